//! The memory budget at config time: the model's footprint as far as the
//! configuration tells the shapes (image size and channels, text length,
//! layer widths, conv arithmetic, batch size), checked against
//! `device.memory_budget_mb` before any run allocates. Sizes only the data
//! tells (features of a CSV, the vocabulary) count as their smallest value
//! here; the engine checks again with the real ones before it builds the model.

use super::{invalid, ConfigError, DataFormat, Settings};
use crate::engine::budget::{optimizer_copies, Budget, Estimate, OverBudget};
use crate::engine::model::ModelSpec;

/// Largest `data.image_size` side: images are resized to it and kept decoded.
pub const MAX_IMAGE_SIDE: usize = 4096;

impl Settings {
    /// The memory budget of a training step (`device.memory_budget_mb`, or automatic).
    pub fn memory_budget(&self) -> Budget {
        Budget::from_setting(Some(self.device.memory_budget_mb))
    }

    /// The estimate for `spec` trained with these settings.
    pub fn estimate(&self, spec: &ModelSpec) -> Estimate {
        let e = Estimate::new(
            &spec.footprint(),
            self.train.batch_size,
            optimizer_copies(&self.optimizer_config()),
        );
        let d = &self.data;
        if d.format != DataFormat::ImageFolder {
            return e;
        }
        let sample = d.channels * d.image_size[0] * d.image_size[1];
        e.with_data(
            self.data_spec()
                .images
                .pipeline_bytes(sample, self.train.batch_size),
        )
    }

    /// The model as far as the configuration knows its shapes (see the module
    /// doc); `None` when the `[model]` section itself is refused (reported by
    /// [`Settings::model_template`]).
    pub fn sketch_model(&self) -> Option<ModelSpec> {
        let template = self.model_template().ok()?;
        let d = &self.data;
        let shape: Vec<usize> = match d.format {
            DataFormat::ImageFolder => vec![d.channels, d.image_size[0], d.image_size[1]],
            DataFormat::TextTsv => vec![d.max_len],
            DataFormat::Safetensors | DataFormat::Csv => vec![1],
        };
        let classes = d.classes.as_ref().map_or(2, |c| c.len().max(2));
        // The unknown and padding tokens: the smallest vocabulary.
        template.sketch(&shape, classes, 2).ok()
    }

    /// Refuses sizes that cannot be trained within the memory budget, naming
    /// the keys that size what is over it.
    pub(super) fn check_budget(&self) -> Result<(), ConfigError> {
        let d = &self.data;
        if let Some(&side) = d.image_size.iter().find(|&&s| s > MAX_IMAGE_SIDE) {
            return Err(invalid(
                "data.image_size",
                format!("{side} is larger than {MAX_IMAGE_SIDE} pixels a side"),
            ));
        }
        let Some(spec) = self.sketch_model() else {
            return Ok(());
        };
        self.memory_budget()
            .check(self.estimate(&spec))
            .map(|_| ())
            .map_err(|e| self.over_budget(&spec, e))
    }

    /// The config error for `spec` over the budget, naming its keys.
    pub fn over_budget(&self, spec: &ModelSpec, e: OverBudget) -> ConfigError {
        let activations = e.estimate.activation_bound;
        let mut keys: Vec<String> = spec
            .size_keys(activations)
            .iter()
            .map(|k| k.to_string())
            .collect();
        if activations {
            if self.data.format == DataFormat::ImageFolder {
                keys.push("data.image_size".into());
            }
            keys.push("train.batch_size".into());
        }
        let est = &e.estimate;
        if est.data_bytes > est.model_bytes.max(est.batch_bytes) {
            keys.push("data.cache_mb".into());
        }
        ConfigError::OverBudget {
            keys,
            reason: format!("{e}; make them smaller, or raise device.memory_budget_mb"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ArchKind, PerBlock};

    fn err_of(s: &Settings) -> String {
        s.validate().unwrap_err().to_string()
    }

    #[test]
    fn sizes_over_the_budget_are_refused_naming_the_key() {
        let mut s = Settings::default();
        s.model.archs.mlp.hidden = vec![1_099_511_627_776];
        let e = err_of(&s);
        assert!(
            e.contains("`model.hidden`") && e.contains("memory budget"),
            "{e}"
        );
        s.model.archs.mlp.hidden = vec![100_000, 100_000];
        assert!(err_of(&s).contains("`model.hidden`"));

        let mut s = Settings::default();
        s.model.arch = ArchKind::Cnn1d;
        s.model.archs.cnn.padding = Some(PerBlock::One(1_000_000));
        let e = err_of(&s);
        assert!(
            e.contains("`model.padding`") && e.contains("`train.batch_size`"),
            "{e}"
        );

        let mut s = Settings::default();
        s.data.format = DataFormat::ImageFolder;
        s.model.arch = ArchKind::Cnn;
        s.data.image_size = [100_000, 100_000];
        assert!(err_of(&s).contains("data.image_size"));
        // At the largest side, the default CNN's activations are over a small budget.
        s.data.image_size = [MAX_IMAGE_SIDE, MAX_IMAGE_SIDE];
        s.device.memory_budget_mb = 1024;
        let e = err_of(&s);
        assert!(
            e.contains("`data.image_size`") && e.contains("1024 MiB (device.memory_budget_mb)"),
            "{e}"
        );
    }

    #[test]
    fn the_defaults_and_a_configured_budget() {
        let s = Settings::default();
        assert!(s.validate().is_ok());
        let mut s = Settings::default();
        s.model.archs.mlp.hidden = vec![4096, 4096];
        assert!(s.validate().is_ok());
        // 16.8 M parameters * 5 copies * 4 bytes = 336 MB: over 100 MiB.
        s.device.memory_budget_mb = 100;
        assert!(err_of(&s).contains("`model.hidden`"));
    }

    #[test]
    fn the_image_cache_and_prefetched_batches_count() {
        let mut s = Settings::default();
        s.data.format = DataFormat::ImageFolder;
        s.model.arch = ArchKind::Cnn;
        s.device.memory_budget_mb = 400;
        assert!(s.validate().is_ok(), "{}", err_of(&s));
        let small = s.estimate(&s.sketch_model().unwrap());
        // 256 MiB of cache and 2 x 2 batches of 64 x 3 x 32 x 32 f32.
        assert_eq!(small.data_bytes, (256 << 20) + 4 * 64 * 3 * 32 * 32 * 4);
        s.data.cache_mb = 1024;
        let e = err_of(&s);
        assert!(
            e.contains("`data.cache_mb`") && e.contains("image cache"),
            "{e}"
        );
    }
}
