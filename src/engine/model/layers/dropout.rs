//! `nn.Dropout(p)`: inverted dropout in training, the identity in evaluation.

use candle_core::Tensor;

use crate::engine::model::ForwardCtx;

/// Dropout with probability `p`; the mask is drawn from the context's RNG.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f64,
}

impl Dropout {
    /// Dropout with probability `p`.
    pub fn new(p: f64) -> Self {
        Self { p }
    }

    /// Applies dropout (training mode only).
    pub fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        ctx.dropout(x, self.p)
    }
}
