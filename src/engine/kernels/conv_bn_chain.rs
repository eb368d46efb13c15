//! A chain of convolution → batch-norm → activation units, ending in an
//! optional residual join, as one op: ResNet's `BasicBlock` (two units, the
//! input or a 1x1 conv + batch-norm as the shortcut, ReLU after the sum) and
//! MobileNetV2's inverted residual (expand, depthwise, project; the input as
//! the shortcut where the shapes allow).
//!
//! Why one op rather than a layer per op: memory and hand-overs.
//! - Kept for the backward pass: each unit's convolution output (the
//!   batch-norm's input) and the block's output. The activations between the
//!   units (`relu(bn(conv))`, the next convolution's input) are recomputed from
//!   the kept convolution output and the forward pass's per-channel scale and
//!   shift in one cheap pass when the backward pass needs them, and so are
//!   never kept; nor are the batch-norm outputs before the join and the sum.
//!   A `BasicBlock` keeps 3 (4 with a downsample) tensors instead of 5 (7),
//!   an inverted residual 4 instead of 7, two of them the wide expanded ones.
//!   The kept values are released as the backward pass walks past them.
//! - candle's back-propagation hands each op's input gradient to the next op
//!   through a fresh zero tensor and an add (two single-threaded passes and
//!   two allocations per tensor); inside the chain the gradients go straight
//!   from one unit to the next.
//!
//! Parameter gradients go to the gradient store directly
//! ([`direct_grads`]): only the input and one trainable parameter (the
//! "anchor", which makes candle record the op) are the op's arguments, so the
//! backward pass must run through [`direct_grads::backward`] (the trainer's);
//! under a plain `loss.backward()` it fails with an error that says so rather
//! than losing gradients.
//!
//! Numerically the same computation as the separate kernels (convolution,
//! batch-norm with its activation, residual add), up to float summation
//! order. CPU and f32 only; the layers pick it (`model::layers::conv_bn_chain`).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::batchnorm::{Affine, BnAct, BnOp, BnStats, Moments};
use super::conv::{ConvKernel, ConvOp, Geom};
use super::depthwise::DepthwiseOp;
use super::direct_grads;
use super::pool::PoolOp;

const OP: &str = "conv-bn-chain";

/// One convolution → batch-norm → activation unit, as the layers hand it in.
#[derive(Debug, Clone)]
pub struct ChainUnit {
    /// The convolution's weight, `[Cout, Cin, kh, kw]`, or `[C, 1, kh, kw]`
    /// for a depthwise one (detached where frozen).
    pub weight: Tensor,
    /// One filter per channel (`groups` = channels).
    pub depthwise: bool,
    pub stride: usize,
    pub padding: usize,
    /// The batch-norm's weight and bias `[Cout]` (detached where frozen).
    pub bn_weight: Tensor,
    pub bn_bias: Tensor,
    /// Batch statistics (training) or the running ones (frozen layers).
    pub stats: BnStats,
    pub eps: f64,
    /// The activation after the batch-norm; for the last unit of a chain
    /// with a shortcut, after the residual sum.
    pub act: BnAct,
}

/// A unit's batch statistics, where it used the batch's, and the number of
/// values per channel they cover.
pub type UnitStats = Option<(Moments, usize)>;

/// What is added to the last unit's batch-norm output.
#[derive(Debug, Clone)]
pub enum ChainShortcut {
    /// Nothing (no residual).
    None,
    /// The chain's input.
    Identity,
    /// A convolution + batch-norm of the chain's input (its `act` must be
    /// [`BnAct::None`]).
    Unit(ChainUnit),
}

/// A max-pooling after the chain (ResNet's stem): window, stride, padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainPool {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

/// The convolution of a unit.
enum Conv {
    Dense(ConvOp),
    Depthwise(DepthwiseOp),
}

impl Conv {
    fn geom(&self) -> &Geom {
        match self {
            Conv::Dense(k) => k.geom(),
            Conv::Depthwise(k) => k.geom(),
        }
    }

    fn forward(&self, x: &[f32], w: &[f32]) -> Result<Vec<f32>> {
        Ok(match self {
            Conv::Dense(k) => k.forward(x, w, None)?.0,
            Conv::Depthwise(k) => k.forward(x, w, None)?.0,
        })
    }

    /// (input gradient where `need.0`, weight gradient where `need.1`).
    fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        need: (bool, bool),
    ) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
        let (dx, dw, _) = match self {
            Conv::Dense(k) => k.backward(x, w, dy, need)?,
            Conv::Depthwise(k) => k.backward(x, w, dy, need)?,
        };
        Ok((dx, dw))
    }
}

/// A unit inside the op.
struct Stage {
    conv: Conv,
    bn: BnOp,
    /// Weight, batch-norm weight, batch-norm bias.
    params: [Tensor; 3],
}

impl Stage {
    fn new(u: ChainUnit, input: (usize, usize, usize, usize), bn_act: BnAct) -> Result<Stage> {
        let (batch, cin, h, w) = input;
        let (cout, wcin, kh, kw) = u.weight.dims4()?;
        let expect_cin = if u.depthwise { 1 } else { cin };
        if wcin != expect_cin || (u.depthwise && cout != cin) {
            candle_core::bail!(
                "{OP}: weight {:?} does not fit an input of {cin} channels",
                u.weight.dims()
            );
        }
        if u.bn_weight.dims() != [cout] || u.bn_bias.dims() != [cout] {
            candle_core::bail!("{OP}: batch-norm parameters do not fit {cout} channels");
        }
        if let BnStats::Fixed { mean, var } = &u.stats {
            if mean.len() != cout || var.len() != cout {
                candle_core::bail!("{OP}: running statistics do not fit {cout} channels");
            }
        }
        let g = Geom::square_2d(batch, cin, (h, w), cout, (kh, kw), u.stride, u.padding)?;
        let bn = BnOp::new((batch, cout, g.n()), u.eps, bn_act, u.stats);
        let conv = if u.depthwise {
            Conv::Depthwise(DepthwiseOp { g })
        } else {
            Conv::Dense(ConvOp { g })
        };
        let params = [
            u.weight.contiguous()?,
            u.bn_weight.contiguous()?,
            u.bn_bias.contiguous()?,
        ];
        Ok(Stage { conv, bn, params })
    }

    fn out_dims(&self) -> (usize, usize, usize, usize) {
        let g = self.conv.geom();
        (g.batch, g.cout, g.ho, g.wo)
    }
}

/// What the forward pass keeps for the backward pass.
struct Saved {
    /// Each stage's convolution output.
    convs: Vec<Option<Vec<f32>>>,
    /// Each stage's (scale, shift).
    affines: Vec<Affine>,
    /// The shortcut unit's convolution output.
    shortcut: Option<Vec<f32>>,
    /// Per pooled value, the position of its window's maximum in its plane.
    argmax: Vec<u32>,
}

struct ChainOp {
    stages: Vec<Stage>,
    shortcut: Option<Stage>,
    identity: bool,
    /// The activation after the residual sum (the last unit's).
    join_act: BnAct,
    /// Index into [`Self::params`] of the op's second argument, if any.
    anchor: Option<usize>,
    /// A max-pooling of the output (chains without a shortcut).
    pool: Option<PoolOp>,
    saved: Mutex<Option<Saved>>,
}

impl ChainOp {
    fn joins(&self) -> bool {
        self.identity || self.shortcut.is_some()
    }

    /// Every parameter: the stages' in order, then the shortcut's.
    fn params(&self) -> impl Iterator<Item = &Tensor> {
        self.stages
            .iter()
            .chain(self.shortcut.iter())
            .flat_map(|s| s.params.iter())
    }

    fn forward(&self, x: &[f32], anchor: Option<&[f32]>) -> Result<Vec<f32>> {
        // candle holds the anchor's storage locked for this call and hands
        // its values in as `anchor`: it is not locked a second time.
        let guards: Vec<_> = self
            .params()
            .enumerate()
            .map(|(i, t)| {
                (self.anchor != Some(i) || anchor.is_none()).then(|| t.storage_and_layout())
            })
            .collect();
        let mut vals = Vec::with_capacity(guards.len());
        for g in &guards {
            match (g, anchor) {
                (Some((s, l)), _) => vals.push(cpu_slice(s, l)?),
                (None, Some(a)) => vals.push(a),
                (None, None) => candle_core::bail!("{OP}: the anchor's values are missing"),
            }
        }
        let last = self.stages.len() - 1;
        let mut convs = Vec::with_capacity(self.stages.len());
        let mut affines = Vec::with_capacity(self.stages.len());
        let mut cur: Option<Vec<f32>> = None;
        let mut out = Vec::new();
        for (i, st) in self.stages.iter().enumerate() {
            let input = cur.as_deref().unwrap_or(x);
            let c = st.conv.forward(input, vals[3 * i])?;
            let (a, affine) = st.bn.forward_slices(&c, vals[3 * i + 1], vals[3 * i + 2]);
            convs.push(Some(c));
            affines.push(affine);
            if i == last {
                out = a;
            } else {
                cur = Some(a);
            }
        }
        drop(cur);
        let mut short_conv = None;
        if self.joins() {
            let short: Vec<f32>;
            let s: &[f32] = match &self.shortcut {
                Some(st) => {
                    let k = 3 * self.stages.len();
                    let c = st.conv.forward(x, vals[k])?;
                    short = st.bn.forward_slices(&c, vals[k + 1], vals[k + 2]).0;
                    short_conv = Some(c);
                    &short
                }
                None => x,
            };
            if s.len() != out.len() {
                candle_core::bail!(
                    "{OP}: shortcut of {} values for an output of {}",
                    s.len(),
                    out.len()
                );
            }
            let act = self.join_act;
            out.par_iter_mut()
                .zip(s)
                .with_min_len(1 << 14)
                .for_each(|(o, &v)| *o = act.apply(*o + v));
        }
        let mut argmax = Vec::new();
        if let Some(p) = &self.pool {
            let (plane_in, plane_out) = (p_in(p), p.ho() * p.wo());
            let mut pooled = vec![0f32; p.planes * plane_out];
            argmax = vec![0u32; pooled.len()];
            if plane_out > 0 && plane_in > 0 {
                pooled
                    .par_chunks_mut(plane_out)
                    .zip(argmax.par_chunks_mut(plane_out))
                    .zip(out.par_chunks(plane_in))
                    .for_each(|((y, at), x)| p.plane(x, y, at));
            }
            out = pooled;
        }
        *self.lock()? = Some(Saved {
            convs,
            affines,
            shortcut: short_conv,
            argmax,
        });
        Ok(out)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Option<Saved>>> {
        self.saved
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{OP}: state poisoned")))
    }

    /// The input gradient (where `x` tracks) and the anchor's gradient; every
    /// other parameter's gradient is delivered to the store directly.
    fn backward(
        &self,
        x: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(mut saved) = self.lock()?.take() else {
            candle_core::bail!("{OP}: backward without a forward pass (or twice)");
        };
        let grad = grad.contiguous()?;
        let dev = x.device();
        let params: Vec<&Tensor> = self.params().collect();
        let mut anchor_grad = None;
        // Hands the gradient of parameter `k` over.
        let mut give = |k: usize, v: Vec<f32>| -> Result<()> {
            let Some(&p) = params.get(k) else {
                return Ok(());
            };
            if !p.track_op() {
                return Ok(());
            }
            let g = Tensor::from_vec(v, p.shape(), dev)?;
            if self.anchor == Some(k) {
                anchor_grad = direct_grads::deliver(p, g)?;
            } else if direct_grads::deliver(p, g)?.is_some() {
                candle_core::bail!(
                    "{OP}: parameter gradients are delivered directly; run the backward pass \
                     through kernels::direct_grads::backward"
                );
            }
            Ok(())
        };
        let tracks = |k: usize| params.get(k).is_some_and(|p| p.track_op());
        let n = self.stages.len();
        // Whether anything before stage i (its input side) needs a gradient.
        let upstream: Vec<bool> = (0..n)
            .map(|i| x.track_op() || (0..3 * i).any(tracks))
            .collect();
        let x_g = x.storage_and_layout();
        let xv = cpu_slice(&x_g.0, x_g.1)?;
        let y_g = res.storage_and_layout();
        let yv = cpu_slice(&y_g.0, y_g.1)?;
        let g_g = grad.storage_and_layout();
        let gv = cpu_slice(&g_g.0, g_g.1)?;
        let guards: Vec<_> = params.iter().map(|t| t.storage_and_layout()).collect();
        let vals: Vec<&[f32]> = guards
            .iter()
            .map(|(s, l)| cpu_slice(s, l))
            .collect::<Result<_>>()?;
        // The gradient at the last batch-norm's output (the sum's, masked).
        // With a pool: the gradient of the unpooled output (each window's
        // to its maximum) and that output, recomputed, for the mask.
        let (unpooled_g, unpooled_y) = match &self.pool {
            Some(p) => {
                let last = saved.convs[n - 1].as_deref().ok_or_else(|| {
                    candle_core::Error::Msg(format!("{OP}: stage {} not saved", n - 1))
                })?;
                let y = self.stages[n - 1].bn.apply(last, &saved.affines[n - 1]);
                (Some(p.unpool(&saved.argmax, gv)), Some(y))
            }
            None => (None, None),
        };
        let (gv, yv) = (
            unpooled_g.as_deref().unwrap_or(gv),
            unpooled_y.as_deref().unwrap_or(yv),
        );
        let joined: Option<Vec<f32>> =
            (self.joins() && self.join_act != BnAct::None).then(|| mask(self.join_act, yv, gv));
        let g_last: &[f32] = joined.as_deref().unwrap_or(gv);
        let mut dx: Option<Vec<f32>> = None;
        // The gradient of the current stage's output, and the values that
        // give its activation's mask.
        let mut g_out: Vec<f32> = Vec::new();
        let mut mask_src: Option<Vec<f32>> = None;
        for i in (0..n).rev() {
            let st = &self.stages[i];
            let c = saved.convs[i]
                .take()
                .ok_or_else(|| candle_core::Error::Msg(format!("{OP}: stage {i} not saved")))?;
            let need_dc = upstream[i] || tracks(3 * i);
            let (g_here, m_here): (&[f32], &[f32]) = if i == n - 1 {
                // With a join the batch-norm's activation is the identity
                // (the mask was applied to the sum); without, the output.
                (g_last, if self.joins() { &c } else { yv })
            } else {
                (&g_out, mask_src.as_deref().unwrap_or(&c))
            };
            let (dc, dgw, dgb) =
                st.bn
                    .backward_slices(&c, vals[3 * i + 1], m_here, g_here, need_dc)?;
            drop(c);
            give(3 * i + 1, dgw)?;
            give(3 * i + 2, dgb)?;
            let Some(dc) = dc else {
                break;
            };
            // The stage's input: the chain's, or the previous stage's
            // activation, recomputed.
            let prev: Option<Vec<f32>> = if i > 0 {
                let pc = saved.convs[i - 1].as_deref().ok_or_else(|| {
                    candle_core::Error::Msg(format!("{OP}: stage {} not saved", i - 1))
                })?;
                Some(self.stages[i - 1].bn.apply(pc, &saved.affines[i - 1]))
            } else {
                None
            };
            let input = prev.as_deref().unwrap_or(xv);
            let (din, dw) =
                st.conv
                    .backward(input, vals[3 * i], &dc, (upstream[i], tracks(3 * i)))?;
            if tracks(3 * i) {
                give(3 * i, dw)?;
            }
            match din {
                Some(d) if i > 0 => {
                    g_out = d;
                    mask_src = prev;
                }
                Some(d) => dx = Some(d),
                None => break,
            }
        }
        // The shortcut: its parameters' gradients, and its part of the input's.
        let k = 3 * n;
        let short: Option<Vec<f32>> = match &self.shortcut {
            Some(st) if x.track_op() || (k..k + 3).any(tracks) => {
                let c = saved
                    .shortcut
                    .take()
                    .ok_or_else(|| candle_core::Error::Msg(format!("{OP}: shortcut not saved")))?;
                let need_dc = x.track_op() || tracks(k);
                let (dc, dgw, dgb) = st
                    .bn
                    .backward_slices(&c, vals[k + 1], &c, g_last, need_dc)?;
                drop(c);
                give(k + 1, dgw)?;
                give(k + 2, dgb)?;
                match dc {
                    Some(dc) => {
                        let (dxs, dw) =
                            st.conv
                                .backward(xv, vals[k], &dc, (x.track_op(), tracks(k)))?;
                        if tracks(k) {
                            give(k, dw)?;
                        }
                        dxs
                    }
                    None => None,
                }
            }
            None if self.identity && x.track_op() => Some(g_last.to_vec()),
            _ => None,
        };
        dx = match (dx, short) {
            (Some(mut a), Some(b)) => {
                a.par_iter_mut()
                    .zip(&b)
                    .with_min_len(1 << 14)
                    .for_each(|(a, &b)| *a += b);
                Some(a)
            }
            (a, b) => a.or(b),
        };
        drop(guards);
        let dx = match dx {
            Some(v) if x.track_op() => Some(Tensor::from_vec(v, x.shape(), dev)?),
            _ => None,
        };
        Ok((dx, anchor_grad))
    }
}

/// Values per plane of a pool's input.
fn p_in(p: &PoolOp) -> usize {
    p.h * p.w
}

/// `g` where the activation passes at output `y`, else 0.
fn mask(act: BnAct, y: &[f32], g: &[f32]) -> Vec<f32> {
    y.par_iter()
        .zip(g)
        .with_min_len(1 << 14)
        .map(|(&y, &g)| if act.passes(y) { g } else { 0.0 })
        .collect()
}

fn cpu_slice<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    super::cpu_f32_slice(OP, s, l, "operand")
}

impl ChainOp {
    fn out_shape(&self) -> Shape {
        let (b, c, h, w) = self.stages[self.stages.len() - 1].out_dims();
        match &self.pool {
            Some(p) => Shape::from((b, c, p.ho(), p.wo())),
            None => Shape::from((b, c, h, w)),
        }
    }
}

/// The units applied to `x` `[B, C, H, W]` in order, the last one's
/// batch-norm output plus the shortcut, then the last unit's activation, then
/// the max-pooling where given (no shortcut then).
/// Returns the output and, per unit (the shortcut's last), the batch
/// statistics used where they were the batch's, with the number of values
/// per channel they cover (for the running statistics).
/// CPU and f32 only.
pub fn conv_bn_chain(
    x: &Tensor,
    units: Vec<ChainUnit>,
    shortcut: ChainShortcut,
    pool: Option<ChainPool>,
) -> Result<(Tensor, Vec<UnitStats>)> {
    let mut all = vec![x];
    for u in units.iter().chain(match &shortcut {
        ChainShortcut::Unit(u) => Some(u),
        _ => None,
    }) {
        all.extend([&u.weight, &u.bn_weight, &u.bn_bias]);
    }
    if !super::on_cpu_f32(&all) {
        candle_core::bail!("{OP}: the kernel runs on f32 CPU tensors only");
    }
    let Some(last_act) = units.last().map(|u| u.act) else {
        candle_core::bail!("{OP}: no units");
    };
    let joins = !matches!(shortcut, ChainShortcut::None);
    let mut dims = x.dims4()?;
    let count = units.len();
    let mut stages = Vec::with_capacity(count);
    for (i, u) in units.into_iter().enumerate() {
        let bn_act = if i + 1 == count && joins {
            BnAct::None
        } else {
            u.act
        };
        let st = Stage::new(u, dims, bn_act)?;
        dims = st.out_dims();
        stages.push(st);
    }
    let (short, identity) = match shortcut {
        ChainShortcut::None => (None, false),
        ChainShortcut::Identity => {
            if x.dims4()? != dims {
                candle_core::bail!(
                    "{OP}: identity shortcut of shape {:?} for an output of {dims:?}",
                    x.dims()
                );
            }
            (None, true)
        }
        ChainShortcut::Unit(u) => {
            if u.act != BnAct::None {
                candle_core::bail!("{OP}: the shortcut unit has no activation of its own");
            }
            let st = Stage::new(u, x.dims4()?, BnAct::None)?;
            if st.out_dims() != dims {
                candle_core::bail!("{OP}: the shortcut's output differs in shape from the chain's");
            }
            (Some(st), false)
        }
    };
    let pool = match pool {
        Some(_) if short.is_some() || identity => {
            candle_core::bail!("{OP}: a pooled chain has no shortcut")
        }
        Some(p) => {
            let (b, c, h, w) = dims;
            Some(PoolOp::strided_2d(
                b * c,
                (h, w),
                p.kernel,
                p.stride,
                p.padding,
            )?)
        }
        None => None,
    };
    let mut op = ChainOp {
        stages,
        shortcut: short,
        identity,
        join_act: last_act,
        anchor: None,
        pool,
        saved: Mutex::new(None),
    };
    let anchor = op.params().position(|p| p.track_op());
    op.anchor = anchor;
    let x = x.contiguous()?;
    let moments = |op: &ChainOp| -> Vec<UnitStats> {
        op.stages
            .iter()
            .chain(op.shortcut.iter())
            .map(|s| match s.bn.stats() {
                BnStats::Batch => {
                    let g = s.conv.geom();
                    s.bn.used().cloned().map(|m| (m, g.batch * g.n()))
                }
                BnStats::Fixed { .. } => None,
            })
            .collect()
    };
    let op = std::sync::Arc::new(op);
    let y = match op.anchor.and_then(|k| op.params().nth(k).cloned()) {
        Some(a) => x.apply_op2_arc(&a, std::sync::Arc::new(Box::new(Shared(op.clone())))),
        None => x.apply_op1_arc(std::sync::Arc::new(Box::new(Shared(op.clone())))),
    }?;
    Ok((y, moments(&op)))
}

/// The op shared between candle's graph and [`conv_bn_chain`] (which reads
/// the statistics after the forward pass).
struct Shared(std::sync::Arc<ChainOp>);

impl CustomOp1 for Shared {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::f32_slice(OP, s, l, "input")?;
        let y = self.0.forward(x, None)?;
        Ok((CpuStorage::F32(y), self.0.out_shape()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.0.backward(x, res, grad)?.0)
    }
}

impl CustomOp2 for Shared {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = super::f32_slice(OP, s1, l1, "input")?;
        let a = super::f32_slice(OP, s2, l2, "parameter")?;
        let y = self.0.forward(x, Some(a))?;
        Ok((CpuStorage::F32(y), self.0.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.0.backward(x, res, grad)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{max_diff, rand};
    use super::*;
    use crate::engine::kernels::{act, batchnorm, conv2d, depthwise_conv2d, pool};
    use candle_core::Var;

    /// A unit's shape: (cin, cout, kernel, stride, depthwise, act).
    type Shape_ = (usize, usize, usize, usize, bool, BnAct);

    struct Case {
        x: Vec<usize>,
        units: Vec<Shape_>,
        /// None: no join; Some(None): identity; Some(Some(stride)): 1x1 conv + bn.
        join: Option<Option<usize>>,
        pool: Option<ChainPool>,
        /// Per parameter (in the op's order), frozen.
        frozen: fn(usize) -> bool,
        x_grad: bool,
    }

    /// Parameters of every unit (then the shortcut's): (weight, bn weight, bn bias).
    fn params(case: &Case) -> Vec<Var> {
        let mut shapes: Vec<(usize, usize, usize, bool)> =
            case.units.iter().map(|u| (u.0, u.1, u.2, u.4)).collect();
        if let Some(Some(_)) = case.join {
            shapes.push((case.x[1], case.units[case.units.len() - 1].1, 1, false));
        }
        let mut out = Vec::new();
        for (i, (cin, cout, k, dw)) in shapes.into_iter().enumerate() {
            let w = rand(&[cout, if dw { 1 } else { cin }, k, k], 10 + i as u64);
            let g = rand(&[cout], 50 + i as u64).affine(0.5, 1.0).unwrap();
            out.push(Var::from_tensor(&w).unwrap());
            out.push(Var::from_tensor(&g).unwrap());
            out.push(Var::from_tensor(&rand(&[cout], 90 + i as u64)).unwrap());
        }
        out
    }

    fn live(case: &Case, ps: &[Var]) -> Vec<Tensor> {
        ps.iter()
            .enumerate()
            .map(|(i, p)| {
                if (case.frozen)(i) {
                    p.as_tensor().detach()
                } else {
                    p.as_tensor().clone()
                }
            })
            .collect()
    }

    fn stats(case: &Case, k: usize) -> BnStats {
        if (case.frozen)(3 * k + 1) {
            let c = if k < case.units.len() {
                case.units[k].1
            } else {
                case.units[case.units.len() - 1].1
            };
            BnStats::Fixed {
                mean: (0..c).map(|i| 0.1 * i as f32).collect(),
                var: (0..c).map(|i| 1.0 + 0.2 * i as f32).collect(),
            }
        } else {
            BnStats::Batch
        }
    }

    /// The chain with the separate kernels: output and batch statistics.
    fn reference(case: &Case, x: &Tensor, p: &[Tensor]) -> (Tensor, Vec<Option<Moments>>) {
        let n = case.units.len();
        let mut h = x.clone();
        let mut moments = Vec::new();
        for (i, &(_, _, k, s, dw, a)) in case.units.iter().enumerate() {
            let c = if dw {
                depthwise_conv2d(&h, &p[3 * i], None, s, k / 2).unwrap()
            } else {
                conv2d(&h, &p[3 * i], None, s, k / 2).unwrap()
            };
            let a = if i + 1 == n && case.join.is_some() {
                BnAct::None
            } else {
                a
            };
            let (y, m) =
                batchnorm::batch_norm(&c, &p[3 * i + 1], &p[3 * i + 2], stats(case, i), 1e-5, a)
                    .unwrap();
            moments.push(m);
            h = y;
        }
        if let Some(join) = case.join {
            let s = match join {
                None => x.clone(),
                Some(stride) => {
                    let c = conv2d(x, &p[3 * n], None, stride, 0).unwrap();
                    let (y, m) = batchnorm::batch_norm(
                        &c,
                        &p[3 * n + 1],
                        &p[3 * n + 2],
                        stats(case, n),
                        1e-5,
                        BnAct::None,
                    )
                    .unwrap();
                    moments.push(m);
                    y
                }
            };
            h = act::add_act(&h, &s, case.units[n - 1].5 == BnAct::Relu).unwrap();
        }
        if let Some(pl) = case.pool {
            h = pool::max_pool2d_strided(&h, pl.kernel, pl.stride, pl.padding, false).unwrap();
        }
        (h, moments)
    }

    fn chain(case: &Case, x: &Tensor, p: &[Tensor]) -> (Tensor, Vec<UnitStats>) {
        let n = case.units.len();
        let unit = |i: usize, (_, _, k, s, dw, a): Shape_| ChainUnit {
            weight: p[3 * i].clone(),
            depthwise: dw,
            stride: s,
            padding: k / 2,
            bn_weight: p[3 * i + 1].clone(),
            bn_bias: p[3 * i + 2].clone(),
            stats: stats(case, i),
            eps: 1e-5,
            act: a,
        };
        let units = case
            .units
            .iter()
            .enumerate()
            .map(|(i, &u)| unit(i, u))
            .collect();
        let shortcut = match case.join {
            None => ChainShortcut::None,
            Some(None) => ChainShortcut::Identity,
            Some(Some(stride)) => {
                let cout = case.units[n - 1].1;
                ChainShortcut::Unit(unit(n, (case.x[1], cout, 1, stride, false, BnAct::None)))
            }
        };
        conv_bn_chain(x, units, shortcut, case.pool).unwrap()
    }

    fn check(case: Case) {
        let xv = Var::from_tensor(&rand(&case.x, 1)).unwrap();
        let x = if case.x_grad {
            xv.as_tensor().clone()
        } else {
            xv.as_tensor().detach()
        };
        let ps = params(&case);
        let p = live(&case, &ps);
        let (want, want_m) = reference(&case, &x, &p);
        let (got, got_m) = chain(&case, &x, &p);
        assert!(max_diff(&want, &got) < 1e-5, "outputs differ");
        for (w, g) in want_m.iter().zip(&got_m) {
            match (w, g) {
                (Some((wm, wv)), Some(((gm, gv), _))) => {
                    assert_eq!((wm, wv), (gm, gv), "batch statistics differ")
                }
                (None, None) => {}
                _ => panic!("batch statistics where none were expected, or the reverse"),
            }
        }
        let wts = rand(want.dims(), 7);
        let loss = |y: &Tensor| (y * &wts).unwrap().sum_all().unwrap();
        let gw = direct_grads::backward(&loss(&want)).unwrap();
        let gg = direct_grads::backward(&loss(&got)).unwrap();
        let mut all: Vec<(&str, &Tensor)> = vec![("input", xv.as_tensor())];
        all.extend(ps.iter().map(|v| ("parameter", v.as_tensor())));
        for (i, (what, t)) in all.into_iter().enumerate() {
            match (gw.get(t), gg.get(t)) {
                (Some(a), Some(b)) => {
                    let d = max_diff(a, b);
                    assert!(d < 1e-4, "{what} {i}: gradients differ by {d}");
                }
                (None, None) => {}
                (a, b) => panic!(
                    "{what} {i}: gradient present {} in the reference, {} in the chain",
                    a.is_some(),
                    b.is_some()
                ),
            }
        }
    }

    #[test]
    fn basic_block_with_downsample_matches_the_separate_kernels() {
        check(Case {
            x: vec![3, 4, 9, 9],
            units: vec![
                (4, 6, 3, 2, false, BnAct::Relu),
                (6, 6, 3, 1, false, BnAct::Relu),
            ],
            join: Some(Some(2)),
            pool: None,
            frozen: |_| false,
            x_grad: true,
        });
    }

    #[test]
    fn inverted_residual_matches_the_separate_kernels() {
        check(Case {
            x: vec![2, 4, 7, 7],
            units: vec![
                (4, 12, 1, 1, false, BnAct::Relu6),
                (12, 12, 3, 1, true, BnAct::Relu6),
                (12, 4, 1, 1, false, BnAct::None),
            ],
            join: Some(None),
            pool: None,
            frozen: |_| false,
            x_grad: true,
        });
    }

    #[test]
    fn stem_with_max_pool_on_data_matches_the_separate_kernels() {
        check(Case {
            x: vec![2, 3, 16, 16],
            units: vec![(3, 8, 7, 2, false, BnAct::Relu)],
            join: None,
            pool: Some(ChainPool {
                kernel: 3,
                stride: 2,
                padding: 1,
            }),
            frozen: |_| false,
            x_grad: false,
        });
    }

    #[test]
    fn frozen_parts_get_no_gradient_and_keep_their_statistics() {
        // Stage 0 frozen whole (conv and batch-norm: running statistics),
        // stage 1's convolution frozen, its batch-norm and the shortcut's
        // trainable ("bias" fine-tuning); the input needs no gradient.
        check(Case {
            x: vec![2, 4, 8, 8],
            units: vec![
                (4, 6, 3, 2, false, BnAct::Relu),
                (6, 6, 3, 1, false, BnAct::Relu),
            ],
            join: Some(Some(2)),
            pool: None,
            frozen: |i| i <= 3,
            x_grad: false,
        });
        // Everything frozen but the input's gradient is needed.
        check(Case {
            x: vec![2, 4, 8, 8],
            units: vec![
                (4, 4, 3, 1, false, BnAct::Relu),
                (4, 4, 3, 1, false, BnAct::Relu),
            ],
            join: Some(None),
            pool: None,
            frozen: |_| true,
            x_grad: true,
        });
    }

    #[test]
    fn a_plain_backward_pass_fails_rather_than_losing_gradients() {
        let case = Case {
            x: vec![2, 4, 6, 6],
            units: vec![
                (4, 4, 3, 1, false, BnAct::Relu),
                (4, 4, 3, 1, false, BnAct::Relu),
            ],
            join: Some(None),
            pool: None,
            frozen: |_| false,
            x_grad: false,
        };
        let x = rand(&case.x, 1);
        let ps = params(&case);
        let p = live(&case, &ps);
        let (y, _) = chain(&case, &x, &p);
        let err = y.sum_all().unwrap().backward().unwrap_err().to_string();
        assert!(err.contains("direct_grads::backward"), "{err}");
    }
}
