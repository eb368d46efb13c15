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

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::error::{KeyError, KeyProblem, ModelError, SpecError};
use super::layers::{linear, Dropout, Embedding, Linear, TextConv};
use super::registry::Common;
use super::split::{self, SplitPoint, Staged};
use super::{Classifier, ForwardCtx};
use crate::engine::budget::{linear_params, n, sum, Footprint};
use crate::engine::data::Vocab;
use crate::engine::export::layers::{self as onnx, Emit};
use crate::engine::export::{ExportError, Graph};

/// Dropout when `model.dropout` is not set: the seed's 0.5.
pub const DEFAULT_DROPOUT: f64 = 0.5;

/// The `[model]` keys of `textcnn` (the seed's sizes by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TextCnnConfig {
    /// Embedding size.
    pub embed_dim: usize,
    /// Widths of the parallel convolutions.
    pub filter_sizes: Vec<usize>,
    /// Filters per width.
    pub num_filters: usize,
}

impl Default for TextCnnConfig {
    fn default() -> Self {
        Self {
            embed_dim: 300,
            filter_sizes: vec![2, 3, 4],
            num_filters: 256,
        }
    }
}

impl TextCnnConfig {
    /// Checks the keys; when `textcnn` is `selected`, also the filter widths
    /// against `data.max_len`.
    pub fn validate(&self, selected: bool, max_len: usize) -> Result<(), KeyError> {
        if self.embed_dim == 0 {
            return Err(KeyError::new("model.embed_dim", KeyProblem::Zero));
        }
        if self.num_filters == 0 {
            return Err(KeyError::new("model.num_filters", KeyProblem::Zero));
        }
        if self.filter_sizes.is_empty() || self.filter_sizes.contains(&0) {
            return Err(KeyError::new("model.filter_sizes", KeyProblem::NoWidths));
        }
        if selected {
            if let Some(&k) = self.filter_sizes.iter().find(|&&k| k > max_len) {
                return Err(KeyError::new(
                    "model.filter_sizes",
                    KeyProblem::FilterTooLong { size: k, max_len },
                ));
            }
        }
        Ok(())
    }

    /// The spec for token sequences of `sample_shape` (`[L]`) over `vocab`.
    pub fn resolve(
        &self,
        common: &Common,
        sample_shape: &[usize],
        vocab: Option<&Vocab>,
    ) -> Result<TextCnnSpec, ModelError> {
        let Some(vocab) = vocab else {
            return Err(ModelError::NeedsText { arch: "textcnn" });
        };
        let [seq_len] = sample_shape else {
            return Err(ModelError::SampleShape {
                arch: "textcnn",
                spatial_dims: 0,
                shape: sample_shape.to_vec(),
            });
        };
        let spec = TextCnnSpec {
            vocab_size: vocab.len(),
            pad_index: vocab.pad_index(),
            embed_dim: self.embed_dim,
            filter_sizes: self.filter_sizes.clone(),
            num_filters: self.num_filters,
            seq_len: *seq_len,
            num_classes: common.num_classes,
            dropout: common.dropout,
        };
        spec.check().map_err(|source| ModelError::Spec {
            arch: "textcnn",
            source,
        })?;
        Ok(spec)
    }
}

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
    pub fn check(&self) -> Result<(), SpecError> {
        if self.vocab_size == 0 || self.embed_dim == 0 || self.num_filters == 0 {
            return Err(SpecError::ZeroTextSize);
        }
        if self.pad_index >= self.vocab_size {
            return Err(SpecError::PadOutside {
                pad_index: self.pad_index,
                vocab_size: self.vocab_size,
            });
        }
        if self.filter_sizes.is_empty() || self.filter_sizes.contains(&0) {
            return Err(SpecError::NoFilterWidths);
        }
        if let Some(&k) = self.filter_sizes.iter().find(|&&k| k > self.seq_len) {
            return Err(SpecError::FilterTooLong {
                size: k,
                seq_len: self.seq_len,
            });
        }
        Ok(())
    }
}

impl TextCnnConfig {
    /// The spec for sequences of `seq_len` tokens over a vocabulary of
    /// `vocab_size`, unchecked: for estimating the footprint before the data
    /// is known.
    pub fn sketch(&self, common: &Common, seq_len: usize, vocab_size: usize) -> TextCnnSpec {
        TextCnnSpec {
            vocab_size,
            pad_index: 0,
            embed_dim: self.embed_dim,
            filter_sizes: self.filter_sizes.clone(),
            num_filters: self.num_filters,
            seq_len,
            num_classes: common.num_classes,
            dropout: common.dropout,
        }
    }
}

impl TextCnnSpec {
    /// Config keys that size the parameters.
    pub const PARAM_KEYS: &'static [&'static str] =
        &["model.embed_dim", "model.num_filters", "model.filter_sizes"];
    /// Config keys that size the activations.
    pub const ACTIVATION_KEYS: &'static [&'static str] = &[
        "model.embed_dim",
        "model.num_filters",
        "model.filter_sizes",
        "data.max_len",
    ];

    /// Parameters and per-sample activations (see [`Footprint`]).
    pub fn footprint(&self) -> Footprint {
        let (e, f, l) = (n(self.embed_dim), n(self.num_filters), n(self.seq_len));
        let embedded = l.saturating_mul(e);
        let mut params = n(self.vocab_size).saturating_mul(e);
        let mut activations = embedded;
        for &k in &self.filter_sizes {
            let k = n(k);
            let windows = l.saturating_add(1).saturating_sub(k);
            params = sum([params, f.saturating_mul(k).saturating_mul(e), f]);
            activations = sum([
                activations,
                // The sliding windows, the convolution and its ReLU, the max.
                windows.saturating_mul(k).saturating_mul(e),
                windows.saturating_mul(f).saturating_mul(2),
                f,
            ]);
        }
        let width = f.saturating_mul(n(self.filter_sizes.len()));
        let classes = n(self.num_classes);
        params = params.saturating_add(linear_params(width, classes));
        activations = sum([
            activations,
            width.saturating_mul(2),
            classes.saturating_mul(3),
        ]);
        Footprint {
            params,
            buffers: 0,
            input: l,
            activations,
            activation_bound: false,
        }
        .finish()
    }
}

/// The TextCNN itself.
pub struct TextCnn {
    embedding: Embedding,
    convs: Vec<TextConv>,
    dropout: Dropout,
    fc: Linear,
}

impl TextCnn {
    /// Builds the layers under `vb` (`embedding.weight`, `convs.N.*`, `fc.*`).
    pub fn new(spec: &TextCnnSpec, vb: VarBuilder) -> candle_core::Result<Self> {
        spec.check().map_err(candle_core::Error::wrap)?;
        let (v, e) = (spec.vocab_size, spec.embed_dim);
        let embedding = Embedding::new(v, e, Some(spec.pad_index), vb.pp("embedding"))?;
        let cv = vb.pp("convs");
        let convs = spec
            .filter_sizes
            .iter()
            .enumerate()
            .map(|(i, &k)| TextConv::new(spec.num_filters, k, e, cv.pp(i.to_string())))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let fc = linear(
            spec.num_filters * spec.filter_sizes.len(),
            spec.num_classes,
            vb.pp("fc"),
        )?;
        Ok(Self {
            embedding,
            convs,
            dropout: Dropout::new(spec.dropout),
            fc,
        })
    }
}

impl Staged for TextCnn {
    /// Stage 0 is the embedding, 1 the convolutions with their pooling, 2
    /// dropout and `fc`.
    fn stage_count(&self) -> usize {
        3
    }

    fn cuts(&self) -> Vec<(usize, SplitPoint)> {
        vec![
            (
                1,
                SplitPoint::new("embedding", ["convs.".to_string(), "fc.".to_string()]),
            ),
            (2, SplitPoint::new("pooled", ["fc.".to_string()])),
        ]
    }

    fn stage(&self, s: usize, x: Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        match s {
            0 => self.embedding.forward(&x, ctx),
            1 => {
                let pooled = self
                    .convs
                    .iter()
                    .map(|c| c.forward(&x, ctx))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&pooled, 1)
            }
            _ => {
                let x = self.dropout.forward(&x, ctx)?;
                self.fc.forward(&x, ctx)
            }
        }
    }
}

impl Classifier for TextCnn {
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        split::forward(self, x, ctx)
    }

    fn staged(&self) -> Option<&dyn Staged> {
        Some(self)
    }

    fn export_onnx(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let emb = self.embedding.emit(g, x)?;
        let pooled = self
            .convs
            .iter()
            .map(|c| c.emit(g, &emb))
            .collect::<Result<Vec<_>, _>>()?;
        let x = onnx::concat(g, &pooled);
        self.fc.emit(g, &x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{Model, ModelSpec};
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
        assert_eq!(
            s.check().unwrap_err(),
            SpecError::FilterTooLong {
                size: 3,
                seq_len: 2
            }
        );
        assert!(s.check().unwrap_err().to_string().contains("filter size 3"));
    }
}
