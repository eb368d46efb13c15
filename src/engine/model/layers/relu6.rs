//! `nn.ReLU6`: `min(max(x, 0), 6)`, with PyTorch's gradient (1 strictly
//! between 0 and 6, 0 elsewhere, the boundaries included).

use candle_core::Tensor;

use crate::engine::model::ForwardCtx;

/// The ReLU6 activation (MobileNetV2's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relu6;

impl Relu6 {
    /// `relu6(x)`. Candle's generic ops on every device: the pass-through
    /// mask is computed outside the graph, so the gradient is exactly the
    /// mask (candle's `clamp` would halve it at ties).
    pub fn forward(&self, x: &Tensor, _ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let d = x.detach();
        let inside = d.gt(0.0)?.mul(&d.lt(6.0)?)?.to_dtype(x.dtype())?;
        let top = (d.ge(6.0)?.to_dtype(x.dtype())? * 6.0)?;
        x.mul(&inside)?.add(&top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn values_and_gradient_are_torchs() {
        let x = Var::new(&[-1f32, 0.0, 0.5, 5.9, 6.0, 7.5], &Device::Cpu).unwrap();
        let y = Relu6.forward(x.as_tensor(), &ForwardCtx::eval()).unwrap();
        assert_eq!(
            y.to_vec1::<f32>().unwrap(),
            vec![0.0, 0.0, 0.5, 5.9, 6.0, 6.0]
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
        );
    }
}
