//! The scheduler in process: a fake trainer instead of the engine, the outbox
//! read directly instead of a broker, and tokio's paused clock. The runs go to
//! the blocking pool, so the clock does not auto-advance while one is going.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

use super::*;
use crate::daemon::publisher::Topics;
use crate::engine::error::FailureKind;
use crate::engine::run::{RunStarted, SplitSizes};

/// What the fake trainer does, set by the test.
#[derive(Default)]
struct Control {
    /// Runs allowed to finish; each finishing run takes one.
    releases: AtomicUsize,
    /// The next runs fail with this reason.
    fail: Mutex<Option<String>>,
    /// The next runs panic.
    panic: AtomicBool,
    /// The next runs do not notice a cancel.
    ignore_cancel: AtomicBool,
    /// The requests of the runs so far.
    requests: Mutex<Vec<RunRequest>>,
    /// The cancel flags of the runs so far.
    cancels: Mutex<Vec<CancelFlag>>,
}

impl Control {
    fn release(&self, n: usize) {
        self.releases.fetch_add(n, Ordering::SeqCst);
    }

    fn take_release(&self) -> bool {
        self.releases
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

fn summary(req: &RunRequest, outcome: Outcome, reason: String) -> RunSummary {
    RunSummary {
        run_id: req.run_id.clone(),
        failure: (outcome == Outcome::Failed).then_some(FailureKind::NoData),
        outcome,
        reason,
        epochs: 1,
        steps: 3,
        best: None,
        test: None,
        skipped_files: Vec::new(),
        config: req.config.clone(),
        best_checkpoint: None,
        classes: vec!["a".into(), "b".into()],
        samples: SplitSizes::default(),
        device: "cpu".into(),
        started: String::new(),
        ended: String::new(),
        wall_s: 0.5,
        feature_cache: None,
    }
}

/// A trainer that reports `run_started`, then waits until the test releases
/// it (finished) or the run is cancelled (cancelled); or fails or panics at once.
fn fake(ctl: Arc<Control>) -> Runner {
    Runner::new(Arc::new(move |req, tx, cancel| {
        ctl.requests.lock().unwrap().push(req.clone());
        ctl.cancels.lock().unwrap().push(cancel.clone());
        if ctl.panic.load(Ordering::SeqCst) {
            panic!("a bug in the fake trainer");
        }
        tx.emit(RunEvent::Started(RunStarted {
            run_id: req.run_id.clone(),
            run_dir: req.runs_dir.join(&req.run_id),
            samples: SplitSizes::default(),
            classes: vec!["a".into(), "b".into()],
            skipped_files: Vec::new(),
            trainable_params: 10,
            steps_per_epoch: 3,
            max_epochs: req.train.max_epochs,
            device: "cpu".into(),
            warm_start: "scratch".into(),
            resumed_at_step: None,
            feature_cache: Default::default(),
        }));
        let fail = ctl.fail.lock().unwrap().clone();
        let (outcome, reason) = match fail {
            Some(reason) => (Outcome::Failed, reason),
            None => {
                let t0 = Instant::now();
                loop {
                    if cancel.is_cancelled() && !ctl.ignore_cancel.load(Ordering::SeqCst) {
                        break (Outcome::Cancelled, "cancelled at step 3".to_string());
                    }
                    if ctl.take_release() {
                        break (Outcome::Finished, "reached max_epochs".to_string());
                    }
                    if t0.elapsed() > Duration::from_secs(30) {
                        break (Outcome::Failed, "the test never released the run".into());
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        };
        let s = summary(req, outcome, reason);
        tx.emit(RunEvent::Ended(Box::new(s.clone())));
        s
    }))
    .on_blocking_pool()
}

#[derive(Debug, Clone)]
struct Msg {
    topic: String,
    json: Value,
}

impl Msg {
    fn event(&self) -> &str {
        if self.topic.ends_with("/events") {
            self.json["event"].as_str().unwrap_or("")
        } else {
            ""
        }
    }

    fn state(&self) -> &str {
        if self.topic.ends_with("/status") {
            self.json["state"].as_str().unwrap_or("")
        } else {
            ""
        }
    }
}

struct Harness {
    publisher: Publisher,
    commands: mpsc::Sender<RawCommand>,
    urgent: mpsc::Sender<RawCommand>,
    samples: mpsc::UnboundedSender<u64>,
    probes: mpsc::Sender<oneshot::Sender<()>>,
    activity: watch::Receiver<Activity>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    ctl: Arc<Control>,
    /// Every message the scheduler published, in order.
    seen: Vec<Msg>,
    /// Messages before this one were matched by a wait already.
    cursor: usize,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// A scheduler with a fake trainer; `extra` is appended to its config file.
    async fn start(extra: &str) -> Self {
        Self::start_with(extra, 64).await
    }

    /// As [`Harness::start`], with room for `queue` commands waiting.
    async fn start_with(extra: &str, queue: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "[device]\nkind = \"cpu\"\n[mqtt]\ndevice_id = \"d1\"\n[data]\ndir = {:?}\n[output]\ndir = {:?}\n{extra}",
                dir.path().join("data").display().to_string(),
                dir.path().join("out").display().to_string(),
            ),
        )
        .unwrap();
        let (base, settings) = ConfigBase::load(&cfg, Vec::new()).unwrap();
        let publisher = Publisher::new(Topics::new("et", "d1"), "d1", 1000);
        let (activity_tx, activity) = watch::channel(Activity::Idle);
        let ctl = Arc::new(Control::default());
        let scheduler = Scheduler::new(base, settings, Device::Cpu, publisher.clone(), activity_tx)
            .with_runner(fake(ctl.clone()));
        let (commands, commands_rx) = mpsc::channel(queue);
        let (urgent, urgent_rx) = mpsc::channel(commands::URGENT_QUEUE);
        let (samples, samples_rx) = mpsc::unbounded_channel();
        let (probes, probes_rx) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(scheduler.run(
            Inputs {
                commands: commands_rx,
                urgent: urgent_rx,
                new_samples: samples_rx,
                probes: probes_rx,
            },
            shutdown.clone(),
        ));
        Self {
            publisher,
            commands,
            urgent,
            samples,
            probes,
            activity,
            shutdown,
            task,
            ctl,
            seen: Vec::new(),
            cursor: 0,
            _dir: dir,
        }
    }

    /// Sends a command on its channel, as the MQTT driver routes it.
    fn send(&self, name: &str, payload: &str) {
        self.try_send(name, payload).unwrap();
    }

    fn try_send(
        &self,
        name: &str,
        payload: &str,
    ) -> Result<(), mpsc::error::TrySendError<RawCommand>> {
        let queue = if commands::is_urgent(name) {
            &self.urgent
        } else {
            &self.commands
        };
        queue.try_send(RawCommand {
            name: name.into(),
            payload: payload.as_bytes().to_vec(),
            retained: false,
        })
    }

    /// Commands waiting in the train channel.
    fn waiting(&self) -> usize {
        self.commands.max_capacity() - self.commands.capacity()
    }

    /// Takes everything out of the outbox, as a broker acknowledging it would.
    fn drain(&mut self) {
        let msgs = self.publisher.with_outbox(|o| {
            o.on_connect();
            let mut out = Vec::new();
            while let Some(m) = o.next_to_send() {
                o.on_outgoing(1);
                o.on_ack(1);
                out.push(m);
            }
            out
        });
        for m in msgs {
            let json: Value = serde_json::from_slice(&m.payload).unwrap();
            assert!(
                json["ts"].as_str().is_some_and(|t| t.ends_with('Z')),
                "{json}"
            );
            self.seen.push(Msg {
                topic: m.topic,
                json,
            });
        }
    }

    /// Waits for the next message (after the last one waited for) that matches.
    async fn wait(&mut self, what: &str, pred: impl Fn(&Msg) -> bool) -> Msg {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        loop {
            self.drain();
            if let Some(i) = self.seen[self.cursor..].iter().position(&pred) {
                let i = self.cursor + i;
                self.cursor = i + 1;
                return self.seen[i].clone();
            }
            let publisher = self.publisher.clone();
            if tokio::time::timeout_at(deadline, publisher.pushed())
                .await
                .is_err()
            {
                panic!(
                    "no {what}; published since the last match: {:#?}",
                    &self.seen[self.cursor..]
                );
            }
        }
    }

    async fn event(&mut self, name: &str) -> Value {
        self.wait(name, |m| m.event() == name).await.json
    }

    async fn status(&mut self, state: &str) -> Value {
        self.wait(&format!("status {state}"), |m| m.state() == state)
            .await
            .json
    }

    /// Lets the scheduler handle everything sent to it so far (without the
    /// clock: it stands still while a run holds the blocking pool).
    async fn settle(&mut self) {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        self.drain();
    }

    fn count(&self, names: &[&str]) -> usize {
        self.seen
            .iter()
            .filter(|m| names.contains(&m.event()))
            .count()
    }

    /// Shuts the scheduler down and waits for its last message.
    async fn finish(mut self) -> Self {
        self.shutdown.cancel();
        (&mut self.task).await.unwrap();
        self.drain();
        assert_eq!(self.seen.last().map(Msg::state), Some("offline"));
        self
    }
}

const RUN_ENDS: &[&str] = &["run_finished", "run_failed", "run_cancelled"];

#[tokio::test(start_paused = true)]
async fn a_train_request_during_a_run_is_queued_and_coalesced() {
    let mut h = Harness::start("").await;
    h.send("train", r#"{"request_id": "a"}"#);
    let training = h.status("training").await;
    let started = h.event("run_started").await;
    assert_eq!(started["triggers"], json!(["command"]));
    assert_eq!(started["request_ids"], json!(["a"]));
    let first = started["run_id"].clone();
    assert_eq!(training["run_id"], first);

    h.send(
        "train",
        r#"{"request_id": "b", "overrides": {"train.max_epochs": 3}}"#,
    );
    h.send("train", r#"{"request_id": 7}"#);
    let q = h.event("run_queued").await;
    assert_eq!(
        q,
        json!({"event": "run_queued", "request_id": "b", "trigger": "command",
               "behind_run_id": first, "coalesced": false, "ts": q["ts"]})
    );
    let status = h.wait("queued status", |m| m.state() == "training").await;
    assert_eq!(status.json["queued"], 1);
    let q = h.event("run_queued").await;
    assert_eq!(q["request_id"], 7);
    assert_eq!(q["coalesced"], true);
    // The status said so once: a coalesced request changes nothing in it.
    h.settle().await;
    assert!(!h.seen[h.cursor..].iter().any(|m| m.state() == "training"));

    h.ctl.release(1);
    let done = h.event("run_finished").await;
    assert_eq!(done["run_id"], first);
    assert_eq!(done["request_ids"], json!(["a"]));
    let second = h.event("run_started").await;
    assert_ne!(second["run_id"], first);
    assert_eq!(second["triggers"], json!(["command"]));
    assert_eq!(second["request_ids"], json!(["b", 7]));
    // The queued request's overrides reached the run.
    assert_eq!(second["max_epochs"], 3);
    assert_eq!(h.ctl.requests.lock().unwrap()[1].train.max_epochs, 3);

    h.ctl.release(1);
    let done = h.event("run_finished").await;
    assert_eq!(done["request_ids"], json!(["b", 7]));
    let idle = h.status("idle").await;
    assert_eq!(idle["queued"], 0);
    let h = h.finish().await;
    assert_eq!(h.count(&["run_started"]), 2);
}

#[tokio::test(start_paused = true)]
async fn cmd_stop_cancels_the_run_and_says_who_stopped_it() {
    let mut h = Harness::start("").await;
    h.send("stop", r#"{"request_id": "s0"}"#);
    let r = h.event("command_rejected").await;
    assert_eq!(r["command"], "stop");
    assert_eq!(r["request_id"], "s0");
    assert_eq!(r["reason"], "no run in progress");

    h.send("train", "{}");
    let started = h.event("run_started").await;
    h.send("stop", r#"{"request_id": "s1"}"#);
    let c = h.event("run_cancelled").await;
    assert_eq!(c["run_id"], started["run_id"]);
    assert_eq!(c["outcome"], "cancelled");
    assert_eq!(c["stopped_by"], "cmd/stop");
    assert_eq!(c["stop_request_id"], "s1");
    assert_eq!(c["reason"], "cancelled at step 3: stopped by cmd/stop");
    h.status("idle").await;
    let h = h.finish().await;
    assert_eq!(h.count(RUN_ENDS), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failing_run_yields_one_run_failed_with_its_kind() {
    let mut h = Harness::start("").await;
    *h.ctl.fail.lock().unwrap() = Some("the training split is empty (0 samples in all)".into());
    h.send("train", r#"{"request_id": "f1"}"#);
    let f = h.event("run_failed").await;
    assert_eq!(f["kind"], "no_data");
    assert_eq!(f["outcome"], "failed");
    assert_eq!(f["triggers"], json!(["command"]));
    assert_eq!(f["request_ids"], json!(["f1"]));
    h.status("idle").await;
    assert_eq!(h.count(RUN_ENDS), 1);

    // A crashed training thread: the same event, the same shape.
    *h.ctl.fail.lock().unwrap() = None;
    h.ctl.panic.store(true, Ordering::SeqCst);
    h.send("train", r#"{"request_id": "f2"}"#);
    let crash = h.event("run_failed").await;
    assert_eq!(crash["kind"], "internal");
    assert_eq!(crash["request_ids"], json!(["f2"]));
    assert!(crash["reason"]
        .as_str()
        .unwrap()
        .contains("the training thread crashed: a bug in the fake trainer"));
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&f), keys(&crash));
    h.status("idle").await;
    let h = h.finish().await;
    assert_eq!(h.count(RUN_ENDS), 2);
}

#[tokio::test(start_paused = true)]
async fn new_data_starts_a_run_once_min_new_samples_arrived() {
    let mut h = Harness::start("[retrain]\nmin_new_samples = 10\n").await;
    h.samples.send(4).unwrap();
    h.samples.send(5).unwrap();
    h.settle().await;
    assert_eq!(h.count(&["run_started"]), 0, "{:#?}", h.seen);

    h.samples.send(1).unwrap();
    let started = h.event("run_started").await;
    assert_eq!(started["triggers"], json!(["new_data"]));
    assert_eq!(started["request_ids"], json!([]));

    // More data during the run queues one run, however much arrives.
    h.samples.send(10).unwrap();
    h.samples.send(10).unwrap();
    let q = h.event("run_queued").await;
    assert_eq!(q["trigger"], "new_data");
    assert_eq!(q["request_id"], Value::Null);
    h.settle().await;
    assert_eq!(h.count(&["run_queued"]), 1);

    h.ctl.release(2);
    h.event("run_finished").await;
    let next = h.event("run_started").await;
    assert_eq!(next["triggers"], json!(["new_data"]));
    h.event("run_finished").await;
    h.status("idle").await;
    let h = h.finish().await;
    assert_eq!(h.count(&["run_started"]), 2);
}

#[tokio::test(start_paused = true)]
async fn shutdown_cancels_the_run_and_drops_the_queue() {
    let mut h = Harness::start("").await;
    h.send("train", r#"{"request_id": "x"}"#);
    let started = h.event("run_started").await;
    h.send("train", r#"{"request_id": "y"}"#);
    h.event("run_queued").await;

    h.shutdown.cancel();
    let c = h.event("run_cancelled").await;
    assert_eq!(c["run_id"], started["run_id"]);
    assert_eq!(c["stopped_by"], "shutdown");
    assert_eq!(c["stop_request_id"], Value::Null);
    assert_eq!(
        c["reason"],
        "cancelled at step 3: the daemon is shutting down"
    );
    let h = h.finish().await;
    // The queued request is dropped, not started.
    assert_eq!(h.count(&["run_started"]), 1);
}

#[tokio::test(start_paused = true)]
async fn a_run_that_does_not_end_is_left_behind_after_its_stop_budget() {
    let mut h = Harness::start("").await;
    h.ctl.ignore_cancel.store(true, Ordering::SeqCst);
    h.send("train", "{}");
    h.event("run_started").await;

    h.shutdown.cancel();
    h.activity
        .wait_for(|a| matches!(a, Activity::ShuttingDown))
        .await
        .unwrap();
    // The run holds the blocking pool, so the clock only moves when told to.
    tokio::time::advance(STOP_BUDGET.run - Duration::from_secs(1)).await;
    h.settle().await;
    assert!(!h.task.is_finished());
    tokio::time::advance(Duration::from_secs(1)).await;
    let h = h.finish().await;
    assert_eq!(h.count(RUN_ENDS), 0);
    // Let the fake run end before the runtime waits for its blocking pool.
    h.ctl.release(1);
}

/// Issue 18 break 4: a flood of valid `cmd/train` during a run. The watchdog
/// probe is answered before the flood is worked off, and so are a `cmd/stop`
/// and a `cmd/status` sent after it (their own channel); the queued overrides
/// stay one per key (the last value wins) and the coalesced request ids capped.
#[tokio::test(start_paused = true)]
async fn a_command_flood_neither_starves_the_watchdog_nor_grows_the_queue() {
    const FLOOD: usize = 10_000;
    let mut h = Harness::start_with("", FLOOD + 8).await;
    h.send("train", r#"{"request_id": "first"}"#);
    let started = h.event("run_started").await;
    for i in 0..FLOOD {
        h.send(
            "train",
            &format!(
                r#"{{"request_id": {i}, "overrides": {{"train.max_epochs": {}, "train.lr": 0.0{}}}}}"#,
                i % 50 + 1,
                i % 9 + 1
            ),
        );
    }
    h.send("stop", r#"{"request_id": "halt"}"#);
    h.send("status", r#"{"request_id": "how"}"#);
    let t0 = Instant::now();
    let (tx, rx) = oneshot::channel();
    h.probes.try_send(tx).unwrap();
    rx.await.unwrap();
    // Answered at once, not after the flood was worked off; so was the stop.
    let waiting = h.waiting();
    assert!(waiting > FLOOD - 500, "{waiting} commands still waiting");
    assert!(h.ctl.cancels.lock().unwrap()[0].is_cancelled());
    let st = h
        .wait("status answer", |m| {
            m.topic.ends_with("/status") && m.json["request_id"] == "how"
        })
        .await;
    assert_eq!(st.state(), "training");

    let c = h.event("run_cancelled").await;
    assert_eq!(c["run_id"], started["run_id"]);
    assert_eq!(c["stop_request_id"], "halt");
    // The flood is worked off: it queues behind the runs it starts.
    while h.waiting() > 0 {
        h.settle().await;
    }
    let flood_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "{FLOOD} queued cmd/train worked off in {flood_s:.2} s ({:.0} us each)",
        flood_s * 1e6 / FLOOD as f64
    );
    // Every run may finish now; the last one holds the coalesced rest.
    h.ctl.release(FLOOD);
    h.activity
        .wait_for(|a| matches!(a, Activity::Idle))
        .await
        .unwrap();
    h.drain();
    let last = h
        .seen
        .iter()
        .rev()
        .find(|m| m.event() == "run_started")
        .unwrap()
        .json
        .clone();
    let ids = last["request_ids"].as_array().unwrap();
    assert_eq!(ids.len(), crate::daemon::bounded::MAX_REQUEST_IDS);
    // The last request's values won.
    let n = FLOOD - 1;
    assert_eq!(last["max_epochs"], (n % 50 + 1) as u64);
    let req = h.ctl.requests.lock().unwrap().last().unwrap().clone();
    assert_eq!(req.train.max_epochs, (n % 50 + 1) as u64);
    assert!(h.ctl.requests.lock().unwrap().len() <= 3);
    h.finish().await;
}

/// Issue 18: behind a full train channel, `cmd/stop` and `cmd/status` were
/// answered "busy". They have their own channel now: the stop cancels the run
/// and the status is answered with its request id while the train requests
/// still wait.
#[tokio::test(start_paused = true)]
async fn stop_and_status_are_served_past_a_full_train_queue() {
    let mut h = Harness::start_with("", 8).await;
    h.send("train", r#"{"request_id": "run"}"#);
    let started = h.event("run_started").await;
    let mut sent = 0;
    while h
        .try_send("train", &format!(r#"{{"request_id": {sent}}}"#))
        .is_ok()
    {
        sent += 1;
    }
    assert_eq!(sent, 8, "the train channel is full");
    h.send("status", r#"{"request_id": "s-1"}"#);
    h.send("stop", r#"{"request_id": "x-1"}"#);
    let (tx, rx) = oneshot::channel();
    h.probes.try_send(tx).unwrap();
    rx.await.unwrap();
    let st = h
        .wait("status answer", |m| {
            m.topic.ends_with("/status") && m.json["request_id"] == "s-1"
        })
        .await;
    assert_eq!(st.state(), "training");
    assert_eq!(st.json["run_id"], started["run_id"]);
    let c = h.event("run_cancelled").await;
    assert_eq!(c["run_id"], started["run_id"]);
    assert_eq!(c["stop_request_id"], "x-1");
    assert_eq!(c["stopped_by"], "cmd/stop");
    // The waiting requests are served after it, coalesced into one run.
    let next = h.event("run_started").await;
    assert!(!next["request_ids"].as_array().unwrap().is_empty());
    h.ctl.release(2);
    h.activity
        .wait_for(|a| matches!(a, Activity::Idle))
        .await
        .unwrap();
    let h = h.finish().await;
    assert_eq!(h.count(&["command_rejected"]), 0, "{:#?}", h.seen);
}

/// A `cmd/train` and the `cmd/stop` right behind it: the stop waits for the
/// run it was meant for, although it travels on the faster channel.
#[tokio::test(start_paused = true)]
async fn a_stop_right_after_a_train_stops_that_run() {
    let mut h = Harness::start("").await;
    h.send("train", r#"{"request_id": "t"}"#);
    h.send("stop", r#"{"request_id": "s"}"#);
    let c = h.event("run_cancelled").await;
    assert_eq!(c["request_ids"], json!(["t"]));
    assert_eq!(c["stop_request_id"], "s");
    h.status("idle").await;
    let h = h.finish().await;
    assert_eq!(h.count(&["command_rejected"]), 0, "{:#?}", h.seen);
}

#[test]
fn queued_overrides_merge_by_key_with_aliases() {
    let ov = |k: &str, v: i64| Override {
        key: k.into(),
        value: toml::Value::Integer(v),
        origin: "t".into(),
    };
    let mut q = Queued::default();
    for i in 0..1000 {
        q.add(
            vec![ov("train.max_epochs", i), ov("train.lr", i)],
            Some(Value::from(i)),
        );
    }
    q.add(vec![ov("train.optimizer.lr", 7)], None);
    assert_eq!(q.overrides.len(), 2);
    assert_eq!(q.overrides[0].value, toml::Value::Integer(999));
    assert_eq!(q.overrides[1].key, "train.optimizer.lr");
    assert_eq!(q.overrides[1].value, toml::Value::Integer(7));
    assert_eq!(q.request_ids.len(), crate::daemon::bounded::MAX_REQUEST_IDS);
    assert_eq!(q.more_request_ids, 1000 - q.request_ids.len() as u64);
}
