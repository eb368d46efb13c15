//! `nn.Linear`: `y = x Wᵀ + b` on `[B, in]` inputs.

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use super::{Activation, Param};
use crate::engine::kernels;
use crate::engine::model::ForwardCtx;

/// A fully-connected layer: one fused kernel on the CPU ([`kernels::linear`]),
/// a matrix product elsewhere.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Param,
    bias: Param,
}

/// `nn.Linear(in_dim, out_dim)`: `weight` [out, in] and `bias` [out], both
/// initialised U(-1/sqrt(in), 1/sqrt(in)) as PyTorch does.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let bound = 1.0 / (in_dim.max(1) as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    Ok(Linear {
        weight: Param::new(&vb, (out_dim, in_dim), "weight", init)?,
        bias: Param::new(&vb, out_dim, "bias", init)?,
    })
}

/// `nn.Linear(in_dim, out_dim)` with its weight and bias drawn from
/// `weight` and `bias` (torchvision's MobileNetV2 head: N(0, 0.01) and 0).
pub fn linear_with_init(
    in_dim: usize,
    out_dim: usize,
    weight: Init,
    bias: Init,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    Ok(Linear {
        weight: Param::new(&vb, (out_dim, in_dim), "weight", weight)?,
        bias: Param::new(&vb, out_dim, "bias", bias)?,
    })
}

impl Linear {
    /// The weight `[out, in]` and bias `[out]` (for the ONNX export).
    pub fn params(&self) -> (&Param, &Param) {
        (&self.weight, &self.bias)
    }

    /// Applies the layer to `x` of shape `[B, in]`.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        self.apply(x, false, ctx)
    }

    /// `activation(forward(x))`, one fused kernel where the activation is ReLU.
    pub fn forward_activated(
        &self,
        x: &Tensor,
        activation: Activation,
        ctx: &ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        match activation {
            Activation::Relu => self.apply(x, true, ctx),
            other => other.apply(&self.apply(x, false, ctx)?),
        }
    }

    fn apply(&self, x: &Tensor, relu: bool, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let (w, b) = (self.weight.live(ctx), self.bias.live(ctx));
        if ctx.use_kernels(&[x, &w, &b]) {
            return if relu {
                kernels::linear_relu(x, &w, &b)
            } else {
                kernels::linear(x, &w, &b)
            };
        }
        let y = x.matmul(&w.t()?)?.broadcast_add(&b)?;
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }
}
