//! The scheduler: the daemon's main loop. One run at a time, each on its own OS
//! thread with its own cancel flag; train requests that arrive during a run are
//! queued and coalesce into one. It turns the engine's [`RunEvent`]s into
//! `metrics` and `events` messages, promotes the run's best model, keeps the
//! `status` current, and answers commands.

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::Device;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::commands::{self, Command, ConfigBase};
use super::model_recovery;
use super::mqtt::RawCommand;
use super::outbox::Kind;
use super::publisher::Publisher;
use super::recovery::{self, Interrupted};
use super::systemd::Activity;
use crate::config::{Override, Settings, WarmStartFrom};
use crate::engine::promote::{self, PromoteRequest, Promotion, CURRENT_FILE};
use crate::engine::run::{
    new_run_id, CancelFlag, Outcome, RunEvent, RunRequest, RunSummary, WarmStart,
};
use crate::engine::trainer;

/// Longest wait at shutdown for the run to finish its batch and end.
const SHUTDOWN_RUN_WAIT: Duration = Duration::from_secs(60);

/// What the run thread reports.
enum RunMsg {
    Event(RunEvent),
    Promotion(Result<Promotion, String>),
    /// The training thread panicked (a bug); the run counts as failed.
    Crashed(String),
    /// The thread is done; nothing more comes from this run.
    Done,
}

struct ActiveRun {
    run_id: String,
    cancel: CancelFlag,
    thread: Option<JoinHandle<()>>,
    triggers: Vec<String>,
    request_ids: Vec<Value>,
    /// `cmd/stop` or `shutdown`, once a stop was asked for.
    stopped_by: Option<&'static str>,
    stop_request_id: Option<Value>,
    max_epochs: u64,
    ended: bool,
}

#[derive(Default)]
struct Queued {
    overrides: Vec<Override>,
    request_ids: Vec<Value>,
    triggers: BTreeSet<String>,
}

/// Where the scheduler's inputs come from.
pub struct Inputs {
    /// Raw commands from the MQTT driver.
    pub commands: mpsc::Receiver<RawCommand>,
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
    running: Option<ActiveRun>,
    queued: Option<Queued>,
    new_samples: u64,
    run_tx: mpsc::UnboundedSender<(String, RunMsg)>,
    run_rx: mpsc::UnboundedReceiver<(String, RunMsg)>,
    shutting_down: bool,
    /// Interrupted runs found at start, continued one after the other.
    resumes: VecDeque<Interrupted>,
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
            running: None,
            queued: None,
            new_samples: 0,
            run_tx,
            run_rx,
            shutting_down: false,
            resumes: VecDeque::new(),
        }
    }

    fn current_path(&self) -> PathBuf {
        self.settings.output.dir.join(CURRENT_FILE)
    }

    /// Runs until `shutdown` fires, then cancels the run, waits for it to end,
    /// and publishes the final events and the `offline` status.
    pub async fn run(mut self, mut inputs: Inputs, shutdown: CancellationToken) {
        // What a crash or shutdown left behind: temporary files, runs to continue.
        let out = self.settings.output.dir.clone();
        let runs = self.settings.runs_dir();
        let (found, repaired, undecided) = tokio::task::spawn_blocking(move || {
            recovery::clean_stale_temps(&out);
            // A corrupt current model, and a finished run killed before its promotion.
            let repaired = model_recovery::repair_current(&out);
            let current = promote::current_model_run_id(&out);
            let undecided = model_recovery::find_undecided(&runs, current.as_deref());
            (recovery::find_interrupted(&runs), repaired, undecided)
        })
        .await
        .unwrap_or_default();
        if let Some(r) = repaired {
            let fields = model_recovery::repair_fields(&r);
            self.publisher
                .event(Kind::Lifecycle, "model_recovered", fields);
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
            self.request("on_start", Vec::new(), None);
        }
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some((id, msg)) = self.run_rx.recv() => self.on_run_msg(&id, msg),
                Some(cmd) = inputs.commands.recv() => self.on_command(cmd),
                Some(n) = inputs.new_samples.recv() => self.on_new_samples(n),
                Some(p) = inputs.probes.recv() => { let _ = p.send(()); }
            }
        }
        self.shutting_down = true;
        self.activity.send_replace(Activity::ShuttingDown);
        if let Some(q) = self.queued.take() {
            tracing::info!(
                requests = q.request_ids.len(),
                "dropping the queued run: shutting down"
            );
        }
        if let Some(run) = &mut self.running {
            run.stopped_by = Some("shutdown");
            run.cancel.cancel();
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_RUN_WAIT;
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
            s.state = "offline";
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
                .is_some_and(|q| q.triggers.contains("new_data"));
            if !queued_data {
                tracing::info!(
                    new_samples = self.new_samples,
                    threshold,
                    "enough new data: training"
                );
                self.request("new_data", Vec::new(), None);
            }
        }
    }

    fn on_command(&mut self, raw: RawCommand) {
        if self.shutting_down {
            return;
        }
        let queued_overrides: Vec<Override> = match (&self.running, &self.queued) {
            (Some(_), Some(q)) => q.overrides.clone(),
            _ => Vec::new(),
        };
        let base = &self.base;
        let parsed = commands::parse(&raw.name, &raw.payload, raw.retained, |ovs| {
            let mut all = queued_overrides.clone();
            all.extend_from_slice(ovs);
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
                self.publisher
                    .event(Kind::Info, "command_rejected", rej.to_fields());
            }
            Ok(Command::Train {
                overrides,
                request_id,
            }) => {
                tracing::info!(overrides = overrides.len(), "train requested");
                self.request("command", overrides, request_id);
            }
            Ok(Command::Stop { request_id }) => match &mut self.running {
                Some(run) if !run.ended => {
                    tracing::info!(run_id = %run.run_id, "stop requested");
                    run.stopped_by = Some("cmd/stop");
                    run.stop_request_id = request_id;
                    run.cancel.cancel();
                }
                _ => {
                    let rej = commands::Rejection {
                        command: "stop".into(),
                        request_id,
                        reason: "no run in progress".into(),
                    };
                    self.publisher
                        .event(Kind::Info, "command_rejected", rej.to_fields());
                }
            },
            Ok(Command::Status { .. }) => self.publisher.publish_status(),
        }
    }

    /// Starts a run now, or queues it (coalescing with what is queued).
    fn request(&mut self, trigger: &str, overrides: Vec<Override>, request_id: Option<Value>) {
        if self.running.is_none() {
            self.start(Queued {
                overrides,
                request_ids: request_id.into_iter().collect(),
                triggers: BTreeSet::from([trigger.to_string()]),
            });
            return;
        }
        let coalesced = self.queued.is_some();
        let q = self.queued.get_or_insert_with(Queued::default);
        q.overrides.extend(overrides);
        q.request_ids.extend(request_id.clone());
        q.triggers.insert(trigger.to_string());
        let running = self.running.as_ref().map(|r| r.run_id.clone());
        self.publisher.event(
            Kind::Info,
            "run_queued",
            json!({
                "request_id": request_id,
                "trigger": trigger,
                "behind_run_id": running,
                "coalesced": coalesced,
            }),
        );
        self.publisher.update_status(|s| s.queued = 1);
    }

    fn warm_start(&self, settings: &Settings) -> WarmStart {
        let init = || match &settings.model.init {
            Some(p) => WarmStart::StateDict(p.clone()),
            None => WarmStart::Scratch,
        };
        match settings.retrain.warm_start {
            WarmStartFrom::Current if self.current_path().is_file() => {
                WarmStart::Checkpoint(self.current_path())
            }
            WarmStartFrom::Current | WarmStartFrom::Init => init(),
            WarmStartFrom::Scratch => WarmStart::Scratch,
        }
    }

    fn start(&mut self, q: Queued) {
        let triggers: Vec<String> = q.triggers.into_iter().collect();
        let run_id = new_run_id();
        let prepared = self
            .base
            .resolve(&q.overrides)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                let warm = self.warm_start(&s);
                s.run_request(run_id.clone(), self.device.clone(), warm)
                    .map(|r| (s, r))
                    .map_err(|e| e.to_string())
            });
        let (settings, req) = match prepared {
            Ok(x) => x,
            Err(reason) => {
                tracing::error!(%reason, "cannot start a run");
                self.publisher.event(
                    Kind::Lifecycle,
                    "run_failed",
                    json!({"run_id": run_id, "outcome": "failed", "reason": reason, "triggers": triggers, "request_ids": q.request_ids}),
                );
                return;
            }
        };
        self.launch(settings, req, triggers, q.request_ids);
    }

    /// Starts the next interrupted run found at start, if any; whether one started.
    fn next_resume(&mut self) -> bool {
        while let Some(r) = self.resumes.pop_front() {
            let prepared = r.settings(&self.settings).and_then(|s| {
                let warm = self.warm_start(&s);
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
                    self.publisher.event(
                        Kind::Lifecycle,
                        "run_failed",
                        json!({"run_id": r.run_id, "outcome": "failed", "reason": format!("cannot resume: {reason}"), "triggers": ["resume"]}),
                    );
                    continue;
                }
            };
            let (step, epoch) = match &r.meta {
                Ok(m) => (m.step, m.next_epoch),
                Err(_) => (0, 0),
            };
            tracing::info!(run_id = %r.run_id, step, cause = r.cause, "resuming the run");
            self.publisher.event(
                Kind::Lifecycle,
                "run_resumed",
                json!({
                    "run_id": r.run_id,
                    "step": step,
                    "epoch": epoch,
                    "cause": r.cause,
                    "run_dir": r.run_dir,
                }),
            );
            if self.launch(settings, req, vec!["resume".to_string()], Vec::new()) {
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
        let thread = std::thread::Builder::new()
            .name("promote-undecided".into())
            .spawn(move || {
                tracing::info!(run_id = %u.run_id, "deciding the promotion of a run finished before a restart");
                let pr = model_recovery::promote_undecided(&settings, &device, &u);
                let _ = out.send((u.run_id.clone(), RunMsg::Promotion(pr)));
                let _ = out.send((u.run_id, RunMsg::Done));
            });
        match thread {
            Ok(t) => {
                self.running = Some(ActiveRun {
                    run_id,
                    cancel: CancelFlag::new(),
                    thread: Some(t),
                    triggers: vec!["recovery".into()],
                    request_ids: Vec::new(),
                    stopped_by: None,
                    stop_request_id: None,
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

    fn launch(
        &mut self,
        settings: Settings,
        req: RunRequest,
        triggers: Vec<String>,
        request_ids: Vec<Value>,
    ) -> bool {
        let run_id = req.run_id.clone();
        self.new_samples = 0;
        let max_epochs = req.train.max_epochs;
        let cancel = CancelFlag::new();
        let thread = spawn_run(req, settings, cancel.clone(), self.run_tx.clone());
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                self.publisher.event(
                    Kind::Lifecycle,
                    "run_failed",
                    json!({"run_id": run_id, "outcome": "failed", "reason": format!("cannot start the training thread: {e}")}),
                );
                return false;
            }
        };
        tracing::info!(%run_id, triggers = ?triggers, "run starting");
        self.running = Some(ActiveRun {
            run_id: run_id.clone(),
            cancel,
            thread: Some(thread),
            triggers,
            request_ids,
            stopped_by: None,
            stop_request_id: None,
            max_epochs,
            ended: false,
        });
        self.publisher.update_status(|s| {
            s.state = "training";
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
            RunMsg::Event(RunEvent::Started(s)) => {
                p.event(
                    Kind::Lifecycle,
                    "run_started",
                    json!({
                        "run_id": s.run_id,
                        "triggers": run.triggers,
                        "request_ids": run.request_ids,
                        "warm_start": s.warm_start,
                        "device": s.device,
                        "samples": s.samples,
                        "classes": s.classes,
                        "trainable_params": s.trainable_params,
                        "steps_per_epoch": s.steps_per_epoch,
                        "max_epochs": s.max_epochs,
                        "run_dir": s.run_dir,
                        "skipped_files": s.skipped_files,
                    }),
                );
            }
            RunMsg::Event(RunEvent::EpochStarted { epoch, .. }) => {
                self.activity.send_replace(Activity::Training {
                    run_id: run.run_id.clone(),
                    epoch,
                    max_epochs: run.max_epochs,
                });
            }
            RunMsg::Event(RunEvent::Step { .. }) => {}
            RunMsg::Event(RunEvent::Evaluated(m)) => p.metrics(&m),
            RunMsg::Event(RunEvent::CheckpointSaved(c)) => {
                p.event(Kind::Lifecycle, "checkpoint_saved", json!(c));
            }
            RunMsg::Event(RunEvent::EarlyStopped(e)) => {
                p.event(Kind::Lifecycle, "early_stopped", json!(e));
            }
            RunMsg::Event(RunEvent::Ended(summary)) => {
                run.ended = true;
                if summary.outcome == Outcome::Cancelled && run.stopped_by == Some("cmd/stop") {
                    // Stopped on purpose: a restart must not continue it.
                    recovery::forget(&self.settings.runs_dir().join(&run.run_id));
                }
                let (name, fields) = ended_event(&summary, run);
                tracing::info!(run_id = %summary.run_id, outcome = ?summary.outcome, reason = %summary.reason, "run ended");
                p.event(Kind::Lifecycle, name, fields);
            }
            RunMsg::Crashed(reason) => {
                run.ended = true;
                tracing::error!(run_id = %run.run_id, %reason, "the training thread crashed");
                p.event(
                    Kind::Lifecycle,
                    "run_failed",
                    json!({"run_id": run.run_id, "outcome": "failed", "reason": format!("the training thread crashed: {reason}"), "request_ids": run.request_ids}),
                );
            }
            RunMsg::Promotion(result) => {
                let run_id = run.run_id.clone();
                self.on_promotion(&run_id, result);
            }
            RunMsg::Done => self.on_run_done(),
        }
    }

    fn on_promotion(&mut self, run_id: &str, result: Result<Promotion, String>) {
        match result {
            Ok(pr) => {
                let name = if pr.promoted {
                    "model_promoted"
                } else {
                    "model_kept"
                };
                tracing::info!(%run_id, promoted = pr.promoted, reason = %pr.reason, "promotion decided");
                self.publisher.event(
                    Kind::Lifecycle,
                    name,
                    json!({
                        "run_id": run_id,
                        "metric": pr.metric.name(),
                        "split": pr.split,
                        "candidate": pr.candidate,
                        "current": pr.current,
                        "reason": pr.reason,
                        "path": pr.current_path,
                        "previous_path": pr.previous_path,
                    }),
                );
                if pr.promoted {
                    let id = pr.candidate.run_id.clone();
                    self.publisher.update_status(|s| s.current_model = Some(id));
                }
            }
            Err(e) => {
                tracing::error!(%run_id, error = %e, "promotion failed; the current model stays");
                self.publisher.event(
                    Kind::Lifecycle,
                    "model_kept",
                    json!({"run_id": run_id, "reason": format!("promotion failed: {e}"), "error": e}),
                );
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
            s.state = "idle";
            s.run_id = None;
            s.queued = 0;
        });
        self.activity.send_replace(Activity::Idle);
        let threshold = self.settings.retrain.min_new_samples;
        if threshold > 0 && self.new_samples >= threshold {
            self.request("new_data", Vec::new(), None);
        }
    }
}

/// The `run_*` event that ends a run.
fn ended_event(s: &RunSummary, run: &ActiveRun) -> (&'static str, Value) {
    let name = match s.outcome {
        Outcome::Finished | Outcome::EarlyStopped => "run_finished",
        Outcome::Failed => "run_failed",
        Outcome::Cancelled => "run_cancelled",
    };
    let reason = match (run.stopped_by, s.outcome) {
        (Some("shutdown"), Outcome::Cancelled) => {
            format!("{}: the daemon is shutting down", s.reason)
        }
        (Some(by), Outcome::Cancelled) => format!("{}: stopped by {by}", s.reason),
        _ => s.reason.clone(),
    };
    let test = s.test.as_ref().map(|t| {
        json!({"loss": t.loss, "accuracy": t.accuracy, "macro_f1": t.macro_f1, "samples": t.samples})
    });
    let run_dir = s
        .best_checkpoint
        .as_ref()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()));
    (
        name,
        json!({
            "run_id": s.run_id,
            "outcome": s.outcome,
            "reason": reason,
            "epochs": s.epochs,
            "steps": s.steps,
            "best": s.best,
            "test": test,
            "best_checkpoint": s.best_checkpoint,
            "run_dir": run_dir,
            "wall_s": s.wall_s,
            "triggers": run.triggers,
            "request_ids": run.request_ids,
            "stopped_by": run.stopped_by,
            "stop_request_id": run.stop_request_id,
        }),
    )
}

/// Starts the run's OS thread: trains, then promotes, reporting through `out`.
fn spawn_run(
    req: RunRequest,
    settings: Settings,
    cancel: CancelFlag,
    out: mpsc::UnboundedSender<(String, RunMsg)>,
) -> std::io::Result<JoinHandle<()>> {
    let run_id = req.run_id.clone();
    std::thread::Builder::new()
        .name(format!("train-{run_id}"))
        .spawn(move || {
            let send = |m: RunMsg| {
                let _ = out.send((run_id.clone(), m));
            };
            let (tx, rx) = std_mpsc::channel::<RunEvent>();
            // Bridges the engine's std channel into the async world, in order.
            let bridge = {
                let out = out.clone();
                let run_id = run_id.clone();
                std::thread::Builder::new()
                    .name("run-events".into())
                    .spawn(move || {
                        for ev in rx {
                            if matches!(ev, RunEvent::Step { .. }) {
                                continue;
                            }
                            let _ = out.send((run_id.clone(), RunMsg::Event(ev)));
                        }
                    })
            };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                trainer::run(&req, &tx, &cancel)
            }));
            drop(tx);
            if let Ok(b) = bridge {
                let _ = b.join();
            }
            match result {
                Ok(summary) => {
                    if summary.outcome.is_success() {
                        if let Some(best) = &summary.best_checkpoint {
                            let data = settings.data_spec();
                            let pr = promote::promote(&PromoteRequest {
                                candidate: best,
                                output_dir: &settings.output.dir,
                                data: &data,
                                device: &req.device,
                                batch_size: settings.train.batch_size,
                                metric: settings.retrain.promote_metric,
                            });
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
            send(RunMsg::Done);
        })
}
