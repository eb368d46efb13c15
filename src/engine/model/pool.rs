//! Max-reductions whose gradient goes to the first maximum only, as PyTorch's
//! max-pooling and `max(dim)` do (candle's `max` sends it to every tied
//! maximum, which matters where windows are flat: padding, image backgrounds).

use candle_core::Tensor;

/// The maximum over `dim` (removed), the gradient flowing to the first maximum.
pub fn max_first(x: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let idx = x.detach().argmax_keepdim(dim)?;
    x.gather(&idx, dim)?.squeeze(dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn ties_send_the_gradient_to_the_first() {
        let v = Var::new(&[[1f32, 3., 3.], [2., 0., 1.]], &Device::Cpu).unwrap();
        let m = max_first(v.as_tensor(), 1).unwrap();
        assert_eq!(m.to_vec1::<f32>().unwrap(), vec![3.0, 2.0]);
        let g = m.sum_all().unwrap().backward().unwrap();
        let g = g.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(g, vec![vec![0.0, 1.0, 0.0], vec![1.0, 0.0, 0.0]]);
    }
}
