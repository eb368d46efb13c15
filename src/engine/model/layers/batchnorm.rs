//! Batch normalisation over the channel dimension (dim 1), as PyTorch's
//! `nn.BatchNorm1d` / `nn.BatchNorm2d`: affine, tracking running statistics,
//! with PyTorch's defaults (`eps = 1e-5`, `momentum = 0.1`) or, for
//! architectures that set others (MobileNetV3: `1e-3`, `0.01`), those.
//!
//! Parameters `weight` [C] (init 1) and `bias` [C] (init 0); buffers
//! `running_mean` [C] (0), `running_var` [C] (1) and `num_batches_tracked` []
//! (0). In training mode a batch is normalised with its own statistics (biased
//! variance) and the running statistics move towards them (unbiased variance,
//! as torch); in evaluation mode the running statistics are used. A layer whose
//! `weight` is frozen (`model.freeze`) keeps using and keeping its running
//! statistics in training too, as a frozen layer in PyTorch put in `.eval()`
//! (torchvision's `FrozenBatchNorm2d`).

use candle_core::{DType, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use super::Param;
pub use crate::engine::kernels::batchnorm::BnAct;
use crate::engine::kernels::batchnorm::{self, BnStats, Moments};
use crate::engine::model::ForwardCtx;

/// Names of the buffers a batch-norm layer keeps (never optimised).
pub const BUFFER_SUFFIXES: [&str; 3] = [".running_mean", ".running_var", ".num_batches_tracked"];

/// PyTorch's default `eps`.
pub const EPS: f64 = 1e-5;
/// PyTorch's default `momentum`.
pub const MOMENTUM: f64 = 0.1;

/// `relu6(x)` with candle's ops and PyTorch's gradient (1 strictly between 0
/// and 6: the mask is computed outside the graph).
fn relu6_generic(x: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.detach();
    let inside = d.gt(0.0)?.mul(&d.lt(6.0)?)?.to_dtype(x.dtype())?;
    let top = (d.ge(6.0)?.to_dtype(x.dtype())? * 6.0)?;
    x.mul(&inside)?.add(&top)
}

/// One batch-norm layer.
pub struct BatchNorm {
    weight: Param,
    bias: Param,
    running_mean: Var,
    running_var: Var,
    num_batches_tracked: Var,
    channels: usize,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    /// Builds the layer's parameters and buffers under `vb`, with PyTorch's
    /// default `eps` and `momentum`.
    pub fn new(channels: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::with_eps_momentum(channels, EPS, MOMENTUM, vb)
    }

    /// [`BatchNorm::new`] with `nn.BatchNorm2d(eps=..., momentum=...)`.
    pub fn with_eps_momentum(
        channels: usize,
        eps: f64,
        momentum: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let weight = Param::new(&vb, channels, "weight", Init::Const(1.0))?;
        let bias = Param::new(&vb, channels, "bias", Init::Const(0.0))?;
        let rm = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
        let rv = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
        let nbt = vb.get_with_hints((), "num_batches_tracked", Init::Const(0.0))?;
        // The store hands out the variables' own tensors, so these share storage with it.
        Ok(Self {
            weight,
            bias,
            running_mean: Var::from_tensor(&rm)?,
            running_var: Var::from_tensor(&rv)?,
            num_batches_tracked: Var::from_tensor(&nbt)?,
            channels,
            eps,
            momentum,
        })
    }

    /// Normalises `x` of shape [B, C, ...].
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        self.forward_act(x, BnAct::None, ctx)
    }

    /// `act(forward(x))`: on f32 CPU tensors (kernels on) one fused kernel
    /// ([`kernels::batchnorm`]), elsewhere candle's ops then the activation.
    pub fn forward_act(
        &self,
        x: &Tensor,
        act: BnAct,
        ctx: &ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        if ctx.use_kernels(&[x, self.weight.tensor(), self.bias.tensor()]) {
            return self.kernel(x, act, ctx);
        }
        let y = self.generic(x, ctx)?;
        match act {
            BnAct::None => Ok(y),
            BnAct::Relu => y.relu(),
            BnAct::Relu6 => relu6_generic(&y),
        }
    }

    /// The fused kernel; the running statistics move as in [`Self::generic`].
    fn kernel(&self, x: &Tensor, act: BnAct, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        if x.rank() < 2 || x.dim(1)? != self.channels {
            candle_core::bail!(
                "batch-norm over {} channels got input of shape {:?}",
                self.channels,
                x.dims()
            );
        }
        let (weight, bias, stats) = self.kernel_inputs(ctx)?;
        let (y, moments) = batchnorm::batch_norm(x, &weight, &bias, stats, self.eps, act)?;
        if let Some(m) = moments {
            self.record_batch(m, x.elem_count() / self.channels)?;
        }
        Ok(y)
    }

    /// What the kernels normalise with in this pass: the live weight and
    /// bias, and the batch's statistics (training, not frozen) or the running
    /// ones.
    pub(crate) fn kernel_inputs(
        &self,
        ctx: &ForwardCtx,
    ) -> candle_core::Result<(Tensor, Tensor, BnStats)> {
        let frozen = self.weight.frozen(ctx);
        let (weight, bias) = (self.weight.live(ctx), self.bias.live(ctx));
        if ctx.train && !frozen {
            return Ok((weight, bias, BnStats::Batch));
        }
        let stats = BnStats::Fixed {
            mean: self
                .running_mean
                .as_tensor()
                .to_dtype(DType::F32)?
                .to_vec1()?,
            var: self
                .running_var
                .as_tensor()
                .to_dtype(DType::F32)?
                .to_vec1()?,
        };
        Ok((weight, bias, stats))
    }

    /// Moves the running statistics towards a batch's (mean, biased
    /// variance) over `n` values per channel, as torch (unbiased variance).
    pub(crate) fn record_batch(&self, (mean, var): Moments, n: usize) -> candle_core::Result<()> {
        let dev = self.running_mean.device();
        let m = self.momentum;
        let unbiased = n as f64 / (n.max(2) - 1) as f64;
        let rm = self.running_mean.as_tensor();
        let rv = self.running_var.as_tensor();
        let bm = Tensor::from_vec(mean, self.channels, dev)?.to_dtype(rm.dtype())?;
        let bv = Tensor::from_vec(var, self.channels, dev)?.to_dtype(rv.dtype())?;
        self.running_mean.set(&((rm * (1.0 - m))? + (bm * m)?)?)?;
        self.running_var
            .set(&((rv * (1.0 - m))? + (bv * (m * unbiased))?)?)?;
        let nbt = (self.num_batches_tracked.as_tensor() + 1.0)?;
        self.num_batches_tracked.set(&nbt)
    }

    /// Candle's ops (the path CUDA takes).
    fn generic(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let rank = x.rank();
        if rank < 2 || x.dim(1)? != self.channels {
            candle_core::bail!(
                "batch-norm over {} channels got input of shape {:?}",
                self.channels,
                x.dims()
            );
        }
        let mut bshape = vec![1usize; rank];
        bshape[1] = self.channels;
        // A frozen layer computes no gradient for its own parameters.
        let frozen = self.weight.frozen(ctx);
        let (weight, bias) = if frozen {
            (self.weight.tensor().detach(), self.bias.tensor().detach())
        } else {
            (self.weight.tensor().clone(), self.bias.tensor().clone())
        };
        let weight = weight.reshape(bshape.as_slice())?;
        let bias = bias.reshape(bshape.as_slice())?;
        let normalised = if ctx.train && !frozen {
            let n = x.elem_count() / self.channels;
            let mean = channel_mean(x)?;
            let centred = x.broadcast_sub(&mean)?;
            let var = channel_mean(&centred.sqr()?)?;
            // Running statistics: outside the autograd graph, unbiased variance.
            let m = self.momentum;
            let batch_mean = mean.detach().flatten_all()?;
            let unbiased = (var.detach().flatten_all()? * (n as f64 / (n.max(2) - 1) as f64))?;
            let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (batch_mean * m)?)?;
            let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
            self.running_mean.set(&rm)?;
            self.running_var.set(&rv)?;
            let nbt = (self.num_batches_tracked.as_tensor() + 1.0)?;
            self.num_batches_tracked.set(&nbt)?;
            centred.broadcast_div(&(var + self.eps)?.sqrt()?)?
        } else {
            let rm = self
                .running_mean
                .as_tensor()
                .detach()
                .reshape(bshape.as_slice())?;
            let rv = self
                .running_var
                .as_tensor()
                .detach()
                .reshape(bshape.as_slice())?;
            x.broadcast_sub(&rm)?
                .broadcast_div(&(rv + self.eps)?.sqrt()?)?
        };
        normalised.broadcast_mul(&weight)?.broadcast_add(&bias)
    }

    /// The `eps` added to the variance (for the ONNX export).
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Weight, bias, running mean and running variance (for the ONNX export).
    pub fn params(&self) -> (&Param, &Param, &Tensor, &Tensor) {
        (
            &self.weight,
            &self.bias,
            self.running_mean.as_tensor(),
            self.running_var.as_tensor(),
        )
    }

    /// The current running mean (for tests).
    pub fn running_mean(&self) -> candle_core::Result<Vec<f32>> {
        self.running_mean
            .as_tensor()
            .to_dtype(DType::F32)?
            .to_vec1()
    }
}

/// The per-channel mean of `x` `[B, C, ...]`, kept as `[1, C, 1, ...]`,
/// reduced one dim at a time (last first, the batch last): float32 sums over
/// a row stay short, so a batch of 8 images of 32x32 has the statistics
/// PyTorch's (pairwise) reduction gives, not a sum of 8,192 terms in a row
/// whose rounding a deep network's later batch-norm layers amplify.
fn channel_mean(x: &Tensor) -> candle_core::Result<Tensor> {
    let mut m = x.clone();
    for d in (2..x.rank()).rev() {
        m = m.mean_keepdim(d)?;
    }
    m.mean_keepdim(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::ParamStore;
    use candle_core::Device;

    /// The fused kernel against candle's ops (the CUDA path): outputs,
    /// gradients and running statistics, in training, evaluation and frozen,
    /// with each fused activation.
    #[test]
    fn kernel_matches_the_generic_path() {
        use crate::engine::model::KernelPolicy;
        use candle_core::Var;
        let x = Var::from_tensor(&(Tensor::rand(-3f32, 5f32, (4, 3, 5, 7), &Device::Cpu).unwrap()))
            .unwrap();
        for act in [BnAct::None, BnAct::Relu, BnAct::Relu6] {
            for mode in ["train", "eval", "frozen"] {
                let mut runs = Vec::new();
                for policy in [KernelPolicy::Ours, KernelPolicy::Generic] {
                    let store = ParamStore::new(0, &Device::Cpu);
                    let bn = BatchNorm::new(3, store.var_builder().pp("bn")).unwrap();
                    // Non-trivial affine and running statistics.
                    let t = |v: [f32; 3]| Tensor::new(&v, &Device::Cpu).unwrap();
                    let values = std::collections::HashMap::from([
                        ("bn.weight".to_string(), t([1.5, -0.5, 2.0])),
                        ("bn.bias".to_string(), t([0.5, 1.0, -0.25])),
                        ("bn.running_mean".to_string(), t([0.3, -0.1, 1.0])),
                        ("bn.running_var".to_string(), t([0.7, 2.0, 1.3])),
                    ]);
                    store.load_partial(&values).unwrap();
                    let ctx = match mode {
                        "train" => ForwardCtx::train(0),
                        "eval" => ForwardCtx::eval(),
                        _ => ForwardCtx::train(0).with_frozen(vec!["bn.*".into()]),
                    }
                    .with_kernels(policy);
                    // Two steps, so the running statistics feed the second.
                    let mut out = Vec::new();
                    for _ in 0..2 {
                        let y = bn.forward_act(&x, act, &ctx).unwrap();
                        let wts = crate::engine::kernels::test_util::rand(y.dims(), 9);
                        let loss = (&y * &wts).unwrap().sum_all().unwrap();
                        let g = crate::engine::kernels::direct_grads::backward(&loss).unwrap();
                        out.push(y.flatten_all().unwrap());
                        out.push(g.get(&x).unwrap().flatten_all().unwrap());
                        for p in [bn.weight.tensor(), bn.bias.tensor()] {
                            assert_eq!(g.get(p).is_none(), mode == "frozen", "{mode}");
                            if let Some(t) = g.get(p) {
                                out.push(t.clone());
                            }
                        }
                    }
                    for (_, t) in store.state_dict() {
                        out.push(t.flatten_all().unwrap());
                    }
                    runs.push(out);
                }
                for (i, (a, b)) in runs[0].iter().zip(&runs[1]).enumerate() {
                    let d = (a - b)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max(0)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(d < 1e-4, "{act:?} {mode}: tensor {i} differs by {d}");
                }
            }
        }
    }

    #[test]
    fn train_mode_updates_running_statistics_like_torch() {
        let store = ParamStore::new(0, &Device::Cpu);
        let bn = BatchNorm::new(2, store.var_builder().pp("bn")).unwrap();
        // Channel 0: values 1, 3 (two samples, one position); channel 1: 2, 6.
        let x = Tensor::new(&[[[1f32], [2.]], [[3.], [6.]]], &Device::Cpu).unwrap();
        let y = bn.forward(&x, &ForwardCtx::train(0)).unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // (1 - 2) / sqrt(1 + eps) ~ -1
        assert!((y[0] + 1.0).abs() < 1e-4, "{y:?}");
        assert_eq!(bn.running_mean().unwrap(), vec![0.2, 0.4]);
        let rv = store
            .state_dict()
            .into_iter()
            .find(|(n, _)| n == "bn.running_var")
            .unwrap()
            .1
            .to_vec1::<f32>()
            .unwrap();
        // unbiased var: ch0 = 2, ch1 = 8 -> 0.9 + 0.1 * v
        assert!(
            (rv[0] - 1.1).abs() < 1e-6 && (rv[1] - 1.7).abs() < 1e-6,
            "{rv:?}"
        );
        // Eval mode uses the running statistics and changes nothing.
        let e = bn.forward(&x, &ForwardCtx::eval()).unwrap();
        let e = e.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((e[0] - (1.0 - 0.2) / (1.1f32 + 1e-5).sqrt()).abs() < 1e-5);
        assert_eq!(bn.running_mean().unwrap(), vec![0.2, 0.4]);
        // A frozen layer behaves as in eval mode even in training.
        let frozen = ForwardCtx::train(0).with_frozen(vec!["bn.*".into()]);
        bn.forward(&x, &frozen).unwrap();
        assert_eq!(bn.running_mean().unwrap(), vec![0.2, 0.4]);
    }
}
