//! Max-pooling with window = stride (PyTorch's `MaxPool2d(k)` / `MaxPool1d(k)`
//! defaults), optionally fused with a preceding ReLU (`relu` then pool equals
//! pool then `relu`), parallel over planes. The backward pass sends each
//! window's gradient to the first position holding the maximum (PyTorch's
//! choice of index), found again from the input instead of stored, and — when
//! fused — only where that maximum is positive, as the ReLU's gradient does.
//!
//! On a CPU with f32 tensors [`max_pool2d`] / [`max_pool1d`] use this kernel;
//! elsewhere they fall back to candle's ops.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
struct PoolOp {
    planes: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    relu: bool,
    one_d: bool,
}

impl PoolOp {
    fn ho(&self) -> usize {
        self.h / self.kh
    }
    fn wo(&self) -> usize {
        self.w / self.kw
    }
    fn out_shape(&self, in_dims: &[usize]) -> Shape {
        let mut d = in_dims.to_vec();
        let r = d.len();
        if self.one_d {
            d[r - 1] = self.wo();
        } else {
            d[r - 2] = self.ho();
            d[r - 1] = self.wo();
        }
        Shape::from(d)
    }

    /// Index (within the plane) of the first maximum of window (oi, oj) and its value.
    #[inline(always)]
    fn argmax(&self, plane: &[f32], oi: usize, oj: usize) -> (usize, f32) {
        let mut best = f32::NEG_INFINITY;
        let mut at = oi * self.kh * self.w + oj * self.kw;
        for di in 0..self.kh {
            let row = (oi * self.kh + di) * self.w + oj * self.kw;
            for (dj, &v) in plane[row..row + self.kw].iter().enumerate() {
                if v > best || v.is_nan() {
                    best = v;
                    at = row + dj;
                    if v.is_nan() {
                        return (at, v);
                    }
                }
            }
        }
        (at, best)
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("max-pool: input must be contiguous".into()))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("max-pool: input must be f32"),
    }
}

impl CustomOp1 for PoolOp {
    fn name(&self) -> &'static str {
        if self.relu {
            "relu-max-pool"
        } else {
            "max-pool"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let (ho, wo) = (self.ho(), self.wo());
        let plane_in = self.h * self.w;
        let mut y = vec![0f32; self.planes * ho * wo];
        y.par_chunks_mut(ho * wo)
            .zip(x.par_chunks(plane_in))
            .for_each(|(yp, xp)| {
                for oi in 0..ho {
                    for oj in 0..wo {
                        let (_, m) = self.argmax(xp, oi, oj);
                        yp[oi * wo + oj] = if self.relu && !(m > 0.0 || m.is_nan()) {
                            0.0
                        } else {
                            m
                        };
                    }
                }
            });
        Ok((CpuStorage::F32(y), self.out_shape(l.dims())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (ho, wo) = (self.ho(), self.wo());
        let plane_in = self.h * self.w;
        let mut dx = vec![0f32; self.planes * plane_in];
        {
            let (xs, xl) = arg.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let (x, g) = match (&*xs, &*gs) {
                (candle_core::Storage::Cpu(a), candle_core::Storage::Cpu(b)) => {
                    (f32_slice(a, xl)?, f32_slice(b, gl)?)
                }
                _ => candle_core::bail!("max-pool: backward runs on the CPU only"),
            };
            dx.par_chunks_mut(plane_in)
                .zip(x.par_chunks(plane_in).zip(g.par_chunks(ho * wo)))
                .for_each(|(dp, (xp, gp))| {
                    for oi in 0..ho {
                        for oj in 0..wo {
                            let (at, m) = self.argmax(xp, oi, oj);
                            if !self.relu || m > 0.0 {
                                dp[at] += gp[oi * wo + oj];
                            }
                        }
                    }
                });
        }
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

fn use_kernel(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// `MaxPool2d(k)` on `[B, C, H, W]`, after a ReLU when `relu`.
pub fn max_pool2d(x: &Tensor, k: usize, relu: bool) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if k == 0 || h < k || w < k {
        candle_core::bail!("max-pool: window {k} does not fit a {h}x{w} input");
    }
    if !use_kernel(x) {
        let x = if relu { x.relu()? } else { x.clone() };
        return x.max_pool2d(k);
    }
    let op = PoolOp {
        planes: b * c,
        h,
        w,
        kh: k,
        kw: k,
        relu,
        one_d: false,
    };
    x.contiguous()?.apply_op1(op)
}

/// `MaxPool1d(k)` on `[B, C, L]`, after a ReLU when `relu`.
pub fn max_pool1d(x: &Tensor, k: usize, relu: bool) -> Result<Tensor> {
    let (b, c, l) = x.dims3()?;
    if k == 0 || l < k {
        candle_core::bail!("max-pool: window {k} does not fit an input of length {l}");
    }
    if !use_kernel(x) {
        let x = if relu { x.relu()? } else { x.clone() };
        return x.unsqueeze(2)?.max_pool2d((1, k))?.squeeze(2);
    }
    let op = PoolOp {
        planes: b * c,
        h: 1,
        w: l,
        kh: 1,
        kw: k,
        relu,
        one_d: true,
    };
    x.contiguous()?.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Max over reshaped windows: its gradient goes to the window's maximum
    /// (candle's `max_pool2d` gradient is scaled by 1/k², so it is no reference).
    fn reference(x: &Tensor, k: usize) -> Tensor {
        let (b, c, h, w) = x.dims4().unwrap();
        let (ho, wo) = (h / k, w / k);
        x.narrow(2, 0, ho * k)
            .unwrap()
            .narrow(3, 0, wo * k)
            .unwrap()
            .reshape((b, c, ho, k, wo, k))
            .unwrap()
            .permute((0, 1, 2, 4, 3, 5))
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, c, ho, wo, k * k))
            .unwrap()
            .max(4)
            .unwrap()
    }

    #[test]
    fn matches_reference_forward_and_backward() {
        for (shape, k) in [(vec![2, 3, 8, 8], 2), (vec![1, 2, 7, 9], 3)] {
            for relu in [false, true] {
                let x = Var::from_tensor(&rand(&shape, 7)).unwrap();
                let reference = if relu {
                    reference(&x.relu().unwrap(), k)
                } else {
                    reference(&x, k)
                };
                let ours = max_pool2d(&x, k, relu).unwrap();
                assert_eq!(flat(&ours), flat(&reference));
                assert_eq!(
                    flat(&ours),
                    flat(
                        &x.max_pool2d(k)
                            .unwrap()
                            .maximum(if relu { 0.0 } else { f32::MIN as f64 })
                            .unwrap()
                    )
                );
                let wts = rand(reference.dims(), 8);
                let gr = (&reference * &wts)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let go = (&ours * &wts)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                assert_eq!(flat(go.get(&x).unwrap()), flat(gr.get(&x).unwrap()));
            }
        }
    }

    #[test]
    fn ties_go_to_the_first_maximum_like_torch() {
        let x = Var::new(&[[[[1f32, 1.], [0., 1.]]]], &Device::Cpu).unwrap();
        let y = max_pool2d(&x, 2, false).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(flat(g.get(&x).unwrap()), vec![1.0, 0.0, 0.0, 0.0]);
        // Fused with ReLU: an all-negative window passes no gradient.
        let x = Var::new(&[[[[-1f32, -2.], [-3., -4.]]]], &Device::Cpu).unwrap();
        let y = max_pool2d(&x, 2, true).unwrap();
        assert_eq!(flat(&y), vec![0.0]);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(flat(g.get(&x).unwrap()), vec![0.0; 4]);
    }

    #[test]
    fn one_d() {
        let x = Var::from_tensor(&rand(&[2, 3, 10], 3)).unwrap();
        let reference = x
            .unsqueeze(2)
            .unwrap()
            .max_pool2d((1, 2))
            .unwrap()
            .squeeze(2)
            .unwrap();
        let ours = max_pool1d(&x, 2, false).unwrap();
        assert_eq!(ours.dims(), &[2, 3, 5]);
        assert_eq!(flat(&ours), flat(&reference));
    }
}
