//! Depthwise convolutions (`groups = in = out channels`, dilation 1: every
//! channel convolved with its own `kh x kw` filter), computed directly — no
//! im2col, no per-group products — and parallel over the samples:
//! - forward: per output row, one multiply-add pass per filter tap over the
//!   row (contiguous slices at stride 1), the bias pre-filled;
//! - backward: one pass over each sample's planes gives the input gradient
//!   (the taps' passes transposed), the weight gradient (one dot product per
//!   tap and row, per-sample partial sums added at the end) and the bias
//!   gradient (row sums); the weight gradient is skipped for a frozen weight,
//!   the input gradient for data.
//!
//! CPU and f32 only: off the CPU (or for other dtypes) they return an error;
//! the layer (`model::layers::conv`) picks candle's generic ops there instead.

use candle_core::{Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv::{apply, check_bias, out_size, ConvKernel, Geom, Grads};
use super::depthwise3x3 as fast;

/// The range of output columns `[lo, hi)` whose input column for a filter
/// column is inside the image, and the input column of `lo`.
type Cols = (usize, usize, usize);

/// [`Cols`] of every filter column (divisions: computed once per op, not per row).
fn col_table(g: &Geom) -> Vec<Cols> {
    (0..g.kw).map(|kj| cols(g, kj)).collect()
}

fn cols(g: &Geom, kj: usize) -> Cols {
    let lo = g.pw.saturating_sub(kj).div_ceil(g.sw).min(g.wo);
    let hi = if g.w + g.pw > kj {
        ((g.w + g.pw - kj - 1) / g.sw + 1).min(g.wo)
    } else {
        0
    };
    if lo >= hi {
        return (0, 0, 0);
    }
    (lo, hi, lo * g.sw + kj - g.pw)
}

/// The input row of output row `oi` and filter row `ki`, if inside the image.
#[inline(always)]
fn in_row(g: &Geom, oi: usize, ki: usize) -> Option<usize> {
    let r = (oi * g.sh + ki).checked_sub(g.ph)?;
    (r < g.h).then_some(r)
}

/// `y += a * x` over equal-length slices.
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// The dot product of two equal-length slices, in eight lanes (so that it
/// vectorises).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Whether the CPU has AVX2 (checked once; the plane loops are compiled
/// twice, for it and for the baseline, and picked at run time).
#[cfg(target_arch = "x86_64")]
pub(super) fn avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| std::is_x86_feature_detected!("avx2"))
}

/// [`forward_plane_impl`], 8 lanes wide where the CPU has AVX2.
fn forward_plane(g: &Geom, ct: &[Cols], x: &[f32], f: &[f32], bias: f32, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        #[target_feature(enable = "avx2")]
        unsafe fn wide(g: &Geom, ct: &[Cols], x: &[f32], f: &[f32], bias: f32, y: &mut [f32]) {
            forward_plane_impl(g, ct, x, f, bias, y)
        }
        // SAFETY: the CPU has AVX2 (checked above); the body is safe code.
        return unsafe { wide(g, ct, x, f, bias, y) };
    }
    forward_plane_impl(g, ct, x, f, bias, y)
}

/// [`backward_plane_impl`], 8 lanes wide where the CPU has AVX2.
fn backward_plane(
    g: &Geom,
    ct: &[Cols],
    x: &[f32],
    f: &[f32],
    dy: &[f32],
    df: Option<&mut [f32]>,
    dx: Option<&mut [f32]>,
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        #[target_feature(enable = "avx2")]
        unsafe fn wide(
            g: &Geom,
            ct: &[Cols],
            x: &[f32],
            f: &[f32],
            dy: &[f32],
            df: Option<&mut [f32]>,
            dx: Option<&mut [f32]>,
        ) -> f32 {
            backward_plane_impl(g, ct, x, f, dy, df, dx)
        }
        // SAFETY: the CPU has AVX2 (checked above); the body is safe code.
        return unsafe { wide(g, ct, x, f, dy, df, dx) };
    }
    backward_plane_impl(g, ct, x, f, dy, df, dx)
}

/// One channel's plane `x` ([H, W]) convolved with its filter `f` ([kh, kw])
/// into `y` ([Ho, Wo]), starting from `bias`.
#[inline(always)]
fn forward_plane_impl(g: &Geom, ct: &[Cols], x: &[f32], f: &[f32], bias: f32, y: &mut [f32]) {
    y.fill(bias);
    for oi in 0..g.ho {
        let yr = &mut y[oi * g.wo..(oi + 1) * g.wo];
        for ki in 0..g.kh {
            let Some(ii) = in_row(g, oi, ki) else {
                continue;
            };
            let xr = &x[ii * g.w..(ii + 1) * g.w];
            for (kj, &(lo, hi, first)) in ct.iter().enumerate() {
                let a = f[ki * g.kw + kj];
                if g.sw == 1 {
                    axpy(&mut yr[lo..hi], a, &xr[first..first + (hi - lo)]);
                } else {
                    for (o, y) in yr[lo..hi].iter_mut().enumerate() {
                        *y += a * xr[first + o * g.sw];
                    }
                }
            }
        }
    }
}

/// One channel's gradients from its output gradient `dy` ([Ho, Wo]): adds to
/// the filter's gradient `df` ([kh, kw], when given) and returns the bias
/// gradient; writes the input gradient into `dx` ([H, W], when given).
#[inline(always)]
fn backward_plane_impl(
    g: &Geom,
    ct: &[Cols],
    x: &[f32],
    f: &[f32],
    dy: &[f32],
    mut df: Option<&mut [f32]>,
    mut dx: Option<&mut [f32]>,
) -> f32 {
    if let Some(dx) = dx.as_deref_mut() {
        dx.fill(0.0);
    }
    let mut db = 0f32;
    for oi in 0..g.ho {
        let dr = &dy[oi * g.wo..(oi + 1) * g.wo];
        db += dr.iter().sum::<f32>();
        for ki in 0..g.kh {
            let Some(ii) = in_row(g, oi, ki) else {
                continue;
            };
            let row = ii * g.w..(ii + 1) * g.w;
            for (kj, &(lo, hi, first)) in ct.iter().enumerate() {
                let tap = ki * g.kw + kj;
                let d = &dr[lo..hi];
                if let Some(df) = df.as_deref_mut() {
                    let xr = &x[row.clone()];
                    df[tap] += if g.sw == 1 {
                        dot(d, &xr[first..first + (hi - lo)])
                    } else {
                        d.iter()
                            .enumerate()
                            .map(|(o, v)| v * xr[first + o * g.sw])
                            .sum()
                    };
                }
                if let Some(dx) = dx.as_deref_mut() {
                    let xr = &mut dx[row.clone()];
                    let a = f[tap];
                    if g.sw == 1 {
                        axpy(&mut xr[first..first + (hi - lo)], a, d);
                    } else {
                        for (o, v) in d.iter().enumerate() {
                            xr[first + o * g.sw] += a * v;
                        }
                    }
                }
            }
        }
    }
    db
}

/// The depthwise convolution kernel.
pub(super) struct DepthwiseOp {
    pub(super) g: Geom,
}

impl DepthwiseOp {
    fn taps(&self) -> usize {
        self.g.kh * self.g.kw
    }
}

impl ConvKernel for DepthwiseOp {
    const NAMES: [&'static str; 2] = ["depthwise-conv", "depthwise-conv-bias"];

    fn geom(&self) -> &Geom {
        &self.g
    }

    fn forward(&self, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Result<(Vec<f32>, Shape)> {
        let g = &self.g;
        let (plane_in, plane_out, taps) = (g.h * g.w, g.n(), self.taps());
        let mut y = vec![0f32; g.batch * g.out_len()];
        let ct = col_table(g);
        if plane_out > 0 && fast::applies(g) {
            y.par_chunks_mut(g.out_len().max(1))
                .enumerate()
                .for_each(|(s, ys)| {
                    let mut pad = fast::Padded::new(g.h, g.w);
                    for (c, yp) in ys.chunks_mut(plane_out).enumerate() {
                        let p = s * g.cin + c;
                        pad.load(&x[p * plane_in..(p + 1) * plane_in]);
                        let bias = b.map_or(0.0, |b| b[c]);
                        fast::forward_plane(&pad, &w[c * taps..(c + 1) * taps], bias, yp);
                    }
                });
        } else if plane_out > 0 {
            y.par_chunks_mut(g.out_len().max(1))
                .enumerate()
                .for_each(|(s, ys)| {
                    for (c, yp) in ys.chunks_mut(plane_out).enumerate() {
                        let p = s * g.cin + c;
                        let xp = &x[p * plane_in..(p + 1) * plane_in];
                        let bias = b.map_or(0.0, |b| b[c]);
                        forward_plane(g, &ct, xp, &w[c * taps..(c + 1) * taps], bias, yp);
                    }
                });
        }
        Ok((y, g.out_shape()))
    }

    fn backward(&self, x: &[f32], w: &[f32], dy: &[f32], need: (bool, bool)) -> Result<Grads> {
        let g = &self.g;
        let (need_dx, need_dw) = need;
        let (plane_in, plane_out, taps, c) = (g.h * g.w, g.n(), self.taps(), g.cin);
        let ct = col_table(g);
        // Per sample: (dw, db) partial sums, and its input gradient.
        let sample = |s: usize, dxs: Option<&mut [f32]>| -> (Vec<f32>, Vec<f32>) {
            let mut dw = if need_dw {
                vec![0f32; c * taps]
            } else {
                Vec::new()
            };
            let mut db = vec![0f32; c];
            let mut dxp = dxs.map(|d| d.chunks_mut(plane_in.max(1)));
            for ch in 0..c {
                let p = s * c + ch;
                let df = need_dw.then(|| &mut dw[ch * taps..(ch + 1) * taps]);
                let dx = dxp.as_mut().and_then(|it| it.next());
                db[ch] = backward_plane(
                    g,
                    &ct,
                    &x[p * plane_in..(p + 1) * plane_in],
                    &w[ch * taps..(ch + 1) * taps],
                    &dy[p * plane_out..(p + 1) * plane_out],
                    df,
                    dx,
                );
            }
            (dw, db)
        };
        let zero = || {
            (
                vec![0f32; if need_dw { c * taps } else { 0 }],
                vec![0f32; c],
            )
        };
        let add = |(mut aw, mut ab): (Vec<f32>, Vec<f32>), (bw, bb): (Vec<f32>, Vec<f32>)| {
            for (a, b) in aw.iter_mut().zip(&bw) {
                *a += b;
            }
            for (a, b) in ab.iter_mut().zip(&bb) {
                *a += b;
            }
            (aw, ab)
        };
        let mut dx = None;
        let (dw, db) = if need_dx && g.in_len() > 0 {
            let mut buf = vec![0f32; g.batch * g.in_len()];
            let sums = buf
                .par_chunks_mut(g.in_len())
                .enumerate()
                .map(|(s, d)| sample(s, Some(d)))
                .reduce(zero, add);
            dx = Some(buf);
            sums
        } else {
            if need_dx {
                dx = Some(Vec::new());
            }
            (0..g.batch)
                .into_par_iter()
                .map(|s| sample(s, None))
                .reduce(zero, add)
        };
        Ok((dx, dw, db))
    }
}

/// `F.conv2d(x, w, b, stride, padding, groups=C)`: x `[B, C, H, W]`, w
/// `[C, 1, kh, kw]`. CPU and f32 only.
pub fn depthwise_conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let mut all = vec![x, w];
    all.extend(b);
    if !super::on_cpu_f32(&all) {
        candle_core::bail!("depthwise_conv2d: the kernel runs on f32 CPU tensors only");
    }
    let (batch, cin, h, wd) = x.dims4()?;
    let (cout, one, kh, kw) = w.dims4()?;
    if cout != cin || one != 1 {
        candle_core::bail!(
            "depthwise_conv2d: input has {cin} channels, the weight {:?} is not [{cin}, 1, kh, kw]",
            w.dims()
        );
    }
    check_bias(b, cout)?;
    let g = Geom::square_2d(batch, cin, (h, wd), cout, (kh, kw), stride, padding)?;
    apply(x, w, b, DepthwiseOp { g })
}

/// `F.conv1d(x, w, b, stride, padding, groups=C)`: x `[B, C, L]`, w
/// `[C, 1, k]`. CPU and f32 only.
pub fn depthwise_conv1d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let mut all = vec![x, w];
    all.extend(b);
    if !super::on_cpu_f32(&all) {
        candle_core::bail!("depthwise_conv1d: the kernel runs on f32 CPU tensors only");
    }
    let (batch, cin, len) = x.dims3()?;
    let (cout, one, k) = w.dims3()?;
    if cout != cin || one != 1 {
        candle_core::bail!(
            "depthwise_conv1d: input has {cin} channels, the weight {:?} is not [{cin}, 1, k]",
            w.dims()
        );
    }
    check_bias(b, cout)?;
    let g = Geom {
        batch,
        cin,
        h: 1,
        w: len,
        cout,
        kh: 1,
        kw: k,
        sh: 1,
        sw: stride,
        ph: 0,
        pw: padding,
        ho: 1,
        wo: out_size(len, k, stride, padding)?,
        one_d: true,
    };
    apply(x, w, b, DepthwiseOp { g })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{max_diff, rand};
    use super::*;
    use candle_core::Var;

    /// Candle's convolution, one channel at a time (its generic path for a
    /// depthwise layer), stride 1 only (where candle's gradients are right).
    fn per_channel(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize) -> Tensor {
        let c = x.dim(1).unwrap();
        let parts: Vec<Tensor> = (0..c)
            .map(|i| {
                x.narrow(1, i, 1)
                    .unwrap()
                    .conv2d(&w.narrow(0, i, 1).unwrap(), padding, 1, 1, 1)
                    .unwrap()
            })
            .collect();
        Tensor::cat(&parts, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
    }

    #[test]
    fn matches_candle_per_channel_at_stride_one() {
        for (xs, k, p) in [
            ([3, 5, 9, 8], 3, 1),
            ([2, 4, 7, 11], 5, 2),
            ([1, 3, 6, 6], 2, 0),
        ] {
            let x = Var::from_tensor(&rand(&xs, 1)).unwrap();
            let w = Var::from_tensor(&rand(&[xs[1], 1, k, k], 2)).unwrap();
            let b = Var::from_tensor(&rand(&[xs[1]], 3)).unwrap();
            let want = per_channel(&x, &w, &b, p);
            let ours = depthwise_conv2d(&x, &w, Some(&b), 1, p).unwrap();
            assert!(max_diff(&ours, &want) < 1e-5);
            let wts = rand(want.dims(), 4);
            let gw = (&want * &wts).unwrap().sum_all().unwrap();
            let go = (&ours * &wts).unwrap().sum_all().unwrap();
            let (gw, go) = (gw.backward().unwrap(), go.backward().unwrap());
            for v in [&x, &w, &b] {
                let d = max_diff(go.get(v).unwrap(), gw.get(v).unwrap());
                assert!(d < 1e-4, "{xs:?} k {k}: gradient differs by {d}");
            }
        }
    }

    #[test]
    fn frozen_weight_and_data_input_get_no_gradient() {
        let x = rand(&[2, 3, 6, 6], 1);
        let w = rand(&[3, 1, 3, 3], 2);
        let b = Var::from_tensor(&rand(&[3], 3)).unwrap();
        let y = depthwise_conv2d(&x, &w, Some(&b), 2, 1).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none() && g.get(&w).is_none());
        assert!(g.get(&b).is_some());
    }

    #[test]
    fn rejects_what_is_not_depthwise() {
        let x = rand(&[1, 4, 5, 5], 1);
        assert!(depthwise_conv2d(&x, &rand(&[4, 2, 3, 3], 2), None, 1, 1).is_err());
        assert!(depthwise_conv2d(&x, &rand(&[8, 1, 3, 3], 2), None, 1, 1).is_err());
        assert!(depthwise_conv2d(&x, &rand(&[4, 1, 7, 7], 2), None, 1, 0).is_err());
    }
}
