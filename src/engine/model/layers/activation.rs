//! Element-wise non-linearities (PyTorch's defaults for each).

use candle_core::Tensor;
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
    /// Applies the activation (candle's ops; they are right on every device).
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
