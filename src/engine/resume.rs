//! Resume state: everything a run needs to continue exactly where it was after
//! a crash or a shutdown, written atomically as one safetensors file
//! (`runs/{run_id}/resume.safetensors`) at every evaluation and on cancel.
//! Tensors are grouped by prefix (`model/`, `optim/`, `best/`); the rest is
//! JSON in the metadata key `resume`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::{read_tensors, to_safetensors_bytes, CheckpointError};
use super::early_stop::EarlyStopping;
use super::fsutil::atomic_write;
use super::optim::OptimizerStateMeta;
use super::run::BestRecord;
use super::schedule::ReduceLrOnPlateau;

/// File name of the resume state inside a run folder.
pub const RESUME_FILE: &str = "resume.safetensors";
/// Marks resume files (field `format`).
pub const RESUME_FORMAT: &str = "edge-trainer-resume/1";

/// Sums over the steps since the last evaluation (restored mid-interval on resume).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IntervalState {
    pub loss_sum: f64,
    pub loss_den: f64,
    pub correct: u64,
    pub seen: u64,
}

impl IntervalState {
    /// Adds one batch: its mean loss (weighted by `denom`) and its correct/seen counts.
    pub fn add(&mut self, loss: f64, denom: f64, correct: u64, seen: u64) {
        self.loss_sum += loss * denom;
        self.loss_den += denom;
        self.correct += correct;
        self.seen += seen;
    }

    /// Mean training loss of the interval (NaN when empty).
    pub fn loss(&self) -> f64 {
        if self.loss_den > 0.0 {
            self.loss_sum / self.loss_den
        } else {
            f64::NAN
        }
    }

    /// Training accuracy of the interval (NaN when empty).
    pub fn acc(&self) -> f64 {
        if self.seen > 0 {
            self.correct as f64 / self.seen as f64
        } else {
            f64::NAN
        }
    }
}

/// The non-tensor part of the resume state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeMeta {
    pub format: String,
    pub run_id: String,
    /// The epoch (1-based) the run continues in...
    pub next_epoch: u64,
    /// ...after skipping this many of its batches (already trained).
    pub skip_batches: u64,
    /// Optimiser steps done.
    pub step: u64,
    /// Seconds of training before the interruption.
    pub elapsed_s: f64,
    /// The data files the run trains on (relative to the data folder).
    pub data_files: Vec<String>,
    pub early_stopping: EarlyStopping,
    pub scheduler: Option<ReduceLrOnPlateau>,
    pub best: Option<BestRecord>,
    /// Best values so far (`None` before the first finite one).
    pub best_val_loss: Option<f64>,
    pub best_val_acc: Option<f64>,
    pub last_eval_step: u64,
    pub interval: IntervalState,
    pub optimizer: OptimizerStateMeta,
    /// Dropout RNG position, as a decimal string (a u128).
    pub dropout_rng_word_pos: String,
    /// The effective configuration the run started with.
    pub config: serde_json::Value,
}

/// A resume state read back.
pub struct ResumeState {
    pub meta: ResumeMeta,
    /// The model's state dict at the time of writing.
    pub model: HashMap<String, Tensor>,
    /// The optimiser's state tensors.
    pub optim: HashMap<String, Tensor>,
    /// The best model so far (empty if none yet).
    pub best: HashMap<String, Tensor>,
}

/// Writes the resume state atomically.
pub fn save(
    path: &Path,
    meta: &ResumeMeta,
    model: &[(String, Tensor)],
    optim: &[(String, Tensor)],
    best: Option<&[(String, Tensor)]>,
) -> Result<(), CheckpointError> {
    let err = |reason: String| CheckpointError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let mut all: Vec<(String, Tensor)> = Vec::new();
    for (prefix, group) in [
        ("model/", Some(model)),
        ("optim/", Some(optim)),
        ("best/", best),
    ] {
        for (name, t) in group.unwrap_or_default() {
            all.push((format!("{prefix}{name}"), t.clone()));
        }
    }
    let json = serde_json::to_string(meta).map_err(|e| err(e.to_string()))?;
    let metadata = HashMap::from([("resume".to_string(), json)]);
    let bytes = to_safetensors_bytes(&all, Some(metadata)).map_err(|e| err(e.to_string()))?;
    atomic_write(path, &bytes).map_err(|source| CheckpointError::WriteIo {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a resume state; the error says what is wrong with the file.
pub fn load(path: &Path, device: &Device) -> Result<ResumeState, CheckpointError> {
    let (tensors, metadata) = read_tensors(path, device)?;
    let err = |reason: String| CheckpointError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let json = metadata
        .get("resume")
        .ok_or_else(|| err("not a resume state (no `resume` metadata)".into()))?;
    let meta: ResumeMeta =
        serde_json::from_str(json).map_err(|e| err(format!("bad resume metadata: {e}")))?;
    if meta.format != RESUME_FORMAT {
        return Err(err(format!(
            "unsupported resume format {:?} (expected {RESUME_FORMAT:?})",
            meta.format
        )));
    }
    let mut state = ResumeState {
        meta,
        model: HashMap::new(),
        optim: HashMap::new(),
        best: HashMap::new(),
    };
    for (name, t) in tensors {
        if let Some(n) = name.strip_prefix("model/") {
            state.model.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("optim/") {
            state.optim.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix("best/") {
            state.best.insert(n.to_string(), t);
        } else {
            return Err(err(format!("unexpected tensor `{name}`")));
        }
    }
    Ok(state)
}

/// Reads only the metadata of a run folder's resume state, if it has one
/// (for a daemon deciding what to resume after a restart).
pub fn read_meta(run_dir: &Path) -> Option<Result<ResumeMeta, CheckpointError>> {
    let path = run_dir.join(RESUME_FILE);
    if !path.is_file() {
        return None;
    }
    Some(load(&path, &Device::Cpu).map(|s| s.meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::early_stop::EarlyStopConfig;
    use crate::engine::optim::OptimizerKind;
    use crate::engine::schedule::{Mode, PlateauConfig};

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(RESUME_FILE);
        let mut sched = ReduceLrOnPlateau::new(PlateauConfig::default());
        sched.step(1.0, 0.1);
        let meta = ResumeMeta {
            format: RESUME_FORMAT.into(),
            run_id: "r".into(),
            next_epoch: 3,
            skip_batches: 2,
            step: 22,
            elapsed_s: 1.5,
            data_files: vec!["a.safetensors".into()],
            early_stopping: EarlyStopping::new(EarlyStopConfig {
                enabled: true,
                mode: Mode::Min,
                patience: 3,
                min_delta: 0.0,
            }),
            scheduler: Some(sched),
            best: None,
            best_val_loss: None,
            best_val_acc: Some(0.5),
            last_eval_step: 20,
            interval: IntervalState::default(),
            optimizer: OptimizerStateMeta {
                kind: OptimizerKind::Adam,
                lr: 0.1,
                steps: Default::default(),
            },
            dropout_rng_word_pos: "12345678901234567890123".into(),
            config: serde_json::json!({"a": 1}),
        };
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let model = vec![("w".to_string(), t.clone())];
        let optim = vec![("w.exp_avg".to_string(), t.clone())];
        save(&p, &meta, &model, &optim, None).unwrap();
        let back = load(&p, &Device::Cpu).unwrap();
        assert_eq!(back.meta, meta);
        assert_eq!(back.model["w"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        assert!(back.optim.contains_key("w.exp_avg"));
        assert!(back.best.is_empty());
        assert_eq!(read_meta(dir.path()).unwrap().unwrap().step, 22);
    }
}
