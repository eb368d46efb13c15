//! A parameter: its tensor and its full name, and the one place where a
//! frozen parameter (`model.freeze`) is detached.

use candle_core::{Shape, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::engine::model::ForwardCtx;

/// A tensor of the model with its full name (`features.0.conv.weight`).
#[derive(Debug, Clone)]
pub struct Param {
    tensor: Tensor,
    name: String,
}

impl Param {
    /// Creates (or fetches) the parameter `name` under `vb`.
    pub fn new<S: Into<Shape>>(
        vb: &VarBuilder,
        shape: S,
        name: &str,
        init: Init,
    ) -> candle_core::Result<Self> {
        let tensor = vb.get_with_hints(shape, name, init)?;
        Ok(Self {
            tensor,
            name: full_name(vb, name),
        })
    }

    /// The stored tensor (shares storage with the parameter store).
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// The full name, as in the state dict.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the parameter is held fixed in this pass (frozen, in training).
    pub fn frozen(&self, ctx: &ForwardCtx) -> bool {
        ctx.train && ctx.is_frozen(&self.name)
    }

    /// The tensor to compute with: detached where frozen in training, so no
    /// gradient is computed for it (nor, when a whole feature extractor is
    /// frozen, through it at all).
    pub fn live(&self, ctx: &ForwardCtx) -> Tensor {
        if self.frozen(ctx) {
            self.tensor.detach()
        } else {
            self.tensor.clone()
        }
    }
}

/// The full name of `name` under `vb`'s prefix.
pub fn full_name(vb: &VarBuilder, name: &str) -> String {
    let prefix = vb.prefix();
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}
