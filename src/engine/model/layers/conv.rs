//! `nn.Conv1d` / `nn.Conv2d` with stride, zero padding, dilation and groups
//! (`groups = channels` is a depthwise convolution).
//!
//! On f32 CPU tensors with one group and no dilation the convolution is our
//! im2col + gemm kernel ([`kernels::conv2d`], [`kernels::conv1d`]), and a
//! convolution followed by ReLU and a max-pool can be one fused kernel
//! ([`Conv::forward_relu_pool`]); a depthwise convolution (groups = in = out
//! channels, no dilation) is our direct kernel ([`kernels::depthwise_conv2d`]).
//! Everywhere else (CUDA, other dtypes, other groups, dilation, kernels
//! switched off) it is candle's `conv2d` per group, built so
//! that its backward is right: candle derives the output padding of its
//! backward from the first spatial dim alone, and its strided `conv1d`
//! kernel gradient is wrong; so a signal is computed as a 1-pixel-high image,
//! the padding is explicit zeros, and the input is cropped to exactly what
//! the windows cover (then no output padding is ever needed).

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use super::pool::MaxPool;
use super::Param;
use crate::engine::kernels;
use crate::engine::model::ForwardCtx;

/// A convolution's stride, zero padding, dilation and groups (PyTorch's
/// arguments of the same names; the same value for every spatial dim).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvConfig {
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub groups: usize,
}

impl Default for ConvConfig {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

impl ConvConfig {
    /// Output length along one spatial dim of length `n` for kernel size `k`;
    /// `None` when the (padded) input is shorter than the dilated kernel.
    pub fn output_size(&self, n: usize, k: usize) -> Option<usize> {
        let span = (k.max(1) - 1) * self.dilation + 1;
        let padded = n + 2 * self.padding;
        (padded >= span && self.stride > 0).then(|| (padded - span) / self.stride + 1)
    }
}

/// A convolution over `dims` (1 or 2) spatial dims: weight
/// `[out, in / groups, k(, k)]` and an optional bias `[out]`.
#[derive(Debug, Clone)]
pub struct Conv {
    weight: Param,
    bias: Option<Param>,
    cfg: ConvConfig,
    dims: usize,
}

/// `nn.Conv{dims}d(cin, cout, kernel, stride, padding, dilation, groups,
/// bias)` under `vb` (`weight`, `bias`), PyTorch's init:
/// kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias alike.
pub fn conv(
    dims: usize,
    (cin, cout): (usize, usize),
    kernel: usize,
    cfg: ConvConfig,
    bias: bool,
    vb: VarBuilder,
) -> candle_core::Result<Conv> {
    let g = cfg.groups.max(1);
    let fan_in = cin / g * kernel.pow(dims as u32);
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    conv_with_init(
        dims,
        (cin, cout),
        kernel,
        cfg,
        bias.then_some(init),
        init,
        vb,
    )
}

/// [`conv`] with the weight drawn from `init` and, where `bias` is given, a
/// bias drawn from it (torchvision's backbones: Kaiming normal, fan-out).
pub fn conv_with_init(
    dims: usize,
    (cin, cout): (usize, usize),
    kernel: usize,
    cfg: ConvConfig,
    bias: Option<Init>,
    init: Init,
    vb: VarBuilder,
) -> candle_core::Result<Conv> {
    let g = cfg.groups;
    if !(dims == 1 || dims == 2)
        || g == 0
        || cin % g != 0
        || cout % g != 0
        || cfg.stride == 0
        || cfg.dilation == 0
    {
        candle_core::bail!(
            "conv{dims}d: {cin} -> {cout} channels, stride {}, dilation {} and groups {g} do not fit (1 or 2 dims, channels divisible by groups, all >= 1)",
            cfg.stride,
            cfg.dilation
        );
    }
    let mut shape = vec![cout, cin / g];
    shape.extend(std::iter::repeat_n(kernel, dims));
    let weight = Param::new(&vb, shape.as_slice(), "weight", init)?;
    let bias = match bias {
        Some(b) => Some(Param::new(&vb, cout, "bias", b)?),
        None => None,
    };
    Ok(Conv {
        weight,
        bias,
        cfg,
        dims,
    })
}

impl Conv {
    /// The weight, the bias if any, and the number of spatial dims (for the ONNX export).
    pub fn params(&self) -> (&Param, Option<&Param>, usize) {
        (&self.weight, self.bias.as_ref(), self.dims)
    }

    /// The layer's configuration.
    pub fn config(&self) -> &ConvConfig {
        &self.cfg
    }

    fn live(&self, ctx: &ForwardCtx) -> (Tensor, Option<Tensor>) {
        (
            self.weight.live(ctx),
            self.bias.as_ref().map(|b| b.live(ctx)),
        )
    }

    /// Whether our kernels compute this layer on these tensors.
    fn kernel_applies(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, ctx: &ForwardCtx) -> bool {
        let mut all = vec![x, w];
        all.extend(b);
        self.cfg.groups == 1 && self.cfg.dilation == 1 && ctx.use_kernels(&all)
    }

    /// Whether this is a depthwise convolution (one filter per channel,
    /// `groups` = in = out channels) that our depthwise kernel computes on
    /// these tensors.
    fn depthwise_applies(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        ctx: &ForwardCtx,
    ) -> bool {
        let g = self.cfg.groups;
        let mut all = vec![x, w];
        all.extend(b);
        g > 1
            && self.cfg.dilation == 1
            && w.dim(0).ok() == Some(g)
            && w.dim(1).ok() == Some(1)
            && x.dim(1).ok() == Some(g)
            && ctx.use_kernels(&all)
    }

    /// The live weight, and whether the convolution is depthwise, where the
    /// fused chain kernel ([`kernels::conv_bn_chain`]) can compute this layer
    /// on an input of `x`'s kind with `cin` channels: 2-D, no bias,
    /// dilation 1, one group or depthwise, kernels on for f32 CPU tensors.
    pub(crate) fn chain_weight(
        &self,
        x: &Tensor,
        cin: usize,
        ctx: &ForwardCtx,
    ) -> Option<(Tensor, bool)> {
        let (w, b) = self.live(ctx);
        if self.dims != 2 || b.is_some() || self.cfg.dilation != 1 || !ctx.use_kernels(&[x, &w]) {
            return None;
        }
        let g = self.cfg.groups;
        let depthwise = g > 1 && w.dim(0).ok() == Some(g) && w.dim(1).ok() == Some(1) && cin == g;
        (g == 1 || depthwise).then_some((w, depthwise))
    }

    /// The convolution of `x` `[B, C, L]` or `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let (w, b) = self.live(ctx);
        let (s, p) = (self.cfg.stride, self.cfg.padding);
        if self.kernel_applies(x, &w, b.as_ref(), ctx) {
            return if self.dims == 2 {
                kernels::conv2d(x, &w, b.as_ref(), s, p)
            } else {
                kernels::conv1d(x, &w, b.as_ref(), s, p)
            };
        }
        if self.depthwise_applies(x, &w, b.as_ref(), ctx) {
            return if self.dims == 2 {
                kernels::depthwise_conv2d(x, &w, b.as_ref(), s, p)
            } else {
                kernels::depthwise_conv1d(x, &w, b.as_ref(), s, p)
            };
        }
        generic(x, &w, b.as_ref(), self.dims, &self.cfg)
    }

    /// `pool(relu(forward(x)))` as one CPU kernel (the convolution's output
    /// and its gradient never become tensors); `None` where it does not apply
    /// (kernels off or not on f32 CPU tensors, groups or dilation, a pool
    /// with padding or overlapping windows).
    pub fn forward_relu_pool(
        &self,
        x: &Tensor,
        pool: &MaxPool,
        ctx: &ForwardCtx,
    ) -> candle_core::Result<Option<Tensor>> {
        let (w, b) = self.live(ctx);
        if !pool.is_tiling() || !self.kernel_applies(x, &w, b.as_ref(), ctx) {
            return Ok(None);
        }
        let (s, p, k) = (self.cfg.stride, self.cfg.padding, pool.config().kernel);
        Ok(Some(if self.dims == 2 {
            kernels::conv_relu_pool2d(x, &w, b.as_ref(), s, p, k)?
        } else {
            kernels::conv_relu_pool1d(x, &w, b.as_ref(), s, p, k)?
        }))
    }
}

/// The convolution with candle's generic ops (see the module notes), one
/// `conv2d` per group.
fn generic(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    dims: usize,
    cfg: &ConvConfig,
) -> candle_core::Result<Tensor> {
    let (s, p, d, g) = (cfg.stride, cfg.padding, cfg.dilation, cfg.groups);
    if x.rank() != dims + 2 || w.rank() != dims + 2 {
        candle_core::bail!(
            "conv{dims}d: input {:?} and weight {:?} do not fit",
            x.dims(),
            w.dims()
        );
    }
    let (cin, cout, wcin) = (x.dim(1)?, w.dim(0)?, w.dim(1)?);
    if g == 0 || cin != wcin * g || cout % g != 0 {
        candle_core::bail!(
            "conv{dims}d: input has {cin} channels, the weight {:?} with {g} groups expects {}",
            w.dims(),
            wcin * g
        );
    }
    let k = w.dim(2)?;
    let span = (k - 1) * d + 1;
    let (mut x, w) = if dims == 1 {
        (x.unsqueeze(2)?, w.unsqueeze(2)?)
    } else {
        (x.clone(), w.clone())
    };
    let first = if dims == 1 { 3 } else { 2 };
    for dim in first..4 {
        if p > 0 {
            x = x.pad_with_zeros(dim, p, p)?;
        }
        let n = x.dim(dim)?;
        if n < span {
            candle_core::bail!(
                "conv{dims}d: padded input of size {n} is smaller than the (dilated) kernel {span}"
            );
        }
        let used = (n - span) / s * s + span;
        if used < n {
            x = x.narrow(dim, 0, used)?;
        }
    }
    let y = if g == 1 {
        x.conv2d(&w, 0, s, d, 1)?
    } else {
        let (ci, co) = (cin / g, cout / g);
        let parts = (0..g)
            .map(|i| {
                x.narrow(1, i * ci, ci)?
                    .conv2d(&w.narrow(0, i * co, co)?, 0, s, d, 1)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)?
    };
    let y = if dims == 1 { y.squeeze(2)? } else { y };
    match b {
        None => Ok(y),
        Some(b) => {
            let mut shape = vec![1usize; y.rank()];
            shape[1] = b.dim(0)?;
            y.broadcast_add(&b.reshape(shape.as_slice())?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{KernelPolicy, ParamStore};
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A naive 2-D convolution with groups and dilation (loops over every
    /// output, PyTorch's definition), and its gradients for the loss
    /// `sum(y * wts)` computed by the same loops.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        x: &[f32],
        (b, c, h, wd): (usize, usize, usize, usize),
        w: &[f32],
        (co, k): (usize, usize),
        bias: &[f32],
        cfg: &ConvConfig,
        wts: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (s, p, d, g) = (cfg.stride, cfg.padding, cfg.dilation, cfg.groups);
        let (ci, cog) = (c / g, co / g);
        let ho = cfg.output_size(h, k).unwrap();
        let wo = cfg.output_size(wd, k).unwrap();
        let mut y = vec![0f32; b * co * ho * wo];
        let (mut dx, mut dw, mut db) = (vec![0f32; x.len()], vec![0f32; w.len()], vec![0f32; co]);
        for n in 0..b {
            for o in 0..co {
                let grp = o / cog;
                for i in 0..ho {
                    for j in 0..wo {
                        let yi = ((n * co + o) * ho + i) * wo + j;
                        let mut acc = bias[o];
                        for cc in 0..ci {
                            let cin = grp * ci + cc;
                            for a in 0..k {
                                for e in 0..k {
                                    let r = (i * s + a * d) as isize - p as isize;
                                    let q = (j * s + e * d) as isize - p as isize;
                                    if r < 0 || q < 0 || r as usize >= h || q as usize >= wd {
                                        continue;
                                    }
                                    let xi = ((n * c + cin) * h + r as usize) * wd + q as usize;
                                    let wi = ((o * ci + cc) * k + a) * k + e;
                                    acc += x[xi] * w[wi];
                                    dx[xi] += w[wi] * wts[yi];
                                    dw[wi] += x[xi] * wts[yi];
                                }
                            }
                        }
                        y[yi] = acc;
                        db[o] += wts[yi];
                    }
                }
            }
        }
        (y, dx, dw, db)
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < tol, "{what} differs by {d}");
    }

    /// Groups, dilation, stride and padding, on both paths, against the
    /// naive loops: values and all three gradients.
    #[test]
    fn grouped_dilated_conv_matches_the_naive_definition() {
        for (xs, co, k, cfg) in [
            // depthwise (groups = channels), stride 2, padding 1
            (
                (2, 4, 7, 6),
                4,
                3,
                ConvConfig {
                    stride: 2,
                    padding: 1,
                    dilation: 1,
                    groups: 4,
                },
            ),
            // two groups, two outputs per group, dilation 2
            (
                (2, 4, 9, 8),
                4,
                3,
                ConvConfig {
                    stride: 1,
                    padding: 2,
                    dilation: 2,
                    groups: 2,
                },
            ),
            // depthwise multiplier 2, no padding
            (
                (1, 3, 6, 7),
                6,
                2,
                ConvConfig {
                    stride: 1,
                    padding: 0,
                    dilation: 1,
                    groups: 3,
                },
            ),
            // plain (our kernel on the kernels path)
            (
                (2, 2, 6, 6),
                3,
                3,
                ConvConfig {
                    stride: 2,
                    padding: 1,
                    dilation: 1,
                    groups: 1,
                },
            ),
        ] {
            let (b, c, h, wd) = xs;
            for policy in [KernelPolicy::Ours, KernelPolicy::Generic] {
                let store = ParamStore::new(3, &Device::Cpu);
                let layer = conv(2, (c, co), k, cfg, true, store.var_builder()).unwrap();
                let x = Var::from_tensor(&rand(&[b, c, h, wd], 1)).unwrap();
                let ctx = ForwardCtx::eval().with_kernels(policy);
                let y = layer.forward(&x, &ctx).unwrap();
                let wts = rand(y.dims(), 7);
                let (wv, bv) = (layer.weight.tensor(), layer.bias.as_ref().unwrap().tensor());
                let (ry, rdx, rdw, rdb) = naive(
                    &flat(&x),
                    xs,
                    &flat(wv),
                    (co, k),
                    &flat(bv),
                    &cfg,
                    &flat(&wts),
                );
                let what = format!("{cfg:?} {policy:?}");
                close(&flat(&y), &ry, 1e-4, &format!("{what}: values"));
                let grads = (&y * &wts).unwrap().sum_all().unwrap();
                let grads = crate::engine::kernels::direct_grads::backward(&grads).unwrap();
                close(
                    &flat(grads.get(&x).unwrap()),
                    &rdx,
                    1e-3,
                    &format!("{what}: dx"),
                );
                close(
                    &flat(grads.get(wv).unwrap()),
                    &rdw,
                    1e-3,
                    &format!("{what}: dw"),
                );
                close(
                    &flat(grads.get(bv).unwrap()),
                    &rdb,
                    1e-3,
                    &format!("{what}: db"),
                );
            }
        }
    }

    /// The depthwise kernel against candle's generic path (the CUDA path):
    /// values and the gradients of input, weight and bias, at odd sizes,
    /// strides 1 to 3, padding 0 to 2, 1-D and 2-D, and a frozen weight.
    #[test]
    fn depthwise_kernel_matches_the_generic_path() {
        let dw = |stride, padding| ConvConfig {
            stride,
            padding,
            dilation: 1,
            groups: 5,
        };
        for (dims, xs, k, cfg, bias, frozen) in [
            (2, vec![3, 5, 13, 11], 3, dw(1, 1), false, false),
            (2, vec![2, 5, 6, 9], 3, dw(1, 1), true, true),
            (2, vec![2, 5, 13, 11], 3, dw(2, 1), true, false),
            (2, vec![2, 5, 8, 9], 3, dw(2, 0), false, false),
            (2, vec![2, 5, 7, 7], 5, dw(3, 2), true, false),
            (2, vec![2, 5, 9, 10], 3, dw(2, 1), true, true),
            (1, vec![3, 5, 17], 3, dw(2, 1), true, false),
            (1, vec![2, 5, 9], 4, dw(1, 2), false, false),
        ] {
            let what = format!("{dims}-D {xs:?} k {k} {cfg:?} bias {bias} frozen {frozen}");
            let mut runs = Vec::new();
            for policy in [KernelPolicy::Ours, KernelPolicy::Generic] {
                let store = ParamStore::new(5, &Device::Cpu);
                let layer = conv(dims, (5, 5), k, cfg, bias, store.var_builder()).unwrap();
                let x = Var::from_tensor(&rand(&xs, 1)).unwrap();
                let mut ctx = ForwardCtx::train(0).with_kernels(policy);
                if frozen {
                    ctx = ctx.with_frozen(vec!["weight".into()]);
                }
                let y = layer.forward(&x, &ctx).unwrap();
                let wts = rand(y.dims(), 7);
                let loss = (&y * &wts).unwrap().sum_all().unwrap();
                let grads = crate::engine::kernels::direct_grads::backward(&loss).unwrap();
                let mut got = vec![flat(&y), flat(grads.get(&x).unwrap())];
                let wg = grads.get(layer.weight.tensor());
                assert_eq!(wg.is_none(), frozen, "{what}: weight gradient");
                got.extend(wg.map(flat));
                if let Some(b) = &layer.bias {
                    got.push(flat(grads.get(b.tensor()).unwrap()));
                }
                runs.push(got);
            }
            for (i, (a, b)) in runs[0].iter().zip(&runs[1]).enumerate() {
                close(a, b, 1e-4, &format!("{what}: output {i}"));
            }
        }
    }

    #[test]
    fn one_d_groups_match_two_d_with_height_one() {
        let cfg = ConvConfig {
            stride: 2,
            padding: 1,
            dilation: 2,
            groups: 2,
        };
        let store = ParamStore::new(3, &Device::Cpu);
        let l1 = conv(1, (4, 6), 3, cfg, true, store.var_builder().pp("a")).unwrap();
        let x = rand(&[2, 4, 11], 2);
        let y1 = l1.forward(&x, &ForwardCtx::eval()).unwrap();
        let w2 = l1.weight.tensor().unsqueeze(2).unwrap();
        let b = l1.bias.as_ref().unwrap().tensor();
        let (xs, ws) = (flat(&x), flat(&w2));
        // Height 1, padding only along the length: the naive 2-D loops with
        // kernel height 1 are the 1-D definition.
        let (c, co, l, k) = (4, 6, 11, 3);
        let lo = cfg.output_size(l, k).unwrap();
        let mut want = vec![0f32; 2 * co * lo];
        for n in 0..2 {
            for o in 0..co {
                let grp = o / 3;
                for j in 0..lo {
                    let mut acc = flat(b)[o];
                    for cc in 0..2 {
                        for e in 0..k {
                            let q = (j * 2 + e * 2) as isize - 1;
                            if q >= 0 && (q as usize) < l {
                                acc += xs[(n * c + grp * 2 + cc) * l + q as usize]
                                    * ws[(o * 2 + cc) * k + e];
                            }
                        }
                    }
                    want[(n * co + o) * lo + j] = acc;
                }
            }
        }
        close(&flat(&y1), &want, 1e-4, "conv1d with groups");
    }
}
