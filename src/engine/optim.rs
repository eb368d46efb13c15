//! Optimisers that follow `torch.optim` step for step: [`Adam`], [`AdamW`] and
//! [`Sgd`], each mirroring torch's single-tensor (non-foreach, non-fused) path,
//! with their state open for checkpoint and resume.
//!
//! [`AnyOptimizer`] picks one of them from an [`OptimizerConfig`] and keeps the
//! parameters' state-dict names, so its state can be exported as named tensors
//! ([`AnyOptimizer::state_tensors`]) plus a small serde struct
//! ([`AnyOptimizer::state_meta`]) and loaded back ([`AnyOptimizer::load_state`]).
//!
//! As in torch, state is per parameter and created lazily: a parameter that has
//! no gradient in the [`GradStore`] is skipped entirely (no weight decay, its
//! step count does not advance, and it has no state until its first update).
//! Scalars are computed in `f64` and applied in the tensors' own dtype.
//!
//! On the CPU with f32/f64 parameters each update runs as a few fused in-place
//! kernels ([`crate::engine::kernels::elementwise`]): one pass per state tensor
//! and one over the parameter, no temporaries, bit-identical to the generic
//! path. Elsewhere (CUDA) updates are computed out of place with tensor ops and
//! written back with [`Var::set`]. Either way [`AnyOptimizer::state_tensors`]
//! returns copies, which later steps do not change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::kernels::elementwise::{self as fused, update};

/// Which optimisation algorithm to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// `torch.optim.Adam`: weight decay is an L2 term added to the gradient.
    Adam,
    /// `torch.optim.AdamW`: decoupled weight decay.
    AdamW,
    /// `torch.optim.SGD` with optional momentum, dampening and Nesterov.
    Sgd,
}

impl OptimizerKind {
    /// The name used in configs and state files: `adam`, `adamw` or `sgd`.
    pub fn as_str(self) -> &'static str {
        match self {
            OptimizerKind::Adam => "adam",
            OptimizerKind::AdamW => "adamw",
            OptimizerKind::Sgd => "sgd",
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Optimiser hyper-parameters, named and defaulted as in torch's Adam.
///
/// Fields an algorithm does not use are ignored (`betas`, `eps`, `amsgrad` by
/// SGD; `momentum`, `dampening`, `nesterov` by Adam/AdamW). Missing fields
/// deserialise to their defaults. Note that torch's AdamW defaults
/// `weight_decay` to 0.01; here the default is 0 for every kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimizerConfig {
    /// The algorithm.
    pub kind: OptimizerKind,
    /// Learning rate.
    pub lr: f64,
    /// Adam's (beta1, beta2).
    pub betas: (f64, f64),
    /// Adam's denominator epsilon.
    pub eps: f64,
    /// L2 penalty (Adam, SGD) or decoupled decay rate (AdamW).
    pub weight_decay: f64,
    /// Adam/AdamW: keep the running maximum of `exp_avg_sq`.
    pub amsgrad: bool,
    /// SGD momentum factor (0 disables momentum).
    pub momentum: f64,
    /// SGD dampening of the momentum update.
    pub dampening: f64,
    /// SGD: use Nesterov momentum (needs momentum > 0 and dampening 0).
    pub nesterov: bool,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Adam,
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
        }
    }
}

/// An optimiser setting that torch (or this crate) rejects: the field (as in
/// `[train.optimizer]`) and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid optimizer config: {field} {reason}")]
pub struct InvalidOptimizerConfig {
    pub field: &'static str,
    pub reason: String,
}

impl InvalidOptimizerConfig {
    fn new(field: &'static str, reason: String) -> Self {
        Self { field, reason }
    }
}

impl OptimizerConfig {
    /// Checks the settings `kind` uses, as torch's constructors do (and a
    /// learning rate of zero, which trains nothing); non-finite values are
    /// rejected too. The one definition of the optimiser's value rules: the
    /// config maps its errors onto `train.optimizer.*` keys.
    pub fn validate(&self) -> std::result::Result<(), InvalidOptimizerConfig> {
        self.check(Some(self.kind))
    }

    /// Checks every setting, whichever algorithm uses it (the config's check:
    /// a bad value is refused even where the chosen algorithm ignores it).
    pub fn validate_all(&self) -> std::result::Result<(), InvalidOptimizerConfig> {
        self.check(None)
    }

    fn validate_for(&self, kind: OptimizerKind) -> std::result::Result<(), InvalidOptimizerConfig> {
        self.check(Some(kind))
    }

    /// The rules for `kind`, or for every kind (`None`).
    fn check(
        &self,
        kind: Option<OptimizerKind>,
    ) -> std::result::Result<(), InvalidOptimizerConfig> {
        fn non_negative(
            name: &'static str,
            v: f64,
        ) -> std::result::Result<(), InvalidOptimizerConfig> {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(InvalidOptimizerConfig::new(
                    name,
                    format!("{v} is outside [0, inf)"),
                ))
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(InvalidOptimizerConfig::new(
                "lr",
                format!("{} is outside (0, inf)", self.lr),
            ));
        }
        let adam = kind.is_none_or(|k| matches!(k, OptimizerKind::Adam | OptimizerKind::AdamW));
        let sgd = kind.is_none_or(|k| k == OptimizerKind::Sgd);
        if adam {
            for (i, beta) in [self.betas.0, self.betas.1].into_iter().enumerate() {
                if !(0.0..1.0).contains(&beta) {
                    return Err(InvalidOptimizerConfig::new(
                        "betas",
                        format!("[{i}] = {beta} is outside [0, 1)"),
                    ));
                }
            }
            non_negative("eps", self.eps)?;
        }
        non_negative("weight_decay", self.weight_decay)?;
        if sgd {
            non_negative("momentum", self.momentum)?;
            if !(0.0..=1.0).contains(&self.dampening) {
                return Err(InvalidOptimizerConfig::new(
                    "dampening",
                    format!("{} is outside [0, 1]", self.dampening),
                ));
            }
            if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
                return Err(InvalidOptimizerConfig::new(
                    "nesterov",
                    "needs momentum > 0 and dampening = 0 (as torch.optim.SGD)".to_string(),
                ));
            }
        }
        Ok(())
    }
}

/// The non-tensor part of an optimiser's state, saved next to the tensors
/// from [`AnyOptimizer::state_tensors`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerStateMeta {
    /// The algorithm the state belongs to.
    pub kind: OptimizerKind,
    /// The learning rate in use when the state was taken.
    pub lr: f64,
    /// Per-parameter step counts (updates that had a gradient), by parameter name.
    pub steps: BTreeMap<String, u64>,
}

/// Why [`AnyOptimizer::load_state`] refused a saved state. Nothing is changed
/// when it fails.
#[derive(Debug, thiserror::Error)]
pub enum OptimStateError {
    /// The state was saved by another algorithm.
    #[error("optimizer state is for `{found}`, but this optimizer is `{expected}`")]
    KindMismatch {
        /// This optimiser's kind.
        expected: OptimizerKind,
        /// The saved state's kind.
        found: OptimizerKind,
    },
    /// The saved learning rate is negative or not finite.
    #[error("optimizer state has an invalid learning rate {0}")]
    InvalidLr(f64),
    /// The saved step counts name a parameter this optimiser does not have.
    #[error("optimizer state has a step count for unknown parameter `{0}`")]
    UnknownParam(String),
    /// The saved step counts lack a parameter this optimiser has.
    #[error("optimizer state has no step count for parameter `{0}`")]
    MissingStep(String),
    /// A state tensor the saved step count requires is absent.
    #[error("optimizer state tensor `{0}` is missing")]
    MissingTensor(String),
    /// A state tensor's shape differs from its parameter's.
    #[error("optimizer state tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The state tensor's name, e.g. `fc.weight.exp_avg`.
        name: String,
        /// The parameter's shape.
        expected: Vec<usize>,
        /// The saved tensor's shape.
        found: Vec<usize>,
    },
    /// Moving a state tensor to the parameter's device or dtype failed.
    #[error("optimizer state tensor `{name}`: {source}")]
    Tensor {
        /// The state tensor's name.
        name: String,
        /// The underlying candle error.
        #[source]
        source: candle_core::Error,
    },
}

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const MAX_EXP_AVG_SQ: &str = "max_exp_avg_sq";
const MOMENTUM_BUFFER: &str = "momentum_buffer";

/// Per-parameter state; which fields are used depends on the algorithm.
#[derive(Debug, Clone, Default)]
struct SlotState {
    step: u64,
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
    max_exp_avg_sq: Option<Tensor>,
    momentum_buffer: Option<Tensor>,
}

#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    state: SlotState,
}

/// What the three optimisers share: parameters, names, state and settings.
#[derive(Debug)]
struct Core {
    slots: Vec<Slot>,
    cfg: OptimizerConfig,
}

impl Core {
    fn new(
        named_vars: Vec<(String, Var)>,
        mut cfg: OptimizerConfig,
        kind: OptimizerKind,
    ) -> Result<Self> {
        cfg.validate_for(kind).map_err(candle_core::Error::msg)?;
        cfg.kind = kind;
        let mut seen = HashSet::new();
        let mut slots = Vec::with_capacity(named_vars.len());
        for (name, var) in named_vars {
            if !var.dtype().is_float() {
                continue;
            }
            if !seen.insert(name.clone()) {
                candle_core::bail!("optimizer: duplicate parameter name `{name}`");
            }
            slots.push(Slot {
                name,
                var,
                state: SlotState::default(),
            });
        }
        Ok(Self { slots, cfg })
    }

    fn from_vars(vars: Vec<Var>, cfg: OptimizerConfig, kind: OptimizerKind) -> Result<Self> {
        let named = vars
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect();
        Self::new(named, cfg, kind)
    }

    fn kind(&self) -> OptimizerKind {
        self.cfg.kind
    }

    /// The state tensor names `kind` keeps for a parameter that has stepped.
    fn state_keys(&self) -> &'static [&'static str] {
        match self.kind() {
            OptimizerKind::Adam | OptimizerKind::AdamW => {
                if self.cfg.amsgrad {
                    &[EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ]
                } else {
                    &[EXP_AVG, EXP_AVG_SQ]
                }
            }
            OptimizerKind::Sgd => {
                if self.cfg.momentum != 0.0 {
                    &[MOMENTUM_BUFFER]
                } else {
                    &[]
                }
            }
        }
    }

    fn adam_step(&mut self, grads: &GradStore, decoupled: bool) -> Result<()> {
        let OptimizerConfig {
            lr,
            betas: (beta1, beta2),
            eps,
            weight_decay: wd,
            amsgrad,
            ..
        } = self.cfg;
        for slot in self.slots.iter_mut() {
            let Some(grad) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            if fusable(&slot.var, grad) {
                adam_fused(slot, grad, &self.cfg, decoupled)?;
                continue;
            }
            // Detached views: no backprop graph is kept alive through the state.
            let grad = grad.detach();
            let param = slot.var.as_tensor().detach();
            let st = &slot.state;
            let step = st.step + 1;

            let grad = if wd != 0.0 && !decoupled {
                (&grad + param.affine(wd, 0.0)?)?
            } else {
                grad
            };
            let exp_avg = match &st.exp_avg {
                Some(m) => lerp(m, &grad, 1.0 - beta1)?,
                None => lerp(&param.zeros_like()?, &grad, 1.0 - beta1)?,
            };
            let exp_avg_sq_prev = match &st.exp_avg_sq {
                Some(v) => v.clone(),
                None => param.zeros_like()?,
            };
            let exp_avg_sq =
                (exp_avg_sq_prev.affine(beta2, 0.0)? + grad.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            let max_exp_avg_sq = if amsgrad {
                Some(match &st.max_exp_avg_sq {
                    Some(mx) => mx.maximum(&exp_avg_sq)?,
                    None => param.zeros_like()?.maximum(&exp_avg_sq)?,
                })
            } else {
                None
            };

            let t = step as f64;
            let bias_correction1 = 1.0 - beta1.powf(t);
            let bias_correction2 = 1.0 - beta2.powf(t);
            let step_size = lr / bias_correction1;
            let bias_correction2_sqrt = bias_correction2.sqrt();
            let denom = max_exp_avg_sq
                .as_ref()
                .unwrap_or(&exp_avg_sq)
                .sqrt()?
                .affine(1.0 / bias_correction2_sqrt, eps)?;
            // torch's addcdiv: param + (value * exp_avg) / denom.
            let update = (exp_avg.affine(-step_size, 0.0)? / &denom)?;
            let base = if decoupled && wd != 0.0 {
                param.affine(1.0 - lr * wd, 0.0)?
            } else {
                param
            };
            let new_param = (base + update)?;
            if new_param.elem_count() > 0 {
                slot.var.set(&new_param)?;
            }
            slot.state = SlotState {
                step,
                exp_avg: Some(exp_avg),
                exp_avg_sq: Some(exp_avg_sq),
                max_exp_avg_sq,
                momentum_buffer: None,
            };
        }
        Ok(())
    }

    fn sgd_step(&mut self, grads: &GradStore) -> Result<()> {
        let OptimizerConfig {
            lr,
            weight_decay: wd,
            momentum,
            dampening,
            nesterov,
            ..
        } = self.cfg;
        for slot in self.slots.iter_mut() {
            let Some(grad) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            if fusable(&slot.var, grad) {
                sgd_fused(slot, grad, &self.cfg)?;
                continue;
            }
            let grad = grad.detach();
            let param = slot.var.as_tensor().detach();
            let d_p = if wd != 0.0 {
                (&grad + param.affine(wd, 0.0)?)?
            } else {
                grad
            };
            let (d_p, momentum_buffer) = if momentum != 0.0 {
                let buf = match &slot.state.momentum_buffer {
                    None => d_p.clone(),
                    Some(buf) => {
                        let scaled = buf.affine(momentum, 0.0)?;
                        if dampening == 0.0 {
                            (scaled + &d_p)?
                        } else {
                            (scaled + d_p.affine(1.0 - dampening, 0.0)?)?
                        }
                    }
                };
                let d_p = if nesterov {
                    (&d_p + buf.affine(momentum, 0.0)?)?
                } else {
                    buf.clone()
                };
                (d_p, Some(buf))
            } else {
                (d_p, None)
            };
            let new_param = (param + d_p.affine(-lr, 0.0)?)?;
            if new_param.elem_count() > 0 {
                slot.var.set(&new_param)?;
            }
            slot.state.step += 1;
            slot.state.momentum_buffer = momentum_buffer;
        }
        Ok(())
    }

    fn param_names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.name.as_str()).collect()
    }

    fn element_count(&self) -> usize {
        self.slots.iter().map(|s| s.var.elem_count()).sum()
    }

    /// Copies of the state tensors (the fused path updates them in place).
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for slot in &self.slots {
            let st = &slot.state;
            for (key, t) in [
                (EXP_AVG, &st.exp_avg),
                (EXP_AVG_SQ, &st.exp_avg_sq),
                (MAX_EXP_AVG_SQ, &st.max_exp_avg_sq),
                (MOMENTUM_BUFFER, &st.momentum_buffer),
            ] {
                if let Some(t) = t {
                    out.push((format!("{}.{key}", slot.name), t.copy()?));
                }
            }
        }
        Ok(out)
    }

    fn state_meta(&self) -> OptimizerStateMeta {
        OptimizerStateMeta {
            kind: self.kind(),
            lr: self.cfg.lr,
            steps: self
                .slots
                .iter()
                .map(|s| (s.name.clone(), s.state.step))
                .collect(),
        }
    }

    fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &OptimizerStateMeta,
    ) -> std::result::Result<(), OptimStateError> {
        if meta.kind != self.kind() {
            return Err(OptimStateError::KindMismatch {
                expected: self.kind(),
                found: meta.kind,
            });
        }
        if !(meta.lr.is_finite() && meta.lr >= 0.0) {
            return Err(OptimStateError::InvalidLr(meta.lr));
        }
        if let Some(unknown) = meta
            .steps
            .keys()
            .find(|name| !self.slots.iter().any(|s| &s.name == *name))
        {
            return Err(OptimStateError::UnknownParam(unknown.clone()));
        }
        let keys = self.state_keys();
        // Validate and convert everything first, then commit.
        let mut loaded = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let step = *meta
                .steps
                .get(&slot.name)
                .ok_or_else(|| OptimStateError::MissingStep(slot.name.clone()))?;
            let mut st = SlotState {
                step,
                ..SlotState::default()
            };
            if step > 0 {
                for &key in keys {
                    let name = format!("{}.{key}", slot.name);
                    let t = tensors
                        .get(&name)
                        .ok_or_else(|| OptimStateError::MissingTensor(name.clone()))?;
                    if t.dims() != slot.var.dims() {
                        return Err(OptimStateError::ShapeMismatch {
                            name,
                            expected: slot.var.dims().to_vec(),
                            found: t.dims().to_vec(),
                        });
                    }
                    // A private copy: the fused path updates state in place.
                    let t = t
                        .detach()
                        .to_device(slot.var.device())
                        .and_then(|t| t.to_dtype(slot.var.dtype()))
                        .and_then(|t| t.copy())
                        .map_err(|source| OptimStateError::Tensor {
                            name: name.clone(),
                            source,
                        })?;
                    let field = match key {
                        EXP_AVG => &mut st.exp_avg,
                        EXP_AVG_SQ => &mut st.exp_avg_sq,
                        MAX_EXP_AVG_SQ => &mut st.max_exp_avg_sq,
                        _ => &mut st.momentum_buffer,
                    };
                    *field = Some(t);
                }
            }
            loaded.push(st);
        }
        for (slot, st) in self.slots.iter_mut().zip(loaded) {
            slot.state = st;
        }
        self.cfg.lr = meta.lr;
        Ok(())
    }
}

/// Whether a parameter's update can run as fused in-place kernels: a non-empty,
/// contiguous f32/f64 CPU parameter and a gradient of its shape and dtype.
fn fusable(var: &Var, grad: &Tensor) -> bool {
    let p = var.as_tensor();
    p.elem_count() > 0
        && fused::supports(p)
        && grad.device().is_cpu()
        && grad.dtype() == p.dtype()
        && grad.shape() == p.shape()
}

/// A state tensor that this optimiser owns and may update in place: the
/// existing one, or zeros on the first step.
fn owned_state(slot_state: &mut Option<Tensor>, param: &Tensor) -> Result<Tensor> {
    match slot_state {
        Some(t) if t.is_contiguous() && t.shape() == param.shape() => Ok(t.clone()),
        _ => {
            let t = param.zeros_like()?;
            *slot_state = Some(t.clone());
            Ok(t)
        }
    }
}

/// One Adam/AdamW step of one parameter with the fused in-place kernels; the
/// same arithmetic as [`Core::adam_step`]'s generic path.
fn adam_fused(
    slot: &mut Slot,
    grad: &Tensor,
    cfg: &OptimizerConfig,
    decoupled: bool,
) -> Result<()> {
    let OptimizerConfig {
        lr,
        betas: (beta1, beta2),
        eps,
        weight_decay: wd,
        amsgrad,
        ..
    } = *cfg;
    let grad = grad.contiguous()?;
    let param = slot.var.as_tensor();
    let l2 = if decoupled { 0.0 } else { wd };
    let st = &mut slot.state;
    let step = st.step + 1;
    let exp_avg = owned_state(&mut st.exp_avg, param)?;
    let exp_avg_sq = owned_state(&mut st.exp_avg_sq, param)?;
    update(
        &exp_avg,
        &grad,
        param,
        fused::AdamExpAvg {
            weight: 1.0 - beta1,
            l2,
        },
    )?;
    update(&exp_avg_sq, &grad, param, fused::AdamExpAvgSq { beta2, l2 })?;
    let second = if amsgrad {
        let mx = owned_state(&mut st.max_exp_avg_sq, param)?;
        update(&mx, &exp_avg_sq, &exp_avg_sq, fused::Maximum)?;
        mx
    } else {
        st.max_exp_avg_sq = None;
        exp_avg_sq
    };
    let t = step as f64;
    let bias_correction1 = 1.0 - beta1.powf(t);
    let bias_correction2 = 1.0 - beta2.powf(t);
    update(
        param,
        &exp_avg,
        &second,
        fused::AdamParam {
            step_size: lr / bias_correction1,
            inv_bc2_sqrt: 1.0 / bias_correction2.sqrt(),
            eps,
            decay: (decoupled && wd != 0.0).then_some(1.0 - lr * wd),
        },
    )?;
    st.step = step;
    st.momentum_buffer = None;
    Ok(())
}

/// One SGD step of one parameter with the fused in-place kernels; the same
/// arithmetic as [`Core::sgd_step`]'s generic path.
fn sgd_fused(slot: &mut Slot, grad: &Tensor, cfg: &OptimizerConfig) -> Result<()> {
    let grad = grad.contiguous()?;
    let param = slot.var.as_tensor();
    let st = &mut slot.state;
    let sgd = fused::SgdParam {
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        momentum: cfg.momentum,
        nesterov: cfg.nesterov,
    };
    if cfg.momentum != 0.0 {
        let first = st.momentum_buffer.is_none();
        let buf = owned_state(&mut st.momentum_buffer, param)?;
        update(
            &buf,
            &grad,
            param,
            fused::SgdMomentum {
                momentum: cfg.momentum,
                dampening: cfg.dampening,
                weight_decay: cfg.weight_decay,
                first,
            },
        )?;
        update(param, &grad, &buf, sgd)?;
    } else {
        st.momentum_buffer = None;
        update(param, &grad, &grad, sgd)?;
    }
    st.step += 1;
    Ok(())
}

/// torch's `lerp`: `start + weight * (end - start)`, computed the way torch
/// does for each weight range.
fn lerp(start: &Tensor, end: &Tensor, weight: f64) -> Result<Tensor> {
    let diff = (end - start)?;
    if weight.abs() < 0.5 {
        start + diff.affine(weight, 0.0)?
    } else {
        end - diff.affine(1.0 - weight, 0.0)?
    }
}

/// `torch.optim.Adam` (L2 weight decay added to the gradient, optional AMSGrad).
#[derive(Debug)]
pub struct Adam {
    core: Core,
}

/// `torch.optim.AdamW` (decoupled weight decay, optional AMSGrad).
#[derive(Debug)]
pub struct AdamW {
    core: Core,
}

/// `torch.optim.SGD` (weight decay, momentum, dampening, Nesterov).
#[derive(Debug)]
pub struct Sgd {
    core: Core,
}

macro_rules! common_methods {
    ($ty:ident, $kind:expr) => {
        impl $ty {
            /// Creates the optimiser over named parameters (state-dict names,
            /// which must be unique); non-float variables are skipped and
            /// `config.kind` is ignored.
            pub fn new_named(
                named_vars: Vec<(String, Var)>,
                config: OptimizerConfig,
            ) -> Result<Self> {
                Ok(Self {
                    core: Core::new(named_vars, config, $kind)?,
                })
            }

            /// The settings in use (`lr` follows `set_learning_rate`).
            pub fn config(&self) -> &OptimizerConfig {
                &self.core.cfg
            }

            /// The number of parameter tensors this optimiser updates.
            pub fn param_count(&self) -> usize {
                self.core.slots.len()
            }

            /// The total number of scalar elements across the parameters.
            pub fn element_count(&self) -> usize {
                self.core.element_count()
            }

            /// The parameters' names, in order.
            pub fn param_names(&self) -> Vec<&str> {
                self.core.param_names()
            }

            /// The state tensors, named `{param}.{exp_avg|exp_avg_sq|max_exp_avg_sq|momentum_buffer}`.
            pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
                self.core.state_tensors()
            }

            /// Step counts and learning rate, to save with [`Self::state_tensors`].
            pub fn state_meta(&self) -> OptimizerStateMeta {
                self.core.state_meta()
            }

            /// Restores state saved by [`Self::state_tensors`] / [`Self::state_meta`].
            pub fn load_state(
                &mut self,
                tensors: &HashMap<String, Tensor>,
                meta: &OptimizerStateMeta,
            ) -> std::result::Result<(), OptimStateError> {
                self.core.load_state(tensors, meta)
            }
        }
    };
}

common_methods!(Adam, OptimizerKind::Adam);
common_methods!(AdamW, OptimizerKind::AdamW);
common_methods!(Sgd, OptimizerKind::Sgd);

impl candle_nn::Optimizer for Adam {
    type Config = OptimizerConfig;

    /// Parameters are named by their index (`"0"`, `"1"`, ...).
    fn new(vars: Vec<Var>, config: OptimizerConfig) -> Result<Self> {
        Ok(Self {
            core: Core::from_vars(vars, config, OptimizerKind::Adam)?,
        })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.core.adam_step(grads, false)
    }

    fn learning_rate(&self) -> f64 {
        self.core.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.core.cfg.lr = lr;
    }
}

impl candle_nn::Optimizer for AdamW {
    type Config = OptimizerConfig;

    /// Parameters are named by their index (`"0"`, `"1"`, ...).
    fn new(vars: Vec<Var>, config: OptimizerConfig) -> Result<Self> {
        Ok(Self {
            core: Core::from_vars(vars, config, OptimizerKind::AdamW)?,
        })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.core.adam_step(grads, true)
    }

    fn learning_rate(&self) -> f64 {
        self.core.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.core.cfg.lr = lr;
    }
}

impl candle_nn::Optimizer for Sgd {
    type Config = OptimizerConfig;

    /// Parameters are named by their index (`"0"`, `"1"`, ...).
    fn new(vars: Vec<Var>, config: OptimizerConfig) -> Result<Self> {
        Ok(Self {
            core: Core::from_vars(vars, config, OptimizerKind::Sgd)?,
        })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.core.sgd_step(grads)
    }

    fn learning_rate(&self) -> f64 {
        self.core.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.core.cfg.lr = lr;
    }
}

/// One of the three optimisers, chosen by [`OptimizerConfig::kind`].
#[derive(Debug)]
pub enum AnyOptimizer {
    /// See [`Adam`].
    Adam(Adam),
    /// See [`AdamW`].
    AdamW(AdamW),
    /// See [`Sgd`].
    Sgd(Sgd),
}

impl AnyOptimizer {
    /// Creates the optimiser `cfg.kind` names over the named parameters
    /// (state-dict names, unique); non-float variables are skipped. Fails on an
    /// invalid config or a duplicate name.
    pub fn new(named_vars: Vec<(String, Var)>, cfg: &OptimizerConfig) -> Result<Self> {
        let cfg = cfg.clone();
        Ok(match cfg.kind {
            OptimizerKind::Adam => AnyOptimizer::Adam(Adam::new_named(named_vars, cfg)?),
            OptimizerKind::AdamW => AnyOptimizer::AdamW(AdamW::new_named(named_vars, cfg)?),
            OptimizerKind::Sgd => AnyOptimizer::Sgd(Sgd::new_named(named_vars, cfg)?),
        })
    }

    fn core(&self) -> &Core {
        match self {
            AnyOptimizer::Adam(o) => &o.core,
            AnyOptimizer::AdamW(o) => &o.core,
            AnyOptimizer::Sgd(o) => &o.core,
        }
    }

    fn core_mut(&mut self) -> &mut Core {
        match self {
            AnyOptimizer::Adam(o) => &mut o.core,
            AnyOptimizer::AdamW(o) => &mut o.core,
            AnyOptimizer::Sgd(o) => &mut o.core,
        }
    }

    /// The algorithm.
    pub fn kind(&self) -> OptimizerKind {
        self.core().kind()
    }

    /// The settings in use (`lr` follows [`Self::set_learning_rate`]).
    pub fn config(&self) -> &OptimizerConfig {
        &self.core().cfg
    }

    /// Applies one update to every parameter that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        use candle_nn::Optimizer;
        match self {
            AnyOptimizer::Adam(o) => o.step(grads),
            AnyOptimizer::AdamW(o) => o.step(grads),
            AnyOptimizer::Sgd(o) => o.step(grads),
        }
    }

    /// Back-propagates `loss` and applies one update.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = crate::engine::kernels::direct_grads::backward(loss)?;
        self.step(&grads)
    }

    /// The current learning rate.
    pub fn learning_rate(&self) -> f64 {
        self.core().cfg.lr
    }

    /// Sets the learning rate used from the next step on.
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.core_mut().cfg.lr = lr;
    }

    /// The number of parameter tensors this optimiser updates.
    pub fn param_count(&self) -> usize {
        self.core().slots.len()
    }

    /// The total number of scalar elements across the parameters.
    pub fn element_count(&self) -> usize {
        self.core().element_count()
    }

    /// The parameters' names, in order.
    pub fn param_names(&self) -> Vec<&str> {
        self.core().param_names()
    }

    /// The state tensors that exist, named
    /// `{param}.{exp_avg|exp_avg_sq|max_exp_avg_sq|momentum_buffer}`.
    /// A parameter that has never stepped has none.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.core().state_tensors()
    }

    /// Step counts per parameter and the learning rate, to save next to
    /// [`Self::state_tensors`].
    pub fn state_meta(&self) -> OptimizerStateMeta {
        self.core().state_meta()
    }

    /// Restores a state saved with [`Self::state_tensors`] and
    /// [`Self::state_meta`], including the learning rate. `meta` must name
    /// exactly this optimiser's parameters; each parameter with a step count
    /// above zero needs every state tensor the current settings use (a missing
    /// `max_exp_avg_sq` when AMSGrad was switched on is an error). Extra
    /// tensors in `tensors` are ignored. On error nothing is changed.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &OptimizerStateMeta,
    ) -> std::result::Result<(), OptimStateError> {
        self.core_mut().load_state(tensors, meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::Optimizer;

    fn cfg(kind: OptimizerKind) -> OptimizerConfig {
        OptimizerConfig {
            kind,
            ..OptimizerConfig::default()
        }
    }

    fn var(values: &[f64]) -> Var {
        Var::from_slice(values, values.len(), &Device::Cpu).unwrap()
    }

    fn values(v: &Var) -> Vec<f64> {
        v.as_tensor().to_vec1::<f64>().unwrap()
    }

    fn grads_for(pairs: &[(&Var, &[f64])]) -> GradStore {
        let mut store = GradStore::default();
        for (v, g) in pairs {
            let t = Tensor::from_slice(g, g.len(), &Device::Cpu).unwrap();
            store.insert(v.as_tensor(), t);
        }
        store
    }

    /// Gradients of a fixed, non-trivial loss: sum(c * (w - t)^2) + sum(sin(3 w)).
    fn loss_grads(vars: &[&Var]) -> GradStore {
        let mut total: Option<Tensor> = None;
        for (i, v) in vars.iter().enumerate() {
            let w = v.as_tensor();
            let target = (w.ones_like().unwrap() * (0.3 * i as f64 - 0.2)).unwrap();
            let sq = (w - target).unwrap().sqr().unwrap();
            let term = ((sq * 1.7).unwrap() + (w * 3.0).unwrap().sin().unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            total = Some(match total {
                None => term,
                Some(t) => (t + term).unwrap(),
            });
        }
        total.unwrap().backward().unwrap()
    }

    /// A scalar transcription of torch's update rules, for one element.
    #[derive(Default, Clone)]
    struct RefState {
        step: u64,
        m: f64,
        v: f64,
        vmax: f64,
        buf: Option<f64>,
    }

    fn reference_step(c: &OptimizerConfig, p: f64, g: f64, s: &mut RefState) -> f64 {
        s.step += 1;
        match c.kind {
            OptimizerKind::Adam | OptimizerKind::AdamW => {
                let (b1, b2) = c.betas;
                let mut p = p;
                let mut g = g;
                if c.kind == OptimizerKind::AdamW {
                    p *= 1.0 - c.lr * c.weight_decay;
                } else {
                    g += c.weight_decay * p;
                }
                s.m = b1 * s.m + (1.0 - b1) * g;
                s.v = b2 * s.v + (1.0 - b2) * g * g;
                s.vmax = s.vmax.max(s.v);
                let t = s.step as f64;
                let bc1 = 1.0 - b1.powf(t);
                let bc2 = 1.0 - b2.powf(t);
                let v = if c.amsgrad { s.vmax } else { s.v };
                let denom = v.sqrt() / bc2.sqrt() + c.eps;
                p - (c.lr / bc1) * s.m / denom
            }
            OptimizerKind::Sgd => {
                let mut d = g + c.weight_decay * p;
                if c.momentum != 0.0 {
                    let buf = match s.buf {
                        None => d,
                        Some(b) => c.momentum * b + (1.0 - c.dampening) * d,
                    };
                    s.buf = Some(buf);
                    d = if c.nesterov {
                        d + c.momentum * buf
                    } else {
                        buf
                    };
                }
                p - c.lr * d
            }
        }
    }

    fn reference_configs() -> Vec<OptimizerConfig> {
        vec![
            cfg(OptimizerKind::Adam),
            OptimizerConfig {
                lr: 0.05,
                betas: (0.3, 0.5),
                weight_decay: 0.1,
                amsgrad: true,
                eps: 1e-3,
                ..cfg(OptimizerKind::Adam)
            },
            OptimizerConfig {
                lr: 0.02,
                weight_decay: 0.2,
                ..cfg(OptimizerKind::AdamW)
            },
            OptimizerConfig {
                lr: 0.02,
                weight_decay: 0.2,
                amsgrad: true,
                betas: (0.5, 0.6),
                ..cfg(OptimizerKind::AdamW)
            },
            OptimizerConfig {
                lr: 0.1,
                ..cfg(OptimizerKind::Sgd)
            },
            OptimizerConfig {
                lr: 0.1,
                momentum: 0.9,
                dampening: 0.3,
                weight_decay: 0.05,
                ..cfg(OptimizerKind::Sgd)
            },
            OptimizerConfig {
                lr: 0.1,
                momentum: 0.8,
                nesterov: true,
                ..cfg(OptimizerKind::Sgd)
            },
        ]
    }

    #[test]
    fn matches_scalar_reference_in_f64() {
        let grads_seq = [
            [0.5, -1.0, 2.0],
            [0.4, 0.1, -3.0],
            [-0.2, 0.01, 0.5],
            [0.0, -0.5, 0.2],
            [1e-3, 0.3, -0.1],
        ];
        let init = [0.5, -1.5, 2.0];
        for c in reference_configs() {
            let w = var(&init);
            let mut opt = AnyOptimizer::new(vec![("w".into(), w.clone())], &c).unwrap();
            let mut expected = init.to_vec();
            let mut states = vec![RefState::default(); init.len()];
            for g in grads_seq {
                opt.step(&grads_for(&[(&w, &g)])).unwrap();
                for i in 0..init.len() {
                    expected[i] = reference_step(&c, expected[i], g[i], &mut states[i]);
                }
                let got = values(&w);
                for (a, b) in got.iter().zip(&expected) {
                    assert!(
                        (a - b).abs() < 1e-12,
                        "{c:?}: got {got:?}, expected {expected:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn sgd_by_hand() {
        let w = var(&[1.0, 2.0]);
        let c = OptimizerConfig {
            lr: 0.5,
            momentum: 0.9,
            dampening: 0.5,
            ..cfg(OptimizerKind::Sgd)
        };
        let mut opt = Sgd::new(vec![w.clone()], c).unwrap();
        opt.step(&grads_for(&[(&w, &[1.0, -2.0])])).unwrap();
        // First step: buf = g, no dampening.
        assert_eq!(values(&w), vec![0.5, 3.0]);
        opt.step(&grads_for(&[(&w, &[1.0, -2.0])])).unwrap();
        // buf = 0.9 * g + 0.5 * g = 1.4 g.
        assert_eq!(values(&w), vec![0.5 - 0.7, 3.0 + 1.4]);
    }

    #[test]
    fn adam_first_step_is_lr_times_sign() {
        let w = var(&[1.0, -1.0, 0.0]);
        let mut opt = Adam::new(vec![w.clone()], cfg(OptimizerKind::Adam)).unwrap();
        opt.step(&grads_for(&[(&w, &[3.0, -0.5, 1e-2])])).unwrap();
        let got = values(&w);
        for (a, b) in got.iter().zip([1.0 - 1e-3, -1.0 + 1e-3, -1e-3]) {
            assert!((a - b).abs() < 1e-8, "{got:?}");
        }
    }

    #[test]
    fn frozen_param_is_untouched_and_has_no_state() {
        for c in reference_configs() {
            let c = OptimizerConfig {
                weight_decay: 0.5,
                ..c
            };
            let w = var(&[1.0, 2.0]);
            let frozen = var(&[3.0, 4.0]);
            let mut opt = AnyOptimizer::new(
                vec![("w".into(), w.clone()), ("frozen".into(), frozen.clone())],
                &c,
            )
            .unwrap();
            for _ in 0..3 {
                opt.step(&loss_grads(&[&w])).unwrap();
            }
            assert_eq!(values(&frozen), vec![3.0, 4.0]);
            assert_ne!(values(&w), vec![1.0, 2.0]);
            let meta = opt.state_meta();
            assert_eq!(meta.steps["frozen"], 0);
            assert_eq!(meta.steps["w"], 3);
            let names: Vec<String> = opt
                .state_tensors()
                .unwrap()
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            assert!(names.iter().all(|n| n.starts_with("w.")), "{names:?}");
        }
    }

    #[test]
    fn step_counts_are_per_parameter() {
        let a = var(&[0.1, 0.2]);
        let b = var(&[0.3]);
        let c = cfg(OptimizerKind::Adam);
        let mut opt =
            AnyOptimizer::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())], &c).unwrap();
        for _ in 0..2 {
            opt.step(&loss_grads(&[&a])).unwrap();
        }
        // b starts late: its first update must use bias corrections for t = 1.
        let before = values(&b)[0];
        let grads = loss_grads(&[&a, &b]);
        let gb = grads.get(b.as_tensor()).unwrap().to_vec1::<f64>().unwrap()[0];
        opt.step(&grads).unwrap();
        let mut st = RefState::default();
        let expected = reference_step(&c, before, gb, &mut st);
        assert!((values(&b)[0] - expected).abs() < 1e-12);
        let meta = opt.state_meta();
        assert_eq!(meta.steps["a"], 3);
        assert_eq!(meta.steps["b"], 1);
    }

    #[test]
    fn state_round_trip_gives_identical_params() {
        let dir = tempfile::tempdir().unwrap();
        for (i, c) in reference_configs().into_iter().enumerate() {
            let init = [[0.5, -0.25, 1.0], [2.0, 0.0, -1.0]];
            let a1 = var(&init[0]);
            let a2 = var(&init[1]);
            let mut a = AnyOptimizer::new(
                vec![("l.w".into(), a1.clone()), ("l.b".into(), a2.clone())],
                &c,
            )
            .unwrap();
            for step in 0..4 {
                // l.b only has gradients from the second step on.
                if step == 0 {
                    a.step(&loss_grads(&[&a1])).unwrap();
                } else {
                    a.step(&loss_grads(&[&a1, &a2])).unwrap();
                }
            }
            a.set_learning_rate(c.lr * 0.5);

            // Save through a safetensors file and JSON, as a checkpoint would.
            let path = dir.path().join(format!("state{i}.safetensors"));
            let tensors: HashMap<String, Tensor> = a.state_tensors().unwrap().into_iter().collect();
            candle_core::safetensors::save(&tensors, &path).unwrap();
            let meta_json = serde_json::to_string(&a.state_meta()).unwrap();

            let b1 = Var::from_tensor(&a1.as_tensor().copy().unwrap()).unwrap();
            let b2 = Var::from_tensor(&a2.as_tensor().copy().unwrap()).unwrap();
            let mut b = AnyOptimizer::new(
                vec![("l.w".into(), b1.clone()), ("l.b".into(), b2.clone())],
                &c,
            )
            .unwrap();
            let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
            let meta: OptimizerStateMeta = serde_json::from_str(&meta_json).unwrap();
            b.load_state(&loaded, &meta).unwrap();
            assert_eq!(b.learning_rate(), c.lr * 0.5);
            assert_eq!(b.state_meta(), a.state_meta());

            for _ in 0..4 {
                a.step(&loss_grads(&[&a1, &a2])).unwrap();
                b.step(&loss_grads(&[&b1, &b2])).unwrap();
            }
            assert_eq!(values(&a1), values(&b1), "{c:?}");
            assert_eq!(values(&a2), values(&b2), "{c:?}");
        }
    }

    #[test]
    fn exported_state_survives_later_steps() {
        let w = var(&[1.0, 2.0]);
        let mut opt =
            AnyOptimizer::new(vec![("w".into(), w.clone())], &cfg(OptimizerKind::Adam)).unwrap();
        opt.step(&loss_grads(&[&w])).unwrap();
        let saved = opt.state_tensors().unwrap();
        let before: Vec<Vec<f64>> = saved.iter().map(|(_, t)| t.to_vec1().unwrap()).collect();
        opt.step(&loss_grads(&[&w])).unwrap();
        let after: Vec<Vec<f64>> = saved.iter().map(|(_, t)| t.to_vec1().unwrap()).collect();
        assert_eq!(before, after);
    }

    fn two_param_adam(amsgrad: bool) -> (AnyOptimizer, Var, Var) {
        let w = var(&[1.0, 2.0]);
        let b = var(&[0.5]);
        let c = OptimizerConfig {
            amsgrad,
            ..cfg(OptimizerKind::Adam)
        };
        let mut opt =
            AnyOptimizer::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], &c).unwrap();
        opt.step(&loss_grads(&[&w, &b])).unwrap();
        (opt, w, b)
    }

    fn saved(opt: &AnyOptimizer) -> (HashMap<String, Tensor>, OptimizerStateMeta) {
        (
            opt.state_tensors().unwrap().into_iter().collect(),
            opt.state_meta(),
        )
    }

    #[test]
    fn load_state_errors_name_the_culprit() {
        let (src, _, _) = two_param_adam(false);
        let (tensors, meta) = saved(&src);

        let (mut dst, _, _) = two_param_adam(false);
        let untouched = dst.state_meta();

        let mut t = tensors.clone();
        t.remove("b.exp_avg_sq");
        match dst.load_state(&t, &meta) {
            Err(OptimStateError::MissingTensor(n)) => assert_eq!(n, "b.exp_avg_sq"),
            other => panic!("{other:?}"),
        }

        let mut t = tensors.clone();
        t.insert(
            "w.exp_avg".into(),
            Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap(),
        );
        match dst.load_state(&t, &meta) {
            Err(e @ OptimStateError::ShapeMismatch { .. }) => {
                assert!(e.to_string().contains("w.exp_avg"), "{e}")
            }
            other => panic!("{other:?}"),
        }

        let mut m = meta.clone();
        m.kind = OptimizerKind::Sgd;
        assert!(matches!(
            dst.load_state(&tensors, &m),
            Err(OptimStateError::KindMismatch { .. })
        ));

        let mut m = meta.clone();
        m.steps.insert("ghost".into(), 1);
        assert!(matches!(
            dst.load_state(&tensors, &m),
            Err(OptimStateError::UnknownParam(n)) if n == "ghost"
        ));

        let mut m = meta.clone();
        m.steps.remove("w");
        assert!(matches!(
            dst.load_state(&tensors, &m),
            Err(OptimStateError::MissingStep(n)) if n == "w"
        ));

        let mut m = meta.clone();
        m.lr = f64::NAN;
        assert!(matches!(
            dst.load_state(&tensors, &m),
            Err(OptimStateError::InvalidLr(_))
        ));

        // AMSGrad switched on after the save: its running max is missing.
        let (mut ams, _, _) = two_param_adam(true);
        match ams.load_state(&tensors, &meta) {
            Err(OptimStateError::MissingTensor(n)) => assert_eq!(n, "w.max_exp_avg_sq"),
            other => panic!("{other:?}"),
        }

        // Failed loads changed nothing.
        assert_eq!(dst.state_meta(), untouched);
        dst.load_state(&tensors, &meta).unwrap();
    }

    #[test]
    fn load_state_with_zero_steps_clears_state() {
        let (mut opt, _, _) = two_param_adam(true);
        let meta = OptimizerStateMeta {
            kind: OptimizerKind::Adam,
            lr: 0.01,
            steps: [("w".to_string(), 0), ("b".to_string(), 0)].into(),
        };
        opt.load_state(&HashMap::new(), &meta).unwrap();
        assert!(opt.state_tensors().unwrap().is_empty());
        assert_eq!(opt.learning_rate(), 0.01);
    }

    #[test]
    fn skips_non_float_and_rejects_duplicate_names() {
        let w = var(&[1.0]);
        let idx = Var::from_slice(&[1u32, 2], 2, &Device::Cpu).unwrap();
        let opt = AnyOptimizer::new(
            vec![("w".into(), w.clone()), ("idx".into(), idx)],
            &cfg(OptimizerKind::AdamW),
        )
        .unwrap();
        assert_eq!(opt.param_count(), 1);
        assert_eq!(opt.element_count(), 1);
        assert_eq!(opt.param_names(), vec!["w"]);
        assert_eq!(opt.kind(), OptimizerKind::AdamW);

        let err = AnyOptimizer::new(
            vec![("w".into(), w.clone()), ("w".into(), var(&[2.0]))],
            &cfg(OptimizerKind::Sgd),
        )
        .unwrap_err();
        assert!(err.to_string().contains("duplicate"), "{err}");
    }

    #[test]
    fn empty_parameters_step_without_error() {
        for c in reference_configs() {
            let e = Var::zeros(0, DType::F32, &Device::Cpu).unwrap();
            let w = Var::ones(2, DType::F32, &Device::Cpu).unwrap();
            let mut opt =
                AnyOptimizer::new(vec![("e".into(), e.clone()), ("w".into(), w.clone())], &c)
                    .unwrap();
            let mut grads = GradStore::default();
            grads.insert(e.as_tensor(), e.zeros_like().unwrap());
            grads.insert(w.as_tensor(), w.ones_like().unwrap());
            opt.step(&grads).unwrap();
            opt.step(&grads).unwrap();
            assert_eq!(opt.state_meta().steps["e"], 2);
        }
    }

    #[test]
    fn f32_params_keep_their_dtype() {
        let w = Var::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        let mut opt = AnyOptimizer::new(
            vec![("w".into(), w.clone())],
            &OptimizerConfig {
                amsgrad: true,
                ..cfg(OptimizerKind::AdamW)
            },
        )
        .unwrap();
        let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
        opt.backward_step(&loss).unwrap();
        assert_eq!(w.dtype(), DType::F32);
        for (_, t) in opt.state_tensors().unwrap() {
            assert_eq!(t.dtype(), DType::F32);
            assert_eq!(t.dims(), &[2, 3]);
        }
    }

    #[test]
    fn config_validation() {
        let ok = [
            cfg(OptimizerKind::Adam),
            cfg(OptimizerKind::AdamW),
            cfg(OptimizerKind::Sgd),
            OptimizerConfig {
                momentum: 0.9,
                nesterov: true,
                ..cfg(OptimizerKind::Sgd)
            },
            // Adam ignores SGD-only fields and vice versa.
            OptimizerConfig {
                nesterov: true,
                ..cfg(OptimizerKind::Adam)
            },
            OptimizerConfig {
                betas: (1.0, 2.0),
                ..cfg(OptimizerKind::Sgd)
            },
        ];
        for c in ok {
            assert!(c.validate().is_ok(), "{c:?}");
        }
        let bad = [
            OptimizerConfig {
                lr: -1.0,
                ..cfg(OptimizerKind::Adam)
            },
            OptimizerConfig {
                lr: f64::NAN,
                ..cfg(OptimizerKind::Sgd)
            },
            OptimizerConfig {
                betas: (1.0, 0.999),
                ..cfg(OptimizerKind::Adam)
            },
            OptimizerConfig {
                betas: (0.9, -0.1),
                ..cfg(OptimizerKind::AdamW)
            },
            OptimizerConfig {
                eps: -1e-8,
                ..cfg(OptimizerKind::Adam)
            },
            OptimizerConfig {
                weight_decay: -0.1,
                ..cfg(OptimizerKind::AdamW)
            },
            OptimizerConfig {
                nesterov: true,
                ..cfg(OptimizerKind::Sgd)
            },
            OptimizerConfig {
                nesterov: true,
                momentum: 0.9,
                dampening: 0.1,
                ..cfg(OptimizerKind::Sgd)
            },
            OptimizerConfig {
                momentum: -0.5,
                ..cfg(OptimizerKind::Sgd)
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
            assert!(AnyOptimizer::new(vec![], &c).is_err(), "{c:?}");
        }
    }

    #[test]
    fn serde_names_and_defaults() {
        for (kind, s) in [
            (OptimizerKind::Adam, "\"adam\""),
            (OptimizerKind::AdamW, "\"adamw\""),
            (OptimizerKind::Sgd, "\"sgd\""),
        ] {
            assert_eq!(serde_json::to_string(&kind).unwrap(), s);
            assert_eq!(serde_json::from_str::<OptimizerKind>(s).unwrap(), kind);
        }
        let c: OptimizerConfig = serde_json::from_str(r#"{"kind":"sgd","lr":0.1}"#).unwrap();
        assert_eq!(
            c,
            OptimizerConfig {
                kind: OptimizerKind::Sgd,
                lr: 0.1,
                ..OptimizerConfig::default()
            }
        );
        let d = OptimizerConfig::default();
        assert_eq!(d.kind, OptimizerKind::Adam);
        assert_eq!((d.lr, d.betas, d.eps), (1e-3, (0.9, 0.999), 1e-8));
        let back: OptimizerConfig =
            serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }
}
