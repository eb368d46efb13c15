//! The scheduler: the daemon's main loop. One run at a time, each on its own OS
//! thread with its own cancel flag; train requests that arrive during a run are
//! queued and coalesce into one. It turns the engine's [`RunEvent`]s into
//! `metrics` and `events` messages, promotes the run's best model, keeps the
//! `status` current, and answers commands. What trains a run is injected
//! ([`Runner`]): the engine, or a fake in the in-process tests.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::Device;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::commands::{self, Command, ConfigBase};
use super::messages::{Event, FailureKind, RunOrigin, State, StopCause, Storage, Trigger};
use super::model_recovery;
use super::mqtt::RawCommand;
use super::publisher::Publisher;
use super::recovery::{self, Interrupted};
use super::retention::{self, Eviction, Footprint, Pruned, ReplayCounts};
use super::shutdown::STOP_BUDGET;
use super::systemd::Activity;
use crate::config::run::Starter;
use crate::config::{Override, Settings};
use crate::engine::promote::{self, Promotion};
use crate::engine::run::{
    new_run_id, CancelFlag, EventSink, Outcome, RunEvent, RunRequest, RunSummary,
};
use crate::engine::trainer;

/// Trains one run to its end and returns its summary, reporting on the channel
/// as it goes (its last event is [`RunEvent::Ended`]): the engine's
/// [`trainer::run`], or a fake in tests.
pub type TrainFn =
    Arc<dyn Fn(&RunRequest, &dyn EventSink, &CancelFlag) -> RunSummary + Send + Sync>;

/// What trains the scheduler's runs, and on which thread.
#[derive(Clone)]
pub struct Runner {
    train: TrainFn,
    blocking_pool: bool,
}

impl Runner {
    /// The engine's trainer, one OS thread per run.
    pub fn engine() -> Self {
        Self::new(Arc::new(trainer::run))
    }

    /// `train` instead of the engine, one OS thread per run.
    pub fn new(train: TrainFn) -> Self {
        Self {
            train,
            blocking_pool: false,
        }
    }

    /// Runs on tokio's blocking pool instead of threads of their own. For tests
    /// with paused time: tokio does not auto-advance its clock while a blocking
    /// task runs, so a run in progress is never mistaken for a stuck one.
    pub fn on_blocking_pool(mut self) -> Self {
        self.blocking_pool = true;
        self
    }
}

/// What the run thread reports.
enum RunMsg {
    Event(RunEvent),
    Promotion(Result<Promotion, String>),
    /// The training thread panicked (a bug); the run counts as failed.
    Crashed(String),
    /// Retention's work before or after the run (evictions, pruning, the
    /// footprint, and before a new run what it trains on).
    Housekeeping(Box<Housekeeping>),
    /// The disk guard refused the run before it started.
    Refused(String),
    /// The thread is done; nothing more comes from this run.
    Done,
}

/// What retention did around a run (see [`retention`]).
struct Housekeeping {
    eviction: Option<Eviction>,
    pruned: Option<Pruned>,
    replay: Option<ReplayCounts>,
    footprint: Footprint,
}

struct ActiveRun {
    run_id: String,
    cancel: CancelFlag,
    /// The run's own thread (none on the blocking pool).
    thread: Option<JoinHandle<()>>,
    /// What asked for the run, and who stopped it once a stop was asked for.
    origin: RunOrigin,
    max_epochs: u64,
    ended: bool,
}

#[derive(Default)]
struct Queued {
    /// Merged by key (aliases resolved), the later value winning: at most one
    /// per config key, however many requests coalesced.
    overrides: Vec<Override>,
    /// The first [`MAX_REQUEST_IDS`](super::bounded::MAX_REQUEST_IDS) request ids.
    request_ids: Vec<Value>,
    /// Request ids past the cap, counted only.
    more_request_ids: u64,
    triggers: BTreeSet<Trigger>,
}

/// `base` with `later` on top, one override per key, the later value winning.
fn merge_overrides(base: &[Override], later: Vec<Override>) -> Vec<Override> {
    let mut out = base.to_vec();
    for ov in later {
        let key = crate::config::resolve_alias(&ov.key);
        match out
            .iter_mut()
            .find(|o| crate::config::resolve_alias(&o.key) == key)
        {
            Some(slot) => *slot = ov,
            None => out.push(ov),
        }
    }
    out
}

impl Queued {
    fn add(&mut self, overrides: Vec<Override>, request_id: Option<Value>) {
        self.overrides = merge_overrides(&self.overrides, overrides);
        if let Some(id) = request_id {
            if self.request_ids.len() < super::bounded::MAX_REQUEST_IDS {
                self.request_ids.push(id);
            } else {
                self.more_request_ids += 1;
            }
        }
    }

    fn origin(&self) -> RunOrigin {
        RunOrigin {
            triggers: self.triggers.iter().copied().collect(),
            request_ids: self.request_ids.clone(),
            stopped_by: None,
            stop_request_id: None,
            replay: None,
        }
    }
}

/// Where the scheduler's inputs come from.
pub struct Inputs {
    /// Raw commands from the MQTT driver.
    pub commands: mpsc::Receiver<RawCommand>,
    /// `cmd/stop` and `cmd/status`, served before the train requests.
    pub urgent: mpsc::Receiver<RawCommand>,
    /// Sample counts of newly accepted data files, from the watcher.
    pub new_samples: mpsc::UnboundedReceiver<u64>,
    /// Watchdog probes: answered to prove the loop is alive.
    pub probes: mpsc::Receiver<oneshot::Sender<()>>,
}

/// The scheduler's state.
pub struct Scheduler {
    base: ConfigBase,
    settings: Settings,
    device: Device,
    publisher: Publisher,
    activity: watch::Sender<Activity>,
    runner: Runner,
    running: Option<ActiveRun>,
    queued: Option<Queued>,
    new_samples: u64,
    run_tx: mpsc::UnboundedSender<(String, RunMsg)>,
    run_rx: mpsc::UnboundedReceiver<(String, RunMsg)>,
    shutting_down: bool,
    /// Interrupted runs found at start, continued one after the other.
    resumes: VecDeque<Interrupted>,
    /// `storage` in `status`.
    storage: Storage,
}

impl Scheduler {
    /// A scheduler for the daemon's base configuration.
    pub fn new(
        base: ConfigBase,
        settings: Settings,
        device: Device,
        publisher: Publisher,
        activity: watch::Sender<Activity>,
    ) -> Self {
        let (run_tx, run_rx) = mpsc::unbounded_channel();
        Self {
            base,
            settings,
            device,
            publisher,
            activity,
            runner: Runner::engine(),
            running: None,
            queued: None,
            new_samples: 0,
            run_tx,
            run_rx,
            shutting_down: false,
            resumes: VecDeque::new(),
            storage: Storage::default(),
        }
    }

    /// Trains with `runner` instead of the engine.
    pub fn with_runner(mut self, runner: Runner) -> Self {
        self.runner = runner;
        self
    }

    /// Runs until `shutdown` fires, then cancels the run, waits for it to end,
    /// and publishes the final events and the `offline` status.
    pub async fn run(mut self, mut inputs: Inputs, shutdown: CancellationToken) {
        // What a crash or shutdown left behind: runs to continue (temporary
        // files are removed by `serve` before any task starts writing).
        let out = self.settings.output.dir.clone();
        let runs = self.settings.runs_dir();
        let settings = self.settings.clone();
        let (found, repaired, undecided, footprint) = tokio::task::spawn_blocking(move || {
            // A corrupt current model, and a finished run killed before its promotion.
            let repaired = model_recovery::repair_current(&out);
            let current = promote::current_model_run_id(&out);
            let undecided = model_recovery::find_undecided(&runs, current.as_deref());
            let footprint = retention::footprint(&settings);
            (
                recovery::find_interrupted(&runs),
                repaired,
                undecided,
                footprint,
            )
        })
        .await
        .unwrap_or_default();
        self.storage.footprint = footprint;
        let storage = self.storage.clone();
        self.publisher.update_status(|s| s.storage = Some(storage));
        if let Some(r) = repaired {
            self.publisher.event(model_recovery::event(&r));
            let out = self.settings.output.dir.clone();
            let id = tokio::task::spawn_blocking(move || promote::current_model_run_id(&out))
                .await
                .unwrap_or(None);
            self.publisher.update_status(|s| s.current_model = id);
        }
        self.resumes.extend(found);
        // The undecided promotion first (off the loop); interrupted runs follow it.
        if !undecided.is_some_and(|u| self.decide_undecided(u)) {
            self.next_resume();
        }
        if self.settings.retrain.on_start {
            self.request(Trigger::OnStart, Vec::new(), None);
        }
        loop {
            // Watchdog probes before anything else: a flood of commands or of
            // run messages must not starve them (systemd would restart us).
            // Then stop and status, however many train requests wait.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(p) = inputs.probes.recv() => { let _ = p.send(()); }
                Some(cmd) = inputs.urgent.recv() => self.on_urgent(cmd, &mut inputs.commands),
                Some((id, msg)) = self.run_rx.recv() => self.on_run_msg(&id, msg),
                Some(cmd) = inputs.commands.recv() => self.on_command(cmd),
                Some(n) = inputs.new_samples.recv() => self.on_new_samples(n),
            }
        }
        self.shutting_down = true;
        self.activity.send_replace(Activity::ShuttingDown);
        if let Some(q) = self.queued.take() {
            tracing::info!(
                requests = q.request_ids.len() as u64 + q.more_request_ids,
                "dropping the queued run: shutting down"
            );
        }
        if let Some(run) = &mut self.running {
            run.origin.stopped_by = Some(StopCause::Shutdown);
            run.cancel.cancel();
        }
        let deadline = tokio::time::Instant::now() + STOP_BUDGET.run;
        while self.running.is_some() {
            tokio::select! {
                Some((id, msg)) = self.run_rx.recv() => self.on_run_msg(&id, msg),
                Some(p) = inputs.probes.recv() => { let _ = p.send(()); }
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::error!("the run did not end in time; leaving it behind");
                    break;
                }
            }
        }
        self.publisher.update_status(|s| {
            s.state = State::Offline;
            s.run_id = None;
            s.queued = 0;
        });
    }

    fn on_new_samples(&mut self, n: u64) {
        self.new_samples += n;
        let threshold = self.settings.retrain.min_new_samples;
        if threshold > 0 && self.new_samples >= threshold {
            let queued_data = self
                .queued
                .as_ref()
                .is_some_and(|q| q.triggers.contains(&Trigger::NewData));
            if !queued_data {
                tracing::info!(
                    new_samples = self.new_samples,
                    threshold,
                    "enough new data: training"
                );
                self.request(Trigger::NewData, Vec::new(), None);
            }
        }
    }

    /// A `cmd/stop` or `cmd/status`, served ahead of the train requests.
    fn on_urgent(&mut self, raw: RawCommand, trains: &mut mpsc::Receiver<RawCommand>) {
        if raw.name == "stop" && self.running.is_none() {
            // A `cmd/train` sent just before this stop may still wait in the
            // other channel: serve what waits there (at most its capacity)
            // until a run starts, so that the stop finds the run it was meant for.
            for _ in 0..trains.max_capacity() {
                let Ok(c) = trains.try_recv() else { break };
                self.on_command(c);
                if self.running.is_some() {
                    break;
                }
            }
        }
        self.on_command(raw);
    }

    fn on_command(&mut self, raw: RawCommand) {
        if self.shutting_down {
            return;
        }
        // The queued overrides hold one value per key, so checking a request
        // against them costs the same however many requests coalesced.
        let queued_overrides: &[Override] = match (&self.running, &self.queued) {
            (Some(_), Some(q)) => &q.overrides,
            _ => &[],
        };
        let base = &self.base;
        let parsed = commands::parse(&raw.name, &raw.payload, raw.retained, |ovs| {
            let all = merge_overrides(queued_overrides, ovs.to_vec());
            base.resolve(&all).map(|_| ()).map_err(|e| {
                if queued_overrides.is_empty() {
                    e.to_string()
                } else {
                    format!("{e} (with the overrides of the queued request)")
                }
            })
        });
        match parsed {
            Err(rej) => {
                tracing::warn!(command = %rej.command, reason = %rej.reason, "command rejected");
                self.publisher.event(rej.to_event());
            }
            Ok(Command::Train {
                overrides,
                request_id,
            }) => {
                tracing::info!(overrides = overrides.len(), "train requested");
                self.request(Trigger::Command, overrides, request_id);
            }
            Ok(Command::Stop { request_id }) => match &mut self.running {
                Some(run) if !run.ended => {
                    tracing::info!(run_id = %run.run_id, "stop requested");
                    run.origin.stopped_by = Some(StopCause::Command);
                    run.origin.stop_request_id = request_id;
                    run.cancel.cancel();
                }
                _ => {
                    let rej = commands::Rejection {
                        command: "stop".into(),
                        request_id,
                        reason: "no run in progress".into(),
                    };
                    self.publisher.event(rej.to_event());
                }
            },
            Ok(Command::Status { request_id }) => {
                // Fleet senders collect one answer per device by request id:
                // a `status` carrying it, and a `status_reported` event.
                if let Some(id) = request_id.clone() {
                    self.publisher.event(Event::StatusReported {
                        request_id: id,
                        status: self.publisher.status_info(),
                    });
                }
                self.publisher.answer_status(request_id);
            }
        }
    }

    /// Starts a run now, or queues it (coalescing with what is queued).
    fn request(&mut self, trigger: Trigger, overrides: Vec<Override>, request_id: Option<Value>) {
        if self.running.is_none() {
            let mut q = Queued {
                triggers: BTreeSet::from([trigger]),
                ..Queued::default()
            };
            q.add(overrides, request_id);
            self.start(q);
            return;
        }
        let coalesced = self.queued.is_some();
        let q = self.queued.get_or_insert_with(Queued::default);
        q.add(overrides, request_id.clone());
        q.triggers.insert(trigger);
        let running = self.running.as_ref().map(|r| r.run_id.clone());
        self.publisher.event(Event::RunQueued {
            request_id,
            trigger,
            behind_run_id: running,
            coalesced,
        });
        if !coalesced {
            // Once per queued run, not per request: a flood of requests must
            // not flood `status` (nor replace a `cmd/status` answer waiting
            // in the outbox).
            self.publisher.update_status(|s| s.queued = 1);
        }
    }

    fn start(&mut self, q: Queued) {
        let origin = q.origin();
        let run_id = new_run_id();
        let prepared = self.base.resolve(&q.overrides).and_then(|s| {
            let warm = s.run_settings().warm_start(Starter::Daemon);
            s.run_request(run_id.clone(), self.device.clone(), warm)
                .map(|r| (s, r))
        });
        let (settings, req) = match prepared {
            Ok(x) => x,
            Err(e) => {
                let reason = e.to_string();
                tracing::error!(%reason, "cannot start a run");
                self.publisher.event(Event::run_failed(
                    &run_id,
                    reason,
                    FailureKind::BadConfig,
                    &origin,
                ));
                return;
            }
        };
        self.launch(settings, req, origin);
    }

    /// Starts the next interrupted run found at start, if any; whether one started.
    fn next_resume(&mut self) -> bool {
        while let Some(r) = self.resumes.pop_front() {
            let origin = RunOrigin {
                triggers: vec![Trigger::Resume],
                ..RunOrigin::default()
            };
            let prepared = r.settings(&self.settings).and_then(|s| {
                let warm = s.run_settings().warm_start(Starter::Daemon);
                s.run_request(r.run_id.clone(), self.device.clone(), warm)
                    .map(|mut req| {
                        req.resume = true;
                        (s, req)
                    })
                    .map_err(|e| e.to_string())
            });
            let (settings, req) = match prepared {
                Ok(x) => x,
                Err(reason) => {
                    tracing::error!(run_id = %r.run_id, %reason, "cannot resume the run");
                    recovery::forget(&r.run_dir);
                    // An unreadable resume state, or settings this version refuses.
                    let kind = match &r.meta {
                        Err(_) => FailureKind::Io,
                        Ok(_) => FailureKind::BadConfig,
                    };
                    self.publisher.event(Event::run_failed(
                        &r.run_id,
                        format!("cannot resume: {reason}"),
                        kind,
                        &origin,
                    ));
                    continue;
                }
            };
            let (step, epoch) = match &r.meta {
                Ok(m) => (m.step, m.next_epoch),
                Err(_) => (0, 0),
            };
            tracing::info!(run_id = %r.run_id, step, cause = ?r.cause, "resuming the run");
            self.publisher.event(Event::RunResumed {
                run_id: r.run_id.clone(),
                step,
                epoch,
                cause: r.cause,
                run_dir: r.run_dir.clone(),
            });
            if self.launch(settings, req, origin) {
                return true;
            }
        }
        false
    }

    /// Starts a prepared run on its own thread; whether it started.
    /// Decides the promotion of a run that finished before a restart, on a
    /// thread of its own that reports like a run (so the loop keeps serving and
    /// no run promotes at the same time); whether it started.
    fn decide_undecided(&mut self, u: model_recovery::Undecided) -> bool {
        let (settings, device) = (self.settings.clone(), self.device.clone());
        let out = self.run_tx.clone();
        let run_id = u.run_id.clone();
        let cancel = CancelFlag::new();
        let run_cancel = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("promote-undecided".into())
            .spawn(move || {
                tracing::info!(run_id = %u.run_id, "deciding the promotion of a run finished before a restart");
                let pr = model_recovery::promote_undecided(&settings, &device, &u, &run_cancel);
                let _ = out.send((u.run_id.clone(), RunMsg::Promotion(pr)));
                let _ = out.send((u.run_id, RunMsg::Done));
            });
        match thread {
            Ok(t) => {
                self.running = Some(ActiveRun {
                    run_id,
                    cancel,
                    thread: Some(t),
                    origin: RunOrigin {
                        triggers: vec![Trigger::Recovery],
                        ..RunOrigin::default()
                    },
                    max_epochs: 0,
                    ended: true,
                });
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the promotion thread");
                false
            }
        }
    }

    fn launch(&mut self, settings: Settings, req: RunRequest, origin: RunOrigin) -> bool {
        let run_id = req.run_id.clone();
        self.new_samples = 0;
        let max_epochs = req.train.max_epochs;
        let cancel = CancelFlag::new();
        let thread = spawn_run(
            req,
            settings,
            cancel.clone(),
            self.run_tx.clone(),
            &self.runner,
        );
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                self.publisher.event(Event::run_failed(
                    &run_id,
                    format!("cannot start the training thread: {e}"),
                    FailureKind::Internal,
                    &origin,
                ));
                return false;
            }
        };
        tracing::info!(%run_id, triggers = ?origin.triggers, "run starting");
        self.running = Some(ActiveRun {
            run_id: run_id.clone(),
            cancel,
            thread,
            origin,
            max_epochs,
            ended: false,
        });
        self.publisher.update_status(|s| {
            s.state = State::Training;
            s.run_id = Some(run_id.clone());
            s.queued = 0;
        });
        self.activity.send_replace(Activity::Training {
            run_id,
            epoch: 0,
            max_epochs,
        });
        true
    }

    fn on_run_msg(&mut self, id: &str, msg: RunMsg) {
        let Some(run) = self.running.as_mut().filter(|r| r.run_id == id) else {
            return;
        };
        let p = &self.publisher;
        match msg {
            RunMsg::Event(RunEvent::Started(s)) => p.event(Event::run_started(&s, &run.origin)),
            RunMsg::Event(RunEvent::EpochStarted { epoch, .. }) => {
                self.activity.send_replace(Activity::Training {
                    run_id: run.run_id.clone(),
                    epoch,
                    max_epochs: run.max_epochs,
                });
            }
            RunMsg::Event(RunEvent::Step { .. }) => {}
            RunMsg::Event(RunEvent::Evaluated(m)) => p.metrics(&m),
            RunMsg::Event(RunEvent::CheckpointSaved(c)) => p.event(Event::checkpoint_saved(&c)),
            RunMsg::Event(RunEvent::EarlyStopped(e)) => p.event(Event::early_stopped(&e)),
            RunMsg::Event(RunEvent::Ended(summary)) => {
                run.ended = true;
                if summary.outcome == Outcome::Cancelled
                    && run.origin.stopped_by == Some(StopCause::Command)
                {
                    // Stopped on purpose: a restart must not continue it.
                    recovery::forget(&self.settings.runs_dir().join(&run.run_id));
                }
                tracing::info!(run_id = %summary.run_id, outcome = ?summary.outcome, reason = %summary.reason, "run ended");
                p.event(Event::run_ended(&summary, &run.origin));
            }
            RunMsg::Crashed(reason) => {
                run.ended = true;
                tracing::error!(run_id = %run.run_id, %reason, "the training thread crashed");
                p.event(Event::run_failed(
                    &run.run_id,
                    format!("the training thread crashed: {reason}"),
                    FailureKind::Internal,
                    &run.origin,
                ));
            }
            RunMsg::Refused(reason) => {
                run.ended = true;
                tracing::error!(run_id = %run.run_id, %reason, "the run is refused");
                p.event(Event::run_failed(
                    &run.run_id,
                    reason,
                    FailureKind::DiskFull,
                    &run.origin,
                ));
            }
            RunMsg::Housekeeping(h) => {
                if h.replay.is_some() {
                    run.origin.replay = h.replay;
                }
                let run_id = run.run_id.clone();
                self.on_housekeeping(&run_id, *h);
            }
            RunMsg::Promotion(result) => {
                let run_id = run.run_id.clone();
                self.on_promotion(&run_id, result);
            }
            RunMsg::Done => self.on_run_done(),
        }
    }

    fn on_housekeeping(&mut self, run_id: &str, h: Housekeeping) {
        let st = &mut self.storage;
        st.footprint = h.footprint;
        if let Some(ev) = h.eviction {
            st.evicted_files += ev.evicted_files;
            st.evicted_samples += ev.samples;
            self.publisher.event(Event::DataEvicted {
                run_id: run_id.to_string(),
                eviction: ev,
            });
        }
        if let Some(pr) = h
            .pruned
            .filter(|p| !p.runs.is_empty() || !p.errors.is_empty())
        {
            st.pruned_runs += pr.runs.len() as u64;
            self.publisher.event(Event::RunsPruned {
                run_id: run_id.to_string(),
                pruned: pr,
            });
        }
        let storage = self.storage.clone();
        self.publisher.update_status(|s| s.storage = Some(storage));
    }

    fn on_promotion(&mut self, run_id: &str, result: Result<Promotion, String>) {
        match result {
            Ok(pr) => {
                tracing::info!(%run_id, promoted = pr.promoted, reason = %pr.reason, "promotion decided");
                self.publisher.event(Event::promotion(run_id, &pr));
                if pr.promoted {
                    let id = pr.candidate.run_id.clone();
                    self.publisher.update_status(|s| s.current_model = Some(id));
                }
            }
            Err(e) => {
                tracing::error!(%run_id, error = %e, "promotion failed; the current model stays");
                self.publisher.event(Event::promotion_failed(run_id, e));
            }
        }
    }

    fn on_run_done(&mut self) {
        if let Some(mut run) = self.running.take() {
            if let Some(t) = run.thread.take() {
                if t.join().is_err() {
                    tracing::error!(run_id = %run.run_id, "the training thread panicked");
                }
            }
        }
        if self.shutting_down {
            return;
        }
        if self.next_resume() {
            return;
        }
        if let Some(q) = self.queued.take() {
            self.start(q);
            return;
        }
        self.publisher.update_status(|s| {
            s.state = State::Idle;
            s.run_id = None;
            s.queued = 0;
        });
        self.activity.send_replace(Activity::Idle);
        let threshold = self.settings.retrain.min_new_samples;
        if threshold > 0 && self.new_samples >= threshold {
            self.request(Trigger::NewData, Vec::new(), None);
        }
    }
}

/// Starts the run's thread (its own, or one of the blocking pool's): trains
/// with the runner, then promotes, reporting through `out`.
fn spawn_run(
    req: RunRequest,
    settings: Settings,
    cancel: CancelFlag,
    out: mpsc::UnboundedSender<(String, RunMsg)>,
    runner: &Runner,
) -> std::io::Result<Option<JoinHandle<()>>> {
    let run_id = req.run_id.clone();
    let train = runner.train.clone();
    let body = move || run_body(req, settings, cancel, out, train);
    if runner.blocking_pool {
        // Detached: `Done` is its last word, as for a thread of its own.
        drop(tokio::task::spawn_blocking(body));
        return Ok(None);
    }
    std::thread::Builder::new()
        .name(format!("train-{run_id}"))
        .spawn(body)
        .map(Some)
}

/// A run from start to `Done`: trains, then promotes a successful run's best model.
fn run_body(
    req: RunRequest,
    settings: Settings,
    cancel: CancelFlag,
    out: mpsc::UnboundedSender<(String, RunMsg)>,
    train: TrainFn,
) {
    let run_id = req.run_id.clone();
    let send = |m: RunMsg| {
        let _ = out.send((run_id.clone(), m));
    };
    let keep_runs = settings.output.keep_runs;
    let prune = |active: Option<&str>| {
        (keep_runs > 0)
            .then(|| retention::prune_runs(&settings.output.dir, &req.runs_dir, keep_runs, active))
    };
    // Between runs: old run folders, data over the budget, the disk guard.
    let mut trained_on = None;
    if !req.resume {
        let pruned = prune(Some(&run_id));
        let (data, eviction) = retention::prepare_data(&settings);
        let guard = retention::check_disk(&settings);
        send(RunMsg::Housekeeping(Box::new(Housekeeping {
            eviction,
            pruned,
            replay: Some(data.replay),
            footprint: retention::footprint(&settings),
        })));
        if let Err(reason) = guard {
            send(RunMsg::Refused(reason));
            send(RunMsg::Done);
            return;
        }
        trained_on = Some(data.files);
    }
    // The engine's events go straight into the scheduler's channel (tokio's
    // unbounded `send` is synchronous), in order; steps are dropped.
    let sink = |ev: RunEvent| {
        if !matches!(ev, RunEvent::Step { .. }) {
            send(RunMsg::Event(ev));
        }
    };
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| train(&req, &sink, &cancel)));
    let success = matches!(&result, Ok(s) if s.outcome.is_success());
    match result {
        Ok(summary) => {
            if summary.outcome.is_success() {
                if let Some(best) = &summary.best_checkpoint {
                    let pr = settings.run_settings().promote(best, &req.device, &cancel);
                    if let Ok(p) = &pr {
                        let dir = req.runs_dir.join(&req.run_id);
                        model_recovery::record_decision(&dir, p.promoted, &p.reason);
                    }
                    send(RunMsg::Promotion(pr.map_err(|e| e.to_string())));
                }
            }
        }
        Err(panic) => {
            let reason = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            send(RunMsg::Crashed(reason));
        }
    }
    if let Some(files) = trained_on.filter(|_| success) {
        retention::mark_trained(&settings, &files);
    }
    let pruned = prune(None);
    send(RunMsg::Housekeeping(Box::new(Housekeeping {
        eviction: None,
        pruned,
        replay: None,
        footprint: retention::footprint(&settings),
    })));
    send(RunMsg::Done);
}

#[cfg(test)]
mod tests;
