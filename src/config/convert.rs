//! Conversion of the settings into the engine's types.

use std::path::PathBuf;

use super::{key_error, ConfigError, SchedulerKind, Settings};
use crate::engine::data::{DataFormat, DataSpec};
use crate::engine::early_stop::EarlyStopConfig;
use crate::engine::model::InitMapping;
use crate::engine::optim::OptimizerConfig;
use crate::engine::run::{
    FeatureCacheSpec, ModelTemplate, Monitor, RunRequest, TrainSpec, WarmStart,
};
use crate::engine::schedule::PlateauConfig;

impl Settings {
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
            max_abs_value: d.max_abs_value.min(f32::MAX as f64) as f32,
            images: crate::engine::data::ImageOptions {
                normalize: d.normalize,
                resize: d.resize,
                cache_bytes: d.cache_mb.saturating_mul(1 << 20),
                workers: d.workers,
                prefetch: d.prefetch,
                augment: d.augment.clone(),
            },
        }
    }

    /// The model section as the engine's template (sizes from the data come later).
    pub fn model_template(&self) -> Result<ModelTemplate, ConfigError> {
        let m = &self.model;
        ModelTemplate::new(
            m.arch,
            m.activation,
            m.dropout,
            m.archs.clone(),
            self.data.format == DataFormat::TextTsv,
        )
        .map_err(key_error)
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
            finetune: self.model.finetune,
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
            memory_budget: self.memory_budget(),
            feature_cache: FeatureCacheSpec {
                mode: t.cache_features,
                dir: self.feature_cache_dir(),
                max_bytes: t.cache_features_mb.saturating_mul(1 << 20),
            },
        }
    }

    /// Where the frozen-feature cache keeps its files: `{output.dir}/feature-cache`.
    pub fn feature_cache_dir(&self) -> PathBuf {
        self.output.dir.join("feature-cache")
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
            fixed_on_resume: super::run::fixed_on_resume().collect(),
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
