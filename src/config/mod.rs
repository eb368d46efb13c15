//! Typed settings: built-in defaults, a TOML file, `EDGE_TRAINER__SECTION__KEY`
//! environment variables and `--set key=value` overrides, layered in that order
//! of precedence (later wins) with the `config` crate, then validated. Every
//! error names the key and where the bad value came from.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::engine::model::registry::ArchConfigs;
use crate::engine::model::KeyError;
use crate::engine::optim::{OptimizerConfig, OptimizerKind};
use crate::engine::schedule::{Mode, PlateauConfig, ThresholdMode};

/// Prefix of environment variables that override the config file.
pub const ENV_PREFIX: &str = "EDGE_TRAINER__";

/// Keys accepted as shorter spellings of longer ones (`--set train.lr=0.01`).
const KEY_ALIASES: &[(&str, &str)] = &[
    ("train.lr", "train.optimizer.lr"),
    ("train.weight_decay", "train.optimizer.weight_decay"),
];

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or is not valid TOML.
    #[error("cannot read config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// A key that no section knows.
    #[error("unknown config key `{key}` (from {origin}){hint}")]
    UnknownKey {
        key: String,
        origin: String,
        hint: String,
    },
    /// A `--set` argument or environment variable that is not `key=value`.
    #[error("bad override `{arg}`: {reason}")]
    BadOverride { arg: String, reason: String },
    /// A value of the wrong type or out of range.
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    /// Sizes whose training would need more memory than the budget.
    #[error("too large for the memory budget: {}: {reason}", quoted(.keys))]
    OverBudget { keys: Vec<String>, reason: String },
    /// The layered values could not be turned into settings.
    #[error("invalid configuration: {0}")]
    Other(String),
}

fn quoted(keys: &[String]) -> String {
    keys.iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An architecture's key error as a config error.
fn key_error(e: KeyError) -> ConfigError {
    ConfigError::Invalid {
        key: e.key.to_string(),
        reason: e.problem.to_string(),
    }
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// The whole settings tree, one field per config section.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub device: DeviceSettings,
    pub mqtt: MqttSettings,
    pub data: DataSettings,
    pub model: ModelSettings,
    pub train: TrainSettings,
    pub retrain: RetrainSettings,
    pub output: OutputSettings,
}

pub use crate::engine::device::DeviceKind;

/// `[device]`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceSettings {
    pub kind: DeviceKind,
    pub ordinal: usize,
    /// Memory a training step may take, in MiB (model, optimiser state and a
    /// batch's activations, estimated before anything is allocated); 0: half
    /// the memory available (see `engine::budget`).
    pub memory_budget_mb: u64,
}

/// `[mqtt.tls]`: paths to PEM files.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// `[mqtt]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    /// MQTT client id; defaults to `edge-trainer-{device_id}`.
    pub client_id: Option<String>,
    /// This device's name in topics; defaults to the host name.
    pub device_id: Option<String>,
    pub topic_prefix: String,
    pub username: Option<String>,
    /// File holding the password (never the password itself in the config).
    pub password_file: Option<PathBuf>,
    pub tls: TlsSettings,
    pub keep_alive_s: u64,
    /// Host a broker in-process on `host:port`.
    pub embedded_broker: bool,
    /// Longest wait between reconnection attempts (exponential backoff with jitter).
    pub reconnect_max_s: f64,
    /// Messages held for the broker while it is unreachable; when full the oldest
    /// `metrics` go first, lifecycle events never.
    pub outbox_capacity: usize,
    /// Fleet groups this device belongs to: it also obeys
    /// `{topic_prefix}/group/{name}/cmd/...` for each (and always `{topic_prefix}/fleet/cmd/...`).
    pub groups: Vec<String>,
}

impl Default for MqttSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: None,
            device_id: None,
            topic_prefix: "edge-trainer".into(),
            username: None,
            password_file: None,
            tls: TlsSettings::default(),
            keep_alive_s: 30,
            embedded_broker: false,
            reconnect_max_s: 30.0,
            outbox_capacity: 10_000,
            groups: Vec::new(),
        }
    }
}

pub use crate::engine::data::augment::AugmentSpec;
pub use crate::engine::data::image_folder::ResizeMode;
pub use crate::engine::data::NormalizeKind;
pub use crate::engine::data::{DataFormat, TokenizerKind};

/// `[data]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DataSettings {
    pub dir: PathBuf,
    pub format: DataFormat,
    pub val_fraction: f64,
    pub test_fraction: f64,
    pub split_seed: u64,
    pub x_key: String,
    pub y_key: String,
    pub label_column: String,
    pub delimiter: String,
    pub image_size: [usize; 2],
    pub channels: usize,
    pub tokenizer: TokenizerKind,
    pub max_len: usize,
    /// text-tsv: a vocabulary file (one token per line, in id order) instead of
    /// building the vocabulary from the training split.
    pub vocab: Option<PathBuf>,
    /// text-tsv: at most this many tokens in a built vocabulary.
    pub max_vocab: usize,
    /// text-tsv: tokens seen fewer times in the training split are unknown.
    pub min_freq: usize,
    /// Class names in label order; overrides `class.txt` and inferred labels.
    pub classes: Option<Vec<String>>,
    /// Data files larger than this many MiB are refused before they are read.
    pub max_file_mb: u64,
    /// Float features (CSV, safetensors) whose magnitude exceeds this are
    /// absurd: the file is refused, naming the value and where it is. u8
    /// features (images, u8 safetensors) cannot exceed it.
    pub max_abs_value: f64,
    /// `[data.retention]`: how much of the data already trained on is kept.
    pub retention: RetentionSettings,
    // --- image-folder streaming (issue 14) ---
    /// image-folder: `"dataset"` (per-channel statistics of the training
    /// split) or `"imagenet"` (torchvision's mean and std).
    pub normalize: NormalizeKind,
    /// image-folder: `"stretch"` to `image_size`, or `"center-crop"` (resize
    /// keeping the aspect ratio, then the central crop, as torchvision's eval transform).
    pub resize: ResizeMode,
    /// image-folder: MiB of resized samples kept in memory across epochs.
    pub cache_mb: u64,
    /// image-folder: threads decoding and augmenting batches ahead of training.
    pub workers: usize,
    /// image-folder: batches each worker prepares ahead.
    pub prefetch: usize,
    /// image-folder: train-split augmentation.
    pub augment: AugmentSpec,
}

impl Default for DataSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data"),
            format: DataFormat::Safetensors,
            val_fraction: 0.1,
            test_fraction: 0.1,
            split_seed: 42,
            x_key: "x".into(),
            y_key: "y".into(),
            label_column: "label".into(),
            delimiter: ",".into(),
            image_size: [32, 32],
            channels: 3,
            tokenizer: TokenizerKind::Char,
            max_len: 32,
            vocab: None,
            max_vocab: 10_000,
            min_freq: 1,
            classes: None,
            max_file_mb: 512,
            max_abs_value: crate::engine::data::DEFAULT_MAX_ABS_VALUE as f64,
            retention: RetentionSettings::default(),
            normalize: NormalizeKind::Dataset,
            resize: ResizeMode::Stretch,
            cache_mb: 256,
            workers: 2,
            prefetch: 2,
            augment: AugmentSpec::default(),
        }
    }
}

/// Model architectures (`model.arch`): the list lives in the model registry.
pub use crate::engine::model::ArchKind;

pub use crate::engine::model::{Activation, PerBlock};

/// Dropout when `model.dropout` is not set: the architecture's own default.
pub fn default_dropout(arch: ArchKind) -> f64 {
    arch.default_dropout()
}

/// `[model]`: the keys every architecture shares, and each architecture's
/// own keys (flattened in, so they stay `model.hidden`, `model.conv_channels`,
/// `model.embed_dim`, ...). Unknown keys are refused by the schema walk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ModelSettings {
    pub arch: ArchKind,
    pub activation: Activation,
    /// Dropout before the classifier head (and between MLP layers); unset: the
    /// architecture's default (0.5 for textcnn, 0 otherwise).
    pub dropout: Option<f64>,
    /// Each architecture's own keys (see `engine::model::registry`).
    #[serde(flatten)]
    pub archs: ArchConfigs,
    /// Safetensors weights to start from (e.g. a PyTorch `state_dict`).
    pub init: Option<PathBuf>,
    /// Only tensors of `init` under this prefix are used, with it removed
    /// (`"model."` for a Lightning module, `"module."` for DataParallel).
    pub init_prefix: Option<String>,
    /// Renames tensors of `init` (after `init_prefix`): `"old.name" = "new.name"`,
    /// or `"classifier.*" = "head.*"` for everything under a prefix.
    pub rename: BTreeMap<String, String>,
    /// Parameter-name patterns initialised afresh instead of loaded from `init`
    /// (a head whose class count changed: `["head.*"]`).
    pub reinit: Vec<String>,
    /// Parameter-name patterns (`*` wildcard) held fixed during training.
    pub freeze: Vec<String>,
    /// Which parameters train: `"full"`, `"head"`, `"last:N"` or `"bias"`
    /// (see `engine::model::finetune`); combines with `freeze`.
    pub finetune: crate::engine::model::FineTune,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            arch: ArchKind::Mlp,
            activation: Activation::Relu,
            dropout: None,
            archs: ArchConfigs::default(),
            init: None,
            init_prefix: None,
            rename: BTreeMap::new(),
            reinit: Vec::new(),
            freeze: Vec::new(),
            finetune: crate::engine::model::FineTune::Full,
        }
    }
}

pub use crate::engine::run::{EvalEvery, Monitor};

/// `[train.optimizer]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerSettings {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Defaults by kind as torch does: 0.01 for `adamw`, 0 otherwise.
    pub weight_decay: Option<f64>,
    pub amsgrad: bool,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        let d = OptimizerConfig::default();
        Self {
            kind: OptimizerKind::Adam,
            lr: d.lr,
            betas: [d.betas.0, d.betas.1],
            eps: d.eps,
            weight_decay: None,
            amsgrad: d.amsgrad,
            momentum: d.momentum,
            dampening: d.dampening,
            nesterov: d.nesterov,
        }
    }
}

impl OptimizerSettings {
    /// The weight decay in force: the configured one, else torch's default for the kind.
    pub fn effective_weight_decay(&self) -> f64 {
        self.weight_decay.unwrap_or(match self.kind {
            OptimizerKind::AdamW => 0.01,
            OptimizerKind::Adam | OptimizerKind::Sgd => 0.0,
        })
    }
}

/// LR schedule kinds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    #[default]
    Plateau,
    None,
}

/// `[train.scheduler]`: ReduceLROnPlateau.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSettings {
    pub kind: SchedulerKind,
    pub monitor: Monitor,
    /// Defaults to the monitor's natural direction.
    pub mode: Option<Mode>,
    pub factor: f64,
    pub patience: usize,
    pub threshold: f64,
    pub threshold_mode: ThresholdMode,
    pub cooldown: usize,
    pub min_lr: f64,
    pub eps: f64,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        let d = PlateauConfig::default();
        Self {
            kind: SchedulerKind::Plateau,
            monitor: Monitor::ValLoss,
            mode: None,
            factor: d.factor,
            patience: d.patience,
            threshold: d.threshold,
            threshold_mode: d.threshold_mode,
            cooldown: d.cooldown,
            min_lr: d.min_lr,
            eps: d.eps,
        }
    }
}

/// `[train.early_stopping]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EarlyStoppingSettings {
    pub enabled: bool,
    pub monitor: Monitor,
    /// Defaults to the monitor's natural direction.
    pub mode: Option<Mode>,
    /// Evaluations without improvement before stopping.
    pub patience: usize,
    pub min_delta: f64,
}

impl Default for EarlyStoppingSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            monitor: Monitor::ValLoss,
            mode: None,
            patience: 10,
            min_delta: 0.0,
        }
    }
}

/// `[train]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    pub max_epochs: u64,
    /// Stop after this many optimiser steps (none: no limit).
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub seed: u64,
    pub eval_every: EvalEvery,
    /// Per-class loss weights, in class order.
    pub class_weights: Option<Vec<f64>>,
    pub label_smoothing: f64,
    pub optimizer: OptimizerSettings,
    pub scheduler: SchedulerSettings,
    pub early_stopping: EarlyStoppingSettings,
    /// Frozen-feature cache: `"auto"` (on where valid) or `"off"`.
    pub cache_features: crate::engine::run::CacheFeatures,
    /// At most this many MiB of cached features, in memory and on disk.
    pub cache_features_mb: u64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            max_epochs: 100,
            max_steps: None,
            batch_size: 64,
            seed: 42,
            eval_every: EvalEvery::Epoch,
            class_weights: None,
            label_smoothing: 0.0,
            optimizer: OptimizerSettings::default(),
            scheduler: SchedulerSettings::default(),
            early_stopping: EarlyStoppingSettings::default(),
            cache_features: crate::engine::run::CacheFeatures::Auto,
            cache_features_mb: DEFAULT_CACHE_FEATURES_MB,
        }
    }
}

/// `train.cache_features_mb` by default.
pub const DEFAULT_CACHE_FEATURES_MB: u64 = 1024;

/// Where a retrain starts from.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WarmStartFrom {
    /// The promoted model, else `model.init`, else scratch.
    #[default]
    Current,
    Init,
    Scratch,
}

pub use crate::engine::promote::PromoteMetric;

/// `[retrain]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetrainSettings {
    pub on_start: bool,
    pub min_new_samples: u64,
    pub warm_start: WarmStartFrom,
    /// Test-split metric a candidate must match or beat to replace the current model.
    pub promote_metric: PromoteMetric,
    /// A new data file not renamed into place is taken once its size and mtime
    /// stayed unchanged this long (seconds).
    pub file_settle_s: f64,
    /// Seconds between full rescans of `data.dir` (besides file-system events).
    pub rescan_s: f64,
}

impl Default for RetrainSettings {
    fn default() -> Self {
        Self {
            on_start: false,
            min_new_samples: 1000,
            warm_start: WarmStartFrom::Current,
            promote_metric: PromoteMetric::Accuracy,
            file_settle_s: 2.0,
            rescan_s: 30.0,
        }
    }
}

/// `[output]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutputSettings {
    pub dir: PathBuf,
    /// The daemon keeps the newest this many run folders (0: all); runs behind
    /// `current`/`previous.safetensors` and runs with a resume state stay.
    pub keep_runs: u64,
    /// MiB a run must leave free on the disk beyond what it will write.
    pub min_free_mb: u64,
    /// Check the free space before a run (the disk guard).
    pub disk_guard: bool,
    /// Write `current.onnx` and `current.labels.txt` beside `current.safetensors`
    /// on each promotion (opset 13, input `input_0`, output `output_0`).
    pub export_onnx: bool,
}

impl Default for OutputSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("output"),
            keep_runs: 0,
            min_free_mb: DEFAULT_MIN_FREE_MB,
            disk_guard: true,
            export_onnx: false,
        }
    }
}

mod budget;
pub mod checks;
mod convert;
mod layers;
mod retention;
pub mod run;
mod validate;

pub use retention::{RetentionPolicy, RetentionSettings, DEFAULT_MIN_FREE_MB};

pub use budget::MAX_IMAGE_SIDE;
pub use layers::{env_overrides, load, load_layers, read_table, resolve_alias, Override};

#[cfg(test)]
mod tests;
