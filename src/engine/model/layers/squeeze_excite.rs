//! torchvision's `SqueezeExcitation` as MobileNetV3 uses it: the mean of each
//! channel over all positions, `fc1` (a 1x1 convolution with bias) to
//! `squeeze` channels, ReLU, `fc2` back, a hard sigmoid, and the input scaled
//! channel by channel with the result.

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use super::hard_act::Hardsigmoid;
use super::{conv_with_init, Conv, ConvConfig};
use crate::engine::model::ForwardCtx;

/// A squeeze-and-excitation gate (`fc1`, `fc2` under its prefix).
pub struct SqueezeExcite {
    fc1: Conv,
    fc2: Conv,
}

impl SqueezeExcite {
    /// `channels` -> `squeeze` -> `channels`, both convolutions initialised
    /// with `init` and zero biases (torchvision's MobileNetV3).
    pub fn new(
        channels: usize,
        squeeze: usize,
        init: Init,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let one = ConvConfig::default();
        let zero = Some(Init::Const(0.0));
        Ok(Self {
            fc1: conv_with_init(2, (channels, squeeze), 1, one, zero, init, vb.pp("fc1"))?,
            fc2: conv_with_init(2, (squeeze, channels), 1, one, zero, init, vb.pp("fc2"))?,
        })
    }

    /// `x * hardsigmoid(fc2(relu(fc1(mean(x)))))` for `x` of `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let (b, c) = (x.dim(0)?, x.dim(1)?);
        let s = x.reshape((b, c, ()))?.mean(2)?.reshape((b, c, 1, 1))?;
        let s = self.fc1.forward(&s, ctx)?.relu()?;
        let s = Hardsigmoid.forward(&self.fc2.forward(&s, ctx)?, ctx)?;
        x.broadcast_mul(&s)
    }

    /// The two convolutions (for the ONNX export).
    pub fn convs(&self) -> (&Conv, &Conv) {
        (&self.fc1, &self.fc2)
    }
}
