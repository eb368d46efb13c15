//! The TextCNN's convolution: `relu(Conv2d(1, F, (k, E)))` over an embedded
//! sequence `[B, L, E]` followed by max-over-time: `[B, F]`, the gradient
//! going to the first maximum of each filter.

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use super::{max_first, Param};
use crate::engine::kernels;
use crate::engine::model::ForwardCtx;

/// One width of the TextCNN: weight `[F, 1, k, E]` (as PyTorch stores it), bias `[F]`.
#[derive(Debug, Clone)]
pub struct TextConv {
    weight: Param,
    bias: Param,
    k: usize,
}

impl TextConv {
    /// `nn.Conv2d(1, filters, (k, embed))` under `vb`, PyTorch's init.
    pub fn new(
        filters: usize,
        k: usize,
        embed: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let bound = 1.0 / ((k * embed).max(1) as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Ok(Self {
            weight: Param::new(&vb, (filters, 1, k, embed), "weight", init)?,
            bias: Param::new(&vb, filters, "bias", init)?,
            k,
        })
    }

    /// The weight `[F, 1, k, E]` and bias `[F]` (for the ONNX export).
    pub fn params(&self) -> (&Param, &Param) {
        (&self.weight, &self.bias)
    }

    /// `max_t relu(conv(x)[t])` for `x` `[B, L, E]`: one fused kernel on the
    /// CPU, a matrix product over sliding windows elsewhere (the same arithmetic).
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let (w, b) = (self.weight.live(ctx), self.bias.live(ctx));
        if ctx.use_kernels(&[x, &w, &b]) {
            return kernels::text::conv_relu_max_over_time(x, &w, &b);
        }
        let (batch, l, e) = x.dims3()?;
        let (f, k) = (w.dim(0)?, self.k);
        if k == 0 || k > l {
            candle_core::bail!("conv over time: filter size {k} does not fit a sequence of {l}");
        }
        let n = l + 1 - k;
        // Sliding windows [B, n, k*E]: window t is rows t..t+k, concatenated.
        let parts: Vec<Tensor> = (0..k)
            .map(|j| x.narrow(1, j, n))
            .collect::<candle_core::Result<_>>()?;
        let windows = Tensor::cat(&parts, 2)?;
        let out = windows
            .reshape((batch * n, k * e))?
            .matmul(&w.reshape((f, k * e))?.t()?)?
            .broadcast_add(&b)?
            .relu()?
            .reshape((batch, n, f))?;
        max_first(&out, 1)
    }
}
