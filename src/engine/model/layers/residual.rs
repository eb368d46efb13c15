//! The residual join of ResNet's and MobileNetV2's blocks: `branch + shortcut`,
//! optionally followed by ReLU (`out += identity; out = relu(out)` in
//! torchvision's `BasicBlock`).

use candle_core::Tensor;

use crate::engine::model::ForwardCtx;

/// A residual addition, with or without a ReLU after it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Residual {
    /// Apply ReLU to the sum.
    pub relu: bool,
}

impl Residual {
    /// `branch + shortcut` (then ReLU where set); both of the same shape.
    /// Candle's generic ops on every device.
    pub fn forward(
        &self,
        branch: &Tensor,
        shortcut: &Tensor,
        _ctx: &ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        if branch.dims() != shortcut.dims() {
            candle_core::bail!(
                "residual: branch {:?} and shortcut {:?} differ in shape",
                branch.dims(),
                shortcut.dims()
            );
        }
        let sum = branch.add(shortcut)?;
        if self.relu {
            sum.relu()
        } else {
            Ok(sum)
        }
    }
}
