//! Batch normalisation over dim 1 of `[B, C, ...]` (PyTorch's
//! `F.batch_norm`), optionally followed by ReLU or ReLU6, as one op:
//! - forward: per channel, the batch statistics (two passes over the
//!   channel's values, accumulated in f64 across samples) or the given
//!   running ones, then one pass per sample writing `act(x * scale + shift)`;
//! - backward: per channel, the sums of the (activation-masked) output
//!   gradient and of its product with the normalised input, then one pass per
//!   sample writing the input gradient. The activation's mask comes from the
//!   op's output (ReLU: positive; ReLU6: strictly between 0 and 6, as
//!   PyTorch's `hardtanh_backward`), so nothing but the input and the output
//!   is kept — candle's generic batch norm keeps five tensors the size of the
//!   input and makes about ten passes over them.
//!
//! The batch statistics (mean, biased variance) are handed back for the
//! running statistics, which the layer updates. CPU and f32 only.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::direct_grads;

/// The activation fused after the normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnAct {
    None,
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
}

impl BnAct {
    #[inline(always)]
    pub(super) fn apply(self, v: f32) -> f32 {
        match self {
            BnAct::None => v,
            // `v < 0` keeps NaN as NaN, as torch does.
            BnAct::Relu => {
                if v < 0.0 {
                    0.0
                } else {
                    v
                }
            }
            BnAct::Relu6 => v.clamp(0.0, 6.0),
        }
    }

    /// Whether the gradient passes where the output is `y`.
    #[inline(always)]
    pub(super) fn passes(self, y: f32) -> bool {
        match self {
            BnAct::None => true,
            BnAct::Relu => y > 0.0,
            BnAct::Relu6 => y > 0.0 && y < 6.0,
        }
    }
}

/// A [`BnAct`] as a type: the per-value loops are compiled once per
/// activation, with no branch on which one inside them, so that they
/// vectorise (a `match` on the enum per value kept them scalar).
pub(super) trait Act: Copy + Send + Sync {
    /// The activation of `v`.
    fn apply(v: f32) -> f32;
    /// The gradient `g` where it passes at output `y`, else 0.
    fn mask(y: f32, g: f32) -> f32;
}

/// [`BnAct::None`].
#[derive(Clone, Copy)]
pub(super) struct Ident;
/// [`BnAct::Relu`].
#[derive(Clone, Copy)]
pub(super) struct Relu;
/// [`BnAct::Relu6`].
#[derive(Clone, Copy)]
pub(super) struct Relu6;

impl Act for Ident {
    #[inline(always)]
    fn apply(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn mask(_: f32, g: f32) -> f32 {
        g
    }
}

impl Act for Relu {
    #[inline(always)]
    fn apply(v: f32) -> f32 {
        BnAct::Relu.apply(v)
    }
    #[inline(always)]
    fn mask(y: f32, g: f32) -> f32 {
        if y > 0.0 {
            g
        } else {
            0.0
        }
    }
}

impl Act for Relu6 {
    #[inline(always)]
    fn apply(v: f32) -> f32 {
        BnAct::Relu6.apply(v)
    }
    #[inline(always)]
    fn mask(y: f32, g: f32) -> f32 {
        if y > 0.0 && y < 6.0 {
            g
        } else {
            0.0
        }
    }
}

/// Calls `$f::<A>($args)` with the [`Act`] type of `$act`.
macro_rules! with_act {
    ($act:expr, $f:ident($($arg:expr),*)) => {
        match $act {
            BnAct::None => $f::<Ident>($($arg),*),
            BnAct::Relu => $f::<Relu>($($arg),*),
            BnAct::Relu6 => $f::<Relu6>($($arg),*),
        }
    };
}

/// Calls `$f::<$A>($args)` compiled for AVX2 (8 lanes) where the CPU has
/// it, else for the baseline (4 lanes): the per-value loops of a batch-norm
/// are short and many, and the build targets the baseline x86-64.
macro_rules! simd {
    ($f:ident::<$A:ident>($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if super::depthwise::avx2() {
                // SAFETY: the CPU has AVX2 (checked); the body is safe code.
                unsafe { avx2::$f::<$A>($($arg),*) }
            } else {
                $f::<$A>($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $f::<$A>($($arg),*)
        }
    }};
}

/// The per-sample and per-channel loops compiled for AVX2.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Act;

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn normalise_sample<A: Act>(
        spatial: usize,
        x: &[f32],
        scale: &[f32],
        shift: &[f32],
        y: &mut [f32],
    ) {
        super::normalise_sample::<A>(spatial, x, scale, shift, y)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sample_sums<A: Act>(
        spatial: usize,
        xs: &[f32],
        ys: &[f32],
        gs: &[f32],
        mean: &[f32],
        acc: &mut [(f64, f64)],
    ) {
        super::sample_sums::<A>(spatial, xs, ys, gs, mean, acc)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn grad_input_sample<A: Act>(
        spatial: usize,
        xs: &[f32],
        ys: &[f32],
        gs: &[f32],
        coef: &[(f32, f32, f32, f32)],
        ds: &mut [f32],
    ) {
        super::grad_input_sample::<A>(spatial, xs, ys, gs, coef, ds)
    }
}

/// Which statistics normalise the input.
#[derive(Debug, Clone)]
pub enum BnStats {
    /// The batch's own (training); the op records them.
    Batch,
    /// Given per-channel mean and variance (evaluation, frozen layers).
    Fixed { mean: Vec<f32>, var: Vec<f32> },
}

/// Per-channel mean and biased variance.
pub type Moments = (Vec<f32>, Vec<f32>);

/// The [`Moments`] the forward pass used, shared with the caller.
type BatchStats = Arc<OnceLock<Moments>>;

/// Per-channel (scale, shift) of a forward pass: `y = act(x * scale + shift)`.
pub(super) type Affine = (Vec<f32>, Vec<f32>);

/// The batch-norm op over one `[batch, channels, spatial]` tensor.
pub(super) struct BnOp {
    batch: usize,
    channels: usize,
    /// Values per channel and sample.
    spatial: usize,
    eps: f64,
    act: BnAct,
    stats: BnStats,
    /// The statistics used (batch ones in training), set by the forward pass.
    used: BatchStats,
}

const OP: &str = "batch-norm";

/// Sum of a slice in eight lanes (so that it vectorises).
#[inline(always)]
fn lanes_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let c = v.chunks_exact(8);
    let tail: f32 = c.remainder().iter().map(|&x| f(x)).sum();
    for ch in c {
        for l in 0..8 {
            acc[l] += f(ch[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl BnOp {
    /// The op over `[batch, channels, spatial]` values.
    pub(super) fn new(
        (batch, channels, spatial): (usize, usize, usize),
        eps: f64,
        act: BnAct,
        stats: BnStats,
    ) -> Self {
        Self {
            batch,
            channels,
            spatial,
            eps,
            act,
            stats,
            used: Arc::new(OnceLock::new()),
        }
    }

    /// Which statistics normalise the input.
    pub(super) fn stats(&self) -> &BnStats {
        &self.stats
    }

    /// The statistics the forward pass used, once it ran.
    pub(super) fn used(&self) -> Option<&Moments> {
        self.used.get()
    }

    /// `act(x * scale + shift)` and the per-channel (scale, shift), with the
    /// statistics of [`Self::stats`] (recorded in [`Self::used`]).
    pub(super) fn forward_slices(&self, x: &[f32], w: &[f32], b: &[f32]) -> (Vec<f32>, Affine) {
        let (mean, var) = match &self.stats {
            BnStats::Batch => self.batch_stats(x),
            BnStats::Fixed { mean, var } => (mean.clone(), var.clone()),
        };
        // y = x * scale + shift, per channel.
        let affine: Affine = (0..self.channels)
            .map(|c| {
                let invstd = (1.0 / (var[c] as f64 + self.eps).sqrt()) as f32;
                let scale = w[c] * invstd;
                (scale, b[c] - mean[c] * scale)
            })
            .unzip();
        let _ = self.used.set((mean, var));
        let y = self.apply(x, &affine);
        (y, affine)
    }

    /// `act(x * scale + shift)` with a forward pass's (scale, shift).
    pub(super) fn apply(&self, x: &[f32], (scale, shift): &Affine) -> Vec<f32> {
        let mut y = vec![0f32; self.len()];
        with_act!(self.act, normalise(self, x, scale, shift, &mut y));
        y
    }

    /// (input gradient when `need_dx`, weight gradient, bias gradient) from
    /// the input `xv`, weight `wv`, output `yv` (for the activation's mask)
    /// and output gradient `gv`.
    pub(super) fn backward_slices(
        &self,
        xv: &[f32],
        wv: &[f32],
        yv: &[f32],
        gv: &[f32],
        need_dx: bool,
    ) -> Result<super::conv::Grads> {
        let (mean, invstd) = self.norm()?;
        let act = self.act;
        let batch_stats = matches!(self.stats, BnStats::Batch);
        let n = (self.batch * self.spatial).max(1) as f64;
        // Per channel: sum of the masked gradient (= dbias) and of its
        // product with x̂ (= dweight).
        let sums = with_act!(act, grad_sums(self, xv, yv, gv, mean, &invstd));
        let dx = if need_dx {
            // Batch statistics: dx = w·invstd·(g - Σg/n - x̂·Σg·x̂/n);
            // fixed ones: dx = w·invstd·g.
            let coef: Vec<(f32, f32, f32, f32)> = (0..self.channels)
                .map(|c| {
                    let k = wv[c] * invstd[c];
                    if batch_stats {
                        let (sd, sdx) = sums[c];
                        let c1 = (sd as f64 / n) as f32;
                        let c2 = (sdx as f64 / n) as f32 * invstd[c];
                        (k, c1, c2, mean[c])
                    } else {
                        (k, 0.0, 0.0, mean[c])
                    }
                })
                .collect();
            let mut dx = vec![0f32; self.len()];
            with_act!(act, grad_input(self, xv, yv, gv, &coef, &mut dx));
            Some(dx)
        } else {
            None
        };
        let (db, dw): (Vec<f32>, Vec<f32>) = sums.into_iter().unzip();
        Ok((dx, dw, db))
    }

    fn len(&self) -> usize {
        self.batch * self.channels * self.spatial
    }

    /// Channel `c`'s values of sample `s`.
    fn seg<'a>(&self, v: &'a [f32], s: usize, c: usize) -> &'a [f32] {
        let at = (s * self.channels + c) * self.spatial;
        &v[at..at + self.spatial]
    }

    /// Per-channel (mean, biased variance) of `x`.
    fn batch_stats(&self, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let n = (self.batch * self.spatial).max(1) as f64;
        let per: Vec<(f32, f32)> = (0..self.channels)
            .into_par_iter()
            .map(|c| {
                let sum: f64 = (0..self.batch)
                    .map(|s| lanes_sum(self.seg(x, s, c), |v| v) as f64)
                    .sum();
                let mean = (sum / n) as f32;
                let sq: f64 = (0..self.batch)
                    .map(|s| {
                        lanes_sum(self.seg(x, s, c), |v| {
                            let d = v - mean;
                            d * d
                        }) as f64
                    })
                    .sum();
                (mean, (sq / n) as f32)
            })
            .collect();
        per.into_iter().unzip()
    }

    /// Per-channel `x̂ = (x - mean) * invstd`'s (mean, invstd).
    fn norm(&self) -> Result<(&[f32], Vec<f32>)> {
        let Some((mean, var)) = self.used.get() else {
            candle_core::bail!("{OP}: backward before forward");
        };
        let invstd = var
            .iter()
            .map(|&v| (1.0 / (v as f64 + self.eps).sqrt()) as f32)
            .collect();
        Ok((mean, invstd))
    }
}

impl CustomOp3 for BnOp {
    fn name(&self) -> &'static str {
        OP
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
        let x = super::f32_slice(OP, s1, l1, "input")?;
        let w = super::f32_slice(OP, s2, l2, "weight")?;
        let b = super::f32_slice(OP, s3, l3, "bias")?;
        let (y, _) = self.forward_slices(x, w, b);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dx, dw, db) = {
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (ys, yl) = res.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let xv = super::cpu_f32_slice(OP, &xs, xl, "input")?;
            let wv = super::cpu_f32_slice(OP, &ws, wl, "weight")?;
            let yv = super::cpu_f32_slice(OP, &ys, yl, "output")?;
            let gv = super::cpu_f32_slice(OP, &gs, gl, "gradient")?;
            self.backward_slices(xv, wv, yv, gv, x.track_op())?
        };
        let dev = x.device();
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), dev))
            .transpose()?;
        let c = self.channels;
        Ok((
            dx,
            direct_grads::param(w, || Tensor::from_vec(dw, c, dev))?,
            direct_grads::param(b, || Tensor::from_vec(db, c, dev))?,
        ))
    }
}

/// `y = A(x * scale + shift)` per channel, parallel over the samples.
fn normalise<A: Act>(op: &BnOp, x: &[f32], scale: &[f32], shift: &[f32], y: &mut [f32]) {
    let sample = op.channels * op.spatial;
    if sample == 0 {
        return;
    }
    y.par_chunks_mut(sample)
        .zip(x.par_chunks(sample))
        .for_each(|(ys, xs)| simd!(normalise_sample::<A>(op.spatial, xs, scale, shift, ys)));
}

/// [`normalise`] of one sample.
#[inline(always)]
fn normalise_sample<A: Act>(
    spatial: usize,
    x: &[f32],
    scale: &[f32],
    shift: &[f32],
    y: &mut [f32],
) {
    for (((yc, xc), &a), &o) in y
        .chunks_mut(spatial)
        .zip(x.chunks(spatial))
        .zip(scale)
        .zip(shift)
    {
        for (y, &v) in yc.iter_mut().zip(xc) {
            *y = A::apply(v * a + o);
        }
    }
}

/// Per channel, the sums of the masked output gradient (= dbias) and of its
/// product with x̂ (= dweight), in one pass, parallel over chunks of samples
/// (contiguous reads; per-chunk partial sums added at the end).
fn grad_sums<A: Act>(
    op: &BnOp,
    xv: &[f32],
    yv: &[f32],
    gv: &[f32],
    mean: &[f32],
    invstd: &[f32],
) -> Vec<(f32, f32)> {
    let sample = op.channels * op.spatial;
    let mut tot = vec![(0f64, 0f64); op.channels];
    if sample > 0 {
        let per = op
            .batch
            .div_ceil(rayon::current_num_threads().max(1))
            .max(1)
            * sample;
        let partials: Vec<Vec<(f64, f64)>> = xv
            .par_chunks(per)
            .zip(yv.par_chunks(per))
            .zip(gv.par_chunks(per))
            .map(|((xs, ys), gs)| {
                let mut acc = vec![(0f64, 0f64); op.channels];
                for ((x1, y1), g1) in xs
                    .chunks(sample)
                    .zip(ys.chunks(sample))
                    .zip(gs.chunks(sample))
                {
                    simd!(sample_sums::<A>(op.spatial, x1, y1, g1, mean, &mut acc));
                }
                acc
            })
            .collect();
        for p in partials {
            for (t, v) in tot.iter_mut().zip(p) {
                t.0 += v.0;
                t.1 += v.1;
            }
        }
    }
    tot.iter()
        .zip(invstd)
        .map(|(&(sd, sdx), &is)| (sd as f32, (sdx * is as f64) as f32))
        .collect()
}

/// One sample's contribution to [`grad_sums`] (before the scaling by
/// invstd), added to `acc` per channel.
#[inline(always)]
fn sample_sums<A: Act>(
    spatial: usize,
    xs: &[f32],
    ys: &[f32],
    gs: &[f32],
    mean: &[f32],
    acc: &mut [(f64, f64)],
) {
    for ((((xc, yc), gc), &m), acc) in xs
        .chunks(spatial)
        .zip(ys.chunks(spatial))
        .zip(gs.chunks(spatial))
        .zip(mean)
        .zip(acc.iter_mut())
    {
        let (mut a, mut bb) = ([0f32; 8], [0f32; 8]);
        let (xs, ys, gs) = (xc.chunks_exact(8), yc.chunks_exact(8), gc.chunks_exact(8));
        let (mut ta, mut tb) = (0f32, 0f32);
        for ((&x, &y), &g) in xs
            .remainder()
            .iter()
            .zip(ys.remainder())
            .zip(gs.remainder())
        {
            let g = A::mask(y, g);
            ta += g;
            tb += g * (x - m);
        }
        for ((x, y), g) in xs.zip(ys).zip(gs) {
            for l in 0..8 {
                let g = A::mask(y[l], g[l]);
                a[l] += g;
                bb[l] += g * (x[l] - m);
            }
        }
        acc.0 += (a.iter().sum::<f32>() + ta) as f64;
        acc.1 += (bb.iter().sum::<f32>() + tb) as f64;
    }
}

/// The input gradient `k·(mask(g) - c1 - (x - m)·c2)` per channel from
/// `coef` = (k, c1, c2, m), parallel over the samples.
fn grad_input<A: Act>(
    op: &BnOp,
    xv: &[f32],
    yv: &[f32],
    gv: &[f32],
    coef: &[(f32, f32, f32, f32)],
    dx: &mut [f32],
) {
    let sample = op.channels * op.spatial;
    if sample == 0 {
        return;
    }
    dx.par_chunks_mut(sample)
        .zip(xv.par_chunks(sample))
        .zip(yv.par_chunks(sample).zip(gv.par_chunks(sample)))
        .for_each(|((ds, xs), (ys, gs))| {
            simd!(grad_input_sample::<A>(op.spatial, xs, ys, gs, coef, ds))
        });
}

/// [`grad_input`] of one sample.
#[inline(always)]
fn grad_input_sample<A: Act>(
    spatial: usize,
    xs: &[f32],
    ys: &[f32],
    gs: &[f32],
    coef: &[(f32, f32, f32, f32)],
    ds: &mut [f32],
) {
    for ((dc, &(k, c1, c2, m)), ((xc, yc), gc)) in ds.chunks_mut(spatial).zip(coef).zip(
        xs.chunks(spatial)
            .zip(ys.chunks(spatial))
            .zip(gs.chunks(spatial)),
    ) {
        for (((d, &x), &y), &g) in dc.iter_mut().zip(xc).zip(yc).zip(gc) {
            *d = k * (A::mask(y, g) - c1 - (x - m) * c2);
        }
    }
}

/// `act(F.batch_norm(x, stats, weight, bias, eps))` over dim 1 of `x`
/// `[B, C, ...]`; weight and bias `[C]`. Returns the output and, for
/// [`BnStats::Batch`], the batch's (mean, biased variance) per channel. CPU
/// and f32 only.
pub fn batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: BnStats,
    eps: f64,
    act: BnAct,
) -> Result<(Tensor, Option<Moments>)> {
    if !super::on_cpu_f32(&[x, weight, bias]) {
        candle_core::bail!("{OP}: the kernel runs on f32 CPU tensors only");
    }
    let dims = x.dims();
    if dims.len() < 2 {
        candle_core::bail!("{OP}: input of shape {dims:?} has no channel dim");
    }
    let channels = dims[1];
    let fits = |v: &[f32]| v.len() == channels;
    let stats_fit = match &stats {
        BnStats::Batch => true,
        BnStats::Fixed { mean, var } => fits(mean) && fits(var),
    };
    if weight.dims() != [channels] || bias.dims() != [channels] || !stats_fit {
        candle_core::bail!(
            "{OP}: weight {:?}, bias {:?} or statistics do not fit {channels} channels",
            weight.dims(),
            bias.dims()
        );
    }
    let is_batch = matches!(stats, BnStats::Batch);
    let op = BnOp::new(
        (dims[0], channels, dims[2..].iter().product()),
        eps,
        act,
        stats,
    );
    let used = op.used.clone();
    let y = x
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    let out = if is_batch { used.get().cloned() } else { None };
    Ok((y, out))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{max_diff, rand};
    use super::*;
    use candle_core::{Device, Var};

    /// Batch norm with candle's ops (the generic path's formula).
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, stats: &BnStats, act: BnAct) -> Tensor {
        let r = x.rank();
        let mut bs = vec![1usize; r];
        bs[1] = x.dim(1).unwrap();
        let reduce: Vec<usize> = (0..r).filter(|&d| d != 1).collect();
        let (mean, var) = match stats {
            BnStats::Batch => {
                let mean = x.mean_keepdim(reduce.as_slice()).unwrap();
                let var = x
                    .broadcast_sub(&mean)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .mean_keepdim(reduce.as_slice())
                    .unwrap();
                (mean, var)
            }
            BnStats::Fixed { mean, var } => (
                Tensor::new(mean.as_slice(), &Device::Cpu)
                    .unwrap()
                    .reshape(bs.as_slice())
                    .unwrap(),
                Tensor::new(var.as_slice(), &Device::Cpu)
                    .unwrap()
                    .reshape(bs.as_slice())
                    .unwrap(),
            ),
        };
        let y = x
            .broadcast_sub(&mean)
            .unwrap()
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w.reshape(bs.as_slice()).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape(bs.as_slice()).unwrap())
            .unwrap();
        match act {
            BnAct::None => y,
            BnAct::Relu => y.relu().unwrap(),
            // The mask outside the graph: PyTorch's gradient exactly.
            BnAct::Relu6 => {
                let d = y.detach();
                let inside = d
                    .gt(0.0)
                    .unwrap()
                    .mul(&d.lt(6.0).unwrap())
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap();
                let top = (d
                    .ge(6.0)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    * 6.0)
                    .unwrap();
                y.mul(&inside).unwrap().add(&top).unwrap()
            }
        }
    }

    #[test]
    fn matches_candle_ops_in_values_gradients_and_statistics() {
        let fixed = BnStats::Fixed {
            mean: vec![0.1, -0.2, 0.3, 0.0, 0.5],
            var: vec![0.5, 1.5, 0.8, 2.0, 0.3],
        };
        for (shape, stats, act) in [
            (vec![4, 5, 7, 9], BnStats::Batch, BnAct::None),
            (vec![3, 5, 13], BnStats::Batch, BnAct::Relu),
            (vec![6, 5], BnStats::Batch, BnAct::Relu6),
            (vec![2, 5, 11, 3], BnStats::Batch, BnAct::Relu6),
            (vec![2, 5, 6, 5], fixed.clone(), BnAct::Relu),
            (vec![3, 5, 4], fixed.clone(), BnAct::None),
        ] {
            // Scaled so that ReLU6 clips at both ends.
            let x = Var::from_tensor(&(rand(&shape, 1) * 4.0).unwrap()).unwrap();
            let w = Var::from_tensor(&(rand(&[5], 2) * 3.0).unwrap()).unwrap();
            let b = Var::from_tensor(&(rand(&[5], 3) + 2.0).unwrap()).unwrap();
            let want = reference(&x, &w, &b, &stats, act);
            let (ours, got) = batch_norm(&x, &w, &b, stats.clone(), 1e-5, act).unwrap();
            let what = format!("{shape:?} {act:?} {}", matches!(stats, BnStats::Batch));
            assert!(max_diff(&ours, &want) < 1e-4, "{what}: values");
            if let BnStats::Batch = stats {
                let (mean, var) = got.unwrap();
                let r: Vec<usize> = (0..shape.len()).filter(|&d| d != 1).collect();
                let m = x.mean_keepdim(r.as_slice()).unwrap().flatten_all().unwrap();
                let v = x.broadcast_sub(&x.mean_keepdim(r.as_slice()).unwrap());
                let v = v
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .mean_keepdim(r.as_slice())
                    .unwrap();
                let mean = Tensor::new(mean, &Device::Cpu).unwrap();
                let var = Tensor::new(var, &Device::Cpu).unwrap();
                assert!(max_diff(&mean, &m) < 1e-5, "{what}: mean");
                assert!(
                    max_diff(&var, &v.flatten_all().unwrap()) < 1e-4,
                    "{what}: var"
                );
            } else {
                assert!(got.is_none());
            }
            let wts = rand(want.dims(), 4);
            let gw = (&want * &wts)
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
            for (v, name) in [(&x, "dx"), (&w, "dw"), (&b, "db")] {
                let d = max_diff(go.get(v).unwrap(), gw.get(v).unwrap());
                assert!(d < 1e-3, "{what}: {name} differs by {d}");
            }
        }
    }

    #[test]
    fn frozen_affine_and_data_get_no_gradient() {
        let x = rand(&[2, 3, 4, 4], 1);
        let w = rand(&[3], 2);
        let b = Var::from_tensor(&rand(&[3], 3)).unwrap();
        let (y, _) = batch_norm(&x, &w, &b, BnStats::Batch, 1e-5, BnAct::Relu).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none() && g.get(&w).is_none());
        assert!(g.get(&b).is_some());
    }
}
