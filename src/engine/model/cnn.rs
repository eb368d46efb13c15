//! `cnn` (images `[C, H, W]`) and `cnn1d` (signals `[C, L]`): a stack of conv
//! blocks (convolution, optional batch-norm, activation, optional max-pool),
//! global average pooling (or, with `flatten`, the whole last feature map),
//! optional hidden fully-connected layers, dropout and a linear head.
//!
//! PyTorch twin (parameter names `features.{i}.conv.weight|bias`,
//! `features.{i}.bn.weight|bias|running_mean|running_var|num_batches_tracked`,
//! `fc.{i}.weight|bias` for hidden layers, `head.weight|bias`; the full classes
//! are in `scripts/pytorch_twins.py`):
//! ```python
//! class ConvBlock(nn.Module):
//!     def __init__(self, dim, cin, cout, kernel, stride, padding, batch_norm, pool, act):
//!         Conv, BN, Pool = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) if dim == 2 else \
//!                          (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d)
//!         self.conv = Conv(cin, cout, kernel, stride, padding, bias=not batch_norm)
//!         self.bn = BN(cout) if batch_norm else None
//!         self.act, self.pool = act(), (Pool(pool) if pool > 1 else None)
//!     def forward(self, x):
//!         x = self.conv(x)
//!         if self.bn is not None: x = self.bn(x)
//!         x = self.act(x)
//!         return self.pool(x) if self.pool is not None else x
//!
//! class CNN(nn.Module):  # dim = 2 for cnn, 1 for cnn1d
//!     def __init__(self, dim, in_channels, blocks, num_classes, dropout=0.0, act=nn.ReLU):
//!         self.features = nn.Sequential(*[ConvBlock(dim, ...) for each block])
//!         dims = [features_out] + hidden  # channels, or channels * prod(size) with flatten
//!         self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
//!         self.drop, self.head = nn.Dropout(dropout), nn.Linear(dims[-1], num_classes)
//!     def forward(self, x):
//!         x = self.features(x)
//!         x = x.flatten(1) if flatten else x.mean(dim=tuple(range(2, x.dim())))  # GAP
//!         for fc in self.fc:
//!             x = self.act(fc(self.drop(x)))
//!         return self.head(self.drop(x))
//! ```

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::batchnorm::BatchNorm;
use super::layers::{linear, Activation, Dense};
use super::pool::max_first;
use super::{Classifier, ForwardCtx};
use crate::engine::kernels;

/// One conv block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvBlockSpec {
    pub out_channels: usize,
    pub kernel_size: usize,
    pub stride: usize,
    pub padding: usize,
    /// Batch-norm after the convolution (the convolution then has no bias).
    pub batch_norm: bool,
    /// Max-pool window (and stride) after the activation; 1 means no pooling.
    pub pool: usize,
}

/// Sizes of a `cnn` or `cnn1d`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CnnSpec {
    /// Channels of one sample.
    pub in_channels: usize,
    /// Spatial size of one sample: `[H, W]` for `cnn`, `[L]` for `cnn1d`.
    pub input_size: Vec<usize>,
    pub blocks: Vec<ConvBlockSpec>,
    pub num_classes: usize,
    #[serde(default)]
    pub activation: Activation,
    #[serde(default)]
    pub dropout: f64,
    /// Feed the whole last feature map (flattened) to the head instead of its
    /// global average.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flatten: bool,
    /// Widths of hidden fully-connected layers (each followed by the
    /// activation) between the features and the head.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<usize>,
}

impl CnnSpec {
    /// Width of the features entering the fully-connected part.
    pub fn features_out(&self) -> Result<usize, String> {
        let sizes = self.feature_sizes()?;
        let channels = self
            .blocks
            .last()
            .map_or(self.in_channels, |b| b.out_channels);
        Ok(if self.flatten {
            channels * sizes.last().map_or(1, |s| s.iter().product::<usize>())
        } else {
            channels
        })
    }

    /// Spatial size after each block; an error names the block that runs out of input.
    pub fn feature_sizes(&self) -> Result<Vec<Vec<usize>>, String> {
        if self.blocks.is_empty() {
            return Err("needs at least one conv block".into());
        }
        let mut size = self.input_size.clone();
        let mut out = Vec::with_capacity(self.blocks.len());
        for (i, b) in self.blocks.iter().enumerate() {
            if b.out_channels == 0 || b.kernel_size == 0 || b.stride == 0 || b.pool == 0 {
                return Err(format!(
                    "block {i}: channels, kernel_size, stride and pool must be >= 1"
                ));
            }
            for n in size.iter_mut() {
                let padded = *n + 2 * b.padding;
                if padded < b.kernel_size {
                    return Err(format!(
                        "block {i}: input of size {:?} (padded {padded}) is smaller than kernel_size {}",
                        self.input_size, b.kernel_size
                    ));
                }
                let conv = (padded - b.kernel_size) / b.stride + 1;
                if conv < b.pool {
                    return Err(format!(
                        "block {i}: feature map of size {conv} is smaller than pool {} (input {:?} is too small for this many blocks)",
                        b.pool, self.input_size
                    ));
                }
                *n = conv / b.pool;
            }
            out.push(size.clone());
        }
        Ok(out)
    }
}

/// A convolution weight [out, in, k(, k)] and optional bias, PyTorch's init.
struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    dims: usize,
    /// Full names of the weight and bias, to ask whether they are frozen.
    names: [String; 2],
}

impl Conv {
    fn new(
        dims: usize,
        cin: usize,
        block: &ConvBlockSpec,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let k = block.kernel_size;
        let fan_in = cin * k.pow(dims as u32);
        // nn.Conv*d: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias alike.
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let mut shape = vec![block.out_channels, cin];
        shape.extend(std::iter::repeat_n(k, dims));
        let weight = vb.get_with_hints(shape.as_slice(), "weight", init)?;
        let bias = if block.batch_norm {
            None
        } else {
            Some(vb.get_with_hints(block.out_channels, "bias", init)?)
        };
        let prefix = vb.prefix();
        Ok(Self {
            weight,
            bias,
            stride: block.stride,
            padding: block.padding,
            dims,
            names: [format!("{prefix}.weight"), format!("{prefix}.bias")],
        })
    }

    /// The weight and bias to compute with: detached where frozen in training,
    /// so no gradient is computed for them (nor, when a whole feature
    /// extractor is frozen, through it at all).
    fn live(&self, ctx: &ForwardCtx) -> (Tensor, Option<Tensor>) {
        let frozen = |n: &str| ctx.train && ctx.is_frozen(n);
        let w = if frozen(&self.names[0]) {
            self.weight.detach()
        } else {
            self.weight.clone()
        };
        let b = self.bias.as_ref().map(|b| {
            if frozen(&self.names[1]) {
                b.detach()
            } else {
                b.clone()
            }
        });
        (w, b)
    }

    /// Convolution, ReLU and max-pooling as one CPU kernel (the convolution's
    /// output and its gradient never become tensors); `None` where it does not
    /// apply (not on an f32 CPU tensor).
    fn forward_relu_pool(
        &self,
        x: &Tensor,
        pool: usize,
        ctx: &ForwardCtx,
    ) -> candle_core::Result<Option<Tensor>> {
        let (weight, bias) = self.live(ctx);
        if !kernels::on_cpu_f32(&[x, &weight]) {
            return Ok(None);
        }
        let b = bias.as_ref();
        let (s, p) = (self.stride, self.padding);
        Ok(Some(if self.dims == 2 {
            kernels::conv_relu_pool2d(x, &weight, b, s, p, pool)?
        } else {
            kernels::conv_relu_pool1d(x, &weight, b, s, p, pool)?
        }))
    }

    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let (weight, bias) = self.live(ctx);
        // On the CPU: our im2col + gemm kernels (any stride and padding, exact
        // gradients, none for the data, the bias fused in).
        if kernels::on_cpu_f32(&[x, &weight]) {
            let b = bias.as_ref();
            return if self.dims == 2 {
                kernels::conv2d(x, &weight, b, self.stride, self.padding)
            } else {
                kernels::conv1d(x, &weight, b, self.stride, self.padding)
            };
        }
        // Elsewhere everything goes through conv2d (a signal is a 1-pixel-high image) with
        // explicit zero padding, and the input is cropped to exactly what the
        // windows cover: candle's conv backward derives an output padding from
        // the first spatial dim alone, and its strided conv1d kernel gradient is
        // wrong; with these shapes no output padding is ever needed.
        let (s, p) = (self.stride, self.padding);
        let k = weight.dim(2)?;
        let (mut x, w) = if self.dims == 1 {
            (x.unsqueeze(2)?, weight.unsqueeze(2)?)
        } else {
            (x.clone(), weight.clone())
        };
        let first = if self.dims == 1 { 3 } else { 2 };
        for d in first..4 {
            if p > 0 {
                x = x.pad_with_zeros(d, p, p)?;
            }
            let n = x.dim(d)?;
            let used = (n - k) / s * s + k;
            if used < n {
                x = x.narrow(d, 0, used)?;
            }
        }
        let y = x.conv2d(&w, 0, s, 1, 1)?;
        let y = if self.dims == 1 { y.squeeze(2)? } else { y };
        match &bias {
            None => Ok(y),
            Some(b) => {
                let mut shape = vec![1usize; y.rank()];
                shape[1] = b.dim(0)?;
                y.broadcast_add(&b.reshape(shape.as_slice())?)
            }
        }
    }
}

struct Block {
    conv: Conv,
    bn: Option<BatchNorm>,
    pool: usize,
}

/// Max-pooling with window and stride `p` over the spatial dims of `[B, C, ...]`
/// (floor mode, as `nn.MaxPool1d/2d(p)`). Computed as a max over reshaped
/// windows, whose gradient goes to the maximum of each window.
fn max_pool(x: &Tensor, p: usize) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let mut x = x.clone();
    let mut out = Vec::with_capacity(dims.len() - 2);
    for (d, &n) in dims.iter().enumerate().skip(2) {
        let o = n / p;
        if o * p < n {
            x = x.narrow(d, 0, o * p)?;
        }
        out.push(o);
    }
    match out.as_slice() {
        [l] => max_first(&x.reshape((b, c, *l, p))?, 3),
        [h, w] => x
            .reshape((b, c, *h, p, *w, p))?
            .permute((0, 1, 2, 4, 3, 5))?
            .contiguous()?
            .reshape((b, c, *h, *w, p * p))
            .and_then(|t| max_first(&t, 4)),
        _ => candle_core::bail!("max-pooling takes [B, C, L] or [B, C, H, W]"),
    }
}

/// A `cnn` or `cnn1d`.
pub struct ConvNet {
    spec: CnnSpec,
    blocks: Vec<Block>,
    fc: Vec<Dense>,
    head: Dense,
}

impl ConvNet {
    /// Builds the network under `vb` (`features.N.*`, `head.*`).
    pub fn new(spec: &CnnSpec, vb: VarBuilder) -> candle_core::Result<Self> {
        let dims = spec.input_size.len();
        if !(dims == 1 || dims == 2) {
            candle_core::bail!("a conv net takes [C, L] or [C, H, W] samples");
        }
        let mut width = spec.features_out().map_err(candle_core::Error::msg)?;
        let fv = vb.pp("features");
        let mut cin = spec.in_channels;
        let mut blocks = Vec::with_capacity(spec.blocks.len());
        for (i, b) in spec.blocks.iter().enumerate() {
            let bv = fv.pp(i.to_string());
            let conv = Conv::new(dims, cin, b, bv.pp("conv"))?;
            let bn = if b.batch_norm {
                Some(BatchNorm::new(b.out_channels, bv.pp("bn"))?)
            } else {
                None
            };
            blocks.push(Block {
                conv,
                bn,
                pool: b.pool,
            });
            cin = b.out_channels;
        }
        let lv = vb.pp("fc");
        let mut fc = Vec::with_capacity(spec.hidden.len());
        for (i, &h) in spec.hidden.iter().enumerate() {
            fc.push(linear(width, h, lv.pp(i.to_string()))?);
            width = h;
        }
        let head = linear(width, spec.num_classes, vb.pp("head"))?;
        Ok(Self {
            spec: spec.clone(),
            blocks,
            fc,
            head,
        })
    }
}

impl Classifier for ConvNet {
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let mut shape = vec![b, self.spec.in_channels];
        shape.extend_from_slice(&self.spec.input_size);
        let mut x = x.reshape(shape.as_slice())?;
        let two_d = self.spec.input_size.len() == 2;
        let relu = self.spec.activation == Activation::Relu;
        for block in &self.blocks {
            if block.bn.is_none() && relu && block.pool > 1 {
                if let Some(y) = block.conv.forward_relu_pool(&x, block.pool, ctx)? {
                    x = y;
                    continue;
                }
            }
            x = block.conv.forward(&x, ctx)?;
            if let Some(bn) = &block.bn {
                x = bn.forward(&x, ctx)?;
            }
            if block.pool > 1 && kernels::on_cpu_f32(&[&x]) {
                // ReLU and max-pool as one kernel on the CPU (same values and gradients).
                if !relu {
                    x = self.spec.activation.apply(&x)?;
                }
                x = if two_d {
                    kernels::max_pool2d(&x, block.pool, relu)?
                } else {
                    kernels::max_pool1d(&x, block.pool, relu)?
                };
                continue;
            }
            x = self.spec.activation.apply(&x)?;
            if block.pool > 1 {
                x = max_pool(&x, block.pool)?;
            }
        }
        let mut x = if self.spec.flatten {
            x.flatten_from(1)?
        } else if two_d {
            x.mean((2, 3))?
        } else {
            x.mean(2)?
        };
        for fc in &self.fc {
            x = ctx.dropout(&x, self.spec.dropout)?;
            x = fc.forward_activated(&x, self.spec.activation)?;
        }
        let x = ctx.dropout(&x, self.spec.dropout)?;
        self.head.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Model, ModelSpec};
    use super::*;
    use candle_core::{DType, Device};

    fn block(out: usize, bn: bool, pool: usize) -> ConvBlockSpec {
        ConvBlockSpec {
            out_channels: out,
            kernel_size: 3,
            stride: 1,
            padding: 1,
            batch_norm: bn,
            pool,
        }
    }

    #[test]
    fn names_shapes_and_output() {
        let spec = CnnSpec {
            in_channels: 3,
            input_size: vec![8, 10],
            blocks: vec![block(4, true, 2), block(5, false, 2)],
            num_classes: 3,
            activation: Activation::Relu,
            dropout: 0.0,
            flatten: false,
            hidden: Vec::new(),
        };
        assert_eq!(spec.feature_sizes().unwrap(), vec![vec![4, 5], vec![2, 2]]);
        let m = Model::new(ModelSpec::Cnn(spec), 1, &Device::Cpu).unwrap();
        let names: Vec<(String, Vec<usize>)> = m
            .params
            .state_dict()
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("features.0.bn.bias".into(), vec![4]),
                ("features.0.bn.num_batches_tracked".into(), vec![]),
                ("features.0.bn.running_mean".into(), vec![4]),
                ("features.0.bn.running_var".into(), vec![4]),
                ("features.0.bn.weight".into(), vec![4]),
                ("features.0.conv.weight".into(), vec![4, 3, 3, 3]),
                ("features.1.conv.bias".into(), vec![5]),
                ("features.1.conv.weight".into(), vec![5, 4, 3, 3]),
                ("head.bias".into(), vec![3]),
                ("head.weight".into(), vec![3, 5]),
            ]
        );
        // Buffers are not trainable.
        assert!(m
            .params
            .trainable()
            .iter()
            .all(|(n, _)| !n.contains("running")));
        let x = Tensor::ones((2, 3, 8, 10), DType::F32, &Device::Cpu).unwrap();
        let y = m.forward(&x, &mut ForwardCtx::eval()).unwrap();
        assert_eq!(y.dims(), &[2, 3]);
    }

    #[test]
    fn flatten_head_with_hidden_layers() {
        let spec = CnnSpec {
            in_channels: 3,
            input_size: vec![8, 8],
            blocks: vec![block(4, false, 2), block(6, false, 2)],
            num_classes: 5,
            activation: Activation::Relu,
            dropout: 0.0,
            flatten: true,
            hidden: vec![7],
        };
        assert_eq!(spec.features_out().unwrap(), 6 * 2 * 2);
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<CnnSpec>(&json).unwrap(), spec);
        let m = Model::new(ModelSpec::Cnn(spec), 1, &Device::Cpu).unwrap();
        let shapes: Vec<(String, Vec<usize>)> = m
            .params
            .state_dict()
            .into_iter()
            .filter(|(n, _)| !n.starts_with("features"))
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect();
        assert_eq!(
            shapes,
            vec![
                ("fc.0.bias".into(), vec![7]),
                ("fc.0.weight".into(), vec![7, 24]),
                ("head.bias".into(), vec![5]),
                ("head.weight".into(), vec![5, 7]),
            ]
        );
        let x = Tensor::ones((2, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let y = m.forward(&x, &mut ForwardCtx::eval()).unwrap();
        assert_eq!(y.dims(), &[2, 5]);
        // Specs without the new fields (older checkpoints) still read.
        let old = r#"{"in_channels":1,"input_size":[4],"blocks":[],"num_classes":2}"#;
        let s: CnnSpec = serde_json::from_str(old).unwrap();
        assert!(!s.flatten && s.hidden.is_empty());
    }

    #[test]
    fn one_d_takes_flat_signals() {
        let spec = CnnSpec {
            in_channels: 1,
            input_size: vec![12],
            blocks: vec![block(4, true, 2)],
            num_classes: 2,
            activation: Activation::Relu,
            dropout: 0.0,
            flatten: false,
            hidden: Vec::new(),
        };
        let m = Model::new(ModelSpec::Cnn1d(spec), 1, &Device::Cpu).unwrap();
        let x = Tensor::ones((3, 12), DType::F32, &Device::Cpu).unwrap();
        let y = m.forward(&x, &mut ForwardCtx::train(1)).unwrap();
        assert_eq!(y.dims(), &[3, 2]);
    }

    #[test]
    fn frozen_features_compute_no_gradient() {
        let spec = CnnSpec {
            in_channels: 1,
            input_size: vec![6, 6],
            blocks: vec![block(3, true, 2), block(4, false, 1)],
            num_classes: 2,
            activation: Activation::Relu,
            dropout: 0.0,
            flatten: false,
            hidden: Vec::new(),
        };
        let m = Model::new(ModelSpec::Cnn(spec), 1, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1., (4, 1, 6, 6), &Device::Cpu).unwrap();
        let mut ctx = ForwardCtx::train(0).with_frozen(vec!["features.*".into()]);
        let y = m.forward(&x, &mut ctx).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in m.params.trainable() {
            let g = grads.get(var.as_tensor());
            assert_eq!(g.is_some(), name.starts_with("head."), "{name}");
        }
    }

    #[test]
    fn too_small_inputs_are_refused_with_the_block() {
        let spec = CnnSpec {
            in_channels: 1,
            input_size: vec![4, 4],
            blocks: vec![block(4, true, 2), block(4, true, 2), block(4, true, 2)],
            num_classes: 2,
            activation: Activation::Relu,
            dropout: 0.0,
            flatten: false,
            hidden: Vec::new(),
        };
        let e = spec.feature_sizes().unwrap_err();
        assert!(e.contains("block 2"), "{e}");
    }
}
