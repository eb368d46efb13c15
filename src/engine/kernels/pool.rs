//! Max-pooling with window = stride (PyTorch's `MaxPool2d(k)` / `MaxPool1d(k)`
//! defaults), optionally fused with a preceding ReLU (`relu` then pool equals
//! pool then `relu`), parallel over planes. The forward pass keeps, for each
//! window, the position of its first maximum (PyTorch's choice of index); the
//! backward pass sends the window's gradient there — when fused, only where
//! that maximum is positive, as the ReLU's gradient does.
//!
//! CPU and f32 only: off the CPU they return an error; the layer
//! (`model::layers::pool`) picks candle's ops there instead.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Marks a window that passes no gradient (fused ReLU, maximum not positive).
pub(crate) const NONE: u32 = u32::MAX;

/// A max-pooling over `planes` planes of `h x w`.
#[derive(Debug)]
pub(super) struct PoolOp {
    pub(super) planes: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    kh: usize,
    kw: usize,
    relu: bool,
    one_d: bool,
    /// Stride and padding (height, width); `None` for tiling windows
    /// (stride = window, no padding).
    strided: Option<((usize, usize), (usize, usize))>,
    /// Per output: the position of the window's maximum within its input
    /// plane, or [`NONE`]; set by the forward pass.
    argmax: OnceLock<Vec<u32>>,
}

impl PoolOp {
    pub(super) fn ho(&self) -> usize {
        match self.strided {
            None => self.h / self.kh,
            Some(((sh, _), (ph, _))) => (self.h + 2 * ph - self.kh) / sh + 1,
        }
    }
    pub(super) fn wo(&self) -> usize {
        match self.strided {
            None => self.w / self.kw,
            Some(((_, sw), (_, pw))) => (self.w + 2 * pw - self.kw) / sw + 1,
        }
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

    /// Pools one plane (see [`pool_plane`], [`pool_plane_strided`]).
    pub(super) fn plane(&self, x: &[f32], y: &mut [f32], at: &mut [u32]) {
        match self.strided {
            None => pool_plane(x, (self.h, self.w), (self.kh, self.kw), self.relu, y, at),
            Some((s, p)) => self.plane_strided(x, s, p, y, at),
        }
    }

    /// Max-pools one plane with any stride and padding (padding never wins:
    /// it is at most half the window, so every window holds a value), like
    /// [`pool_plane`] otherwise.
    fn plane_strided(
        &self,
        x: &[f32],
        (sh, sw): (usize, usize),
        (ph, pw): (usize, usize),
        y: &mut [f32],
        at: &mut [u32],
    ) {
        let (h, w, wo) = (self.h, self.w, self.wo());
        for (oi, (yr, ar)) in y.chunks_mut(wo).zip(at.chunks_mut(wo)).enumerate() {
            let r0 = (oi * sh).saturating_sub(ph);
            let r1 = (oi * sh + self.kh).saturating_sub(ph).min(h);
            for (oj, (yv, av)) in yr.iter_mut().zip(ar.iter_mut()).enumerate() {
                let c0 = (oj * sw).saturating_sub(pw);
                let c1 = (oj * sw + self.kw).saturating_sub(pw).min(w);
                let (mut best, mut pos) = (f32::NEG_INFINITY, NONE as usize);
                for r in r0..r1 {
                    for (c, &v) in x[r * w + c0..r * w + c1].iter().enumerate() {
                        if v > best || pos == NONE as usize {
                            (best, pos) = (v, r * w + c0 + c);
                        }
                    }
                }
                if self.relu && !(best > 0.0 || best.is_nan()) {
                    (best, pos) = (0.0, NONE as usize);
                }
                *yv = best;
                *av = pos as u32;
            }
        }
    }
}

/// Max-pools one `[h, w]` plane with `(kh, kw)` windows (stride = window,
/// floor mode) into `y`, and writes the position (within the plane) of each
/// window's first maximum into `at` (scanning rows, then columns; strictly
/// greater wins). With `relu`, a maximum that is not positive gives 0 and the
/// position [`NONE`] (no gradient).
pub(crate) fn pool_plane(
    x: &[f32],
    (_h, w): (usize, usize),
    (kh, kw): (usize, usize),
    relu: bool,
    y: &mut [f32],
    at: &mut [u32],
) {
    let wo = w / kw;
    let ho = y.len().checked_div(wo).unwrap_or(0);
    for oi in 0..ho {
        let base = oi * kh * w;
        let ys = &mut y[oi * wo..(oi + 1) * wo];
        let ats = &mut at[oi * wo..(oi + 1) * wo];
        if kh == 2 && kw == 2 {
            // The common 2x2 window, without the inner loops.
            let (r0, r1) = (&x[base..base + w], &x[base + w..base + 2 * w]);
            for oj in 0..wo {
                let c = 2 * oj;
                let (mut best, mut pos) = (r0[c], c);
                if r0[c + 1] > best {
                    (best, pos) = (r0[c + 1], c + 1);
                }
                if r1[c] > best {
                    (best, pos) = (r1[c], w + c);
                }
                if r1[c + 1] > best {
                    (best, pos) = (r1[c + 1], w + c + 1);
                }
                ys[oj] = best;
                ats[oj] = (base + pos) as u32;
            }
        } else {
            for oj in 0..wo {
                let first = base + oj * kw;
                let (mut best, mut pos) = (x[first], first);
                for di in 0..kh {
                    let row = first + di * w;
                    for (dj, &v) in x[row..row + kw].iter().enumerate() {
                        if v > best {
                            (best, pos) = (v, row + dj);
                        }
                    }
                }
                ys[oj] = best;
                ats[oj] = pos as u32;
            }
        }
        if relu {
            for (y, a) in ys.iter_mut().zip(ats.iter_mut()) {
                if !(*y > 0.0 || y.is_nan()) {
                    *y = 0.0;
                    *a = NONE;
                }
            }
        }
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    super::f32_slice("max-pool", s, l, "input")
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
        let (out, plane_in) = (self.ho() * self.wo(), self.h * self.w);
        if plane_in > NONE as usize {
            candle_core::bail!("max-pool: planes of {plane_in} values are too large");
        }
        let mut y = vec![0f32; self.planes * out];
        let mut at = vec![0u32; self.planes * out];
        y.par_chunks_mut(out)
            .zip(at.par_chunks_mut(out))
            .zip(x.par_chunks(plane_in))
            .for_each(|((yp, ap), xp)| self.plane(xp, yp, ap));
        let _ = self.argmax.set(at);
        Ok((CpuStorage::F32(y), self.out_shape(l.dims())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Some(argmax) = self.argmax.get() else {
            candle_core::bail!("max-pool: backward before forward");
        };
        let grad = grad.contiguous()?;
        let dx = {
            let (gs, gl) = grad.storage_and_layout();
            let g = super::cpu_f32_slice("max-pool", &gs, gl, "gradient")?;
            self.unpool(argmax, g)
        };
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `MaxPool2d(k)` on `[B, C, H, W]`, after a ReLU when `relu`. CPU and f32 only.
pub fn max_pool2d(x: &Tensor, k: usize, relu: bool) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if k == 0 || h < k || w < k {
        candle_core::bail!("max-pool: window {k} does not fit a {h}x{w} input");
    }
    if !super::on_cpu_f32(&[x]) {
        candle_core::bail!("max-pool: the kernel runs on f32 CPU tensors only");
    }
    let op = PoolOp {
        planes: b * c,
        h,
        w,
        kh: k,
        kw: k,
        relu,
        one_d: false,
        strided: None,
        argmax: OnceLock::new(),
    };
    x.contiguous()?.apply_op1(op)
}

impl PoolOp {
    /// The gradient of the pool's input: each pooled value's gradient `g`
    /// added at its window's maximum (`argmax`, as the forward pass set it).
    pub(super) fn unpool(&self, argmax: &[u32], g: &[f32]) -> Vec<f32> {
        let (out, plane_in) = (self.ho() * self.wo(), self.h * self.w);
        let mut dx = vec![0f32; self.planes * plane_in];
        if out > 0 && plane_in > 0 {
            dx.par_chunks_mut(plane_in)
                .zip(argmax.par_chunks(out).zip(g.par_chunks(out)))
                .for_each(|(dp, (ap, gp))| {
                    // Overlapping windows may share their maximum.
                    for (&a, &g) in ap.iter().zip(gp) {
                        if a != NONE {
                            dp[a as usize] += g;
                        }
                    }
                });
        }
        dx
    }

    /// `MaxPool2d(k, stride, padding)` over `planes` planes of `h x w`
    /// (floor mode, padding at most half the window), no ReLU.
    pub(super) fn strided_2d(
        planes: usize,
        (h, w): (usize, usize),
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<PoolOp> {
        check_strided(h, w, k, stride, padding)?;
        Ok(PoolOp {
            planes,
            h,
            w,
            kh: k,
            kw: k,
            relu: false,
            one_d: false,
            strided: Some(((stride, stride), (padding, padding))),
            argmax: OnceLock::new(),
        })
    }
}

fn check_strided(h: usize, w: usize, k: usize, stride: usize, padding: usize) -> Result<()> {
    if k == 0 || stride == 0 || 2 * padding > k || h + 2 * padding < k || w + 2 * padding < k {
        candle_core::bail!(
            "max-pool: window {k}, stride {stride}, padding {padding} do not fit a {h}x{w} input"
        );
    }
    Ok(())
}

/// `MaxPool2d(k, stride, padding)` on `[B, C, H, W]` (floor mode, padding at
/// most half the window), after a ReLU when `relu`. CPU and f32 only.
pub fn max_pool2d_strided(
    x: &Tensor,
    k: usize,
    stride: usize,
    padding: usize,
    relu: bool,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    check_strided(h, w, k, stride, padding)?;
    if !super::on_cpu_f32(&[x]) {
        candle_core::bail!("max-pool: the kernel runs on f32 CPU tensors only");
    }
    let op = PoolOp {
        planes: b * c,
        h,
        w,
        kh: k,
        kw: k,
        relu,
        one_d: false,
        strided: Some(((stride, stride), (padding, padding))),
        argmax: OnceLock::new(),
    };
    x.contiguous()?.apply_op1(op)
}

/// `MaxPool1d(k)` on `[B, C, L]`, after a ReLU when `relu`. CPU and f32 only.
pub fn max_pool1d(x: &Tensor, k: usize, relu: bool) -> Result<Tensor> {
    let (b, c, l) = x.dims3()?;
    if k == 0 || l < k {
        candle_core::bail!("max-pool: window {k} does not fit an input of length {l}");
    }
    if !super::on_cpu_f32(&[x]) {
        candle_core::bail!("max-pool: the kernel runs on f32 CPU tensors only");
    }
    let op = PoolOp {
        planes: b * c,
        h: 1,
        w: l,
        kh: 1,
        kw: k,
        relu,
        one_d: true,
        strided: None,
        argmax: OnceLock::new(),
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
