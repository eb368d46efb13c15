//! The resource budget: the memory one training step needs, estimated from the
//! model's resolved shapes before anything is allocated, against a limit
//! (`device.memory_budget_mb`, or half the memory the machine has available).
//!
//! Each architecture computes its own [`Footprint`] from its spec (see
//! `engine::model::registry`); [`Estimate`] turns it into bytes for a batch
//! size and an optimiser: f32 weights, their gradients, the optimiser's state
//! (Adam: two more copies) and one more copy for checkpoints, plus the
//! activations a batch keeps for the backward pass and their gradients. All
//! arithmetic saturates, so absurd sizes give a huge estimate, never an overflow.

use std::fmt;

use crate::engine::optim::{OptimizerConfig, OptimizerKind};

/// Bytes of one value (f32).
const VALUE_BYTES: u64 = 4;

/// Smallest automatic budget, whatever the machine reports.
pub const MIN_AUTO_BUDGET_BYTES: u64 = 256 << 20;

/// Automatic budget when the machine's memory cannot be read.
pub const FALLBACK_BUDGET_BYTES: u64 = 2 << 30;

/// What a model needs, in values (f32), from its resolved shapes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Trainable parameters.
    pub params: u64,
    /// Other state kept with the model (batch-norm running statistics).
    pub buffers: u64,
    /// Values of one input sample.
    pub input: u64,
    /// Values the forward pass of one sample creates (layer outputs, unfolded
    /// convolution windows, masks), an upper estimate.
    pub activations: u64,
    /// Whether the activations outweigh the parameters for one sample
    /// (decides which keys a refusal names); set by [`Footprint::finish`].
    pub activation_bound: bool,
}

/// Saturating sum of `values`.
pub fn sum(values: impl IntoIterator<Item = u64>) -> u64 {
    values.into_iter().fold(0, u64::saturating_add)
}

/// Saturating product of `values`.
pub fn product(values: impl IntoIterator<Item = u64>) -> u64 {
    values.into_iter().fold(1, u64::saturating_mul)
}

/// `n` as u64 (saturating on exotic targets).
pub fn n(v: usize) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// Parameters of a linear layer `inputs -> outputs` with a bias.
pub fn linear_params(inputs: u64, outputs: u64) -> u64 {
    inputs.saturating_mul(outputs).saturating_add(outputs)
}

impl Footprint {
    /// Marks which part dominates; call once the fields are filled.
    pub fn finish(mut self) -> Self {
        self.activation_bound = self.activations > self.params;
        self
    }
}

/// Copies of the parameters the optimiser keeps as state.
pub fn optimizer_copies(o: &OptimizerConfig) -> u64 {
    match o.kind {
        OptimizerKind::Adam | OptimizerKind::AdamW => 2 + u64::from(o.amsgrad),
        OptimizerKind::Sgd => u64::from(o.momentum != 0.0),
    }
}

/// The bytes a training step needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Trainable parameters.
    pub params: u64,
    /// Weights, gradients, optimiser state, a checkpoint copy and buffers.
    pub model_bytes: u64,
    /// Inputs and activations of one batch, with their gradients.
    pub batch_bytes: u64,
    /// Samples per batch.
    pub batch_size: u64,
    /// Whether the batch (inputs, activations) takes more than the model.
    pub activation_bound: bool,
    /// What the data pipeline holds besides the step: streamed images'
    /// cache (`data.cache_mb`) and the batches the workers prepare ahead.
    pub data_bytes: u64,
}

impl Estimate {
    /// The estimate for `fp` trained in batches of `batch_size` with an
    /// optimiser keeping `optimizer_copies` copies of the parameters.
    pub fn new(fp: &Footprint, batch_size: usize, optimizer_copies: u64) -> Self {
        let batch = n(batch_size);
        // Weights, gradients, optimiser state, and one copy for checkpoints.
        let param_copies = 3u64.saturating_add(optimizer_copies);
        let model_values = sum([
            fp.params.saturating_mul(param_copies),
            fp.buffers.saturating_mul(2),
        ]);
        // Each activation has a gradient of its size in the backward pass.
        let per_sample = sum([fp.input, fp.activations.saturating_mul(2)]);
        Self {
            params: fp.params,
            model_bytes: model_values.saturating_mul(VALUE_BYTES),
            batch_bytes: per_sample.saturating_mul(batch).saturating_mul(VALUE_BYTES),
            batch_size: batch,
            activation_bound: false,
            data_bytes: 0,
        }
        .finish()
    }

    /// The same estimate with `bytes` held by the data pipeline.
    pub fn with_data(mut self, bytes: u64) -> Self {
        self.data_bytes = bytes;
        self
    }

    /// Marks whether the batch outweighs the model.
    fn finish(mut self) -> Self {
        self.activation_bound = self.batch_bytes > self.model_bytes;
        self
    }

    /// Everything together.
    pub fn total_bytes(&self) -> u64 {
        sum([self.model_bytes, self.batch_bytes, self.data_bytes])
    }
}

impl fmt::Display for Estimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "about {} ({} parameters: {} for weights, gradients and optimiser state; {} for a batch of {})",
            Bytes(self.total_bytes()),
            self.params,
            Bytes(self.model_bytes),
            Bytes(self.batch_bytes),
            self.batch_size
        )?;
        if self.data_bytes > 0 {
            write!(
                f,
                " and {} for the image cache and prefetched batches (data.cache_mb, data.workers, data.prefetch)",
                Bytes(self.data_bytes)
            )?;
        }
        Ok(())
    }
}

/// A byte count for people (`12.3 MiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut v = self.0 as f64;
        let mut unit = 0;
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} bytes", self.0)
        } else {
            write!(f, "{v:.1} {}", UNITS[unit])
        }
    }
}

/// Where the budget came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetSource {
    /// `device.memory_budget_mb`.
    Configured,
    /// Half the memory available to this process (`/proc/meminfo`, cgroup limit).
    Automatic,
    /// The machine's memory could not be read.
    Fallback,
}

/// The memory a training step may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub bytes: u64,
    pub source: BudgetSource,
}

impl Budget {
    /// `device.memory_budget_mb` when set and not 0, else the automatic budget.
    pub fn from_setting(mb: Option<u64>) -> Self {
        match mb {
            Some(mb) if mb > 0 => Self {
                bytes: mb.saturating_mul(1 << 20),
                source: BudgetSource::Configured,
            },
            _ => automatic(),
        }
    }

    /// Refuses `estimate` when it is over the budget.
    pub fn check(&self, estimate: Estimate) -> Result<Estimate, OverBudget> {
        if estimate.total_bytes() > self.bytes {
            Err(OverBudget {
                estimate,
                budget: *self,
            })
        } else {
            Ok(estimate)
        }
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mb = self.bytes >> 20;
        match self.source {
            BudgetSource::Configured => write!(f, "{mb} MiB (device.memory_budget_mb)"),
            BudgetSource::Automatic => write!(
                f,
                "{mb} MiB (automatic: half the memory available; set device.memory_budget_mb to change it)"
            ),
            BudgetSource::Fallback => write!(
                f,
                "{mb} MiB (automatic: the machine's memory is unknown; set device.memory_budget_mb)"
            ),
        }
    }
}

/// A training step that would need more memory than the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("training needs {estimate}, over the memory budget of {budget}")]
pub struct OverBudget {
    pub estimate: Estimate,
    pub budget: Budget,
}

/// Half of the memory available to this process: the smaller of
/// `MemAvailable` and the cgroup's remaining limit; at least
/// [`MIN_AUTO_BUDGET_BYTES`].
pub fn automatic() -> Budget {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let available = meminfo.as_deref().and_then(mem_available);
    let Some(available) = available else {
        return Budget {
            bytes: FALLBACK_BUDGET_BYTES,
            source: BudgetSource::Fallback,
        };
    };
    let available = match cgroup_room() {
        Some(room) => available.min(room),
        None => available,
    };
    Budget {
        bytes: (available / 2).max(MIN_AUTO_BUDGET_BYTES),
        source: BudgetSource::Automatic,
    }
}

/// `MemAvailable` (else `MemTotal`) of a `/proc/meminfo` text, in bytes.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    let field = |name: &str| {
        meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb.saturating_mul(1024))
        })
    };
    field("MemAvailable").or_else(|| field("MemTotal"))
}

/// Room left under this process's cgroup (v2) memory limit, if it has one.
fn cgroup_room() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?; // "max": no limit
    let current: u64 = read("memory.current")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    Some(max.saturating_sub(current))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read_in_bytes() {
        let text = "MemTotal:       24731136 kB\nMemFree:  1 kB\nMemAvailable:   22456789 kB\n";
        assert_eq!(mem_available(text), Some(22_456_789 * 1024));
        assert_eq!(mem_available("MemTotal: 10 kB\n"), Some(10 * 1024));
        assert_eq!(mem_available("nothing"), None);
    }

    #[test]
    fn the_automatic_budget_has_a_floor_and_a_setting_wins() {
        let auto = Budget::from_setting(None);
        assert!(auto.bytes >= MIN_AUTO_BUDGET_BYTES);
        assert_eq!(Budget::from_setting(Some(0)).source, auto.source);
        let set = Budget::from_setting(Some(100));
        assert_eq!(set.bytes, 100 << 20);
        assert_eq!(set.source, BudgetSource::Configured);
    }

    #[test]
    fn estimates_saturate_and_are_checked() {
        let fp = Footprint {
            params: u64::MAX / 2,
            buffers: 0,
            input: 10,
            activations: 10,
            activation_bound: false,
        };
        let e = Estimate::new(&fp, 64, 2);
        assert_eq!(e.total_bytes(), u64::MAX);
        let b = Budget::from_setting(Some(1));
        let err = b.check(e).unwrap_err().to_string();
        assert!(err.contains("1 MiB (device.memory_budget_mb)"), "{err}");
        // 1000 params * 5 copies * 4 bytes + 64 * (10 + 20) * 4 bytes.
        let small = Footprint { params: 1000, ..fp };
        let e = Estimate::new(&small, 64, 2);
        assert_eq!(e.total_bytes(), 20_000 + 7_680);
        assert!(b.check(e).is_ok());
        assert_eq!(Bytes(1536).to_string(), "1.5 KiB");
        assert_eq!(Bytes(12).to_string(), "12 bytes");
    }
}
