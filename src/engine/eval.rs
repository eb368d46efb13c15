//! Evaluation: loss, accuracy, per-class precision/recall/F1 and the confusion
//! matrix of a model over a split, in evaluation mode. Stops between batches
//! when its cancel flag is raised.

use std::path::Path;

use candle_core::{Device, D};
use serde::{Deserialize, Serialize};

use super::checkpoint::CheckpointMeta;
use super::data::{Batch, Batcher, DataSpec, SkippedFile, Split};
use super::error::RunError;
use super::loss::CrossEntropy;
use super::model::{ForwardCtx, Model};
use super::run::CancelFlag;
use super::trainer::{open_with_data, split_indices};

/// Precision, recall and F1 of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub class: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

/// The full evaluation of a model on one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub loss: f64,
    pub accuracy: f64,
    pub samples: u64,
    pub per_class: Vec<ClassMetrics>,
    /// `confusion_matrix[true][predicted]`.
    pub confusion_matrix: Vec<Vec<u64>>,
    pub macro_f1: f64,
}

/// Accumulates predictions into a confusion matrix.
#[derive(Debug, Clone)]
pub struct Confusion {
    matrix: Vec<Vec<u64>>,
}

impl Confusion {
    /// An empty matrix for `n` classes.
    pub fn new(n: usize) -> Self {
        Self {
            matrix: vec![vec![0; n]; n],
        }
    }

    /// Counts one prediction.
    pub fn add(&mut self, truth: u32, predicted: u32) {
        if let Some(row) = self.matrix.get_mut(truth as usize) {
            if let Some(cell) = row.get_mut(predicted as usize) {
                *cell += 1;
            }
        }
    }

    /// Number of samples counted.
    pub fn total(&self) -> u64 {
        self.matrix.iter().flatten().sum()
    }

    /// Fraction of correct predictions (0 when empty).
    pub fn accuracy(&self) -> f64 {
        let correct: u64 = (0..self.matrix.len()).map(|i| self.matrix[i][i]).sum();
        let total = self.total();
        if total == 0 {
            0.0
        } else {
            correct as f64 / total as f64
        }
    }

    /// Per-class metrics (0 where undefined, as scikit-learn's `zero_division=0`).
    pub fn per_class(&self, classes: &[String]) -> Vec<ClassMetrics> {
        let n = self.matrix.len();
        (0..n)
            .map(|c| {
                let tp = self.matrix[c][c] as f64;
                let support: u64 = self.matrix[c].iter().sum();
                let predicted: u64 = (0..n).map(|r| self.matrix[r][c]).sum();
                let precision = if predicted == 0 {
                    0.0
                } else {
                    tp / predicted as f64
                };
                let recall = if support == 0 {
                    0.0
                } else {
                    tp / support as f64
                };
                let f1 = if precision + recall == 0.0 {
                    0.0
                } else {
                    2.0 * precision * recall / (precision + recall)
                };
                ClassMetrics {
                    class: classes.get(c).cloned().unwrap_or_else(|| c.to_string()),
                    precision,
                    recall,
                    f1,
                    support,
                }
            })
            .collect()
    }

    /// The matrix, rows = truth, columns = prediction.
    pub fn matrix(&self) -> &[Vec<u64>] {
        &self.matrix
    }
}

/// Evaluates `model` on the samples `indices` (eval mode, no gradients kept).
/// Returns [`RunError::Cancelled`] between batches once `cancel` is raised.
pub fn evaluate(
    model: &Model,
    batcher: &Batcher,
    indices: &[usize],
    loss_fn: &CrossEntropy,
    batch_size: usize,
    classes: &[String],
    cancel: &CancelFlag,
) -> Result<EvalReport, RunError> {
    let chunks = indices
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect();
    evaluate_batches(
        model,
        batcher.batches(chunks, None),
        None,
        loss_fn,
        classes,
        cancel,
    )
}

/// Evaluates `model` on `batches`, which start at split point `from` (cached
/// frozen features) or at the input (`None`); otherwise as [`evaluate`].
pub fn evaluate_batches(
    model: &Model,
    batches: impl Iterator<Item = candle_core::Result<Batch>>,
    from: Option<usize>,
    loss_fn: &CrossEntropy,
    classes: &[String],
    cancel: &CancelFlag,
) -> Result<EvalReport, RunError> {
    let mut confusion = Confusion::new(model.spec.num_classes());
    let mut loss_num = 0f64;
    let mut loss_den = 0f64;
    let mut ctx = ForwardCtx::eval();
    for batch in batches {
        if cancel.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        let batch = batch?;
        if batch.is_empty() {
            continue;
        }
        let logits = model.forward_from(&batch.x, from, &mut ctx)?.detach();
        let parts = loss_fn.forward(&logits, &batch.y)?;
        loss_num += f64::from(parts.loss.to_scalar::<f32>()?) * parts.denom;
        loss_den += parts.denom;
        let preds = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (t, p) in batch.labels.iter().zip(preds) {
            confusion.add(*t, p);
        }
    }
    let per_class = confusion.per_class(classes);
    let macro_f1 = if per_class.is_empty() {
        0.0
    } else {
        per_class.iter().map(|c| c.f1).sum::<f64>() / per_class.len() as f64
    };
    Ok(EvalReport {
        loss: if loss_den > 0.0 {
            loss_num / loss_den
        } else {
            f64::NAN
        },
        accuracy: confusion.accuracy(),
        samples: confusion.total(),
        per_class,
        confusion_matrix: confusion.matrix().to_vec(),
        macro_f1,
    })
}

/// Evaluates a checkpoint on one split of the data it describes (for `eval`
/// and promotion): the data is read with the checkpoint's classes and
/// tokenisation, and normalised as the checkpoint says.
pub fn evaluate_checkpoint(
    path: &Path,
    data: &DataSpec,
    split: Split,
    device: &Device,
    batch_size: usize,
    loss: &CrossEntropy,
    cancel: &CancelFlag,
) -> Result<(EvalReport, CheckpointMeta, Vec<SkippedFile>), RunError> {
    let o = open_with_data(path, data, device, 0)?;
    let split_idx = o.data.split(&o.spec);
    let indices = split_indices(&split_idx, split);
    if indices.is_empty() {
        return Err(RunError::EmptySplit {
            split,
            samples: o.data.len(),
            dir: o.spec.dir.clone(),
            val_fraction: o.spec.val_fraction,
        });
    }
    let batcher = Batcher::new(&o.data, &o.meta.input.normalization, device);
    let rep = evaluate(
        &o.model,
        &batcher,
        indices,
        loss,
        batch_size,
        &o.meta.classes,
        cancel,
    )?;
    Ok((rep, o.meta, o.data.skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_class_metrics_match_hand_computation() {
        // truth:     0 0 0 1 1 2
        // predicted: 0 0 1 1 2 2
        let mut c = Confusion::new(3);
        for (t, p) in [(0, 0), (0, 0), (0, 1), (1, 1), (1, 2), (2, 2)] {
            c.add(t, p);
        }
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let m = c.per_class(&names);
        assert!((c.accuracy() - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(m[0].support, 3);
        assert!((m[0].precision - 1.0).abs() < 1e-12);
        assert!((m[0].recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((m[1].precision - 0.5).abs() < 1e-12);
        assert!((m[2].f1 - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(c.matrix()[1], vec![0, 1, 1]);
    }

    #[test]
    fn empty_class_has_zero_metrics() {
        let mut c = Confusion::new(2);
        c.add(0, 0);
        let m = c.per_class(&[]);
        assert_eq!(m[1].support, 0);
        assert_eq!(m[1].f1, 0.0);
        assert_eq!(m[1].class, "1");
    }
}
