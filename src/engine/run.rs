//! The engine's interface to its drivers: a [`RunRequest`] in, a stream of
//! [`RunEvent`]s out, a [`CancelFlag`] to stop it. The `train` command, the daemon
//! and the tests all drive the engine through these types.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::budget::Budget;
use super::data::{DataSpec, SkippedFile};
use super::early_stop::EarlyStopConfig;
use super::error::FailureKind;
use super::eval::ClassMetrics;
use super::model::InitMapping;
pub use super::model::ModelTemplate;
use super::optim::OptimizerConfig;
use super::schedule::{Mode, PlateauConfig};

/// When to evaluate on the validation split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvalEvery {
    /// After every epoch.
    #[default]
    Epoch,
    /// Every N optimiser steps (and once more at the end of training).
    Steps(u64),
}

impl Serialize for EvalEvery {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            EvalEvery::Epoch => s.serialize_str("epoch"),
            EvalEvery::Steps(n) => s.serialize_u64(*n),
        }
    }
}

impl<'de> Deserialize<'de> for EvalEvery {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        let bad = |what: String| {
            serde::de::Error::custom(format!(
                "must be \"epoch\" or a positive step count, got {what}"
            ))
        };
        match Raw::deserialize(d)? {
            Raw::Int(n) if n > 0 => Ok(EvalEvery::Steps(n as u64)),
            Raw::Int(n) => Err(bad(n.to_string())),
            Raw::Str(s) if s == "epoch" => Ok(EvalEvery::Epoch),
            Raw::Str(s) => match s.parse::<u64>() {
                Ok(n) if n > 0 => Ok(EvalEvery::Steps(n)),
                _ => Err(bad(format!("{s:?}"))),
            },
        }
    }
}

/// A validation metric a policy watches.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Monitor {
    #[default]
    ValLoss,
    ValAcc,
}

impl Monitor {
    /// The direction in which this metric improves.
    pub fn natural_mode(self) -> Mode {
        match self {
            Monitor::ValLoss => Mode::Min,
            Monitor::ValAcc => Mode::Max,
        }
    }

    /// The metric's value in an evaluation.
    pub fn pick(self, val_loss: f64, val_acc: f64) -> f64 {
        match self {
            Monitor::ValLoss => val_loss,
            Monitor::ValAcc => val_acc,
        }
    }

    /// The metric's name as used in payloads.
    pub fn name(self) -> &'static str {
        match self {
            Monitor::ValLoss => "val_loss",
            Monitor::ValAcc => "val_acc",
        }
    }
}

/// Where the weights of a run start from.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum WarmStart {
    /// Fresh, seeded initialisation.
    #[default]
    Scratch,
    /// A plain state dict (e.g. exported from PyTorch) for the configured model.
    StateDict(PathBuf),
    /// An edge-trainer checkpoint: its architecture, classes and normalisation are kept.
    Checkpoint(PathBuf),
}

/// Training hyper-parameters of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSpec {
    pub max_epochs: u64,
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub seed: u64,
    pub eval_every: EvalEvery,
    pub class_weights: Option<Vec<f64>>,
    pub label_smoothing: f64,
    pub optimizer: OptimizerConfig,
    /// ReduceLROnPlateau and the metric it watches, if scheduling is on.
    pub scheduler: Option<(Monitor, PlateauConfig)>,
    pub early_stopping: (Monitor, EarlyStopConfig),
    /// Parameter-name patterns held fixed.
    pub freeze: Vec<String>,
    /// Which parameters train (`model.finetune`); combines with `freeze`.
    pub finetune: super::model::FineTune,
    /// How the tensors of a `WarmStart::StateDict` map onto the model.
    pub init: InitMapping,
    /// Memory a training step may take; checked before the model is built.
    pub memory_budget: Budget,
    /// The frozen-feature cache (`train.cache_features`).
    pub feature_cache: FeatureCacheSpec,
}

/// `train.cache_features`: whether a run whose layers up to some point are
/// all frozen computes their output once per sample and trains the rest on it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CacheFeatures {
    /// On wherever it is valid (a frozen prefix, no augmentation).
    #[default]
    Auto,
    Off,
}

/// The frozen-feature cache of a run: whether, where and how much.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureCacheSpec {
    pub mode: CacheFeatures,
    /// The folder of the stored features (`{output.dir}/feature-cache`),
    /// shared by every run of the same output folder.
    pub dir: PathBuf,
    /// At most this many bytes of features, in memory and on disk
    /// (`train.cache_features_mb`); least recently used files are evicted.
    pub max_bytes: u64,
}

impl FeatureCacheSpec {
    /// The cache switched off (no folder).
    pub fn off() -> Self {
        Self {
            mode: CacheFeatures::Off,
            dir: PathBuf::new(),
            max_bytes: 0,
        }
    }
}

/// Whether a run trained on cached frozen features, and how many it found.
/// Reported in `run_started` and `summary.json` (`feature_cache`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeatureCacheReport {
    pub used: bool,
    /// Why the cache was not used (absent when it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The split point the features were taken at (`pool`, `layer3`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Samples whose features were found stored.
    pub hits: u64,
    /// Samples whose features were computed in this run.
    pub misses: u64,
    /// Bytes of features the run held (and stored).
    pub bytes: u64,
}

impl FeatureCacheReport {
    /// The cache was not used, for `reason`.
    pub fn unused(reason: impl Into<String>) -> Self {
        Self {
            reason: Some(reason.into()),
            ..Self::default()
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub run_id: String,
    /// The run's files go to `{runs_dir}/{run_id}/`.
    pub runs_dir: PathBuf,
    pub data: DataSpec,
    pub model: ModelTemplate,
    pub warm_start: WarmStart,
    pub train: TrainSpec,
    pub device: Device,
    /// The effective configuration, recorded in `summary.json`.
    pub config: serde_json::Value,
    /// Continue the run `run_id` from its resume state (`resume.safetensors`)
    /// if it has one, on the data files it started with.
    pub resume: bool,
    /// Sections of `config` a resumed run must find unchanged (the driver's
    /// declaration of run settings, e.g. `data`, `model`, `train`).
    pub fixed_on_resume: Vec<&'static str>,
}

/// A new run id: UTC time plus a random suffix (`20261126T073300Z-3fa2`).
pub fn new_run_id() -> String {
    let now = chrono::Utc::now();
    let suffix: u16 = rand::random();
    format!("{}-{suffix:04x}", now.format("%Y%m%dT%H%M%SZ"))
}

/// The current time as RFC 3339 UTC (`2026-11-26T07:33:00.123Z`).
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Shared flag that asks a run to stop after the current batch.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    /// A flag not yet raised.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The underlying atomic, for signal handlers.
    pub fn as_atomic(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

/// One evaluation: the payload of the `metrics` topic and a line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub run_id: String,
    pub epoch: u64,
    pub step: u64,
    pub train_loss: f64,
    pub train_acc: f64,
    pub val_loss: f64,
    pub val_acc: f64,
    pub lr: f64,
    pub elapsed_s: f64,
    /// The monitored metric improved: this model is the new best checkpoint.
    pub improved: bool,
    pub best_val_loss: f64,
    pub best_val_acc: f64,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Reached `max_epochs` or `max_steps`.
    Finished,
    /// Stopped because validation stopped improving.
    EarlyStopped,
    Failed,
    Cancelled,
}

impl Outcome {
    /// Whether the run produced a model worth testing and promoting.
    pub fn is_success(self) -> bool {
        matches!(self, Outcome::Finished | Outcome::EarlyStopped)
    }
}

/// The best evaluation of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestRecord {
    pub epoch: u64,
    pub step: u64,
    pub val_loss: f64,
    pub val_acc: f64,
}

/// Test-split results of the best model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestRecord {
    pub loss: f64,
    pub accuracy: f64,
    pub samples: u64,
    pub macro_f1: f64,
    pub per_class: Vec<ClassMetrics>,
    pub confusion_matrix: Vec<Vec<u64>>,
}

/// Sizes of the splits a run used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitSizes {
    pub train: usize,
    pub val: usize,
    pub test: usize,
}

/// `summary.json`: how a run ended and what it produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub run_id: String,
    pub outcome: Outcome,
    pub reason: String,
    /// Epochs started (the last one may be partial).
    pub epochs: u64,
    pub steps: u64,
    pub best: Option<BestRecord>,
    pub test: Option<TestRecord>,
    pub skipped_files: Vec<SkippedFile>,
    pub config: serde_json::Value,
    /// Path of the best checkpoint, if one was written.
    pub best_checkpoint: Option<PathBuf>,
    pub classes: Vec<String>,
    pub samples: SplitSizes,
    pub device: String,
    pub started: String,
    pub ended: String,
    pub wall_s: f64,
    /// The class of the failure, when `outcome` is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureKind>,
    /// Whether the frozen-feature cache was used (absent when the run
    /// failed before deciding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_cache: Option<FeatureCacheReport>,
}

/// Facts known once a run has loaded its data and built its model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunStarted {
    pub run_id: String,
    pub run_dir: PathBuf,
    pub samples: SplitSizes,
    pub classes: Vec<String>,
    pub skipped_files: Vec<SkippedFile>,
    pub trainable_params: usize,
    pub steps_per_epoch: u64,
    pub max_epochs: u64,
    pub device: String,
    pub warm_start: String,
    /// The step a resumed run continues from (`None` for a fresh run).
    pub resumed_at_step: Option<u64>,
    /// Whether the frozen-feature cache is used.
    pub feature_cache: FeatureCacheReport,
}

/// A saved best checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointSaved {
    pub run_id: String,
    pub path: PathBuf,
    pub epoch: u64,
    pub step: u64,
    pub val_loss: f64,
    pub val_acc: f64,
}

/// The decision to stop early.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EarlyStopped {
    pub run_id: String,
    pub epoch: u64,
    pub step: u64,
    pub reason: String,
    pub monitor: String,
    pub best_value: f64,
}

/// What a run reports while it goes.
#[derive(Debug, Clone)]
pub enum RunEvent {
    /// Data loaded, model built, about to train.
    Started(RunStarted),
    /// An epoch begins (1-based) with this many batches.
    EpochStarted { epoch: u64, batches: u64 },
    /// One optimiser step done.
    Step { epoch: u64, step: u64, loss: f64 },
    /// One evaluation on the validation split.
    Evaluated(Metrics),
    /// A new best model was written.
    CheckpointSaved(CheckpointSaved),
    /// Validation stopped improving; the run stops.
    EarlyStopped(EarlyStopped),
    /// The run is over (always the last event).
    Ended(Box<RunSummary>),
}

/// The JSON pointer of a dotted config key in `RunRequest::config`:
/// `train.optimizer` → `/train/optimizer`.
pub fn key_pointer(key: &str) -> String {
    format!("/{}", key.replace('.', "/"))
}

/// Where a run's events go. A receiver that stopped listening is not an error.
pub trait EventSink {
    /// Hands one event to the driver.
    fn emit(&self, ev: RunEvent);
}

impl EventSink for std::sync::mpsc::Sender<RunEvent> {
    fn emit(&self, ev: RunEvent) {
        let _ = self.send(ev);
    }
}

impl<F: Fn(RunEvent)> EventSink for F {
    fn emit(&self, ev: RunEvent) {
        self(ev)
    }
}

/// Drops every event.
impl EventSink for () {
    fn emit(&self, _: RunEvent) {}
}
