//! MobileNetV3's hard activations in one pass each way: `hardswish(x) =
//! x * relu6(x + 3) / 6` and `hardsigmoid(x) = relu6(x + 3) / 6`, with
//! PyTorch's gradients (see `model::layers::hard_act`). Candle's generic
//! versions take six element-wise ops and as many temporaries forward, more
//! backward. CPU and f32 only; the backward pass reads the input.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Which of the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hard {
    Swish,
    Sigmoid,
}

impl Hard {
    fn name(self) -> &'static str {
        match self {
            Hard::Swish => "hardswish",
            Hard::Sigmoid => "hardsigmoid",
        }
    }

    fn value(self, x: f32) -> f32 {
        let gate = (x + 3.0).clamp(0.0, 6.0) / 6.0;
        match self {
            Hard::Swish => x * gate,
            Hard::Sigmoid => gate,
        }
    }

    /// d value / d x, PyTorch's (strictly between -3 and 3 the slope; from
    /// 3 on, hard swish passes the gradient through).
    fn slope(self, x: f32) -> f32 {
        let inside = x > -3.0 && x < 3.0;
        match self {
            Hard::Swish if inside => x / 3.0 + 0.5,
            Hard::Swish if x >= 3.0 => 1.0,
            Hard::Sigmoid if inside => 1.0 / 6.0,
            _ => 0.0,
        }
    }
}

/// `x * relu6(x + 3) / 6`. CPU and f32 only.
pub fn hardswish(x: &Tensor) -> Result<Tensor> {
    apply(x, Hard::Swish)
}

/// `relu6(x + 3) / 6`. CPU and f32 only.
pub fn hardsigmoid(x: &Tensor) -> Result<Tensor> {
    apply(x, Hard::Sigmoid)
}

fn apply(x: &Tensor, op: Hard) -> Result<Tensor> {
    if !super::on_cpu_f32(&[x]) {
        candle_core::bail!("{}: the kernel runs on f32 CPU tensors only", op.name());
    }
    x.contiguous()?.apply_op1(op)
}

impl CustomOp1 for Hard {
    fn name(&self) -> &'static str {
        Hard::name(*self)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::f32_slice(self.name(), s, l, "input")?;
        let op = *self;
        let y: Vec<f32> = x.par_iter().map(|&v| op.value(v)).collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let arg = arg.contiguous()?;
        let op = *self;
        let dx: Vec<f32> = {
            let (xs, xl) = arg.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let x = super::cpu_f32_slice(self.name(), &xs, xl, "input")?;
            let g = super::cpu_f32_slice(self.name(), &gs, gl, "gradient")?;
            x.par_iter()
                .zip(g)
                .map(|(&x, &g)| g * op.slope(x))
                .collect()
        };
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
