//! Building blocks shared by the architectures, laid out as PyTorch lays them out.

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use crate::engine::kernels;
use serde::{Deserialize, Serialize};

/// Element-wise non-linearities (PyTorch's defaults for each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[default]
    Relu,
    /// `nn.GELU()` (exact, erf-based).
    Gelu,
    Tanh,
    Sigmoid,
    /// `nn.LeakyReLU()` with slope 0.01.
    LeakyRelu,
    /// `nn.SiLU()`.
    Silu,
}

impl Activation {
    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Relu => x.relu(),
            Activation::Gelu => x.gelu_erf(),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(x),
            Activation::LeakyRelu => candle_nn::ops::leaky_relu(x, 0.01),
            Activation::Silu => x.silu(),
        }
    }
}

/// A fully-connected layer, `nn.Linear`: `y = x Wᵀ + b` on `[B, in]` inputs,
/// one fused kernel on the CPU ([`kernels::linear`]).
#[derive(Debug, Clone)]
pub struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    /// Applies the layer to `x` of shape `[B, in]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        kernels::linear(x, &self.weight, &self.bias)
    }

    /// `relu(forward(x))` as one fused kernel on the CPU ([`kernels::linear_relu`]).
    pub fn forward_relu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        kernels::linear_relu(x, &self.weight, &self.bias)
    }

    /// `activation(forward(x))`, fused where the activation is ReLU.
    pub fn forward_activated(
        &self,
        x: &Tensor,
        activation: Activation,
    ) -> candle_core::Result<Tensor> {
        match activation {
            Activation::Relu => self.forward_relu(x),
            other => other.apply(&self.forward(x)?),
        }
    }
}

/// `nn.Linear(in_dim, out_dim)`: `weight` [out, in] and `bias` [out], both
/// initialised U(-1/sqrt(in), 1/sqrt(in)) as PyTorch does.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Dense> {
    let bound = 1.0 / (in_dim.max(1) as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let w = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let b = vb.get_with_hints(out_dim, "bias", init)?;
    Ok(Dense { weight: w, bias: b })
}
