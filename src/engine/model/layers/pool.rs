//! `nn.MaxPool1d/2d` and `nn.AvgPool1d/2d` with kernel, stride and padding
//! (floor mode; average pooling counts the padding, PyTorch's defaults).
//!
//! Max-pooling sends the gradient to the first maximum of each window, in
//! the window's row-major order, as PyTorch does (candle's `max_pool2d` sends
//! it to every tied maximum, which matters where windows are flat: padding,
//! ReLU zeros, image backgrounds). Tiling windows (stride = kernel, no
//! padding) on f32 CPU tensors are our kernel ([`kernels::max_pool2d`],
//! fused with a preceding ReLU), and so are 2-D windows with any stride and
//! padding ([`kernels::pool::max_pool2d_strided`]); everything else is built from candle's
//! generic ops: a max (or mean) over the stacked window positions.

use candle_core::Tensor;

use crate::engine::kernels;
use crate::engine::model::ForwardCtx;

/// A pooling window: kernel, stride and padding (the same for every spatial dim).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl PoolConfig {
    /// Windows of `kernel` with stride `kernel` and no padding (`nn.MaxPool2d(k)`).
    pub fn tiling(kernel: usize) -> Self {
        Self {
            kernel,
            stride: kernel,
            padding: 0,
        }
    }

    /// Output length along a dim of length `n`; `None` when no window fits.
    pub fn output_size(&self, n: usize) -> Option<usize> {
        let padded = n + 2 * self.padding;
        (self.kernel > 0 && self.stride > 0 && padded >= self.kernel)
            .then(|| (padded - self.kernel) / self.stride + 1)
    }

    fn check(&self) -> candle_core::Result<()> {
        if self.kernel == 0 || self.stride == 0 || 2 * self.padding > self.kernel {
            candle_core::bail!(
                "pool: kernel {} and stride {} must be >= 1 and padding {} at most half the kernel",
                self.kernel,
                self.stride,
                self.padding
            );
        }
        Ok(())
    }
}

/// Max-pooling over the spatial dims of `[B, C, L]` or `[B, C, H, W]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool {
    cfg: PoolConfig,
}

impl MaxPool {
    /// A max-pool; padding must be at most half the kernel (as in PyTorch).
    pub fn new(cfg: PoolConfig) -> candle_core::Result<Self> {
        cfg.check()?;
        Ok(Self { cfg })
    }

    /// The window.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// Whether the windows tile the input (stride = kernel, no padding).
    pub fn is_tiling(&self) -> bool {
        self.cfg.stride == self.cfg.kernel && self.cfg.padding == 0
    }

    /// Max-pools `x`.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        self.apply(x, false, ctx)
    }

    /// Max-pools `relu(x)`, one kernel on the CPU (same values and gradients).
    pub fn forward_relu(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        self.apply(x, true, ctx)
    }

    fn apply(&self, x: &Tensor, relu: bool, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let k = self.cfg.kernel;
        if self.is_tiling() && ctx.use_kernels(&[x]) {
            return match x.rank() {
                4 => kernels::max_pool2d(x, k, relu),
                3 => kernels::max_pool1d(x, k, relu),
                _ => candle_core::bail!("max-pooling takes [B, C, L] or [B, C, H, W]"),
            };
        }
        if x.rank() == 4 && ctx.use_kernels(&[x]) {
            let (s, p) = (self.cfg.stride, self.cfg.padding);
            return kernels::pool::max_pool2d_strided(x, k, s, p, relu);
        }
        let x = if relu { x.relu()? } else { x.clone() };
        let (windows, last) = windows(&x, &self.cfg, f32::NEG_INFINITY)?;
        max_first(&windows, last)
    }
}

/// Average pooling over the spatial dims of `[B, C, L]` or `[B, C, H, W]`;
/// padded positions count as zeros (`count_include_pad=True`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AvgPool {
    cfg: PoolConfig,
}

impl AvgPool {
    /// An average pool; padding must be at most half the kernel (as in PyTorch).
    pub fn new(cfg: PoolConfig) -> candle_core::Result<Self> {
        cfg.check()?;
        Ok(Self { cfg })
    }

    /// The window.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// Average-pools `x` (candle's generic ops on every device).
    pub fn forward(&self, x: &Tensor, _ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let (windows, last) = windows(x, &self.cfg, 0.0)?;
        windows.mean(last)
    }
}

/// The windows of `x` stacked along a new last dim (returned with its index):
/// `[B, C, Lo, k]` or `[B, C, Ho, Wo, k*k]` in row-major window order, the
/// padding filled with `fill`.
fn windows(x: &Tensor, cfg: &PoolConfig, fill: f32) -> candle_core::Result<(Tensor, usize)> {
    let rank = x.rank();
    if !(rank == 3 || rank == 4) {
        candle_core::bail!(
            "pooling takes [B, C, L] or [B, C, H, W], got {:?}",
            x.dims()
        );
    }
    let (k, s, p) = (cfg.kernel, cfg.stride, cfg.padding);
    let mut outs = Vec::with_capacity(rank - 2);
    for d in 2..rank {
        let n = x.dim(d)?;
        let o = cfg.output_size(n).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "pool: window {k} (padding {p}) does not fit an input of size {n}"
            ))
        })?;
        outs.push(o);
    }
    if s == k && p == 0 {
        // Tiling windows: a reshape (cheaper than gathering).
        let mut x = x.clone();
        for (i, &o) in outs.iter().enumerate() {
            if o * k < x.dim(2 + i)? {
                x = x.narrow(2 + i, 0, o * k)?;
            }
        }
        let (b, c) = (x.dim(0)?, x.dim(1)?);
        return Ok(match outs.as_slice() {
            [l] => (x.reshape((b, c, *l, k))?, 3),
            [h, w] => (
                x.reshape((b, c, *h, k, *w, k))?
                    .permute((0, 1, 2, 4, 3, 5))?
                    .contiguous()?
                    .reshape((b, c, *h, *w, k * k))?,
                4,
            ),
            _ => unreachable!("rank checked above"),
        });
    }
    let mut x = x.clone();
    if p > 0 {
        for d in 2..rank {
            let mut shape = x.dims().to_vec();
            shape[d] = p;
            let pad = Tensor::full(fill, shape.as_slice(), x.device())?.to_dtype(x.dtype())?;
            x = Tensor::cat(&[&pad, &x, &pad], d)?;
        }
    }
    // Along each spatial dim: the k shifted, strided selections.
    let select = |t: &Tensor, d: usize, o: usize, j: usize| -> candle_core::Result<Tensor> {
        let idx: Vec<u32> = (0..o).map(|i| (i * s + j) as u32).collect();
        let idx = Tensor::new(idx.as_slice(), t.device())?;
        t.index_select(&idx, d)
    };
    let mut parts = Vec::with_capacity(k.pow(outs.len() as u32));
    match outs.as_slice() {
        [l] => {
            for j in 0..k {
                parts.push(select(&x, 2, *l, j)?);
            }
        }
        [h, w] => {
            for a in 0..k {
                let rows = select(&x, 2, *h, a)?;
                for e in 0..k {
                    parts.push(select(&rows, 3, *w, e)?);
                }
            }
        }
        _ => unreachable!("rank checked above"),
    }
    Ok((Tensor::stack(&parts, rank)?, rank))
}

/// The maximum over `dim` (removed), the gradient flowing to the first
/// maximum, as PyTorch's max-pooling and `max(dim)` do.
pub fn max_first(x: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let idx = x.detach().argmax_keepdim(dim)?;
    x.gather(&idx, dim)?.squeeze(dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::KernelPolicy;
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

    /// Values with many ties (small integers), seeded.
    fn ties(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2..3) as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// PyTorch's pooling by its definition, on one `[H, W]` plane per
    /// (batch, channel): the value of each window, and for max the position
    /// (in the input) of the first maximum in row-major window order, or
    /// `None` when the window holds padding only at its maximum (never).
    fn naive(
        x: &[f32],
        planes: usize,
        (h, w): (usize, usize),
        (kh, kw): (usize, usize),
        (sh, sw): (usize, usize),
        (ph, pw): (usize, usize),
        max: bool,
    ) -> (Vec<f32>, Vec<Option<usize>>) {
        let ho = (h + 2 * ph - kh) / sh + 1;
        let wo = (w + 2 * pw - kw) / sw + 1;
        let (mut vals, mut at) = (Vec::new(), Vec::new());
        for pl in 0..planes {
            for i in 0..ho {
                for j in 0..wo {
                    let (mut best, mut pos, mut sum) = (f32::NEG_INFINITY, None, 0f32);
                    for a in 0..kh {
                        for e in 0..kw {
                            let r = (i * sh + a) as isize - ph as isize;
                            let q = (j * sw + e) as isize - pw as isize;
                            if r < 0 || q < 0 || r as usize >= h || q as usize >= w {
                                continue; // padding: -inf for max, 0 for the sum
                            }
                            let idx = pl * h * w + r as usize * w + q as usize;
                            sum += x[idx];
                            if x[idx] > best {
                                best = x[idx];
                                pos = Some(idx);
                            }
                        }
                    }
                    vals.push(if max { best } else { sum / (kh * kw) as f32 });
                    at.push(pos);
                }
            }
        }
        (vals, at)
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn padded_overlapping_pools_match_the_definition_on_both_paths() {
        // (input [B, C, H, W], kernel, stride, padding)
        let cases = [
            ([2, 3, 7, 6], 3, 2, 1),
            ([1, 2, 5, 5], 3, 1, 1),
            ([2, 2, 8, 8], 2, 2, 0),
            ([1, 1, 9, 7], 2, 1, 1),
            ([2, 1, 6, 9], 3, 3, 0),
        ];
        for (shape, k, s, p) in cases {
            let cfg = PoolConfig {
                kernel: k,
                stride: s,
                padding: p,
            };
            let (planes, h, w) = (shape[0] * shape[1], shape[2], shape[3]);
            for policy in [KernelPolicy::Ours, KernelPolicy::Generic] {
                let ctx = ForwardCtx::eval().with_kernels(policy);
                let x = Var::from_tensor(&ties(&shape, 5)).unwrap();
                let xs = flat(&x);
                // Max-pool: values, and the gradient only at each window's first maximum.
                let y = MaxPool::new(cfg).unwrap().forward(&x, &ctx).unwrap();
                let (want, at) = naive(&xs, planes, (h, w), (k, k), (s, s), (p, p), true);
                assert_eq!(flat(&y), want, "max {cfg:?} {policy:?}");
                let wts: Vec<f32> = (0..want.len()).map(|i| 1.0 + i as f32).collect();
                let wt = Tensor::from_vec(wts.clone(), y.dims(), &Device::Cpu).unwrap();
                let g = (&y * &wt).unwrap().sum_all().unwrap().backward().unwrap();
                let mut dx = vec![0f32; xs.len()];
                for (a, wv) in at.iter().zip(&wts) {
                    dx[a.expect("a window holds an input value")] += wv;
                }
                assert_eq!(flat(g.get(&x).unwrap()), dx, "max grad {cfg:?} {policy:?}");
                // Average pool: values and gradient (1/k² to every input in the window).
                let y = AvgPool::new(cfg).unwrap().forward(&x, &ctx).unwrap();
                let (want, _) = naive(&xs, planes, (h, w), (k, k), (s, s), (p, p), false);
                let d = flat(&y)
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-5, "avg {cfg:?}: {d}");
                let g = (&y * &wt).unwrap().sum_all().unwrap().backward().unwrap();
                let g = flat(g.get(&x).unwrap());
                let mut dx = vec![0f32; xs.len()];
                let ho = (h + 2 * p - k) / s + 1;
                let wo = (w + 2 * p - k) / s + 1;
                for pl in 0..planes {
                    for i in 0..ho {
                        for j in 0..wo {
                            let wv = wts[(pl * ho + i) * wo + j] / (k * k) as f32;
                            for a in 0..k {
                                for e in 0..k {
                                    let r = (i * s + a) as isize - p as isize;
                                    let q = (j * s + e) as isize - p as isize;
                                    if r >= 0 && q >= 0 && (r as usize) < h && (q as usize) < w {
                                        dx[pl * h * w + r as usize * w + q as usize] += wv;
                                    }
                                }
                            }
                        }
                    }
                }
                let d = g
                    .iter()
                    .zip(&dx)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-4, "avg grad {cfg:?}: {d}");
            }
        }
    }

    #[test]
    fn one_d_pools_and_the_fused_relu() {
        // Ties, but no exact zeros (where ReLU's gradient is a convention).
        let x = Var::from_tensor(&(ties(&[2, 3, 11], 9) + 0.5).unwrap()).unwrap();
        let cfg = PoolConfig {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        let xs = flat(&x);
        let y = MaxPool::new(cfg)
            .unwrap()
            .forward(&x, &ForwardCtx::eval())
            .unwrap();
        let (want, _) = naive(&xs, 6, (1, 11), (1, 3), (1, 2), (0, 1), true);
        assert_eq!(flat(&y), want);
        // relu then pool, on both paths, for a tiling window.
        let pool = MaxPool::new(PoolConfig::tiling(2)).unwrap();
        let a = pool
            .forward_relu(&x, &ForwardCtx::eval().with_kernels(KernelPolicy::Ours))
            .unwrap();
        let b = pool
            .forward_relu(&x, &ForwardCtx::eval().with_kernels(KernelPolicy::Generic))
            .unwrap();
        assert_eq!(flat(&a), flat(&b));
        let ga = a.sum_all().unwrap().backward().unwrap();
        let gb = b.sum_all().unwrap().backward().unwrap();
        assert_eq!(flat(ga.get(&x).unwrap()), flat(gb.get(&x).unwrap()));
        assert!(MaxPool::new(PoolConfig {
            kernel: 2,
            stride: 1,
            padding: 2
        })
        .is_err());
    }
}
