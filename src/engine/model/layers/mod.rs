//! The layer kit: the building blocks every architecture is made of, laid out
//! as PyTorch lays them out (parameter names and shapes are `nn.*`'s).
//!
//! Each layer's `forward` is the one place that chooses between our CPU
//! kernels ([`crate::engine::kernels`], f32 CPU tensors only) and candle's
//! generic ops (any device: the path CUDA takes), as
//! [`ForwardCtx::use_kernels`](super::ForwardCtx::use_kernels) says; both give
//! PyTorch's values and gradients. Frozen parameters are handled by [`Param`].

pub mod activation;
pub mod batchnorm;
pub mod conv;
pub mod conv_bn_chain;
pub mod dropout;
pub mod embedding;
pub mod global_pool;
pub mod hard_act;
pub mod linear;
pub mod param;
pub mod pool;
pub mod relu6;
pub mod residual;
pub mod squeeze_excite;
pub mod text_conv;

pub use activation::Activation;
pub use batchnorm::BatchNorm;
pub use conv::{conv, conv_with_init, Conv, ConvConfig};
pub use dropout::Dropout;
pub use embedding::Embedding;
pub use global_pool::GlobalAvgPool;
pub use hard_act::{Hardsigmoid, Hardswish};
pub use linear::{linear, linear_with_init, Linear};
pub use param::Param;
pub use pool::{max_first, AvgPool, MaxPool, PoolConfig};
pub use relu6::Relu6;
pub use residual::Residual;
pub use squeeze_excite::SqueezeExcite;
pub use text_conv::TextConv;
