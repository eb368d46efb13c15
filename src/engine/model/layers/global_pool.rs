//! `nn.AdaptiveAvgPool2d((1, 1))` followed by `flatten(1)`: the mean of every
//! channel over all positions, `[B, C, H, W]` to `[B, C]`, for inputs of any size.

use candle_core::Tensor;

use crate::engine::model::ForwardCtx;

/// Global average pooling to one value per channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GlobalAvgPool;

impl GlobalAvgPool {
    /// The per-channel means of `x` (`[B, C, ...]`) as `[B, C]` (candle's
    /// generic ops on every device).
    pub fn forward(&self, x: &Tensor, _ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        if x.rank() < 3 {
            candle_core::bail!(
                "global average pooling takes [B, C, ...], got {:?}",
                x.dims()
            );
        }
        let (b, c) = (x.dim(0)?, x.dim(1)?);
        x.reshape((b, c, ()))?.mean(2)
    }
}
