//! CPU kernels of our own, as candle custom ops, where candle's generic ones
//! are slow for training (measured with `edge-trainer bench`, see README
//! "Performance"): convolutions as im2col + gemm with a fused bias gradient and
//! no input gradient for data, max-pooling with first-maximum indices (fused
//! with ReLU), the fully-connected layer, and the optimisers' fused in-place
//! updates. They are CPU-only: each public function checks the device and
//! dtype and returns an error for anything but f32 CPU tensors. The choice
//! between them and candle's generic ops (the path CUDA takes) is made in one
//! place per layer, in `model::layers`.

pub mod act;
pub mod batchnorm;
pub mod conv;
pub mod conv_bn_chain;
pub mod depthwise;
mod depthwise3x3;
pub mod direct_grads;
pub mod elementwise;
pub mod gemm;
pub mod hard_act;
pub mod linear;
pub mod pool;
pub mod text;

pub use conv::{conv1d, conv2d, conv_relu_pool1d, conv_relu_pool2d};
pub use depthwise::{depthwise_conv1d, depthwise_conv2d};

/// Whether every tensor is an f32 tensor on the CPU, where these kernels run.
pub fn on_cpu_f32(ts: &[&candle_core::Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

/// The contiguous f32 values of an operand in a kernel's forward pass; errors
/// name the kernel (`op`) and the operand (`what`).
pub(crate) fn f32_slice<'a>(
    op: &str,
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")))?;
    match s {
        candle_core::CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: {what} must be f32"),
    }
}

/// [`f32_slice`] of a tensor's storage in a backward pass, which runs on the
/// CPU only.
pub(crate) fn cpu_f32_slice<'a>(
    op: &str,
    s: &'a candle_core::Storage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(c) => f32_slice(op, c, l, what),
        _ => candle_core::bail!("{op}: backward runs on the CPU only"),
    }
}
pub use linear::{linear, linear_relu};
pub use pool::{max_pool1d, max_pool2d};

/// Helpers shared by the kernels' tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Device, Tensor};

    /// A tensor of values uniform in [-1, 1), seeded.
    pub fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The largest absolute difference between two tensors of the same shape.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}
