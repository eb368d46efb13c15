//! Typed settings: built-in defaults, a TOML file, `EDGE_TRAINER__SECTION__KEY`
//! environment variables and `--set key=value` overrides, layered in that order
//! of precedence (later wins) with the `config` crate, then validated. Every
//! error names the key and where the bad value came from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::data::DataSpec;
use crate::engine::early_stop::EarlyStopConfig;
use crate::engine::model::InitMapping;
use crate::engine::optim::{OptimizerConfig, OptimizerKind};
use crate::engine::run::{ConvTemplate, ModelTemplate, RunRequest, TrainSpec, WarmStart};
use crate::engine::schedule::{Mode, PlateauConfig, ThresholdMode};

mod checks;

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
    /// The layered values could not be turned into settings.
    #[error("invalid configuration: {0}")]
    Other(String),
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
        }
    }
}

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
        }
    }
}

/// Model architectures.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ArchKind {
    #[default]
    Mlp,
    Cnn,
    Cnn1d,
    Textcnn,
}

pub use crate::engine::model::Activation;

/// A conv-block setting: one value for every block, or a list with one per block.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The values as a list (one value, or one per block).
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            PerBlock::One(v) => vec![v.clone()],
            PerBlock::Each(v) => v.clone(),
        }
    }
}

/// Dropout when `model.dropout` is not set: the seed's 0.5 for textcnn, else none.
pub fn default_dropout(arch: ArchKind) -> f64 {
    match arch {
        ArchKind::Textcnn => 0.5,
        _ => 0.0,
    }
}

/// `[model]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    pub arch: ArchKind,
    /// Hidden layer widths of the MLP.
    pub hidden: Vec<usize>,
    pub activation: Activation,
    /// Dropout before the classifier head (and between MLP layers); unset: 0.5
    /// for textcnn, 0 otherwise.
    pub dropout: Option<f64>,
    /// cnn / cnn1d: output channels of each conv block (one block per entry).
    pub conv_channels: Vec<usize>,
    /// cnn / cnn1d: kernel size, one for all blocks or one per block.
    pub kernel_size: PerBlock<usize>,
    /// cnn / cnn1d: convolution stride.
    pub stride: PerBlock<usize>,
    /// cnn / cnn1d: zero padding; unset: `kernel_size / 2` ("same" for odd kernels).
    pub padding: Option<PerBlock<usize>>,
    /// cnn / cnn1d: batch-norm after each convolution.
    pub batch_norm: PerBlock<bool>,
    /// cnn / cnn1d: max-pool window after each block (1: no pooling).
    pub pool: PerBlock<usize>,
    /// textcnn: embedding size.
    pub embed_dim: usize,
    /// textcnn: widths of the parallel convolutions.
    pub filter_sizes: Vec<usize>,
    /// textcnn: filters per width.
    pub num_filters: usize,
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
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            arch: ArchKind::Mlp,
            hidden: vec![128, 64],
            activation: Activation::Relu,
            dropout: None,
            conv_channels: vec![16, 32],
            kernel_size: PerBlock::One(3),
            stride: PerBlock::One(1),
            padding: None,
            batch_norm: PerBlock::One(true),
            pool: PerBlock::One(2),
            embed_dim: 300,
            filter_sizes: vec![2, 3, 4],
            num_filters: 256,
            init: None,
            init_prefix: None,
            rename: BTreeMap::new(),
            reinit: Vec::new(),
            freeze: Vec::new(),
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
        }
    }
}

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
}

impl Default for OutputSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("output"),
        }
    }
}

/// One `key=value` override and where it came from.
#[derive(Debug, Clone)]
pub struct Override {
    /// Dotted key, e.g. `train.optimizer.lr`.
    pub key: String,
    /// The value, parsed as a TOML literal where possible, else a string.
    pub value: toml::Value,
    /// Where it came from, for error messages.
    pub origin: String,
}

impl Override {
    /// Parses `key=value` as given to `--set`.
    pub fn parse_set(arg: &str) -> Result<Self, ConfigError> {
        let (key, raw) = arg
            .split_once('=')
            .ok_or_else(|| ConfigError::BadOverride {
                arg: arg.to_string(),
                reason: "expected KEY=VALUE".into(),
            })?;
        let key = key.trim();
        if key.is_empty() {
            return Err(ConfigError::BadOverride {
                arg: arg.to_string(),
                reason: "empty key".into(),
            });
        }
        Ok(Self {
            key: key.to_string(),
            value: parse_literal(raw.trim()),
            origin: format!("--set {arg}"),
        })
    }

    /// Builds an override from a JSON value (as sent in an MQTT command).
    pub fn from_json(
        key: &str,
        value: &serde_json::Value,
        origin: &str,
    ) -> Result<Self, ConfigError> {
        let value = json_to_toml(value).ok_or_else(|| ConfigError::BadOverride {
            arg: key.to_string(),
            reason: "null is not a value".into(),
        })?;
        Ok(Self {
            key: key.to_string(),
            value,
            origin: origin.to_string(),
        })
    }
}

/// Reads a value as a TOML literal (`0.01`, `true`, `[1, 2]`, `"x"`), falling back
/// to the raw text as a string.
fn parse_literal(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn json_to_toml(v: &serde_json::Value) -> Option<toml::Value> {
    Some(match v {
        serde_json::Value::Null => return None,
        serde_json::Value::Bool(b) => toml::Value::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        serde_json::Value::String(s) => toml::Value::String(s.clone()),
        serde_json::Value::Array(a) => {
            toml::Value::Array(a.iter().map(json_to_toml).collect::<Option<Vec<_>>>()?)
        }
        serde_json::Value::Object(o) => {
            let mut t = toml::Table::new();
            for (k, v) in o {
                t.insert(k.clone(), json_to_toml(v)?);
            }
            toml::Value::Table(t)
        }
    })
}

fn toml_to_config(v: &toml::Value) -> config::Value {
    use config::ValueKind;
    let kind = match v {
        toml::Value::String(s) => ValueKind::String(s.clone()),
        toml::Value::Integer(i) => ValueKind::I64(*i),
        toml::Value::Float(f) => ValueKind::Float(*f),
        toml::Value::Boolean(b) => ValueKind::Boolean(*b),
        toml::Value::Datetime(d) => ValueKind::String(d.to_string()),
        toml::Value::Array(a) => ValueKind::Array(a.iter().map(toml_to_config).collect()),
        toml::Value::Table(t) => ValueKind::Table(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_config(v)))
                .collect(),
        ),
    };
    config::Value::new(None, kind)
}

/// Collects `EDGE_TRAINER__SECTION__KEY=value` variables from the given environment.
pub fn env_overrides<I>(vars: I) -> Vec<Override>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut out: Vec<Override> = vars
        .into_iter()
        .filter_map(|(name, value)| {
            let rest = name.strip_prefix(ENV_PREFIX)?;
            let key = rest
                .split("__")
                .map(|p| p.to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join(".");
            Some(Override {
                key,
                value: parse_literal(value.trim()),
                origin: format!("environment variable {name}"),
            })
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// The schema of known keys: the default settings as JSON, every key present.
fn schema() -> serde_json::Value {
    serde_json::to_value(Settings::default()).unwrap_or(serde_json::Value::Null)
}

fn resolve_alias(key: &str) -> String {
    KEY_ALIASES
        .iter()
        .find(|(alias, _)| *alias == key)
        .map(|(_, full)| full.to_string())
        .unwrap_or_else(|| key.to_string())
}

/// Tables whose keys are the user's own (names of tensors), not settings.
const FREE_FORM_TABLES: &[&str] = &["model.rename"];

/// Checks that `key` (dotted) names a known setting; suggests the nearest one if not.
fn check_key(schema: &serde_json::Value, key: &str, origin: &str) -> Result<(), ConfigError> {
    let mut node = schema;
    let mut walked = Vec::new();
    for part in key.split('.') {
        if !walked.is_empty() && FREE_FORM_TABLES.contains(&walked.join(".").as_str()) {
            return Ok(());
        }
        let obj = match node {
            serde_json::Value::Object(o) => o,
            // A leaf (or an optional list) reached before the key ended.
            _ => {
                return Err(ConfigError::UnknownKey {
                    key: key.to_string(),
                    origin: origin.to_string(),
                    hint: format!(" (`{}` is a value, not a section)", walked.join(".")),
                })
            }
        };
        match obj.get(part) {
            Some(child) => {
                walked.push(part.to_string());
                node = child;
            }
            None => {
                let best = obj
                    .keys()
                    .map(|k| (strsim::levenshtein(k, part), k))
                    .filter(|(d, _)| *d <= 3)
                    .min();
                let hint = match best {
                    Some((_, k)) => {
                        walked.push(k.clone());
                        format!("; did you mean `{}`?", walked.join("."))
                    }
                    None if walked.is_empty() => format!(
                        "; known sections: {}",
                        obj.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                    None => format!(
                        "; `{}` has: {}",
                        walked.join("."),
                        obj.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                };
                return Err(ConfigError::UnknownKey {
                    key: key.to_string(),
                    origin: origin.to_string(),
                    hint,
                });
            }
        }
    }
    Ok(())
}

/// Walks a TOML table and checks every leaf key against the schema.
fn check_table(
    schema: &serde_json::Value,
    table: &toml::Table,
    prefix: &str,
    origin: &str,
) -> Result<(), ConfigError> {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let key = resolve_alias(&key);
        check_key(schema, &key, origin)?;
        if let toml::Value::Table(t) = v {
            if FREE_FORM_TABLES.contains(&key.as_str()) {
                continue;
            }
            // A table value must itself be a section in the schema.
            check_table(schema, t, &key, origin)?;
        }
    }
    Ok(())
}

/// Loads settings from a file plus overrides (environment first, then `--set`).
pub fn load(path: &Path, overrides: &[Override]) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let settings = load_layers(&table, &path.display().to_string(), overrides)?;
    // Relative paths in the file are relative to the working directory, as a
    // user typing them at a shell expects; nothing to rewrite here.
    settings.validate()?;
    Ok(settings)
}

/// Builds settings from an already-parsed file table and overrides, without validation.
pub fn load_layers(
    file: &toml::Table,
    file_origin: &str,
    overrides: &[Override],
) -> Result<Settings, ConfigError> {
    let schema = schema();
    check_table(&schema, file, "", file_origin)?;
    let mut builder = config::Config::builder().add_source(config::File::from_str(
        &toml::to_string(&rename_aliases(file)).map_err(|e| ConfigError::Other(e.to_string()))?,
        config::FileFormat::Toml,
    ));
    for ov in overrides {
        let key = resolve_alias(&ov.key);
        check_key(&schema, &key, &ov.origin)?;
        if let toml::Value::Table(t) = &ov.value {
            check_table(&schema, t, &key, &ov.origin)?;
        }
        builder = builder
            .set_override(key.as_str(), toml_to_config(&ov.value))
            .map_err(|e| ConfigError::BadOverride {
                arg: ov.origin.clone(),
                reason: e.to_string(),
            })?;
    }
    let cfg = builder
        .build()
        .map_err(|e| ConfigError::Other(e.to_string()))?;
    let mut settings = cfg
        .try_deserialize::<Settings>()
        .map_err(|e| type_error(e, overrides, file_origin))?;
    let o = &mut settings.train.optimizer;
    o.weight_decay = Some(o.effective_weight_decay());
    Ok(settings)
}

/// Rewrites alias keys (`train.lr`) in a file table to their full form.
fn rename_aliases(table: &toml::Table) -> toml::Table {
    let mut out = table.clone();
    for (alias, full) in KEY_ALIASES {
        let (a_sec, a_key) = alias.split_once('.').unwrap_or(("", alias));
        let value = out
            .get_mut(a_sec)
            .and_then(|v| v.as_table_mut())
            .and_then(|t| t.remove(a_key));
        if let Some(value) = value {
            let mut node = &mut out;
            let parts: Vec<&str> = full.split('.').collect();
            for part in &parts[..parts.len() - 1] {
                let entry = node
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match entry {
                    toml::Value::Table(t) => node = t,
                    _ => return out,
                }
            }
            if let Some(last) = parts.last() {
                node.insert(last.to_string(), value);
            }
        }
    }
    out
}

/// Turns a deserialisation error into one that names the key and its origin.
fn type_error(e: config::ConfigError, overrides: &[Override], file_origin: &str) -> ConfigError {
    let msg = e.to_string();
    // config's messages end with "for key `a.b`" (sometimes "in <source>").
    let key = msg
        .split("for key `")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .map(str::to_string);
    match key {
        Some(key) => {
            let origin = overrides
                .iter()
                .rev()
                .find(|o| resolve_alias(&o.key) == key || key.starts_with(&format!("{}.", o.key)))
                .map(|o| o.origin.clone())
                .unwrap_or_else(|| file_origin.to_string());
            let reason = msg.split(" for key `").next().unwrap_or(&msg).to_string();
            invalid(&key, format!("{reason} (from {origin})"))
        }
        None => ConfigError::Other(format!("{msg} (in {file_origin} or its overrides)")),
    }
}

fn check_range(
    key: &str,
    v: f64,
    lo: f64,
    hi: f64,
    lo_incl: bool,
    hi_incl: bool,
) -> Result<(), ConfigError> {
    let ok_lo = if lo_incl { v >= lo } else { v > lo };
    let ok_hi = if hi_incl { v <= hi } else { v < hi };
    if v.is_finite() && ok_lo && ok_hi {
        Ok(())
    } else {
        let l = if lo_incl { "[" } else { "(" };
        let h = if hi_incl { "]" } else { ")" };
        Err(invalid(key, format!("{v} is outside {l}{lo}, {hi}{h}")))
    }
}

impl Settings {
    /// Refuses secret files (`mqtt.password_file`, `mqtt.tls.client_key`) that
    /// other users can read, or that are missing. Checked by the daemon at start
    /// and by `check-config`.
    pub fn check_secret_files(&self) -> Result<(), ConfigError> {
        use std::os::unix::fs::PermissionsExt;
        let secrets = [
            ("mqtt.password_file", self.mqtt.password_file.as_ref()),
            ("mqtt.tls.client_key", self.mqtt.tls.client_key.as_ref()),
        ];
        for (key, path) in secrets {
            let Some(path) = path else { continue };
            let meta = std::fs::metadata(path)
                .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o007 != 0 {
                return Err(invalid(
                    key,
                    format!(
                        "{} is accessible to every user (mode {mode:04o}); run `chmod 600 {}`",
                        path.display(),
                        path.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks ranges and cross-field rules; the error names the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.data;
        check_range("data.val_fraction", d.val_fraction, 0.0, 1.0, true, false)?;
        check_range("data.test_fraction", d.test_fraction, 0.0, 1.0, true, false)?;
        if d.val_fraction <= 0.0 {
            return Err(invalid(
                "data.val_fraction",
                "must be > 0: training needs a validation split to evaluate on",
            ));
        }
        if d.val_fraction + d.test_fraction >= 1.0 {
            return Err(invalid(
                "data.test_fraction",
                format!(
                    "data.val_fraction + data.test_fraction = {} leaves no training data",
                    d.val_fraction + d.test_fraction
                ),
            ));
        }
        if d.delimiter.len() != 1 {
            return Err(invalid(
                "data.delimiter",
                "must be a single ASCII character",
            ));
        }
        if d.x_key.is_empty() {
            return Err(invalid("data.x_key", "must not be empty"));
        }
        if d.y_key.is_empty() {
            return Err(invalid("data.y_key", "must not be empty"));
        }
        if d.image_size.contains(&0) {
            return Err(invalid("data.image_size", "both sides must be > 0"));
        }
        if !matches!(d.channels, 1 | 3) {
            return Err(invalid("data.channels", "must be 1 or 3"));
        }
        if d.max_file_mb == 0 {
            return Err(invalid("data.max_file_mb", "must be >= 1"));
        }
        if d.max_len == 0 {
            return Err(invalid("data.max_len", "must be > 0"));
        }
        if let Some(c) = &d.classes {
            if c.len() < 2 {
                return Err(invalid("data.classes", "needs at least two classes"));
            }
        }

        let m = &self.model;
        if m.hidden.contains(&0) {
            return Err(invalid("model.hidden", "every layer width must be > 0"));
        }
        if let Some(d) = m.dropout {
            check_range("model.dropout", d, 0.0, 1.0, true, false)?;
        }
        if m.conv_channels.is_empty() || m.conv_channels.contains(&0) {
            return Err(invalid(
                "model.conv_channels",
                "needs at least one block, each with >= 1 channel",
            ));
        }
        for (key, values) in [
            ("model.kernel_size", m.kernel_size.to_vec()),
            ("model.stride", m.stride.to_vec()),
            ("model.pool", m.pool.to_vec()),
        ] {
            if values.is_empty() || values.contains(&0) {
                return Err(invalid(key, "every value must be >= 1"));
            }
        }
        if m.embed_dim == 0 {
            return Err(invalid("model.embed_dim", "must be >= 1"));
        }
        if m.num_filters == 0 {
            return Err(invalid("model.num_filters", "must be >= 1"));
        }
        if m.filter_sizes.is_empty() || m.filter_sizes.contains(&0) {
            return Err(invalid(
                "model.filter_sizes",
                "needs at least one width, each >= 1",
            ));
        }
        if m.arch == ArchKind::Textcnn {
            if let Some(&k) = m.filter_sizes.iter().find(|&&k| k > d.max_len) {
                return Err(invalid(
                    "model.filter_sizes",
                    format!(
                        "filter size {k} is longer than data.max_len = {}",
                        d.max_len
                    ),
                ));
            }
        }
        if d.max_vocab == 0 {
            return Err(invalid("data.max_vocab", "must be >= 1"));
        }
        if m.init_prefix.as_deref() == Some("") {
            return Err(invalid(
                "model.init_prefix",
                "must not be empty (omit it instead)",
            ));
        }
        for (from, to) in &m.rename {
            let wild = |s: &str| s.contains('*');
            let ok = !from.is_empty()
                && !to.is_empty()
                && ((!wild(from) && !wild(to))
                    || (from.ends_with('*')
                        && to.ends_with('*')
                        && !wild(&from[..from.len() - 1])
                        && !wild(&to[..to.len() - 1])));
            if !ok {
                return Err(invalid(
                    "model.rename",
                    format!(
                        "{from:?} = {to:?}: give two names, or two prefixes ending in `*` (\"classifier.*\" = \"head.*\")"
                    ),
                ));
            }
        }
        for (key, patterns) in [("model.reinit", &m.reinit), ("model.freeze", &m.freeze)] {
            if patterns.iter().any(|p| p.is_empty()) {
                return Err(invalid(key, "patterns must not be empty"));
            }
        }
        if (m.init_prefix.is_some() || !m.rename.is_empty() || !m.reinit.is_empty())
            && m.init.is_none()
        {
            let key = if m.init_prefix.is_some() {
                "model.init_prefix"
            } else if !m.rename.is_empty() {
                "model.rename"
            } else {
                "model.reinit"
            };
            return Err(invalid(
                key,
                "only applies to weights loaded with model.init; set model.init",
            ));
        }

        let t = &self.train;
        if t.max_epochs == 0 {
            return Err(invalid("train.max_epochs", "must be >= 1"));
        }
        if t.max_steps == Some(0) {
            return Err(invalid(
                "train.max_steps",
                "must be >= 1 (omit it for no limit)",
            ));
        }
        if t.batch_size == 0 {
            return Err(invalid("train.batch_size", "must be >= 1"));
        }
        check_range(
            "train.label_smoothing",
            t.label_smoothing,
            0.0,
            1.0,
            true,
            true,
        )?;
        if let Some(w) = &t.class_weights {
            for (i, v) in w.iter().enumerate() {
                if !(v.is_finite() && *v >= 0.0) {
                    return Err(invalid(
                        "train.class_weights",
                        format!("weight {i} is {v}; weights must be finite and >= 0"),
                    ));
                }
            }
            if w.iter().all(|v| *v == 0.0) {
                return Err(invalid("train.class_weights", "all weights are zero"));
            }
        }

        let o = &t.optimizer;
        check_range("train.optimizer.lr", o.lr, 0.0, f64::MAX, false, true)?;
        check_range("train.optimizer.betas", o.betas[0], 0.0, 1.0, true, false)?;
        check_range("train.optimizer.betas", o.betas[1], 0.0, 1.0, true, false)?;
        check_range("train.optimizer.eps", o.eps, 0.0, f64::MAX, true, true)?;
        check_range(
            "train.optimizer.weight_decay",
            o.effective_weight_decay(),
            0.0,
            f64::MAX,
            true,
            true,
        )?;
        check_range(
            "train.optimizer.momentum",
            o.momentum,
            0.0,
            f64::MAX,
            true,
            true,
        )?;
        check_range(
            "train.optimizer.dampening",
            o.dampening,
            0.0,
            1.0,
            true,
            true,
        )?;
        if o.nesterov && (o.momentum <= 0.0 || o.dampening != 0.0) {
            return Err(invalid(
                "train.optimizer.nesterov",
                "nesterov needs momentum > 0 and dampening = 0 (as torch.optim.SGD)",
            ));
        }

        let s = &t.scheduler;
        check_range("train.scheduler.factor", s.factor, 0.0, 1.0, false, false)?;
        check_range(
            "train.scheduler.threshold",
            s.threshold,
            0.0,
            f64::MAX,
            true,
            true,
        )?;
        check_range(
            "train.scheduler.min_lr",
            s.min_lr,
            0.0,
            f64::MAX,
            true,
            true,
        )?;
        check_range("train.scheduler.eps", s.eps, 0.0, f64::MAX, true, true)?;

        let e = &t.early_stopping;
        check_range(
            "train.early_stopping.min_delta",
            e.min_delta,
            0.0,
            f64::MAX,
            true,
            true,
        )?;

        if self.mqtt.host.trim().is_empty() {
            return Err(invalid("mqtt.host", "must not be empty"));
        }
        if self.mqtt.topic_prefix.is_empty() || self.mqtt.topic_prefix.contains(['#', '+']) {
            return Err(invalid(
                "mqtt.topic_prefix",
                "must be non-empty and contain no MQTT wildcards (# +)",
            ));
        }
        if let Some(id) = &self.mqtt.device_id {
            if id.is_empty() || id.contains(['#', '+', '/']) {
                return Err(invalid(
                    "mqtt.device_id",
                    "must be non-empty and contain no '/', '#' or '+'",
                ));
            }
        }
        if self.mqtt.keep_alive_s == 0 {
            return Err(invalid("mqtt.keep_alive_s", "must be >= 1"));
        }
        check_range(
            "mqtt.reconnect_max_s",
            self.mqtt.reconnect_max_s,
            0.1,
            86_400.0,
            true,
            true,
        )?;
        if self.mqtt.outbox_capacity < 10 {
            return Err(invalid("mqtt.outbox_capacity", "must be >= 10"));
        }
        let (c, k) = (&self.mqtt.tls.client_cert, &self.mqtt.tls.client_key);
        if c.is_some() != k.is_some() {
            return Err(invalid(
                "mqtt.tls.client_cert",
                "mqtt.tls.client_cert and mqtt.tls.client_key go together: set both or neither",
            ));
        }
        if c.is_some() && self.mqtt.tls.ca.is_none() {
            return Err(invalid(
                "mqtt.tls.ca",
                "a client certificate needs TLS: set mqtt.tls.ca to the broker's CA file",
            ));
        }
        if self.mqtt.password_file.is_some() && self.mqtt.username.is_none() {
            return Err(invalid("mqtt.password_file", "needs mqtt.username"));
        }
        let r = &self.retrain;
        check_range(
            "retrain.file_settle_s",
            r.file_settle_s,
            0.0,
            3_600.0,
            true,
            true,
        )?;
        check_range("retrain.rescan_s", r.rescan_s, 0.1, 86_400.0, true, true)?;
        if self.output.dir.as_os_str().is_empty() {
            return Err(invalid("output.dir", "must not be empty"));
        }
        checks::check(self)
    }

    /// The optimiser configuration for the engine.
    pub fn optimizer_config(&self) -> OptimizerConfig {
        let o = &self.train.optimizer;
        OptimizerConfig {
            kind: o.kind,
            lr: o.lr,
            betas: (o.betas[0], o.betas[1]),
            eps: o.eps,
            weight_decay: o.effective_weight_decay(),
            amsgrad: o.amsgrad,
            momentum: o.momentum,
            dampening: o.dampening,
            nesterov: o.nesterov,
        }
    }

    /// The plateau scheduler configuration, or `None` when scheduling is off.
    pub fn plateau_config(&self) -> Option<(Monitor, PlateauConfig)> {
        let s = &self.train.scheduler;
        match s.kind {
            SchedulerKind::None => None,
            SchedulerKind::Plateau => Some((
                s.monitor,
                PlateauConfig {
                    mode: s.mode.unwrap_or(s.monitor.natural_mode()),
                    factor: s.factor,
                    patience: s.patience,
                    threshold: s.threshold,
                    threshold_mode: s.threshold_mode,
                    cooldown: s.cooldown,
                    min_lr: s.min_lr,
                    eps: s.eps,
                },
            )),
        }
    }

    /// The effective settings as JSON with secrets masked (for printing and summaries).
    pub fn masked_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(user) = v.pointer_mut("/mqtt/username") {
            if !user.is_null() {
                *user = serde_json::Value::String("***".into());
            }
        }
        v
    }

    /// The effective settings as TOML with secrets masked.
    pub fn masked_toml(&self) -> String {
        let json = self.masked_json();
        let cleaned = strip_nulls(json);
        match serde_json::from_value::<toml::Value>(cleaned) {
            Ok(t) => toml::to_string_pretty(&t).unwrap_or_default(),
            Err(e) => format!("# cannot render settings: {e}\n"),
        }
    }
}

impl Settings {
    /// The data section as the engine's spec.
    pub fn data_spec(&self) -> DataSpec {
        let d = &self.data;
        DataSpec {
            dir: d.dir.clone(),
            format: d.format,
            val_fraction: d.val_fraction,
            test_fraction: d.test_fraction,
            split_seed: d.split_seed,
            x_key: d.x_key.clone(),
            y_key: d.y_key.clone(),
            label_column: d.label_column.clone(),
            delimiter: d.delimiter.as_bytes().first().copied().unwrap_or(b','),
            classes: d.classes.clone(),
            image_size: d.image_size,
            channels: d.channels,
            tokenizer: d.tokenizer,
            max_len: d.max_len,
            vocab_file: d.vocab.clone(),
            max_vocab: d.max_vocab,
            min_freq: d.min_freq,
            vocab: None,
            only_files: None,
            max_file_bytes: d.max_file_mb.saturating_mul(1 << 20),
        }
    }

    /// The model section as the engine's template (sizes from the data come later).
    pub fn model_template(&self) -> Result<ModelTemplate, ConfigError> {
        let m = &self.model;
        let dropout = m.dropout.unwrap_or(default_dropout(m.arch));
        let conv = || ConvTemplate {
            channels: m.conv_channels.clone(),
            kernel_size: m.kernel_size.to_vec(),
            stride: m.stride.to_vec(),
            padding: m.padding.as_ref().map(PerBlock::to_vec),
            batch_norm: m.batch_norm.to_vec(),
            pool: m.pool.to_vec(),
            activation: m.activation,
            dropout,
        };
        let blocks = m.conv_channels.len();
        if matches!(m.arch, ArchKind::Cnn | ArchKind::Cnn1d) {
            let lens = [
                ("model.kernel_size", m.kernel_size.to_vec().len()),
                ("model.stride", m.stride.to_vec().len()),
                (
                    "model.padding",
                    m.padding.as_ref().map_or(1, |p| p.to_vec().len()),
                ),
                ("model.batch_norm", m.batch_norm.to_vec().len()),
                ("model.pool", m.pool.to_vec().len()),
            ];
            if let Some((key, n)) = lens.iter().find(|(_, n)| *n != 1 && *n != blocks) {
                return Err(invalid(
                    key,
                    format!(
                        "has {n} values but model.conv_channels makes {blocks} blocks; give one value or {blocks}"
                    ),
                ));
            }
        }
        let text = self.data.format == DataFormat::TextTsv;
        match (m.arch, text) {
            (ArchKind::Textcnn, false) => {
                return Err(invalid(
                    "model.arch",
                    "\"textcnn\" reads text: set data.format = \"text-tsv\"",
                ))
            }
            (ArchKind::Mlp | ArchKind::Cnn | ArchKind::Cnn1d, true) => {
                return Err(invalid(
                    "model.arch",
                    "text data (data.format = \"text-tsv\") needs model.arch = \"textcnn\"",
                ))
            }
            _ => {}
        }
        Ok(match m.arch {
            ArchKind::Mlp => ModelTemplate::Mlp {
                hidden: m.hidden.clone(),
                activation: m.activation,
                dropout,
            },
            ArchKind::Cnn => ModelTemplate::Cnn(conv()),
            ArchKind::Cnn1d => ModelTemplate::Cnn1d(conv()),
            ArchKind::Textcnn => ModelTemplate::TextCnn {
                embed_dim: m.embed_dim,
                filter_sizes: m.filter_sizes.clone(),
                num_filters: m.num_filters,
                dropout,
            },
        })
    }

    /// The train section as the engine's spec.
    pub fn train_spec(&self) -> TrainSpec {
        let t = &self.train;
        let e = &t.early_stopping;
        TrainSpec {
            max_epochs: t.max_epochs,
            max_steps: t.max_steps,
            batch_size: t.batch_size,
            seed: t.seed,
            eval_every: t.eval_every,
            class_weights: t.class_weights.clone(),
            label_smoothing: t.label_smoothing,
            optimizer: self.optimizer_config(),
            scheduler: self.plateau_config(),
            early_stopping: (
                e.monitor,
                EarlyStopConfig {
                    enabled: e.enabled,
                    mode: e.mode.unwrap_or(e.monitor.natural_mode()),
                    patience: e.patience,
                    min_delta: e.min_delta,
                },
            ),
            freeze: self.model.freeze.clone(),
            init: InitMapping {
                prefix: self.model.init_prefix.clone(),
                rename: self
                    .model
                    .rename
                    .iter()
                    .map(|(a, b)| (a.clone(), b.clone()))
                    .collect(),
                reinit: self.model.reinit.clone(),
            },
        }
    }

    /// Where run folders go: `{output.dir}/runs`.
    pub fn runs_dir(&self) -> PathBuf {
        self.output.dir.join("runs")
    }

    /// A complete run request for the engine.
    pub fn run_request(
        &self,
        run_id: String,
        device: candle_core::Device,
        warm_start: WarmStart,
    ) -> Result<RunRequest, ConfigError> {
        Ok(RunRequest {
            run_id,
            runs_dir: self.runs_dir(),
            data: self.data_spec(),
            model: self.model_template()?,
            warm_start,
            train: self.train_spec(),
            device,
            config: self.masked_json(),
            resume: false,
        })
    }
}

/// TOML has no null: unset optional keys are dropped from the rendering.
fn strip_nulls(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(o) => serde_json::Value::Object(
            o.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        other => other,
    }
}

/// A short, human-readable listing of which layers were applied.
#[derive(Debug, Default)]
pub struct LayerReport {
    pub file: PathBuf,
    pub overrides: BTreeMap<String, String>,
}

impl fmt::Display for LayerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# file: {}", self.file.display())?;
        for (k, origin) in &self.overrides {
            writeln!(f, "# {k} overridden by {origin}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn defaults_are_valid() {
        Settings::default().validate().unwrap();
    }

    #[test]
    fn file_values_override_defaults() {
        let s = load_layers(
            &table("[train]\nbatch_size = 32\n[train.optimizer]\nlr = 0.01\n"),
            "test.toml",
            &[],
        )
        .unwrap();
        assert_eq!(s.train.batch_size, 32);
        assert_eq!(s.train.optimizer.lr, 0.01);
        assert_eq!(s.train.max_epochs, 100);
    }

    #[test]
    fn set_beats_env_beats_file() {
        let file = table("[train]\nbatch_size = 32\nseed = 1\nmax_epochs = 7\n");
        let mut ovs = env_overrides(vec![
            (
                "EDGE_TRAINER__TRAIN__BATCH_SIZE".to_string(),
                "16".to_string(),
            ),
            ("EDGE_TRAINER__TRAIN__SEED".to_string(), "2".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
        ]);
        ovs.push(Override::parse_set("train.batch_size=8").unwrap());
        let s = load_layers(&file, "f.toml", &ovs).unwrap();
        assert_eq!(s.train.batch_size, 8);
        assert_eq!(s.train.seed, 2);
        assert_eq!(s.train.max_epochs, 7);
    }

    #[test]
    fn alias_train_lr() {
        let ovs = vec![Override::parse_set("train.lr=0.5").unwrap()];
        let s = load_layers(&table(""), "f", &ovs).unwrap();
        assert_eq!(s.train.optimizer.lr, 0.5);
        let s = load_layers(&table("[train]\nlr = 0.25\n"), "f", &[]).unwrap();
        assert_eq!(s.train.optimizer.lr, 0.25);
    }

    #[test]
    fn lists_and_strings_from_set() {
        let ovs = vec![
            Override::parse_set("model.hidden=[32, 16]").unwrap(),
            Override::parse_set("train.eval_every=50").unwrap(),
            Override::parse_set("data.dir=some/where").unwrap(),
        ];
        let s = load_layers(&table(""), "f", &ovs).unwrap();
        assert_eq!(s.model.hidden, vec![32, 16]);
        assert_eq!(s.train.eval_every, EvalEvery::Steps(50));
        assert_eq!(s.data.dir, PathBuf::from("some/where"));
    }

    #[test]
    fn unknown_key_is_named_with_suggestion() {
        let err = load_layers(&table("[train.optimizer]\nlrr = 0.1\n"), "my.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.optimizer.lrr"), "{err}");
        assert!(err.contains("my.toml"), "{err}");
        assert!(err.contains("did you mean `train.optimizer.lr`"), "{err}");
        let err = load_layers(&table("[trian]\nx = 1\n"), "my.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`trian`") && err.contains("did you mean `train`"),
            "{err}"
        );
        let err = load_layers(
            &table(""),
            "f",
            &[Override::parse_set("train.nope=1").unwrap()],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("train.nope") && err.contains("--set"), "{err}");
    }

    #[test]
    fn wrong_type_names_key() {
        let err = load_layers(&table("[train]\nbatch_size = \"big\"\n"), "f.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.batch_size"), "{err}");
    }

    #[test]
    fn out_of_range_names_key() {
        let mut s = Settings::default();
        s.train.optimizer.lr = -1.0;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("train.optimizer.lr"), "{err}");
        let mut s = Settings::default();
        s.data.val_fraction = 0.6;
        s.data.test_fraction = 0.5;
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("data.test_fraction"));
        let mut s = Settings::default();
        s.train.optimizer.nesterov = true;
        assert!(s.validate().unwrap_err().to_string().contains("nesterov"));
    }

    #[test]
    fn eval_every_forms() {
        for (src, want) in [
            ("eval_every = \"epoch\"", EvalEvery::Epoch),
            ("eval_every = 10", EvalEvery::Steps(10)),
        ] {
            let s = load_layers(&table(&format!("[train]\n{src}\n")), "f", &[]).unwrap();
            assert_eq!(s.train.eval_every, want);
        }
        assert!(load_layers(&table("[train]\neval_every = 0\n"), "f", &[]).is_err());
        assert!(load_layers(&table("[train]\neval_every = \"often\"\n"), "f", &[]).is_err());
    }

    #[test]
    fn model_keys_for_every_architecture() {
        let s = load_layers(
            &table(
                "[data]\nformat = \"image-folder\"\n[model]\narch = \"cnn\"\nconv_channels = [8, 16, 32]\nkernel_size = [5, 3, 3]\npool = 2\nbatch_norm = [true, true, false]\ninit = \"w.safetensors\"\ninit_prefix = \"model.\"\nreinit = [\"head.*\"]\n[model.rename]\n\"classifier.*\" = \"head.*\"\n\"Block.0.W\" = \"features.0.conv.weight\"\n",
            ),
            "f.toml",
            &[],
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(
            s.model.rename.get("classifier.*").map(String::as_str),
            Some("head.*")
        );
        assert_eq!(
            s.model.rename.get("Block.0.W").map(String::as_str),
            Some("features.0.conv.weight")
        );
        assert_eq!(s.model.kernel_size, PerBlock::Each(vec![5, 3, 3]));
        assert_eq!(s.model.pool, PerBlock::One(2));
        match s.model_template().unwrap() {
            ModelTemplate::Cnn(c) => {
                assert_eq!(c.kernel_size, vec![5, 3, 3]);
                assert_eq!(c.dropout, 0.0);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            s.masked_toml().contains("\"classifier.*\" = \"head.*\""),
            "{}",
            s.masked_toml()
        );
        // A list of the wrong length names the key.
        let ovs = vec![Override::parse_set("model.stride=[1, 2, 1]").unwrap()];
        let bad = load_layers(&table("[model]\narch = \"cnn1d\"\n"), "f", &ovs).unwrap();
        let e = bad.model_template().unwrap_err().to_string();
        assert!(e.contains("model.stride") && e.contains("3 values"), "{e}");
        // textcnn: the seed's defaults, and text only.
        let t = load_layers(
            &table("[data]\nformat = \"text-tsv\"\n[model]\narch = \"textcnn\"\n"),
            "f",
            &[],
        )
        .unwrap();
        match t.model_template().unwrap() {
            ModelTemplate::TextCnn {
                embed_dim,
                filter_sizes,
                num_filters,
                dropout,
            } => {
                assert_eq!((embed_dim, num_filters, dropout), (300, 256, 0.5));
                assert_eq!(filter_sizes, vec![2, 3, 4]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.data.max_len, 32);
        let e = load_layers(&table("[model]\narch = \"textcnn\"\n"), "f", &[])
            .unwrap()
            .model_template()
            .unwrap_err()
            .to_string();
        assert!(e.contains("text-tsv"), "{e}");
        // Mapping keys without model.init are a mistake.
        let e = load_layers(&table("[model]\nreinit = [\"head.*\"]\n"), "f", &[])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.reinit") && e.contains("model.init"),
            "{e}"
        );
    }

    #[test]
    fn adamw_weight_decay_defaults_like_torch() {
        let s = load_layers(&table("[train.optimizer]\nkind = \"adamw\"\n"), "f", &[]).unwrap();
        assert_eq!(s.train.optimizer.weight_decay, Some(0.01));
        let s = load_layers(&table("[train.optimizer]\nkind = \"adam\"\n"), "f", &[]).unwrap();
        assert_eq!(s.train.optimizer.weight_decay, Some(0.0));
        let s = load_layers(
            &table("[train.optimizer]\nkind = \"adamw\"\nweight_decay = 0.0\n"),
            "f",
            &[],
        )
        .unwrap();
        assert_eq!(s.train.optimizer.weight_decay, Some(0.0));
    }

    #[test]
    fn world_readable_secrets_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "secret").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut s = Settings::default();
        s.mqtt.password_file = Some(p.clone());
        let e = s.check_secret_files().unwrap_err().to_string();
        assert!(
            e.contains("mqtt.password_file") && e.contains("0644"),
            "{e}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        s.check_secret_files().unwrap();
        s.mqtt.tls.client_key = Some(dir.path().join("missing.key"));
        let e = s.check_secret_files().unwrap_err().to_string();
        assert!(e.contains("mqtt.tls.client_key"), "{e}");
    }

    #[test]
    fn masked_output_hides_username() {
        let mut s = Settings::default();
        s.mqtt.username = Some("alice".into());
        let t = s.masked_toml();
        assert!(!t.contains("alice"));
        assert!(t.contains("***"));
    }
}
