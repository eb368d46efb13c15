//! Every payload the daemon publishes: the `events` messages as one serde enum
//! ([`Event`]), the retained `status` ([`StatusInfo`]) and the `metrics`. This is
//! the only place outgoing JSON is built, and the Rust mirror of the MQTT part of
//! INTERFACE.md and README's "MQTT topics and payloads": every variant below has a
//! golden-JSON test, so a field cannot change name or type unnoticed. The fields
//! every message shares (`ts`) are added in one place, [`encode`].

use std::path::PathBuf;

use serde::Serialize;
use serde_json::{Map, Value};

use super::outbox::Kind;
use super::retention::{Eviction, Footprint, Pruned, ReplayCounts};
use crate::engine::data::SkippedFile;
use crate::engine::promote::{OnnxFiles, PromoteMetric, Promotion, Score};
use crate::engine::run::{self, now_rfc3339, BestRecord, Metrics, Outcome, RunSummary, SplitSizes};

/// A `request_id` as the sender wrote it: a JSON string or number.
pub type RequestId = Value;

/// What asked for a run (`triggers`, `run_queued.trigger`). Declared in the order
/// of their names, so a sorted set lists them alphabetically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// `cmd/train`.
    Command,
    /// `retrain.min_new_samples` new samples arrived.
    NewData,
    /// `retrain.on_start`.
    OnStart,
    /// A run that finished before a restart gets its promotion decided.
    Recovery,
    /// An interrupted run continued after a restart.
    Resume,
}

/// Who asked a run to stop (`stopped_by` of `run_cancelled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StopCause {
    /// `cmd/stop`: the run is not continued after a restart.
    #[serde(rename = "cmd/stop")]
    Command,
    /// SIGTERM/SIGINT: the run is continued at the next start.
    #[serde(rename = "shutdown")]
    Shutdown,
}

/// Why a run is continued after a restart (`run_resumed.cause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumeCause {
    /// The daemon died mid-run (no `summary.json`).
    Interrupted,
    /// A daemon shutdown cancelled it (summary outcome `cancelled`, resume state kept).
    Shutdown,
}

/// The daemon's state in `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    #[default]
    Idle,
    Training,
    /// Published at shutdown, and by the broker as the last will.
    Offline,
}

/// Why a run failed, for machines (`run_failed.kind`): the engine's kinds.
pub use crate::engine::error::FailureKind;

/// The kind of a run that ended `failed`: the engine's typed failure, or
/// `internal` for a failed summary that carries none (a bug).
pub fn failure_kind(summary: &RunSummary) -> FailureKind {
    summary.failure.unwrap_or(FailureKind::Internal)
}

/// The end of a run: the body of `run_finished`, `run_failed` and `run_cancelled`.
/// A run that could not even start has zeros and nulls where results would be.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunEnd {
    pub run_id: String,
    pub outcome: Outcome,
    pub reason: String,
    /// Epochs started (the last one may be partial).
    pub epochs: u64,
    pub steps: u64,
    pub best: Option<BestRecord>,
    pub test: Option<TestScore>,
    pub best_checkpoint: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub wall_s: f64,
    pub triggers: Vec<Trigger>,
    pub request_ids: Vec<RequestId>,
    pub stopped_by: Option<StopCause>,
    pub stop_request_id: Option<RequestId>,
}

/// The best model's test-split results in `run_*` events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TestScore {
    pub loss: f64,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub samples: u64,
}

/// What asked for a run and how it was stopped, as the scheduler knows it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunOrigin {
    pub triggers: Vec<Trigger>,
    pub request_ids: Vec<RequestId>,
    pub stopped_by: Option<StopCause>,
    pub stop_request_id: Option<RequestId>,
    /// New and replayed data of the run, when the daemon counted them (ext).
    pub replay: Option<ReplayCounts>,
}

impl RunEnd {
    /// A run the engine could not report on: it never started, or its thread crashed.
    pub fn without_summary(run_id: &str, reason: String, origin: &RunOrigin) -> Self {
        Self {
            run_id: run_id.to_string(),
            outcome: Outcome::Failed,
            reason,
            epochs: 0,
            steps: 0,
            best: None,
            test: None,
            best_checkpoint: None,
            run_dir: None,
            wall_s: 0.0,
            triggers: origin.triggers.clone(),
            request_ids: origin.request_ids.clone(),
            stopped_by: origin.stopped_by,
            stop_request_id: origin.stop_request_id.clone(),
        }
    }

    /// The engine's summary of a run, with what asked for it.
    pub fn of(s: &RunSummary, origin: &RunOrigin) -> Self {
        let reason = match (origin.stopped_by, s.outcome) {
            (Some(StopCause::Shutdown), Outcome::Cancelled) => {
                format!("{}: the daemon is shutting down", s.reason)
            }
            (Some(StopCause::Command), Outcome::Cancelled) => {
                format!("{}: stopped by cmd/stop", s.reason)
            }
            _ => s.reason.clone(),
        };
        Self {
            run_id: s.run_id.clone(),
            outcome: s.outcome,
            reason,
            epochs: s.epochs,
            steps: s.steps,
            best: s.best.clone(),
            test: s.test.as_ref().map(|t| TestScore {
                loss: t.loss,
                accuracy: t.accuracy,
                macro_f1: t.macro_f1,
                samples: t.samples,
            }),
            best_checkpoint: s.best_checkpoint.clone(),
            run_dir: s
                .best_checkpoint
                .as_ref()
                .and_then(|p| p.parent().map(|d| d.to_path_buf())),
            wall_s: s.wall_s,
            triggers: origin.triggers.clone(),
            request_ids: origin.request_ids.clone(),
            stopped_by: origin.stopped_by,
            stop_request_id: origin.stop_request_id.clone(),
        }
    }
}

/// The body of `model_promoted` and `model_kept`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromotionDecision {
    pub run_id: String,
    pub metric: PromoteMetric,
    /// The split both models were scored on.
    pub split: String,
    pub candidate: Score,
    /// `null` for the first model, or when the current one cannot be scored.
    pub current: Option<Score>,
    pub reason: String,
    /// `current.safetensors`.
    pub path: PathBuf,
    pub previous_path: Option<PathBuf>,
    /// With `output.export_onnx`: `current.onnx` and `current.labels.txt`
    /// (`path`, `sha256`, `labels_path`, `labels_sha256`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onnx: Option<OnnxFiles>,
    /// With `output.export_onnx`: why the export failed (the promotion stands).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onnx_error: Option<String>,
}

/// One message on the `events` topic: `{"event": NAME, "ts", ...fields}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Data loaded, model built: the run trains.
    RunStarted {
        run_id: String,
        triggers: Vec<Trigger>,
        request_ids: Vec<RequestId>,
        warm_start: String,
        device: String,
        samples: SplitSizes,
        classes: Vec<String>,
        trainable_params: usize,
        steps_per_epoch: u64,
        max_epochs: u64,
        run_dir: PathBuf,
        skipped_files: Vec<SkippedFile>,
        /// New files and the replayed ones kept from earlier runs (ext; absent
        /// for a resumed run).
        #[serde(skip_serializing_if = "Option::is_none")]
        replay: Option<ReplayCounts>,
        /// Whether the run trains on cached frozen features (ext).
        feature_cache: run::FeatureCacheReport,
    },
    /// A new best model was written.
    CheckpointSaved {
        run_id: String,
        path: PathBuf,
        epoch: u64,
        step: u64,
        val_loss: f64,
        val_acc: f64,
    },
    /// Validation stopped improving; the run stops.
    EarlyStopped {
        run_id: String,
        epoch: u64,
        step: u64,
        reason: String,
        monitor: String,
        best_value: f64,
    },
    /// The run ended `finished` or `early_stopped`.
    RunFinished(RunEnd),
    /// The run failed, at launch or while training; one shape in every case.
    RunFailed {
        #[serde(flatten)]
        end: RunEnd,
        kind: FailureKind,
    },
    /// The run was stopped (`stopped_by`).
    RunCancelled(RunEnd),
    /// A train request arrived during a run (ext).
    RunQueued {
        request_id: Option<RequestId>,
        trigger: Trigger,
        behind_run_id: Option<String>,
        coalesced: bool,
    },
    /// An interrupted run is continued after a restart (ext).
    RunResumed {
        run_id: String,
        step: u64,
        epoch: u64,
        cause: ResumeCause,
        run_dir: PathBuf,
    },
    /// The run's best model replaced `current.safetensors`.
    ModelPromoted(PromotionDecision),
    /// The current model stays: the candidate was worse.
    ModelKept(PromotionDecision),
    /// The current model stays: the promotion itself failed. Published as
    /// `model_kept` with `reason` and `error` instead of the scores.
    #[serde(rename = "model_kept")]
    PromotionFailed {
        run_id: String,
        reason: String,
        error: String,
    },
    /// A new data file passed its checks.
    DataAccepted { file: String, samples: usize },
    /// A new data file was refused and quarantined.
    DataRejected {
        file: String,
        reason: String,
        moved_to: Option<String>,
        move_error: Option<String>,
    },
    /// At start, `current.safetensors` did not load: it was moved aside and
    /// `previous.safetensors` restored (`restored_from`), or no model is in service.
    ModelRecovered {
        reason: String,
        moved_to: Option<PathBuf>,
        restored_from: Option<&'static str>,
        action: &'static str,
    },
    /// A command that cannot be honoured. `command` is null when the message
    /// was dropped before its topic could be read.
    CommandRejected {
        command: Option<String>,
        request_id: Option<RequestId>,
        reason: String,
        /// Only on the summary of a flood: how many rejections in the last
        /// second were not published one by one (ext).
        #[serde(skip_serializing_if = "Option::is_none")]
        suppressed: Option<u64>,
    },
    /// Data files over the `[data.retention]` budget were deleted or
    /// archived before a run (ext).
    DataEvicted {
        /// The run about to start.
        run_id: String,
        #[serde(flatten)]
        eviction: Eviction,
    },
    /// Run folders beyond `output.keep_runs` were deleted (ext).
    RunsPruned {
        /// The run whose start or end pruned them.
        run_id: String,
        #[serde(flatten)]
        pruned: Pruned,
    },
    /// The answer to a `cmd/status` that carried a `request_id` (fleet): the
    /// status as republished, on `events`, so a sender can collect one answer
    /// per device.
    StatusReported {
        request_id: RequestId,
        #[serde(flatten)]
        status: StatusInfo,
    },
}

impl Event {
    /// The `event` name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Event::RunStarted { .. } => "run_started",
            Event::CheckpointSaved { .. } => "checkpoint_saved",
            Event::EarlyStopped { .. } => "early_stopped",
            Event::RunFinished(_) => "run_finished",
            Event::RunFailed { .. } => "run_failed",
            Event::RunCancelled(_) => "run_cancelled",
            Event::RunQueued { .. } => "run_queued",
            Event::RunResumed { .. } => "run_resumed",
            Event::ModelPromoted(_) => "model_promoted",
            Event::ModelKept(_) | Event::PromotionFailed { .. } => "model_kept",
            Event::DataAccepted { .. } => "data_accepted",
            Event::DataRejected { .. } => "data_rejected",
            Event::ModelRecovered { .. } => "model_recovered",
            Event::CommandRejected { .. } => "command_rejected",
            Event::DataEvicted { .. } => "data_evicted",
            Event::RunsPruned { .. } => "runs_pruned",
            Event::StatusReported { .. } => "status_reported",
        }
    }

    /// The outbox's drop policy for this event: run and model lifecycle events
    /// are never dropped, informational ones may be when the outbox is full.
    pub fn kind(&self) -> Kind {
        match self {
            Event::RunStarted { .. }
            | Event::CheckpointSaved { .. }
            | Event::EarlyStopped { .. }
            | Event::RunFinished(_)
            | Event::RunFailed { .. }
            | Event::RunCancelled(_)
            | Event::RunResumed { .. }
            | Event::ModelPromoted(_)
            | Event::ModelKept(_)
            | Event::PromotionFailed { .. }
            | Event::ModelRecovered { .. }
            | Event::DataEvicted { .. }
            | Event::RunsPruned { .. } => Kind::Lifecycle,
            Event::DataAccepted { .. } | Event::DataRejected { .. } => Kind::Info,
            // Answers to commands: a command flood must not evict anything else.
            Event::RunQueued { .. }
            | Event::CommandRejected { .. }
            | Event::StatusReported { .. } => Kind::Reply,
        }
    }

    /// `run_started` from the engine's report.
    pub fn run_started(s: &run::RunStarted, origin: &RunOrigin) -> Self {
        Event::RunStarted {
            run_id: s.run_id.clone(),
            triggers: origin.triggers.clone(),
            request_ids: origin.request_ids.clone(),
            warm_start: s.warm_start.clone(),
            device: s.device.clone(),
            samples: s.samples.clone(),
            classes: s.classes.clone(),
            trainable_params: s.trainable_params,
            steps_per_epoch: s.steps_per_epoch,
            max_epochs: s.max_epochs,
            run_dir: s.run_dir.clone(),
            skipped_files: s.skipped_files.clone(),
            replay: origin.replay,
            feature_cache: s.feature_cache.clone(),
        }
    }

    /// `checkpoint_saved` from the engine's report.
    pub fn checkpoint_saved(c: &run::CheckpointSaved) -> Self {
        Event::CheckpointSaved {
            run_id: c.run_id.clone(),
            path: c.path.clone(),
            epoch: c.epoch,
            step: c.step,
            val_loss: c.val_loss,
            val_acc: c.val_acc,
        }
    }

    /// `early_stopped` from the engine's report.
    pub fn early_stopped(e: &run::EarlyStopped) -> Self {
        Event::EarlyStopped {
            run_id: e.run_id.clone(),
            epoch: e.epoch,
            step: e.step,
            reason: e.reason.clone(),
            monitor: e.monitor.clone(),
            best_value: e.best_value,
        }
    }

    /// The `run_*` event that ends a run the engine reported on.
    pub fn run_ended(s: &RunSummary, origin: &RunOrigin) -> Self {
        let end = RunEnd::of(s, origin);
        match s.outcome {
            Outcome::Finished | Outcome::EarlyStopped => Event::RunFinished(end),
            Outcome::Failed => Event::RunFailed {
                end,
                kind: failure_kind(s),
            },
            Outcome::Cancelled => Event::RunCancelled(end),
        }
    }

    /// `run_failed` for a run the engine could not report on: it never
    /// started, or its thread crashed.
    pub fn run_failed(run_id: &str, reason: String, kind: FailureKind, origin: &RunOrigin) -> Self {
        Event::RunFailed {
            end: RunEnd::without_summary(run_id, reason, origin),
            kind,
        }
    }

    /// `model_promoted` or `model_kept` after a promotion decision.
    pub fn promotion(run_id: &str, p: &Promotion) -> Self {
        let d = PromotionDecision {
            run_id: run_id.to_string(),
            metric: p.metric,
            split: p.split.clone(),
            candidate: p.candidate.clone(),
            current: p.current.clone(),
            reason: p.reason.clone(),
            path: p.current_path.clone(),
            previous_path: p.previous_path.clone(),
            onnx: p.onnx.clone(),
            onnx_error: p.onnx_error.clone(),
        };
        if p.promoted {
            Event::ModelPromoted(d)
        } else {
            Event::ModelKept(d)
        }
    }

    /// `model_kept` after a promotion that could not be carried out.
    pub fn promotion_failed(run_id: &str, error: String) -> Self {
        Event::PromotionFailed {
            run_id: run_id.to_string(),
            reason: format!("promotion failed: {error}"),
            error,
        }
    }

    /// The payload: the event's fields plus `ts`.
    pub fn payload(&self) -> Vec<u8> {
        encode(self)
    }
}

/// What the retained `status` message says (besides the fields [`status_payload`] adds).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct StatusInfo {
    pub state: State,
    /// The run in progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Run id of the model in `current.safetensors`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_model: Option<String>,
    /// Train requests waiting for the running run (0 or 1: they coalesce).
    pub queued: usize,
    /// `mqtt.groups` (fleet; absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The current model's scores, when known (fleet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_score: Option<super::fleet_status::ModelScore>,
    /// How the last run since start ended (fleet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_run: Option<super::fleet_status::LastRun>,
    /// Disk usage and what retention removed since start (ext).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<Storage>,
}

/// `storage` in `status`: the footprint after the last run's housekeeping,
/// and counts of evictions and pruning since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Storage {
    #[serde(flatten)]
    pub footprint: Footprint,
    pub evicted_files: u64,
    pub evicted_samples: u64,
    pub pruned_runs: u64,
}

#[derive(Serialize)]
struct StatusBody<'a> {
    #[serde(flatten)]
    info: &'a StatusInfo,
    version: &'static str,
    device_id: &'a str,
    /// Messages the outbox had to drop since start.
    dropped_messages: u64,
}

/// The `status` payload: `info` plus `version`, `device_id`, `dropped_messages`, `ts`.
pub fn status_payload(info: &StatusInfo, device_id: &str, dropped_messages: u64) -> Vec<u8> {
    encode(&StatusBody {
        info,
        version: env!("CARGO_PKG_VERSION"),
        device_id,
        dropped_messages,
    })
}

/// The `status` published in answer to a `cmd/status`: the status as
/// [`status_payload`] builds it, plus the command's `request_id`.
pub fn status_answer_payload(
    info: &StatusInfo,
    device_id: &str,
    dropped_messages: u64,
    request_id: &Value,
) -> Vec<u8> {
    #[derive(Serialize)]
    struct StatusAnswer<'a> {
        #[serde(flatten)]
        body: StatusBody<'a>,
        request_id: &'a Value,
    }
    encode(&StatusAnswer {
        body: StatusBody {
            info,
            version: env!("CARGO_PKG_VERSION"),
            device_id,
            dropped_messages,
        },
        request_id,
    })
}

#[derive(Serialize)]
struct LastWillBody<'a> {
    state: State,
    version: &'static str,
    device_id: &'a str,
    reason: &'static str,
}

/// The retained `status` the broker publishes for the daemon when its
/// connection is lost (the MQTT last will): `offline`, with `reason`.
pub fn last_will_payload(device_id: &str) -> Vec<u8> {
    encode(&LastWillBody {
        state: State::Offline,
        version: env!("CARGO_PKG_VERSION"),
        device_id,
        reason: "connection lost",
    })
}

/// The `metrics` payload: one evaluation (a line of `metrics.jsonl`) plus `ts`.
pub fn metrics_payload(m: &Metrics) -> Vec<u8> {
    encode(m)
}

/// Serialises a payload object and adds the fields every message carries (`ts`).
fn encode<T: Serialize + ?Sized>(body: &T) -> Vec<u8> {
    let mut obj = match serde_json::to_value(body) {
        Ok(Value::Object(o)) => o,
        Ok(_) | Err(_) => {
            tracing::error!("a payload did not serialise to a JSON object");
            Map::new()
        }
    };
    obj.insert("ts".into(), Value::String(now_rfc3339()));
    Value::Object(obj).to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::run::TestRecord;
    use serde_json::json;

    /// The payload as JSON, with `ts` checked and removed.
    fn wire(payload: &[u8]) -> Value {
        let mut v: Value = serde_json::from_slice(payload).unwrap();
        let ts = v.as_object_mut().unwrap().remove("ts").unwrap();
        let ts = ts.as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.contains('T'), "{ts}");
        v
    }

    fn golden(ev: Event, expected: Value) {
        let got = wire(&ev.payload());
        assert_eq!(got, expected, "{}", ev.name());
        assert_eq!(got["event"], ev.name());
    }

    fn origin() -> RunOrigin {
        RunOrigin {
            replay: None,
            triggers: vec![Trigger::Command, Trigger::NewData],
            request_ids: vec![json!("a"), json!(7)],
            stopped_by: None,
            stop_request_id: None,
        }
    }

    fn summary(outcome: Outcome, reason: &str) -> RunSummary {
        RunSummary {
            run_id: "r1".into(),
            failure: None,
            outcome,
            reason: reason.into(),
            epochs: 3,
            steps: 30,
            best: Some(BestRecord {
                epoch: 2,
                step: 20,
                val_loss: 0.5,
                val_acc: 0.75,
            }),
            test: Some(TestRecord {
                loss: 0.25,
                accuracy: 0.5,
                samples: 8,
                macro_f1: 0.125,
                per_class: Vec::new(),
                confusion_matrix: Vec::new(),
            }),
            skipped_files: Vec::new(),
            config: json!({}),
            best_checkpoint: Some(PathBuf::from("/o/runs/r1/best.safetensors")),
            classes: vec!["a".into(), "b".into()],
            samples: SplitSizes::default(),
            device: "cpu".into(),
            started: String::new(),
            ended: String::new(),
            wall_s: 1.5,
            feature_cache: None,
        }
    }

    fn end_json(outcome: &str, reason: &str, stopped_by: Value, stop_id: Value) -> Value {
        json!({
            "run_id": "r1", "outcome": outcome, "reason": reason, "epochs": 3, "steps": 30,
            "best": {"epoch": 2, "step": 20, "val_loss": 0.5, "val_acc": 0.75},
            "test": {"loss": 0.25, "accuracy": 0.5, "macro_f1": 0.125, "samples": 8},
            "best_checkpoint": "/o/runs/r1/best.safetensors", "run_dir": "/o/runs/r1",
            "wall_s": 1.5, "triggers": ["command", "new_data"], "request_ids": ["a", 7],
            "stopped_by": stopped_by, "stop_request_id": stop_id,
        })
    }

    fn with(mut v: Value, extra: Value) -> Value {
        let o = v.as_object_mut().unwrap();
        for (k, x) in extra.as_object().unwrap() {
            o.insert(k.clone(), x.clone());
        }
        v
    }

    #[test]
    fn run_started() {
        let s = run::RunStarted {
            run_id: "r1".into(),
            run_dir: PathBuf::from("/o/runs/r1"),
            samples: SplitSizes {
                train: 10,
                val: 2,
                test: 3,
            },
            classes: vec!["a".into(), "b".into()],
            skipped_files: vec![SkippedFile {
                file: "x.csv".into(),
                reason: "bad".into(),
            }],
            trainable_params: 42,
            steps_per_epoch: 5,
            max_epochs: 9,
            device: "cpu".into(),
            warm_start: "scratch".into(),
            resumed_at_step: None,
            feature_cache: Default::default(),
        };
        golden(
            Event::run_started(&s, &origin()),
            json!({
                "event": "run_started", "run_id": "r1", "triggers": ["command", "new_data"],
                "request_ids": ["a", 7], "warm_start": "scratch", "device": "cpu",
                "samples": {"train": 10, "val": 2, "test": 3}, "classes": ["a", "b"],
                "trainable_params": 42, "steps_per_epoch": 5, "max_epochs": 9,
                "run_dir": "/o/runs/r1", "skipped_files": [{"file": "x.csv", "reason": "bad"}],
                "feature_cache": {"used": false, "hits": 0, "misses": 0, "bytes": 0},
            }),
        );
    }

    #[test]
    fn checkpoint_saved() {
        let c = run::CheckpointSaved {
            run_id: "r1".into(),
            path: PathBuf::from("/o/runs/r1/best.safetensors"),
            epoch: 2,
            step: 20,
            val_loss: 0.5,
            val_acc: 0.75,
        };
        golden(
            Event::checkpoint_saved(&c),
            json!({
                "event": "checkpoint_saved", "run_id": "r1", "path": "/o/runs/r1/best.safetensors",
                "epoch": 2, "step": 20, "val_loss": 0.5, "val_acc": 0.75,
            }),
        );
    }

    #[test]
    fn early_stopped() {
        let e = run::EarlyStopped {
            run_id: "r1".into(),
            epoch: 4,
            step: 40,
            reason: "no improvement".into(),
            monitor: "val_loss".into(),
            best_value: 0.5,
        };
        golden(
            Event::early_stopped(&e),
            json!({
                "event": "early_stopped", "run_id": "r1", "epoch": 4, "step": 40,
                "reason": "no improvement", "monitor": "val_loss", "best_value": 0.5,
            }),
        );
    }

    #[test]
    fn run_finished() {
        let s = summary(Outcome::EarlyStopped, "early stop");
        golden(
            Event::run_ended(&s, &origin()),
            with(
                end_json("early_stopped", "early stop", Value::Null, Value::Null),
                json!({"event": "run_finished"}),
            ),
        );
    }

    #[test]
    fn run_failed_during_the_run() {
        let mut s = summary(
            Outcome::Failed,
            "cannot append to metrics.jsonl: No space left on device (os error 28)",
        );
        s.failure = Some(FailureKind::DiskFull);
        golden(
            Event::run_ended(&s, &origin()),
            with(
                end_json(
                    "failed",
                    "cannot append to metrics.jsonl: No space left on device (os error 28)",
                    Value::Null,
                    Value::Null,
                ),
                json!({"event": "run_failed", "kind": "disk_full"}),
            ),
        );
    }

    #[test]
    fn run_failed_before_the_run_has_the_same_shape() {
        let ev = Event::run_failed(
            "r2",
            "invalid value for `train.lr`".into(),
            FailureKind::BadConfig,
            &origin(),
        );
        golden(
            ev.clone(),
            json!({
                "event": "run_failed", "run_id": "r2", "outcome": "failed",
                "reason": "invalid value for `train.lr`", "kind": "bad_config",
                "epochs": 0, "steps": 0, "best": null, "test": null, "best_checkpoint": null,
                "run_dir": null, "wall_s": 0.0, "triggers": ["command", "new_data"],
                "request_ids": ["a", 7], "stopped_by": null, "stop_request_id": null,
            }),
        );
        // Same keys as a failure the engine reported.
        let during = wire(&Event::run_ended(&summary(Outcome::Failed, "x"), &origin()).payload());
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&wire(&ev.payload())), keys(&during));
    }

    #[test]
    fn run_cancelled_names_who_stopped_it() {
        let s = summary(Outcome::Cancelled, "cancelled at step 30");
        let mut o = origin();
        o.stopped_by = Some(StopCause::Command);
        o.stop_request_id = Some(json!("s1"));
        golden(
            Event::run_ended(&s, &o),
            with(
                end_json(
                    "cancelled",
                    "cancelled at step 30: stopped by cmd/stop",
                    json!("cmd/stop"),
                    json!("s1"),
                ),
                json!({"event": "run_cancelled"}),
            ),
        );
        o.stopped_by = Some(StopCause::Shutdown);
        o.stop_request_id = None;
        golden(
            Event::run_ended(&s, &o),
            with(
                end_json(
                    "cancelled",
                    "cancelled at step 30: the daemon is shutting down",
                    json!("shutdown"),
                    Value::Null,
                ),
                json!({"event": "run_cancelled"}),
            ),
        );
    }

    #[test]
    fn run_queued() {
        golden(
            Event::RunQueued {
                request_id: Some(json!("q1")),
                trigger: Trigger::Command,
                behind_run_id: Some("r1".into()),
                coalesced: false,
            },
            json!({
                "event": "run_queued", "request_id": "q1", "trigger": "command",
                "behind_run_id": "r1", "coalesced": false,
            }),
        );
        golden(
            Event::RunQueued {
                request_id: None,
                trigger: Trigger::NewData,
                behind_run_id: None,
                coalesced: true,
            },
            json!({
                "event": "run_queued", "request_id": null, "trigger": "new_data",
                "behind_run_id": null, "coalesced": true,
            }),
        );
    }

    #[test]
    fn run_resumed() {
        golden(
            Event::RunResumed {
                run_id: "r1".into(),
                step: 30,
                epoch: 4,
                cause: ResumeCause::Interrupted,
                run_dir: PathBuf::from("/o/runs/r1"),
            },
            json!({
                "event": "run_resumed", "run_id": "r1", "step": 30, "epoch": 4,
                "cause": "interrupted", "run_dir": "/o/runs/r1",
            }),
        );
        assert_eq!(json!(ResumeCause::Shutdown), json!("shutdown"));
    }

    fn promotion(promoted: bool) -> Promotion {
        let score = |run_id: &str| Score {
            loss: 0.5,
            accuracy: 0.75,
            macro_f1: 0.25,
            samples: 8,
            run_id: run_id.into(),
        };
        Promotion {
            promoted,
            metric: PromoteMetric::MacroF1,
            split: "test".into(),
            candidate: score("r2"),
            current: (!promoted).then(|| score("r1")),
            reason: "why".into(),
            current_path: PathBuf::from("/o/current.safetensors"),
            previous_path: promoted.then(|| PathBuf::from("/o/previous.safetensors")),
            onnx: None,
            onnx_error: None,
        }
    }

    fn score_json(run_id: &str) -> Value {
        json!({"loss": 0.5, "accuracy": 0.75, "macro_f1": 0.25, "samples": 8, "run_id": run_id})
    }

    #[test]
    fn model_promoted() {
        golden(
            Event::promotion("r2", &promotion(true)),
            json!({
                "event": "model_promoted", "run_id": "r2", "metric": "macro_f1", "split": "test",
                "candidate": score_json("r2"), "current": null, "reason": "why",
                "path": "/o/current.safetensors", "previous_path": "/o/previous.safetensors",
            }),
        );
    }

    #[test]
    fn model_kept() {
        golden(
            Event::promotion("r2", &promotion(false)),
            json!({
                "event": "model_kept", "run_id": "r2", "metric": "macro_f1", "split": "test",
                "candidate": score_json("r2"), "current": score_json("r1"), "reason": "why",
                "path": "/o/current.safetensors", "previous_path": null,
            }),
        );
    }

    #[test]
    fn promotion_failed_is_a_model_kept() {
        golden(
            Event::promotion_failed("r2", "disk".into()),
            json!({
                "event": "model_kept", "run_id": "r2", "reason": "promotion failed: disk",
                "error": "disk",
            }),
        );
    }

    #[test]
    fn data_accepted_and_rejected() {
        golden(
            Event::DataAccepted {
                file: "new/a.csv".into(),
                samples: 12,
            },
            json!({"event": "data_accepted", "file": "new/a.csv", "samples": 12}),
        );
        golden(
            Event::DataRejected {
                file: "b.csv".into(),
                reason: "bad label".into(),
                moved_to: Some("rejected/b.csv".into()),
                move_error: None,
            },
            json!({
                "event": "data_rejected", "file": "b.csv", "reason": "bad label",
                "moved_to": "rejected/b.csv", "move_error": null,
            }),
        );
    }

    #[test]
    fn command_rejected() {
        golden(
            Event::CommandRejected {
                command: Some("stop".into()),
                request_id: Some(json!(5)),
                reason: "no run in progress".into(),
                suppressed: None,
            },
            json!({
                "event": "command_rejected", "command": "stop", "request_id": 5,
                "reason": "no run in progress",
            }),
        );
        golden(
            Event::CommandRejected {
                command: None,
                request_id: None,
                reason: "too big".into(),
                suppressed: None,
            },
            json!({"event": "command_rejected", "command": null, "request_id": null, "reason": "too big"}),
        );
        golden(
            Event::CommandRejected {
                command: None,
                request_id: None,
                reason: "40 more commands were rejected".into(),
                suppressed: Some(40),
            },
            json!({"event": "command_rejected", "command": null, "request_id": null,
                   "reason": "40 more commands were rejected", "suppressed": 40}),
        );
    }

    #[test]
    fn data_evicted_and_runs_pruned() {
        use crate::daemon::retention::{Eviction, Pruned};
        use std::collections::BTreeMap;
        let ev = Event::DataEvicted {
            run_id: "r3".into(),
            eviction: Eviction {
                files: vec!["a.csv".into()],
                evicted_files: 1,
                samples: 3,
                per_class: BTreeMap::from([("0".to_string(), 2), ("1".to_string(), 1)]),
                bytes: 40,
                action: "archived",
                archive_dir: Some(PathBuf::from("/arch")),
                reason: "over the replay budget".into(),
                kept_files: 4,
                kept_samples: 12,
                errors: Vec::new(),
            },
        };
        assert_eq!(ev.kind(), Kind::Lifecycle);
        golden(
            ev,
            json!({
                "event": "data_evicted", "run_id": "r3", "files": ["a.csv"], "evicted_files": 1,
                "samples": 3, "per_class": {"0": 2, "1": 1}, "bytes": 40, "action": "archived",
                "archive_dir": "/arch", "reason": "over the replay budget", "kept_files": 4,
                "kept_samples": 12, "errors": [],
            }),
        );
        golden(
            Event::RunsPruned {
                run_id: "r3".into(),
                pruned: Pruned {
                    runs: vec!["r1".into()],
                    bytes: 99,
                    kept: 2,
                    keep_runs: 2,
                    errors: Vec::new(),
                },
            },
            json!({
                "event": "runs_pruned", "run_id": "r3", "runs": ["r1"], "bytes": 99, "kept": 2,
                "keep_runs": 2, "errors": [],
            }),
        );
    }

    #[test]
    fn run_started_says_what_was_new_and_what_replayed() {
        let s = run::RunStarted {
            run_id: "r1".into(),
            run_dir: PathBuf::from("/o/runs/r1"),
            samples: SplitSizes::default(),
            classes: Vec::new(),
            skipped_files: Vec::new(),
            trainable_params: 1,
            steps_per_epoch: 1,
            max_epochs: 1,
            device: "cpu".into(),
            warm_start: "scratch".into(),
            resumed_at_step: None,
            feature_cache: Default::default(),
        };
        let mut o = origin();
        o.replay = Some(crate::daemon::retention::ReplayCounts {
            new_files: 2,
            new_samples: 20,
            replayed_files: 3,
            replayed_samples: 30,
        });
        let v = wire(&Event::run_started(&s, &o).payload());
        assert_eq!(
            v["replay"],
            json!({"new_files": 2, "new_samples": 20, "replayed_files": 3, "replayed_samples": 30})
        );
    }

    #[test]
    fn status_storage() {
        let info = StatusInfo {
            storage: Some(Storage {
                footprint: crate::daemon::retention::Footprint {
                    free_mb: 10.5,
                    data_mb: 1.25,
                    runs_mb: 2.0,
                    runs: 3,
                    feature_cache_mb: 0.5,
                },
                evicted_files: 4,
                evicted_samples: 40,
                pruned_runs: 1,
            }),
            ..StatusInfo::default()
        };
        assert_eq!(
            wire(&status_payload(&info, "d1", 0))["storage"],
            json!({"free_mb": 10.5, "data_mb": 1.25, "runs_mb": 2.0, "runs": 3,
                   "feature_cache_mb": 0.5, "evicted_files": 4, "evicted_samples": 40, "pruned_runs": 1})
        );
    }

    #[test]
    fn status_reported_and_fleet_status_fields() {
        let status = StatusInfo {
            state: State::Idle,
            current_model: Some("r1".into()),
            groups: vec!["line-1".into()],
            current_score: Some(super::super::fleet_status::ModelScore {
                run_id: "r1".into(),
                split: "test".into(),
                accuracy: 0.75,
                loss: 0.5,
                macro_f1: 0.7,
                samples: 8,
            }),
            last_run: Some(super::super::fleet_status::LastRun {
                run_id: "r1".into(),
                outcome: Outcome::Finished,
                reason: "max_epochs".into(),
                epochs: 3,
                ended: "2026-01-01T00:00:00Z".into(),
                promoted: Some(true),
            }),
            ..StatusInfo::default()
        };
        let score = json!({"run_id": "r1", "split": "test", "accuracy": 0.75, "loss": 0.5,
                           "macro_f1": 0.7, "samples": 8});
        let last = json!({"run_id": "r1", "outcome": "finished", "reason": "max_epochs",
                          "epochs": 3, "ended": "2026-01-01T00:00:00Z", "promoted": true});
        golden(
            Event::StatusReported {
                request_id: json!("q1"),
                status: status.clone(),
            },
            json!({"event": "status_reported", "request_id": "q1", "state": "idle",
                   "current_model": "r1", "queued": 0, "groups": ["line-1"],
                   "current_score": score, "last_run": last}),
        );
        assert_eq!(
            Event::StatusReported {
                request_id: json!(1),
                status: StatusInfo::default()
            }
            .kind(),
            Kind::Reply
        );
        let v = wire(&status_payload(&status, "d1", 0));
        assert_eq!(v["groups"], json!(["line-1"]));
        assert_eq!(v["current_score"], score);
        assert_eq!(v["last_run"], last);
    }

    #[test]
    fn kinds_drive_the_drop_policy() {
        let info = Event::DataAccepted {
            file: "a".into(),
            samples: 1,
        };
        assert_eq!(info.kind(), Kind::Info);
        let life = Event::promotion_failed("r", "e".into());
        assert_eq!(life.kind(), Kind::Lifecycle);
    }

    #[test]
    fn status_and_metrics() {
        let info = StatusInfo {
            storage: None,
            state: State::Training,
            run_id: Some("r1".into()),
            current_model: None,
            queued: 1,
            ..StatusInfo::default()
        };
        assert_eq!(
            wire(&status_payload(&info, "d1", 3)),
            json!({
                "state": "training", "run_id": "r1", "queued": 1,
                "version": env!("CARGO_PKG_VERSION"), "device_id": "d1", "dropped_messages": 3,
            })
        );
        assert_eq!(
            wire(&status_answer_payload(&info, "d1", 3, &json!("q7"))),
            json!({
                "state": "training", "run_id": "r1", "queued": 1, "request_id": "q7",
                "version": env!("CARGO_PKG_VERSION"), "device_id": "d1", "dropped_messages": 3,
            })
        );
        assert_eq!(
            wire(&last_will_payload("d1")),
            json!({
                "state": "offline", "version": env!("CARGO_PKG_VERSION"), "device_id": "d1",
                "reason": "connection lost",
            })
        );
        assert_eq!(json!(State::Idle), json!("idle"));
        assert_eq!(json!(State::Offline), json!("offline"));
        let m = Metrics {
            run_id: "r1".into(),
            epoch: 1,
            step: 10,
            train_loss: 0.5,
            train_acc: 0.5,
            val_loss: 0.25,
            val_acc: 0.75,
            lr: 0.001,
            elapsed_s: 2.0,
            improved: true,
            best_val_loss: 0.25,
            best_val_acc: 0.75,
        };
        assert_eq!(
            wire(&metrics_payload(&m)),
            json!({
                "run_id": "r1", "epoch": 1, "step": 10, "train_loss": 0.5, "train_acc": 0.5,
                "val_loss": 0.25, "val_acc": 0.75, "lr": 0.001, "elapsed_s": 2.0,
                "improved": true, "best_val_loss": 0.25, "best_val_acc": 0.75,
            })
        );
    }

    #[test]
    fn failure_kind_is_the_engines() {
        let mut s = summary(Outcome::Failed, "no space");
        s.failure = Some(FailureKind::DiskFull);
        assert_eq!(failure_kind(&s), FailureKind::DiskFull);
        s.failure = None;
        assert_eq!(failure_kind(&s), FailureKind::Internal);
        assert_eq!(json!(FailureKind::DiskFull), json!("disk_full"));
    }

    #[test]
    fn triggers_sort_by_name() {
        let mut t = [
            Trigger::Resume,
            Trigger::OnStart,
            Trigger::NewData,
            Trigger::Command,
        ];
        t.sort();
        let names: Vec<String> = t
            .iter()
            .map(|x| json!(x).as_str().unwrap().to_string())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }
}
