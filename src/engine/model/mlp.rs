//! `mlp`: a multi-layer perceptron.
//!
//! PyTorch twin (parameter names `layers.{i}.weight|bias` and `head.weight|bias`):
//! ```python
//! class MLP(nn.Module):
//!     def __init__(self, input_dim, hidden, num_classes, dropout=0.0, act=nn.ReLU):
//!         super().__init__()
//!         dims = [input_dim] + hidden
//!         self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
//!         self.head = nn.Linear(dims[-1], num_classes)
//!         self.act, self.drop = act(), nn.Dropout(dropout)
//!     def forward(self, x):
//!         x = x.flatten(1)
//!         for layer in self.layers:
//!             x = self.drop(self.act(layer(x)))
//!         return self.head(x)
//! ```

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::error::{KeyError, KeyProblem};
use super::layers::{linear, Activation, Dropout, Linear};
use super::registry::Common;
use super::{Classifier, ForwardCtx};
use crate::engine::budget::{linear_params, n, Footprint};
use crate::engine::export::layers::{self as onnx, Emit};
use crate::engine::export::{ExportError, Graph};

/// Dropout when `model.dropout` is not set.
pub const DEFAULT_DROPOUT: f64 = 0.0;

/// The `[model]` keys of `mlp`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MlpConfig {
    /// Hidden layer widths (`model.hidden`).
    pub hidden: Vec<usize>,
}

impl Default for MlpConfig {
    fn default() -> Self {
        Self {
            hidden: vec![128, 64],
        }
    }
}

impl MlpConfig {
    /// Checks the keys on their own.
    pub fn validate(&self) -> Result<(), KeyError> {
        if self.hidden.contains(&0) {
            return Err(KeyError::new("model.hidden", KeyProblem::ZeroWidth));
        }
        Ok(())
    }

    /// The spec for samples of `sample_shape` (flattened).
    pub fn resolve(&self, common: &Common, sample_shape: &[usize]) -> MlpSpec {
        MlpSpec {
            input_dim: sample_shape.iter().product(),
            hidden: self.hidden.clone(),
            num_classes: common.num_classes,
            activation: common.activation,
            dropout: common.dropout,
        }
    }
}

/// Sizes of an MLP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlpSpec {
    /// Features per sample (inputs are flattened).
    pub input_dim: usize,
    pub hidden: Vec<usize>,
    pub num_classes: usize,
    #[serde(default)]
    pub activation: Activation,
    #[serde(default)]
    pub dropout: f64,
}

impl MlpSpec {
    /// Config keys that size the parameters and the activations.
    pub const SIZE_KEYS: &'static [&'static str] = &["model.hidden"];

    /// Parameters and per-sample activations (see [`Footprint`]).
    pub fn footprint(&self) -> Footprint {
        let mut params = 0u64;
        let mut dim = n(self.input_dim);
        // Each hidden layer: its output, the activation's, and with dropout the
        // mask and the dropped output.
        let per_layer = if self.dropout > 0.0 { 4 } else { 2 };
        let mut activations = 0u64;
        for &h in &self.hidden {
            let h = n(h);
            params = params.saturating_add(linear_params(dim, h));
            activations = activations.saturating_add(h.saturating_mul(per_layer));
            dim = h;
        }
        let classes = n(self.num_classes);
        params = params.saturating_add(linear_params(dim, classes));
        // Logits, their softmax and the loss's gradient.
        activations = activations.saturating_add(classes.saturating_mul(3));
        Footprint {
            params,
            buffers: 0,
            input: n(self.input_dim),
            activations,
            activation_bound: false,
        }
        .finish()
    }
}

/// The MLP itself.
pub struct Mlp {
    layers: Vec<Linear>,
    head: Linear,
    activation: Activation,
    dropout: Dropout,
}

impl Mlp {
    /// Builds the layers under `vb` (`layers.N.*`, `head.*`).
    pub fn new(spec: &MlpSpec, vb: VarBuilder) -> candle_core::Result<Self> {
        let mut layers = Vec::with_capacity(spec.hidden.len());
        let mut dim = spec.input_dim;
        let lv = vb.pp("layers");
        for (i, &h) in spec.hidden.iter().enumerate() {
            layers.push(linear(dim, h, lv.pp(i.to_string()))?);
            dim = h;
        }
        let head = linear(dim, spec.num_classes, vb.pp("head"))?;
        Ok(Self {
            layers,
            head,
            activation: spec.activation,
            dropout: Dropout::new(spec.dropout),
        })
    }
}

impl Classifier for Mlp {
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        let mut x = x.flatten_from(1)?;
        for layer in &self.layers {
            x = layer.forward_activated(&x, self.activation, ctx)?;
            x = self.dropout.forward(&x, ctx)?;
        }
        self.head.forward(&x, ctx)
    }

    fn export_onnx(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let mut x = onnx::flatten(g, x);
        for layer in &self.layers {
            x = layer.emit(g, &x)?;
            x = onnx::activation(g, self.activation, &x);
        }
        self.head.emit(g, &x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{Model, ModelSpec};
    use candle_core::{DType, Device};

    fn spec() -> ModelSpec {
        ModelSpec::Mlp(MlpSpec {
            input_dim: 6,
            hidden: vec![5, 4],
            num_classes: 3,
            activation: Activation::Relu,
            dropout: 0.5,
        })
    }

    #[test]
    fn names_and_shapes_follow_pytorch() {
        let m = Model::new(spec(), 1, &Device::Cpu).unwrap();
        let names: Vec<(String, Vec<usize>)> = m
            .params
            .state_dict()
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("head.bias".into(), vec![3]),
                ("head.weight".into(), vec![3, 4]),
                ("layers.0.bias".into(), vec![5]),
                ("layers.0.weight".into(), vec![5, 6]),
                ("layers.1.bias".into(), vec![4]),
                ("layers.1.weight".into(), vec![4, 5]),
            ]
        );
    }

    #[test]
    fn footprint_counts_the_real_parameters() {
        // The digits MLP: 64 features, [128, 64], 10 classes.
        let spec = MlpSpec {
            input_dim: 64,
            hidden: vec![128, 64],
            num_classes: 10,
            activation: Activation::Relu,
            dropout: 0.1,
        };
        let fp = spec.footprint();
        let m = Model::new(ModelSpec::Mlp(spec), 1, &Device::Cpu).unwrap();
        let real: usize = m
            .params
            .trainable()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        assert_eq!(fp.params, real as u64);
        assert_eq!(fp.params, 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10);
        assert_eq!(fp.input, 64);
        // Absurd widths saturate instead of overflowing.
        let huge = MlpSpec {
            input_dim: usize::MAX,
            hidden: vec![usize::MAX, usize::MAX],
            num_classes: 2,
            activation: Activation::Relu,
            dropout: 0.0,
        };
        assert_eq!(huge.footprint().params, u64::MAX);
    }

    #[test]
    fn dropout_only_in_train_mode() {
        let m = Model::new(spec(), 1, &Device::Cpu).unwrap();
        let x = Tensor::ones((8, 6), DType::F32, &Device::Cpu).unwrap();
        let e1 = m.forward(&x, &mut ForwardCtx::eval()).unwrap();
        let e2 = m.forward(&x, &mut ForwardCtx::eval()).unwrap();
        assert_eq!(e1.to_vec2::<f32>().unwrap(), e2.to_vec2::<f32>().unwrap());
        let t = m.forward(&x, &mut ForwardCtx::train(5)).unwrap();
        assert_ne!(e1.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        assert_eq!(e1.dims(), &[8, 3]);
    }
}
