//! MobileNetV3's piecewise-linear activations, with PyTorch's values and
//! gradients: `nn.Hardsigmoid` (`relu6(x + 3) / 6`; gradient 1/6 strictly
//! between -3 and 3, 0 elsewhere) and `nn.Hardswish` (`x * relu6(x + 3) / 6`;
//! gradient 0 up to -3, `x / 3 + 1/2` strictly between -3 and 3, 1 from 3 on).
//! On f32 CPU tensors (kernels on) one pass each way
//! ([`kernels::hard_act`](crate::engine::kernels::hard_act)); elsewhere
//! candle's generic ops, the masks computed outside the graph, so the
//! gradients are exactly PyTorch's, ties included.

use candle_core::Tensor;

use crate::engine::kernels;
use crate::engine::model::ForwardCtx;

/// The hard sigmoid (the squeeze-excitation gate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hardsigmoid;

/// The hard swish (MobileNetV3's activation from the third stage on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hardswish;

/// `relu6(x + 3) / 6` as `(x / 6 + 1/2) * inside + top`, where `inside`
/// (-3 < x < 3) and `top` (x >= 3) are constants of the graph.
fn gate(x: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.detach();
    let inside = d.gt(-3.0)?.mul(&d.lt(3.0)?)?.to_dtype(x.dtype())?;
    let top = d.ge(3.0)?.to_dtype(x.dtype())?;
    ((x * (1.0 / 6.0))? + 0.5)?.mul(&inside)?.add(&top)
}

impl Hardsigmoid {
    /// `relu6(x + 3) / 6`.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        if ctx.use_kernels(&[x]) {
            return kernels::hard_act::hardsigmoid(x);
        }
        gate(x)
    }
}

impl Hardswish {
    /// `x * relu6(x + 3) / 6`.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        if ctx.use_kernels(&[x]) {
            return kernels::hard_act::hardswish(x);
        }
        x.mul(&gate(x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn run(
        f: impl Fn(&Tensor, &ForwardCtx) -> candle_core::Result<Tensor>,
        ctx: &ForwardCtx,
    ) -> (Vec<f32>, Vec<f32>) {
        let x = Var::new(&[-4f32, -3.0, -1.5, 0.0, 2.0, 3.0, 4.5], &Device::Cpu).unwrap();
        let y = f(x.as_tensor(), ctx).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        (
            y.to_vec1().unwrap(),
            g.get(x.as_tensor()).unwrap().to_vec1().unwrap(),
        )
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    /// Values and gradients as `torch.nn.functional.hardsigmoid` and
    /// `hardswish` give them at these points (ties at -3 and 3 included), on
    /// our kernel and on candle's generic ops.
    #[test]
    fn values_and_gradients_are_torchs() {
        use crate::engine::model::KernelPolicy;
        for policy in [KernelPolicy::Ours, KernelPolicy::Generic] {
            let ctx = ForwardCtx::train(0).with_kernels(policy);
            let (y, g) = run(|x, c| Hardsigmoid.forward(x, c), &ctx);
            assert!(
                close(&y, &[0.0, 0.0, 0.25, 0.5, 5.0 / 6.0, 1.0, 1.0]),
                "{y:?}"
            );
            let s = 1.0 / 6.0;
            assert!(close(&g, &[0.0, 0.0, s, s, s, 0.0, 0.0]), "{g:?}");
            let (y, g) = run(|x, c| Hardswish.forward(x, c), &ctx);
            assert!(
                close(&y, &[0.0, 0.0, -0.375, 0.0, 2.0 * 5.0 / 6.0, 3.0, 4.5]),
                "{y:?}"
            );
            let want = [0.0, 0.0, 0.0, 0.5, 2.0 / 3.0 + 0.5, 1.0, 1.0];
            assert!(close(&g, &want), "{policy:?}: {g:?}");
        }
    }
}
