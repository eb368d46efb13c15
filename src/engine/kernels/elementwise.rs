//! Fused element-wise updates that write into an existing tensor (candle's
//! in-place custom ops), for the optimisers: one pass over memory and no
//! temporaries instead of a dozen allocating tensor ops per parameter.
//!
//! Each update repeats, element by element and in the tensor's own dtype, the
//! exact arithmetic of the out-of-place tensor expressions it replaces (same
//! operations in the same order, scalars rounded to the dtype as candle's
//! `affine` rounds them), so results are bit-identical to the generic path.

use candle_core::{CpuStorage, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// Element types the fused updates run on.
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + 'static
{
    /// The scalar rounded to this type (as candle's `affine` does).
    fn from_f64(v: f64) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Zero.
    fn zero() -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn zero() -> Self {
        0.0
    }
}

impl Real for f64 {
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn zero() -> Self {
        0.0
    }
}

/// An element-wise update `dst[i] = f(dst[i], a[i], b[i])`.
pub trait Update: Sync {
    /// Name for error messages.
    const NAME: &'static str;
    /// Updates one element.
    fn apply<T: Real>(&self, dst: T, a: T, b: T) -> T;
    /// Updates a run of elements. Implementations pick a branch-free loop for
    /// their settings (so that it vectorises); the default applies
    /// [`Update::apply`] element by element.
    fn run<T: Real>(&self, dst: &mut [T], a: &[T], b: &[T]) {
        zip3(dst, a, b, |d, a, b| self.apply(d, a, b));
    }
}

/// `dst[i] = f(dst[i], a[i], b[i])` over equal-length slices.
#[inline(always)]
fn zip3<T: Real, F: Fn(T, T, T) -> T>(dst: &mut [T], a: &[T], b: &[T], f: F) {
    let n = dst.len().min(a.len()).min(b.len());
    let (dst, a, b) = (&mut dst[..n], &a[..n], &b[..n]);
    for i in 0..n {
        dst[i] = f(dst[i], a[i], b[i]);
    }
}

/// Below this many elements an update runs on one thread.
const PARALLEL_MIN: usize = 1 << 15;

fn run<U: Update, T: Real>(u: &U, dst: &mut [T], a: &[T], b: &[T]) {
    let body = |(d, (a, b)): (&mut [T], (&[T], &[T]))| u.run(d, a, b);
    if dst.len() >= PARALLEL_MIN {
        let chunk = dst.len().div_ceil(rayon::current_num_threads().max(1) * 4);
        dst.par_chunks_mut(chunk)
            .zip(a.par_chunks(chunk).zip(b.par_chunks(chunk)))
            .for_each(body);
    } else {
        body((dst, (a, b)));
    }
}

/// Wraps an [`Update`] as a candle in-place op over three same-shaped,
/// contiguous tensors.
pub struct Fused<U>(pub U);

fn span(l: &Layout, name: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{name}: operands must be contiguous")))
}

impl<U: Update> InplaceOp3 for Fused<U> {
    fn name(&self) -> &'static str {
        U::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (d0, d1) = span(l1, U::NAME)?;
        let (a0, a1) = span(l2, U::NAME)?;
        let (b0, b1) = span(l3, U::NAME)?;
        if d1 - d0 != a1 - a0 || d1 - d0 != b1 - b0 {
            candle_core::bail!("{}: operands differ in size", U::NAME);
        }
        match (s1, s2, s3) {
            (CpuStorage::F32(d), CpuStorage::F32(a), CpuStorage::F32(b)) => {
                run(&self.0, &mut d[d0..d1], &a[a0..a1], &b[b0..b1])
            }
            (CpuStorage::F64(d), CpuStorage::F64(a), CpuStorage::F64(b)) => {
                run(&self.0, &mut d[d0..d1], &a[a0..a1], &b[b0..b1])
            }
            _ => candle_core::bail!("{}: only f32 and f64 are supported", U::NAME),
        }
        Ok(())
    }
}

/// Whether the fused updates can run on `t` (a contiguous f32/f64 CPU tensor).
pub fn supports(t: &Tensor) -> bool {
    t.device().is_cpu()
        && matches!(t.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && t.is_contiguous()
}

/// `dst = f(dst, a, b)` in place.
pub fn update<U: Update>(dst: &Tensor, a: &Tensor, b: &Tensor, u: U) -> Result<()> {
    dst.inplace_op3(a, b, &Fused(u))
}

/// Adam's first moment: `m = lerp(m, g', 1 - beta1)` with `g' = g + wd * p`
/// when `l2` (Adam's coupled weight decay). Operands: `dst = m`, `a = g`, `b = p`.
pub struct AdamExpAvg {
    /// `1 - beta1`.
    pub weight: f64,
    /// L2 weight decay added to the gradient (0 for AdamW).
    pub l2: f64,
}

#[inline(always)]
fn decayed<T: Real>(g: T, p: T, l2: f64) -> T {
    if l2 != 0.0 {
        g + (p * T::from_f64(l2) + T::zero())
    } else {
        g
    }
}

impl Update for AdamExpAvg {
    const NAME: &'static str = "adam-exp-avg";
    #[inline(always)]
    fn apply<T: Real>(&self, m: T, g: T, p: T) -> T {
        let g = decayed(g, p, self.l2);
        let diff = g - m;
        if self.weight.abs() < 0.5 {
            m + (diff * T::from_f64(self.weight) + T::zero())
        } else {
            g - (diff * T::from_f64(1.0 - self.weight) + T::zero())
        }
    }

    fn run<T: Real>(&self, m: &mut [T], g: &[T], p: &[T]) {
        let z = T::zero();
        let l2 = T::from_f64(self.l2);
        let near = self.weight.abs() < 0.5;
        let w = T::from_f64(if near { self.weight } else { 1.0 - self.weight });
        match (self.l2 != 0.0, near) {
            (false, true) => zip3(m, g, p, |m, g, _| m + ((g - m) * w + z)),
            (false, false) => zip3(m, g, p, |m, g, _| g - ((g - m) * w + z)),
            (true, true) => zip3(m, g, p, |m, g, p| {
                let g = g + (p * l2 + z);
                m + ((g - m) * w + z)
            }),
            (true, false) => zip3(m, g, p, |m, g, p| {
                let g = g + (p * l2 + z);
                g - ((g - m) * w + z)
            }),
        }
    }
}

/// Adam's second moment: `v = beta2 * v + (1 - beta2) * g'^2`.
/// Operands: `dst = v`, `a = g`, `b = p`.
pub struct AdamExpAvgSq {
    pub beta2: f64,
    /// L2 weight decay added to the gradient (0 for AdamW).
    pub l2: f64,
}

impl Update for AdamExpAvgSq {
    const NAME: &'static str = "adam-exp-avg-sq";
    #[inline(always)]
    fn apply<T: Real>(&self, v: T, g: T, p: T) -> T {
        let g = decayed(g, p, self.l2);
        (v * T::from_f64(self.beta2) + T::zero())
            + ((g * g) * T::from_f64(1.0 - self.beta2) + T::zero())
    }

    fn run<T: Real>(&self, v: &mut [T], g: &[T], p: &[T]) {
        let (z, b2, c2) = (
            T::zero(),
            T::from_f64(self.beta2),
            T::from_f64(1.0 - self.beta2),
        );
        if self.l2 != 0.0 {
            let l2 = T::from_f64(self.l2);
            zip3(v, g, p, |v, g, p| {
                let g = g + (p * l2 + z);
                (v * b2 + z) + ((g * g) * c2 + z)
            });
        } else {
            zip3(v, g, p, |v, g, _| (v * b2 + z) + ((g * g) * c2 + z));
        }
    }
}

/// AMSGrad's running maximum: `vmax = max(vmax, v)`. Operands: `dst = vmax`,
/// `a = v`, `b` unused (pass `v` again).
pub struct Maximum;

impl Update for Maximum {
    const NAME: &'static str = "maximum";
    #[inline(always)]
    fn apply<T: Real>(&self, mx: T, v: T, _: T) -> T {
        if v > mx {
            v
        } else {
            mx
        }
    }
}

/// Adam's parameter update: `p = p * (1 - lr * wd) - step_size * m /
/// (sqrt(v) / sqrt(bc2) + eps)`. Operands: `dst = p`, `a = m`, `b = v`
/// (or `vmax` with AMSGrad).
pub struct AdamParam {
    pub step_size: f64,
    /// `1 / sqrt(bias_correction2)`.
    pub inv_bc2_sqrt: f64,
    pub eps: f64,
    /// `Some(1 - lr * wd)` for AdamW's decoupled decay.
    pub decay: Option<f64>,
}

impl Update for AdamParam {
    const NAME: &'static str = "adam-param";
    #[inline(always)]
    fn apply<T: Real>(&self, p: T, m: T, v: T) -> T {
        let denom = v.sqrt() * T::from_f64(self.inv_bc2_sqrt) + T::from_f64(self.eps);
        let update = (m * T::from_f64(-self.step_size) + T::zero()) / denom;
        let base = match self.decay {
            Some(d) => p * T::from_f64(d) + T::zero(),
            None => p,
        };
        base + update
    }

    fn run<T: Real>(&self, p: &mut [T], m: &[T], v: &[T]) {
        let (z, inv, eps, step) = (
            T::zero(),
            T::from_f64(self.inv_bc2_sqrt),
            T::from_f64(self.eps),
            T::from_f64(-self.step_size),
        );
        match self.decay {
            Some(d) => {
                let d = T::from_f64(d);
                zip3(p, m, v, |p, m, v| {
                    (p * d + z) + ((m * step + z) / (v.sqrt() * inv + eps))
                });
            }
            None => zip3(p, m, v, |p, m, v| {
                p + ((m * step + z) / (v.sqrt() * inv + eps))
            }),
        }
    }
}

/// SGD's momentum buffer: `buf = momentum * buf + (1 - dampening) * d_p`
/// with `d_p = g + wd * p`; on the first step `buf = d_p`.
/// Operands: `dst = buf`, `a = g`, `b = p`.
pub struct SgdMomentum {
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub first: bool,
}

impl Update for SgdMomentum {
    const NAME: &'static str = "sgd-momentum";
    #[inline(always)]
    fn apply<T: Real>(&self, buf: T, g: T, p: T) -> T {
        let d_p = decayed(g, p, self.weight_decay);
        if self.first {
            return d_p;
        }
        let scaled = buf * T::from_f64(self.momentum) + T::zero();
        if self.dampening == 0.0 {
            scaled + d_p
        } else {
            scaled + (d_p * T::from_f64(1.0 - self.dampening) + T::zero())
        }
    }
}

/// SGD's parameter update: `p = p - lr * d` where `d` is `d_p` (no momentum),
/// `buf`, or `d_p + momentum * buf` (Nesterov). Operands: `dst = p`, `a = g`,
/// `b = buf` (pass `g` again without momentum).
pub struct SgdParam {
    pub lr: f64,
    pub weight_decay: f64,
    /// 0 without momentum.
    pub momentum: f64,
    pub nesterov: bool,
}

impl Update for SgdParam {
    const NAME: &'static str = "sgd-param";
    #[inline(always)]
    fn apply<T: Real>(&self, p: T, g: T, buf: T) -> T {
        let d = if self.momentum == 0.0 {
            decayed(g, p, self.weight_decay)
        } else if self.nesterov {
            decayed(g, p, self.weight_decay) + (buf * T::from_f64(self.momentum) + T::zero())
        } else {
            buf
        };
        p + (d * T::from_f64(-self.lr) + T::zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn updates_in_place_large_and_small() {
        for n in [5usize, PARALLEL_MIN + 3] {
            let m = Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap();
            let g = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
            let p = Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap();
            let alias = m.clone();
            update(
                &m,
                &g,
                &p,
                AdamExpAvg {
                    weight: 0.1,
                    l2: 0.0,
                },
            )
            .unwrap();
            let got = alias.to_vec1::<f32>().unwrap();
            assert_eq!(got[3], 3.0 * 0.1f32);
            assert_eq!(got[n - 1], (n - 1) as f32 * 0.1f32);
        }
    }

    #[test]
    fn refuses_mixed_dtypes() {
        let m = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        let g = Tensor::zeros(3, candle_core::DType::F64, &Device::Cpu).unwrap();
        assert!(update(&m, &g, &g, Maximum).is_err());
    }
}
