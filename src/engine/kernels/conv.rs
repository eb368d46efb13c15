//! Convolutions (2-D and 1-D, dilation 1, one group) as im2col + gemm, forward
//! and backward, parallel over the batch:
//! - forward: each sample's windows are unfolded into a `[Cin*kh*kw, Ho*Wo]`
//!   matrix and multiplied by the weight `[Cout, Cin*kh*kw]`, bias pre-filled;
//! - backward: the weight gradient is `dY * colsᵀ` summed over the batch (one
//!   partial sum per thread), the bias gradient is the row sums of `dY` (the
//!   same pass), and the input gradient `Wᵀ * dY` folded back (col2im) only
//!   when the input needs one — images straight from the data need none.
//!
//! CPU and f32 only: off the CPU (or for other dtypes) they return an error;
//! the layer (`model::layers::conv`) picks candle's ops there instead.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::direct_grads;
use super::gemm::{matmul, Parallelism, Strides};
use super::pool::{pool_plane, NONE};

/// The sizes of one convolution; a 1-D one is a 2-D one with height 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geom {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub ho: usize,
    pub wo: usize,
    /// The output is `[B, Cout, L]` rather than `[B, Cout, H, W]`.
    pub one_d: bool,
}

impl Geom {
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    pub fn n(&self) -> usize {
        self.ho * self.wo
    }
    /// A 1x1 convolution with stride 1 and no padding: the unfolded input
    /// is the input itself (no im2col, no col2im).
    fn pointwise(&self) -> bool {
        (self.kh, self.kw, self.sh, self.sw, self.ph, self.pw) == (1, 1, 1, 1, 0, 0)
    }
    pub fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }
    pub fn out_len(&self) -> usize {
        self.cout * self.n()
    }
    pub fn out_shape(&self) -> Shape {
        if self.one_d {
            Shape::from((self.batch, self.cout, self.wo))
        } else {
            Shape::from((self.batch, self.cout, self.ho, self.wo))
        }
    }
}

pub(super) fn out_size(len: usize, k: usize, stride: usize, pad: usize) -> Result<usize> {
    let padded = len + 2 * pad;
    if stride == 0 || padded < k {
        candle_core::bail!("conv: input of size {len} (padding {pad}) is smaller than kernel {k}");
    }
    Ok((padded - k) / stride + 1)
}

/// Unfolds sample `x` ([Cin, H, W]) into `cols` ([Cin*kh*kw, Ho*Wo]).
fn im2col(g: &Geom, x: &[f32], cols: &mut [f32]) {
    im2col_at(g, x, cols, g.n(), 0);
}

/// [`im2col`] into the columns `off..off + Ho*Wo` of a matrix whose rows are
/// `ld` long (several samples side by side).
fn im2col_at(g: &Geom, x: &[f32], cols: &mut [f32], ld: usize, off: usize) {
    let n = g.n();
    for c in 0..g.cin {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = ((c * g.kh + ki) * g.kw + kj) * ld + off;
                let dst = &mut cols[row..row + n];
                // Output columns whose input column is inside the image.
                let lo = g.pw.saturating_sub(kj).div_ceil(g.sw).min(g.wo);
                let hi = if g.w + g.pw > kj {
                    ((g.w + g.pw - kj - 1) / g.sw + 1).min(g.wo)
                } else {
                    0
                };
                for oi in 0..g.ho {
                    let d = &mut dst[oi * g.wo..(oi + 1) * g.wo];
                    let ii = (oi * g.sh + ki) as isize - g.ph as isize;
                    if ii < 0 || ii >= g.h as isize || lo >= hi {
                        d.fill(0.0);
                        continue;
                    }
                    let src = &plane[ii as usize * g.w..(ii as usize + 1) * g.w];
                    d[..lo].fill(0.0);
                    d[hi..].fill(0.0);
                    let first = lo * g.sw + kj - g.pw;
                    if g.sw == 1 {
                        d[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                    } else {
                        for (o, v) in d[lo..hi].iter_mut().enumerate() {
                            *v = src[first + o * g.sw];
                        }
                    }
                }
            }
        }
    }
}

/// Folds the columns `off..off + Ho*Wo` of `cols` ([Cin*kh*kw, ld]) back
/// onto sample `dx` ([Cin, H, W]), adding.
fn col2im_at(g: &Geom, cols: &[f32], ld: usize, off: usize, dx: &mut [f32]) {
    let n = g.n();
    for c in 0..g.cin {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = ((c * g.kh + ki) * g.kw + kj) * ld + off;
                let src = &cols[row..row + n];
                let lo = g.pw.saturating_sub(kj).div_ceil(g.sw).min(g.wo);
                let hi = if g.w + g.pw > kj {
                    ((g.w + g.pw - kj - 1) / g.sw + 1).min(g.wo)
                } else {
                    0
                };
                if lo >= hi {
                    continue;
                }
                for oi in 0..g.ho {
                    let ii = (oi * g.sh + ki) as isize - g.ph as isize;
                    if ii < 0 || ii >= g.h as isize {
                        continue;
                    }
                    let d = &mut plane[ii as usize * g.w..(ii as usize + 1) * g.w];
                    let s = &src[oi * g.wo + lo..oi * g.wo + hi];
                    let first = lo * g.sw + kj - g.pw;
                    if g.sw == 1 {
                        for (d, s) in d[first..first + (hi - lo)].iter_mut().zip(s) {
                            *d += s;
                        }
                    } else {
                        for (o, s) in s.iter().enumerate() {
                            d[first + o * g.sw] += s;
                        }
                    }
                }
            }
        }
    }
}

/// Splits `batch` samples into about one chunk per thread.
fn chunk_size(batch: usize) -> usize {
    batch.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// One sample's convolution into `out` ([Cout, N]): unfolds `xs` into `cols`,
/// pre-fills the bias and multiplies by the weight.
fn conv_sample(
    g: &Geom,
    xs: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    cols: &mut [f32],
    out: &mut [f32],
) -> Result<()> {
    let (k, n) = (g.k(), g.n());
    let cols: &[f32] = if g.pointwise() {
        xs
    } else {
        im2col(g, xs, cols);
        cols
    };
    if let Some(b) = b {
        for (row, &bias) in out.chunks_mut(n).zip(b) {
            row.fill(bias);
        }
    }
    matmul(
        (g.cout, n, k),
        out,
        Strides::rows(n),
        w,
        Strides::rows(k),
        cols,
        Strides::rows(n),
        b.is_some(),
        Parallelism::None,
    )
}

/// Columns a product gets at least when samples are put side by side (their
/// windows unfolded next to each other in one product).
const MIN_COLS: usize = 512;

/// Samples with fewer columns than this go through the products together: a
/// product with few columns (the 7x7 and 4x4 maps of a backbone's last
/// stages) runs far below the CPU's speed, and the weight gradient, whose
/// inner dimension is the columns, even more so (it rewrites the whole
/// weight-sized result per sample). Wider samples go one at a time (measured:
/// side by side they gained nothing, and the copies cost the cnn bench).
const SMALL_N: usize = 128;

/// Samples per product for `count` samples of `n` columns each: one when
/// `n >= SMALL_N`, else groups of about equal size with at least
/// [`MIN_COLS`] columns (or all of them).
fn group_size(count: usize, n: usize) -> usize {
    if n >= SMALL_N || count <= 1 {
        return 1;
    }
    count.div_ceil((count * n).div_ceil(MIN_COLS).max(1))
}

/// Samples `s0..s0 + gn` of `x` unfolded side by side into `cols`
/// (`[Cin*kh*kw, gn*Ho*Wo]`).
fn gather_cols(g: &Geom, x: &[f32], s0: usize, gn: usize, cols: &mut [f32]) {
    let (n, il) = (g.n(), g.in_len());
    let ld = gn * n;
    for j in 0..gn {
        let xs = &x[(s0 + j) * il..(s0 + j + 1) * il];
        if g.pointwise() {
            for (c, src) in xs.chunks(n).enumerate() {
                cols[c * ld + j * n..c * ld + (j + 1) * n].copy_from_slice(src);
            }
        } else {
            im2col_at(g, xs, cols, ld, j * n);
        }
    }
}

fn forward(g: &Geom, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Result<Vec<f32>> {
    let (k, n, out_len) = (g.k(), g.n(), g.out_len());
    let mut y = vec![0f32; g.batch * out_len];
    if y.is_empty() {
        return Ok(y);
    }
    let per = chunk_size(g.batch);
    y.par_chunks_mut(per * out_len)
        .enumerate()
        .try_for_each(|(ci, ys)| -> Result<()> {
            let gs = group_size(ys.len() / out_len, n);
            let mut cols = vec![
                0f32;
                if g.pointwise() && gs == 1 {
                    0
                } else {
                    k * n * gs
                }
            ];
            let mut prod = vec![0f32; if gs > 1 { g.cout * n * gs } else { 0 }];
            for (gi, yg) in ys.chunks_mut(gs * out_len).enumerate() {
                let s0 = ci * per + gi * gs;
                let gn = yg.len() / out_len;
                if gn == 1 {
                    let xs = &x[s0 * g.in_len()..(s0 + 1) * g.in_len()];
                    conv_sample(g, xs, w, b, &mut cols, yg)?;
                    continue;
                }
                let ld = gn * n;
                gather_cols(g, x, s0, gn, &mut cols[..k * ld]);
                matmul(
                    (g.cout, ld, k),
                    &mut prod[..g.cout * ld],
                    Strides::rows(ld),
                    w,
                    Strides::rows(k),
                    &cols[..k * ld],
                    Strides::rows(ld),
                    false,
                    Parallelism::None,
                )?;
                for (j, yn) in yg.chunks_mut(out_len).enumerate() {
                    for (c, row) in yn.chunks_mut(n).enumerate() {
                        let bias = b.map_or(0.0, |b| b[c]);
                        let src = &prod[c * ld + j * n..c * ld + (j + 1) * n];
                        for (d, &v) in row.iter_mut().zip(src) {
                            *d = v + bias;
                        }
                    }
                }
            }
            Ok(())
        })?;
    Ok(y)
}

/// Where the gradient of the convolution's output comes from in the backward
/// pass.
enum ConvOutGrad<'a> {
    /// It is the op's output gradient, `[B, Cout, N]`.
    Dense(&'a [f32]),
    /// The op max-pooled its output: the pooled output's gradient `dy` goes
    /// to each window's maximum (`argmax`, per pooled value, or [`NONE`]).
    Pooled {
        argmax: &'a [u32],
        dy: &'a [f32],
        /// Pooled values per sample.
        out_len: usize,
    },
}

impl ConvOutGrad<'_> {
    /// Sample `s`'s gradient of the convolution's output ([Cout, N]), built
    /// in `scratch` where needed; adds the sample's bias gradient to `db`.
    fn sample<'b>(
        &'b self,
        g: &Geom,
        s: usize,
        scratch: &'b mut [f32],
        db: &mut [f32],
    ) -> &'b [f32] {
        let n = g.n();
        match *self {
            ConvOutGrad::Dense(dy) => {
                let dyn_ = &dy[s * g.out_len()..(s + 1) * g.out_len()];
                for (acc, row) in db.iter_mut().zip(dyn_.chunks(n)) {
                    *acc += row.iter().sum::<f32>();
                }
                dyn_
            }
            ConvOutGrad::Pooled {
                argmax,
                dy,
                out_len,
            } => {
                let plane_out = out_len / g.cout.max(1);
                scratch.fill(0.0);
                let (ats, gs) = (
                    &argmax[s * out_len..(s + 1) * out_len],
                    &dy[s * out_len..(s + 1) * out_len],
                );
                for (c, (ap, gp)) in ats.chunks(plane_out).zip(gs.chunks(plane_out)).enumerate() {
                    let plane = &mut scratch[c * n..(c + 1) * n];
                    for (&a, &gv) in ap.iter().zip(gp) {
                        if a != NONE {
                            plane[a as usize] = gv;
                            db[c] += gv;
                        }
                    }
                }
                scratch
            }
        }
    }
}

/// Gradients of one chunk of samples: weight and bias partial sums; the input
/// gradient is written into `dx` when given. The weight gradient is skipped
/// (left zero) unless `need_dw`. Samples go through the products in groups
/// of [`group_size`].
#[allow(clippy::too_many_arguments)]
fn backward_chunk(
    g: &Geom,
    first: usize,
    count: usize,
    x: &[f32],
    w: &[f32],
    dy: &ConvOutGrad,
    mut dx: Option<&mut [f32]>,
    need_dw: bool,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (k, n, il) = (g.k(), g.n(), g.in_len());
    let gs = group_size(count, n);
    let mut dw = vec![0f32; g.cout * k];
    let mut db = vec![0f32; g.cout];
    let pointwise = g.pointwise();
    // One pointwise sample at a time multiplies its input as it is.
    let direct = pointwise && gs == 1;
    let mut cols = vec![0f32; if direct { 0 } else { k * n * gs }];
    let mut scratch = match dy {
        ConvOutGrad::Dense(_) => Vec::new(),
        ConvOutGrad::Pooled { .. } => vec![0f32; g.cout * n],
    };
    let mut dyg = vec![0f32; if gs > 1 { g.cout * n * gs } else { 0 }];
    let mut i = 0;
    while i < count {
        let gn = gs.min(count - i);
        let (s0, ld) = (first + i, gn * n);
        // dY of the group, [Cout, gn*N].
        let dyv: &[f32] = if gn == 1 {
            dy.sample(g, s0, &mut scratch, &mut db)
        } else {
            for j in 0..gn {
                let d = dy.sample(g, s0 + j, &mut scratch, &mut db);
                for (c, row) in d.chunks(n).enumerate() {
                    dyg[c * ld + j * n..c * ld + (j + 1) * n].copy_from_slice(row);
                }
            }
            &dyg[..g.cout * ld]
        };
        let xcols: &[f32] = if pointwise && gn == 1 {
            &x[s0 * il..(s0 + 1) * il]
        } else {
            gather_cols(g, x, s0, gn, &mut cols[..k * ld]);
            &cols[..k * ld]
        };
        if need_dw {
            // dW += dY [Cout, gn*N] * colsᵀ [gn*N, K]
            matmul(
                (g.cout, k, ld),
                &mut dw,
                Strides::rows(k),
                dyv,
                Strides::rows(ld),
                xcols,
                Strides::transposed(ld),
                true,
                Parallelism::None,
            )?;
        }
        if let Some(dx) = dx.as_deref_mut() {
            let dxg = &mut dx[i * il..(i + gn) * il];
            // dcols = Wᵀ [K, Cout] * dY [Cout, gn*N] (in the unfolded input's
            // buffer, no longer needed), folded back onto the inputs (for one
            // pointwise sample, dcols is the input's gradient).
            let dst = if pointwise && gn == 1 {
                &mut *dxg
            } else {
                &mut cols[..k * ld]
            };
            matmul(
                (k, ld, g.cout),
                dst,
                Strides::rows(ld),
                w,
                Strides::transposed(k),
                dyv,
                Strides::rows(ld),
                false,
                Parallelism::None,
            )?;
            if !(pointwise && gn == 1) {
                for (j, dxs) in dxg.chunks_mut(il).enumerate() {
                    if pointwise {
                        for (c, row) in dxs.chunks_mut(n).enumerate() {
                            row.copy_from_slice(&cols[c * ld + j * n..c * ld + (j + 1) * n]);
                        }
                    } else {
                        col2im_at(g, &cols, ld, j * n, dxs);
                    }
                }
            }
        }
        i += gn;
    }
    Ok((dw, db))
}

/// (dx, dw, db)
pub(super) type Grads = (Option<Vec<f32>>, Vec<f32>, Vec<f32>);

fn backward(
    g: &Geom,
    x: &[f32],
    w: &[f32],
    dy: &ConvOutGrad,
    (need_dx, need_dw): (bool, bool),
) -> Result<Grads> {
    let per = chunk_size(g.batch);
    let partials: Vec<(Vec<f32>, Vec<f32>)>;
    let mut dx = None;
    if need_dx && g.in_len() > 0 {
        let mut buf = vec![0f32; g.batch * g.in_len()];
        partials = buf
            .par_chunks_mut(per * g.in_len())
            .enumerate()
            .map(|(ci, d)| {
                let count = d.len() / g.in_len();
                backward_chunk(g, ci * per, count, x, w, dy, Some(d), need_dw)
            })
            .collect::<Result<_>>()?;
        dx = Some(buf);
    } else {
        let chunks = g.batch.div_ceil(per);
        partials = (0..chunks)
            .into_par_iter()
            .map(|ci| {
                let count = per.min(g.batch - ci * per);
                backward_chunk(g, ci * per, count, x, w, dy, None, need_dw)
            })
            .collect::<Result<_>>()?;
        if need_dx {
            dx = Some(Vec::new());
        }
    }
    let (dw, db) = sum_partials(partials, g);
    Ok((dx, dw, db))
}

/// Sums the per-thread (dw, db) partial sums.
fn sum_partials(partials: Vec<(Vec<f32>, Vec<f32>)>, g: &Geom) -> (Vec<f32>, Vec<f32>) {
    let mut it = partials.into_iter();
    let (mut dw, mut db) = it
        .next()
        .unwrap_or_else(|| (vec![0f32; g.cout * g.k()], vec![0f32; g.cout]));
    for (pw, pb) in it {
        for (a, b) in dw.iter_mut().zip(&pw) {
            *a += b;
        }
        for (a, b) in db.iter_mut().zip(&pb) {
            *a += b;
        }
    }
    (dw, db)
}

/// A convolution kernel over (input, weight[, bias]), made a candle custom op
/// by [`Op`].
pub(super) trait ConvKernel: Send + Sync {
    /// The op's names without and with a bias.
    const NAMES: [&'static str; 2];
    fn geom(&self) -> &Geom;
    fn forward(&self, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Result<(Vec<f32>, Shape)>;
    /// (dx, dw, db) from the gradient of the op's output; `dx` only when
    /// `need.0`, and `dw` may be left empty when not `need.1` (a frozen weight).
    fn backward(&self, x: &[f32], w: &[f32], dy: &[f32], need: (bool, bool)) -> Result<Grads>;
}

/// The candle custom op of a [`ConvKernel`].
pub(super) struct Op<K>(pub K);

impl<K: ConvKernel> Op<K> {
    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = K::NAMES[usize::from(b.is_some())];
        let x = super::f32_slice(name, x.0, x.1, "input")?;
        let w = super::f32_slice(name, w.0, w.1, "weight")?;
        let b = b
            .map(|(s, l)| super::f32_slice(name, s, l, "bias"))
            .transpose()?;
        let (y, shape) = self.0.forward(x, w, b)?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Tensor)> {
        let name = K::NAMES[0];
        let grad = grad.contiguous()?;
        let (dx, dw, db) = {
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let xs = super::cpu_f32_slice(name, &xs, xl, "input")?;
            let ws = super::cpu_f32_slice(name, &ws, wl, "weight")?;
            let gs = super::cpu_f32_slice(name, &gs, gl, "gradient")?;
            self.0.backward(xs, ws, gs, (x.track_op(), w.track_op()))?
        };
        let dev = x.device();
        let dx = match dx {
            Some(v) => Some(Tensor::from_vec(v, x.shape(), dev)?),
            None => None,
        };
        // A frozen weight's gradient may have been skipped; it is not asked for.
        let dw = if w.track_op() {
            Some(Tensor::from_vec(dw, w.shape(), dev)?)
        } else {
            None
        };
        Ok((dx, dw, Tensor::from_vec(db, self.0.geom().cout, dev)?))
    }
}

impl<K: ConvKernel> CustomOp2 for Op<K> {
    fn name(&self) -> &'static str {
        K::NAMES[0]
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, grad)?;
        Ok((
            dx,
            dw.map(|dw| direct_grads::deliver(w, dw))
                .transpose()?
                .flatten(),
        ))
    }
}

impl<K: ConvKernel> CustomOp3 for Op<K> {
    fn name(&self) -> &'static str {
        K::NAMES[1]
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Frozen (detached) weights get no gradient.
        let (dx, dw, db) = self.grads(x, w, grad)?;
        Ok((
            dx,
            dw.map(|dw| direct_grads::deliver(w, dw))
                .transpose()?
                .flatten(),
            direct_grads::param(b, || Ok(db))?,
        ))
    }
}

/// Applies kernel `k` to contiguous operands.
pub(super) fn apply<K: ConvKernel + 'static>(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    k: K,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, Op(k)),
        None => x.apply_op2(&w, Op(k)),
    }
}

/// The convolution.
pub(super) struct ConvOp {
    pub(super) g: Geom,
}

impl ConvKernel for ConvOp {
    const NAMES: [&'static str; 2] = ["im2col-conv", "im2col-conv-bias"];

    fn geom(&self) -> &Geom {
        &self.g
    }

    fn forward(&self, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Result<(Vec<f32>, Shape)> {
        Ok((forward(&self.g, x, w, b)?, self.g.out_shape()))
    }

    fn backward(&self, x: &[f32], w: &[f32], dy: &[f32], need: (bool, bool)) -> Result<Grads> {
        backward(&self.g, x, w, &ConvOutGrad::Dense(dy), need)
    }
}

/// Convolution, bias, ReLU and max-pooling as one op ([`conv_relu_pool2d`],
/// [`conv_relu_pool1d`]): the convolution's output lives only in a per-thread
/// buffer, and its gradient — nonzero only at each window's maximum — is
/// rebuilt per sample in the backward pass instead of being a tensor of its own.
struct ConvPoolOp {
    g: Geom,
    /// Pooling window (height, width); height 1 for 1-D.
    pool: (usize, usize),
    /// Per pooled output: position of the maximum within its conv-output
    /// plane, or [`NONE`]; set by the forward pass.
    argmax: OnceLock<Vec<u32>>,
}

impl ConvPoolOp {
    fn pooled(&self) -> (usize, usize) {
        (self.g.ho / self.pool.0, self.g.wo / self.pool.1)
    }

    fn out_len(&self) -> usize {
        let (ph, pw) = self.pooled();
        self.g.cout * ph * pw
    }

    fn out_shape(&self) -> Shape {
        let (ph, pw) = self.pooled();
        if self.g.one_d {
            Shape::from((self.g.batch, self.g.cout, pw))
        } else {
            Shape::from((self.g.batch, self.g.cout, ph, pw))
        }
    }
}

impl ConvKernel for ConvPoolOp {
    const NAMES: [&'static str; 2] = ["conv-relu-pool", "conv-bias-relu-pool"];

    fn geom(&self) -> &Geom {
        &self.g
    }

    fn forward(&self, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Result<(Vec<f32>, Shape)> {
        let g = &self.g;
        let (k, n, out_len) = (g.k(), g.n(), self.out_len());
        let plane_out = out_len / g.cout.max(1);
        let mut y = vec![0f32; g.batch * out_len];
        let mut at = vec![0u32; g.batch * out_len];
        let per = chunk_size(g.batch);
        y.par_chunks_mut(per * out_len)
            .zip(at.par_chunks_mut(per * out_len))
            .enumerate()
            .try_for_each(|(ci, (ys, ats))| -> Result<()> {
                let mut cols = vec![0f32; k * n];
                let mut conv = vec![0f32; g.cout * n];
                for (i, (yn, an)) in ys
                    .chunks_mut(out_len)
                    .zip(ats.chunks_mut(out_len))
                    .enumerate()
                {
                    let s = ci * per + i;
                    let xs = &x[s * g.in_len()..(s + 1) * g.in_len()];
                    conv_sample(g, xs, w, b, &mut cols, &mut conv)?;
                    for ((cp, yp), ap) in conv
                        .chunks(n)
                        .zip(yn.chunks_mut(plane_out))
                        .zip(an.chunks_mut(plane_out))
                    {
                        pool_plane(cp, (g.ho, g.wo), self.pool, true, yp, ap);
                    }
                }
                Ok(())
            })?;
        let _ = self.argmax.set(at);
        Ok((y, self.out_shape()))
    }

    fn backward(&self, x: &[f32], w: &[f32], dy: &[f32], need: (bool, bool)) -> Result<Grads> {
        let Some(argmax) = self.argmax.get() else {
            candle_core::bail!("conv-relu-pool: backward before forward");
        };
        let dy = ConvOutGrad::Pooled {
            argmax,
            dy,
            out_len: self.out_len(),
        };
        backward(&self.g, x, w, &dy, need)
    }
}

/// The fused op with pooling window `pool` on geometry `g`, after checking
/// that the operands are f32 CPU tensors and that the window fits.
fn apply_pool(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    g: Geom,
    pool: (usize, usize),
) -> Result<Tensor> {
    let mut all = vec![x, w];
    all.extend(b);
    if !super::on_cpu_f32(&all) {
        candle_core::bail!("conv-relu-pool: runs on f32 CPU tensors only");
    }
    let op = ConvPoolOp {
        g,
        pool,
        argmax: OnceLock::new(),
    };
    let (ph, pw) = op.pooled();
    if op.pool.0 == 0 || op.pool.1 == 0 || ph == 0 || pw == 0 {
        candle_core::bail!(
            "conv-relu-pool: pool {:?} does not fit a {}x{} feature map",
            op.pool,
            op.g.ho,
            op.g.wo
        );
    }
    if op.g.ho * op.g.wo > NONE as usize {
        candle_core::bail!("conv-relu-pool: feature maps are too large");
    }
    apply(x, w, b, op)
}

/// `max_pool2d(relu(conv2d(x, w, b, stride, padding)), pool)` as one op:
/// x `[B, Cin, H, W]` → `[B, Cout, Ho/pool, Wo/pool]`. CPU and f32 only.
pub fn conv_relu_pool2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
    pool: usize,
) -> Result<Tensor> {
    apply_pool(x, w, b, geom2d(x, w, b, stride, padding)?, (pool, pool))
}

/// `max_pool1d(relu(conv1d(x, w, b, stride, padding)), pool)` as one op:
/// x `[B, Cin, L]` → `[B, Cout, Lo/pool]`. CPU and f32 only.
pub fn conv_relu_pool1d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
    pool: usize,
) -> Result<Tensor> {
    apply_pool(x, w, b, geom1d(x, w, b, stride, padding)?, (1, pool))
}

pub(super) fn check_bias(b: Option<&Tensor>, cout: usize) -> Result<()> {
    if let Some(b) = b {
        if b.dims() != [cout] {
            candle_core::bail!("conv: bias of shape {:?} for {cout} channels", b.dims());
        }
    }
    Ok(())
}

/// `F.conv2d(x, w, b, stride, padding)`: x `[B, Cin, H, W]`, w `[Cout, Cin, kh, kw]`.
/// CPU and f32 only.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let mut all = vec![x, w];
    all.extend(b);
    if !super::on_cpu_f32(&all) {
        candle_core::bail!("conv2d: the kernel runs on f32 CPU tensors only");
    }
    apply(
        x,
        w,
        b,
        ConvOp {
            g: geom2d(x, w, b, stride, padding)?,
        },
    )
}

fn geom2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Geom> {
    let (batch, cin, h, wd) = x.dims4()?;
    let (cout, wcin, kh, kw) = w.dims4()?;
    if cin != wcin {
        candle_core::bail!("conv2d: input has {cin} channels, the weight expects {wcin}");
    }
    check_bias(b, cout)?;
    Geom::square_2d(batch, cin, (h, wd), cout, (kh, kw), stride, padding)
}

impl Geom {
    /// The geometry of a 2-D convolution with the same stride and padding
    /// along both dims (plain and depthwise kernels alike).
    pub(super) fn square_2d(
        batch: usize,
        cin: usize,
        (h, w): (usize, usize),
        cout: usize,
        (kh, kw): (usize, usize),
        stride: usize,
        padding: usize,
    ) -> Result<Geom> {
        Ok(Geom {
            batch,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            sh: stride,
            sw: stride,
            ph: padding,
            pw: padding,
            ho: out_size(h, kh, stride, padding)?,
            wo: out_size(w, kw, stride, padding)?,
            one_d: false,
        })
    }
}

/// `F.conv1d(x, w, b, stride, padding)`: x `[B, Cin, L]`, w `[Cout, Cin, k]`.
/// CPU and f32 only.
pub fn conv1d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let mut all = vec![x, w];
    all.extend(b);
    if !super::on_cpu_f32(&all) {
        candle_core::bail!("conv1d: the kernel runs on f32 CPU tensors only");
    }
    apply(
        x,
        w,
        b,
        ConvOp {
            g: geom1d(x, w, b, stride, padding)?,
        },
    )
}

fn geom1d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Geom> {
    let (batch, cin, len) = x.dims3()?;
    let (cout, wcin, k) = w.dims3()?;
    if cin != wcin {
        candle_core::bail!("conv1d: input has {cin} channels, the weight expects {wcin}");
    }
    check_bias(b, cout)?;
    Ok(Geom {
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
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{max_diff, rand};
    use super::*;
    use candle_core::{Device, Var};

    /// A reference convolution built from matrix products only (whose
    /// gradients candle gets right): unfolding by a 0/1 selection matrix.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        (h, wd): (usize, usize),
        (kh, kw): (usize, usize),
        (sh, sw): (usize, usize),
        (ph, pw): (usize, usize),
    ) -> Tensor {
        let (bsz, c) = (x.dim(0).unwrap(), x.dim(1).unwrap());
        let cout = w.dim(0).unwrap();
        let ho = (h + 2 * ph - kh) / sh + 1;
        let wo = (wd + 2 * pw - kw) / sw + 1;
        let cols_n = kh * kw * ho * wo;
        let mut sel = vec![0f32; h * wd * cols_n];
        for ki in 0..kh {
            for kj in 0..kw {
                for oi in 0..ho {
                    for oj in 0..wo {
                        let ii = (oi * sh + ki) as isize - ph as isize;
                        let jj = (oj * sw + kj) as isize - pw as isize;
                        if ii >= 0 && jj >= 0 && (ii as usize) < h && (jj as usize) < wd {
                            let col = ((ki * kw + kj) * ho + oi) * wo + oj;
                            sel[(ii as usize * wd + jj as usize) * cols_n + col] = 1.0;
                        }
                    }
                }
            }
        }
        let sel = Tensor::from_vec(sel, (h * wd, cols_n), &Device::Cpu).unwrap();
        let cols = x
            .reshape((bsz, c, h * wd))
            .unwrap()
            .broadcast_matmul(&sel)
            .unwrap()
            .reshape((bsz, c * kh * kw, ho * wo))
            .unwrap();
        let y = w
            .reshape((cout, c * kh * kw))
            .unwrap()
            .broadcast_matmul(&cols)
            .unwrap()
            .broadcast_add(&b.reshape((1, cout, 1)).unwrap())
            .unwrap();
        let mut shape = x.dims().to_vec();
        shape[1] = cout;
        let r = shape.len();
        shape[r - 1] = wo;
        if r == 4 {
            shape[2] = ho;
        }
        y.reshape(shape).unwrap()
    }

    /// Forward values and all three gradients against the reference, and
    /// against candle's own convolution where its gradients are right (stride 1).
    fn check(two_d: bool, xs: &[usize], ws: &[usize], stride: usize, padding: usize) {
        let x = Var::from_tensor(&rand(xs, 1)).unwrap();
        let w = Var::from_tensor(&rand(ws, 2)).unwrap();
        let b = Var::from_tensor(&rand(&[ws[0]], 3)).unwrap();
        let (h, wd, kh, kw, s, p) = if two_d {
            (
                xs[2],
                xs[3],
                ws[2],
                ws[3],
                (stride, stride),
                (padding, padding),
            )
        } else {
            (1, xs[2], 1, ws[2], (1, stride), (0, padding))
        };
        let reference = reference(&x, &w, &b, (h, wd), (kh, kw), s, p);
        let ours = if two_d {
            conv2d(&x, &w, Some(&b), stride, padding).unwrap()
        } else {
            conv1d(&x, &w, Some(&b), stride, padding).unwrap()
        };
        assert!(max_diff(&ours, &reference) < 1e-4);
        if two_d && stride == 1 {
            let candle = x
                .conv2d(&w, padding, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, ws[0], 1, 1)).unwrap())
                .unwrap();
            assert!(max_diff(&ours, &candle) < 1e-4);
        }
        // A loss that weighs every output differently.
        let weights = rand(reference.dims(), 4);
        let gr = (&reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let go = (&ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w, &b] {
            let d = max_diff(go.get(v).unwrap(), gr.get(v).unwrap());
            assert!(d < 1e-3, "gradient differs by {d} for {:?}", v.dims());
        }
    }

    #[test]
    fn conv2d_matches_candle() {
        check(true, &[3, 3, 9, 8], &[5, 3, 3, 3], 1, 1);
        check(true, &[2, 2, 7, 9], &[4, 2, 3, 2], 2, 0);
        check(true, &[2, 1, 6, 6], &[2, 1, 5, 5], 1, 2);
        check(true, &[5, 4, 5, 5], &[3, 4, 1, 1], 1, 0);
        check(true, &[1, 2, 8, 8], &[3, 2, 3, 3], 3, 1);
    }

    #[test]
    fn samples_side_by_side_match_one_at_a_time() {
        // One thread: 5 samples of 120 columns go through the products as
        // 3 + 2, of 72 and 25 columns all 5 together; 576 columns go one
        // sample at a time.
        assert_eq!(group_size(5, 120), 3);
        assert_eq!(group_size(16, 16), 16);
        assert_eq!(group_size(16, 49), 8);
        assert_eq!(group_size(4, 576), 1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        pool.install(|| {
            check(true, &[5, 3, 10, 12], &[4, 3, 1, 1], 1, 0);
            check(true, &[5, 3, 10, 12], &[4, 3, 3, 3], 1, 1);
            check(true, &[5, 3, 8, 9], &[4, 3, 3, 3], 1, 1);
            check(true, &[5, 2, 9, 9], &[6, 2, 3, 3], 2, 1);
            check(true, &[2, 2, 24, 24], &[3, 2, 3, 3], 1, 1);
        });
        check(true, &[7, 4, 4, 4], &[6, 4, 3, 3], 1, 1);
    }

    #[test]
    fn conv1d_matches_candle() {
        check(false, &[3, 2, 17], &[4, 2, 3], 1, 1);
        check(false, &[2, 3, 12], &[2, 3, 5], 2, 2);
        check(false, &[2, 2, 11], &[3, 2, 4], 3, 0);
    }

    #[test]
    fn fused_conv_relu_pool_matches_the_separate_kernels() {
        for (xs, ws, stride, padding, pool) in [
            (vec![3, 2, 9, 8], vec![4, 2, 3, 3], 1, 1, 2),
            (vec![2, 3, 11, 10], vec![5, 3, 3, 2], 2, 0, 2),
            (vec![2, 1, 9, 9], vec![3, 1, 2, 2], 1, 1, 3),
        ] {
            let x = Var::from_tensor(&rand(&xs, 1)).unwrap();
            let w = Var::from_tensor(&rand(&ws, 2)).unwrap();
            let b = Var::from_tensor(&rand(&[ws[0]], 3)).unwrap();
            let sep = super::super::max_pool2d(
                &conv2d(&x, &w, Some(&b), stride, padding).unwrap(),
                pool,
                true,
            )
            .unwrap();
            let fused = conv_relu_pool2d(&x, &w, Some(&b), stride, padding, pool).unwrap();
            assert!(max_diff(&fused, &sep) < 1e-5);
            let wts = rand(sep.dims(), 4);
            let gs = (&sep * &wts)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gf = (&fused * &wts)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &w, &b] {
                assert!(max_diff(gf.get(v).unwrap(), gs.get(v).unwrap()) < 1e-4);
            }
        }
        let x = Var::from_tensor(&rand(&[2, 3, 13], 1)).unwrap();
        let w = Var::from_tensor(&rand(&[4, 3, 3], 2)).unwrap();
        let sep = super::super::max_pool1d(&conv1d(&x, &w, None, 1, 1).unwrap(), 2, true).unwrap();
        let fused = conv_relu_pool1d(&x, &w, None, 1, 1, 2).unwrap();
        assert!(max_diff(&fused, &sep) < 1e-5);
        let gs = sep.sum_all().unwrap().backward().unwrap();
        let gf = fused.sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            assert!(max_diff(gf.get(v).unwrap(), gs.get(v).unwrap()) < 1e-4);
        }
    }

    #[test]
    fn no_input_gradient_for_data() {
        let x = rand(&[2, 3, 6, 6], 1);
        let w = Var::from_tensor(&rand(&[4, 3, 3, 3], 2)).unwrap();
        let y = conv2d(&x, &w, None, 1, 1).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(&w).is_some());
    }
}
