//! `nn.Embedding(vocab, dim, padding_idx=pad)`: rows of `weight` `[V, E]` for
//! token ids; the padding row starts at zero and gets no gradient.

use candle_core::{DType, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use super::Param;
use crate::engine::kernels;
use crate::engine::model::ForwardCtx;

/// A token embedding (`weight` `[V, E]`).
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Param,
    pad: Option<usize>,
}

impl Embedding {
    /// `nn.Embedding`'s init under `vb` (`weight`): N(0, 1), the padding row zeroed.
    pub fn new(
        vocab: usize,
        dim: usize,
        pad: Option<usize>,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let init = Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        let weight = Param::new(&vb, (vocab, dim), "weight", init)?;
        let t = weight.tensor();
        if let (Some(pad), true) = (pad, t.is_variable()) {
            let mut keep = vec![1f32; vocab];
            if let Some(k) = keep.get_mut(pad) {
                *k = 0.0;
            }
            let keep = Tensor::from_vec(keep, (vocab, 1), t.device())?.to_dtype(t.dtype())?;
            Var::from_tensor(t)?.set(&t.broadcast_mul(&keep)?)?;
        }
        Ok(Self { weight, pad })
    }

    /// The table `[V, E]` (for the ONNX export).
    pub fn weight(&self) -> &Param {
        &self.weight
    }

    /// The embedding dim `E`.
    pub fn dim(&self) -> candle_core::Result<usize> {
        self.weight.tensor().dim(1)
    }

    /// `[B, L, E]` for token ids `[B, L]` (f32 or integers): our gather kernel
    /// on the CPU, `index_select` with the padding row's gradient masked out
    /// elsewhere.
    pub fn forward(&self, ids: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let w = self.weight.live(ctx);
        if ctx.use_kernels(&[&w]) {
            return kernels::text::embedding(&w, ids, self.pad);
        }
        let mut out_dims = ids.dims().to_vec();
        out_dims.push(w.dim(1)?);
        let flat = ids.to_dtype(DType::U32)?.flatten_all()?;
        let rows = w.index_select(&flat, 0)?;
        let Some(pad) = self.pad else {
            return rows.reshape(out_dims);
        };
        // The padding row takes part in the forward pass but gets no gradient.
        let keep = flat.ne(pad as u32)?.to_dtype(w.dtype())?.unsqueeze(1)?;
        let drop = keep.affine(-1.0, 1.0)?;
        (rows.broadcast_mul(&keep)? + rows.detach().broadcast_mul(&drop)?)?.reshape(out_dims)
    }
}
