//! One training step: forward, loss, backward, optimiser update. The trainer
//! and `edge-trainer bench` both run this function, so the bench measures the
//! step that trains.

use candle_core::D;

use crate::engine::data::Batch;
use crate::engine::kernels::direct_grads;
use crate::engine::loss::CrossEntropy;
use crate::engine::model::{ForwardCtx, Model};
use crate::engine::optim::AnyOptimizer;

/// What one step produced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOut {
    /// The batch's mean loss (before the update).
    pub loss: f64,
    /// The loss's normaliser (sum of sample weights), for weighted interval means.
    pub denom: f64,
    /// Correct predictions in the batch (before the update).
    pub correct: u64,
    /// Samples in the batch.
    pub seen: u64,
}

/// Why a step did not update the model.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The loss is NaN or infinite; the optimiser was not stepped.
    #[error("the training loss became {0}")]
    NonFinite(f64),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// The phases of a step, reported to a [`StepObserver`] as each one ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Forward pass, loss and predictions.
    Forward,
    /// Gradients.
    Backward,
    /// Parameter update.
    Update,
}

/// Sees the end of each phase (the bench times them; the trainer does not look).
pub trait StepObserver {
    /// Called when `phase` is done.
    fn phase_done(&mut self, phase: Phase) -> candle_core::Result<()>;
}

impl StepObserver for () {
    fn phase_done(&mut self, _: Phase) -> candle_core::Result<()> {
        Ok(())
    }
}

/// Trains `model` on one batch: forward in training mode, the loss, its
/// gradients, one optimiser step. A non-finite loss stops before the update.
pub fn train_step(
    model: &Model,
    batch: &Batch,
    loss_fn: &CrossEntropy,
    optimizer: &mut AnyOptimizer,
    ctx: &mut ForwardCtx,
    observer: &mut dyn StepObserver,
) -> Result<StepOut, StepError> {
    train_step_from(model, None, batch, loss_fn, optimizer, ctx, observer)
}

/// [`train_step`] on a batch that starts at split point `from` (cached
/// frozen features), or at the input when `from` is `None`.
pub fn train_step_from(
    model: &Model,
    from: Option<usize>,
    batch: &Batch,
    loss_fn: &CrossEntropy,
    optimizer: &mut AnyOptimizer,
    ctx: &mut ForwardCtx,
    observer: &mut dyn StepObserver,
) -> Result<StepOut, StepError> {
    let logits = model.forward_from(&batch.x, from, ctx)?;
    let parts = loss_fn.forward(&logits, &batch.y)?;
    let loss = f64::from(parts.loss.to_scalar::<f32>()?);
    if !loss.is_finite() {
        return Err(StepError::NonFinite(loss));
    }
    let preds = logits.detach().argmax(D::Minus1)?.to_vec1::<u32>()?;
    let correct = preds
        .iter()
        .zip(&batch.labels)
        .filter(|(p, t)| p == t)
        .count() as u64;
    observer.phase_done(Phase::Forward)?;
    let grads = direct_grads::backward(&parts.loss)?;
    observer.phase_done(Phase::Backward)?;
    optimizer.step(&grads)?;
    drop(grads);
    observer.phase_done(Phase::Update)?;
    Ok(StepOut {
        loss,
        denom: parts.denom,
        correct,
        seen: batch.len() as u64,
    })
}
