//! `textcnn`: the seed's text classifier (Kim, 2014): token embedding, parallel
//! convolutions of several widths over the whole embedding, ReLU, max-over-time
//! pooling, dropout and a linear layer.
//!
//! PyTorch twin, the seed's `Model` with its sizes as arguments (parameter names
//! `embedding.weight`, `convs.{i}.weight|bias`, `fc.weight|bias`, so a state dict
//! saved by the seed loads as it is):
//! ```python
//! class TextCNN(nn.Module):
//!     def __init__(self, n_vocab, pad_index, embed=300, filter_sizes=(2, 3, 4),
//!                  num_filters=256, num_classes=10, dropout=0.5):
//!         super().__init__()
//!         self.embedding = nn.Embedding(n_vocab, embed, padding_idx=pad_index)
//!         self.convs = nn.ModuleList(nn.Conv2d(1, num_filters, (k, embed)) for k in filter_sizes)
//!         self.dropout = nn.Dropout(dropout)
//!         self.fc = nn.Linear(num_filters * len(filter_sizes), num_classes)
//!     def forward(self, x):                       # x: [B, L] token ids
//!         out = self.embedding(x).unsqueeze(1)    # [B, 1, L, E]
//!         out = torch.cat([F.relu(conv(out)).squeeze(3).max(dim=2).values
//!                          for conv in self.convs], 1)
//!         return self.fc(self.dropout(out))
//! ```
//! The convolutions are computed as one matrix product over sliding windows,
//! which is the same arithmetic as `Conv2d(1, F, (k, E))` and fast on a CPU.

use candle_core::{DType, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::layers::{linear, Dense};
use super::pool::max_first;
use super::{Classifier, ForwardCtx};
use crate::engine::kernels;

/// Sizes of a TextCNN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextCnnSpec {
    /// Rows of the embedding: the vocabulary size (with the unknown and padding tokens).
    pub vocab_size: usize,
    /// Row of the padding token: it gets no gradient, as `padding_idx` in PyTorch.
    pub pad_index: usize,
    pub embed_dim: usize,
    pub filter_sizes: Vec<usize>,
    pub num_filters: usize,
    /// Tokens per sample (`data.max_len`).
    pub seq_len: usize,
    pub num_classes: usize,
    pub dropout: f64,
}

impl TextCnnSpec {
    /// Checks the sizes against each other.
    pub fn check(&self) -> Result<(), String> {
        if self.vocab_size == 0 || self.embed_dim == 0 || self.num_filters == 0 {
            return Err("vocab_size, embed_dim and num_filters must be >= 1".into());
        }
        if self.pad_index >= self.vocab_size {
            return Err(format!(
                "pad_index {} is outside the vocabulary of {}",
                self.pad_index, self.vocab_size
            ));
        }
        if self.filter_sizes.is_empty() || self.filter_sizes.contains(&0) {
            return Err("filter_sizes needs at least one width, each >= 1".into());
        }
        if let Some(&k) = self.filter_sizes.iter().find(|&&k| k > self.seq_len) {
            return Err(format!(
                "filter size {k} is longer than the sequence length {} (data.max_len)",
                self.seq_len
            ));
        }
        Ok(())
    }
}

struct TextConv {
    /// [F, 1, k, E] as PyTorch stores it.
    weight: Tensor,
    bias: Tensor,
    k: usize,
}

/// The TextCNN itself.
pub struct TextCnn {
    spec: TextCnnSpec,
    embedding: Tensor,
    convs: Vec<TextConv>,
    fc: Dense,
}

impl TextCnn {
    /// Builds the layers under `vb` (`embedding.weight`, `convs.N.*`, `fc.*`).
    pub fn new(spec: &TextCnnSpec, vb: VarBuilder) -> candle_core::Result<Self> {
        spec.check().map_err(candle_core::Error::msg)?;
        let (v, e) = (spec.vocab_size, spec.embed_dim);
        // nn.Embedding: N(0, 1), the padding row zeroed.
        let embedding = vb.pp("embedding").get_with_hints(
            (v, e),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        if embedding.is_variable() {
            let mut keep = vec![1f32; v];
            keep[spec.pad_index] = 0.0;
            let keep = Tensor::from_vec(keep, (v, 1), embedding.device())?;
            let zeroed = embedding.broadcast_mul(&keep)?;
            Var::from_tensor(&embedding)?.set(&zeroed)?;
        }
        let cv = vb.pp("convs");
        let mut convs = Vec::with_capacity(spec.filter_sizes.len());
        for (i, &k) in spec.filter_sizes.iter().enumerate() {
            let bound = 1.0 / ((k * e) as f64).sqrt();
            let init = Init::Uniform {
                lo: -bound,
                up: bound,
            };
            let c = cv.pp(i.to_string());
            let weight = c.get_with_hints((spec.num_filters, 1, k, e), "weight", init)?;
            let bias = c.get_with_hints(spec.num_filters, "bias", init)?;
            convs.push(TextConv { weight, bias, k });
        }
        let fc = linear(
            spec.num_filters * spec.filter_sizes.len(),
            spec.num_classes,
            vb.pp("fc"),
        )?;
        Ok(Self {
            spec: spec.clone(),
            embedding,
            convs,
            fc,
        })
    }
}

impl Classifier for TextCnn {
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        if kernels::on_cpu_f32(&[&self.embedding]) {
            // On the CPU: the embedding gather and, per filter width, one fused
            // convolution + ReLU + max-over-time kernel (same values and gradients).
            let emb = kernels::text::embedding(&self.embedding, x, Some(self.spec.pad_index))?;
            let pooled = self
                .convs
                .iter()
                .map(|c| kernels::text::conv_relu_max_over_time(&emb, &c.weight, &c.bias))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let x = Tensor::cat(&pooled, 1)?;
            let x = ctx.dropout(&x, self.spec.dropout)?;
            return self.fc.forward(&x);
        }
        let (b, l) = x.dims2()?;
        let e = self.spec.embed_dim;
        let ids = x.to_dtype(DType::U32)?.flatten_all()?;
        let rows = self.embedding.index_select(&ids, 0)?; // [B*L, E]
                                                          // padding_idx: the padding row takes part in the forward pass but gets no gradient.
        let keep = ids
            .ne(self.spec.pad_index as u32)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        let drop = keep.affine(-1.0, 1.0)?;
        let rows = (rows.broadcast_mul(&keep)? + rows.detach().broadcast_mul(&drop)?)?;
        let emb = rows.reshape((b, l, e))?;
        let mut pooled = Vec::with_capacity(self.convs.len());
        for conv in &self.convs {
            let n = l + 1 - conv.k;
            // Sliding windows [B, n, k*E]: window t is rows t..t+k, concatenated.
            let parts: Vec<Tensor> = (0..conv.k)
                .map(|j| emb.narrow(1, j, n))
                .collect::<candle_core::Result<_>>()?;
            let windows = Tensor::cat(&parts, 2)?;
            let f = self.spec.num_filters;
            let w = conv.weight.reshape((f, conv.k * e))?.t()?;
            let out = windows
                .reshape((b * n, conv.k * e))?
                .matmul(&w)?
                .broadcast_add(&conv.bias)?
                .relu()?
                .reshape((b, n, f))?;
            pooled.push(max_first(&out, 1)?);
        }
        let x = Tensor::cat(&pooled, 1)?;
        let x = ctx.dropout(&x, self.spec.dropout)?;
        self.fc.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Model, ModelSpec};
    use super::*;
    use candle_core::Device;

    fn spec() -> TextCnnSpec {
        TextCnnSpec {
            vocab_size: 10,
            pad_index: 9,
            embed_dim: 4,
            filter_sizes: vec![2, 3],
            num_filters: 5,
            seq_len: 6,
            num_classes: 3,
            dropout: 0.5,
        }
    }

    #[test]
    fn seed_names_and_padding_row() {
        let m = Model::new(ModelSpec::TextCnn(spec()), 1, &Device::Cpu).unwrap();
        let sd = m.params.state_dict();
        let names: Vec<(String, Vec<usize>)> = sd
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("convs.0.bias".into(), vec![5]),
                ("convs.0.weight".into(), vec![5, 1, 2, 4]),
                ("convs.1.bias".into(), vec![5]),
                ("convs.1.weight".into(), vec![5, 1, 3, 4]),
                ("embedding.weight".into(), vec![10, 4]),
                ("fc.bias".into(), vec![3]),
                ("fc.weight".into(), vec![3, 10]),
            ]
        );
        let emb = sd[4].1.to_vec2::<f32>().unwrap();
        assert_eq!(emb[9], vec![0.0; 4]);
        assert!(emb[0].iter().any(|v| *v != 0.0));
    }

    #[test]
    fn padding_row_gets_no_gradient() {
        let m = Model::new(ModelSpec::TextCnn(spec()), 1, &Device::Cpu).unwrap();
        let x = Tensor::new(
            &[[1f32, 2., 3., 9., 9., 9.], [4., 4., 9., 9., 9., 9.]],
            &Device::Cpu,
        )
        .unwrap();
        let y = m.forward(&x, &mut ForwardCtx::eval()).unwrap();
        assert_eq!(y.dims(), &[2, 3]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let (_, emb) = m
            .params
            .trainable()
            .into_iter()
            .find(|(n, _)| n == "embedding.weight")
            .unwrap();
        let g = grads
            .get(emb.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(g[9], vec![0.0; 4]);
        assert!(g[1].iter().any(|v| *v != 0.0));
        assert_eq!(g[0], vec![0.0; 4]);
    }

    #[test]
    fn filters_longer_than_the_text_are_refused() {
        let mut s = spec();
        s.seq_len = 2;
        assert!(s.check().unwrap_err().contains("filter size 3"));
    }
}
