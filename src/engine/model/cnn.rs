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
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::error::{KeyError, KeyProblem, ModelError, SpecError};
use super::layers::{
    conv, linear, Activation, BatchNorm, Conv, ConvConfig, Dropout, Linear, MaxPool, PoolConfig,
};
use super::registry::Common;
use super::split::{self, SplitPoint, Staged};
use super::{Classifier, ForwardCtx};
use crate::engine::budget::{linear_params, n, product, sum, Footprint};
use crate::engine::export::layers::{self as onnx, Emit};
use crate::engine::export::{ExportError, Graph};

/// Dropout when `model.dropout` is not set.
pub const DEFAULT_DROPOUT: f64 = 0.0;

/// A conv-block setting: one value for every block, or a list with one per block.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The values as a list (one value, or one per block).
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            PerBlock::One(v) => vec![v.clone()],
            PerBlock::Each(v) => v.clone(),
        }
    }
}

/// The `[model]` keys of `cnn` and `cnn1d`. Every per-block key holds one
/// value (for every block) or one value per block.
///
/// The spec's `flatten` and `hidden` (a flattened feature map and hidden
/// fully-connected layers before the head) are not config keys: they are
/// the `edge-trainer bench` CNN's, and are read from checkpoints that have them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct CnnConfig {
    /// Output channels of each conv block (one block per entry).
    pub conv_channels: Vec<usize>,
    /// Kernel size, one for all blocks or one per block.
    pub kernel_size: PerBlock<usize>,
    /// Convolution stride.
    pub stride: PerBlock<usize>,
    /// Zero padding; unset: `kernel_size / 2` ("same" for odd kernels).
    pub padding: Option<PerBlock<usize>>,
    /// Batch-norm after each convolution.
    pub batch_norm: PerBlock<bool>,
    /// Max-pool window after each block (1: no pooling).
    pub pool: PerBlock<usize>,
}

impl Default for CnnConfig {
    fn default() -> Self {
        Self {
            conv_channels: vec![16, 32],
            kernel_size: PerBlock::One(3),
            stride: PerBlock::One(1),
            padding: None,
            batch_norm: PerBlock::One(true),
            pool: PerBlock::One(2),
        }
    }
}

impl CnnConfig {
    /// Checks the keys on their own.
    pub fn validate(&self) -> Result<(), KeyError> {
        if self.conv_channels.is_empty() || self.conv_channels.contains(&0) {
            return Err(KeyError::new("model.conv_channels", KeyProblem::NoChannels));
        }
        for (key, values) in [
            ("model.kernel_size", self.kernel_size.to_vec()),
            ("model.stride", self.stride.to_vec()),
            ("model.pool", self.pool.to_vec()),
        ] {
            if values.is_empty() || values.contains(&0) {
                return Err(KeyError::new(key, KeyProblem::ZeroValue));
            }
        }
        Ok(())
    }

    /// Checks that every per-block list has one value or one per block.
    pub fn check_blocks(&self) -> Result<(), KeyError> {
        let blocks = self.conv_channels.len();
        if blocks == 0 {
            return Err(KeyError::new("model.conv_channels", KeyProblem::NoBlocks));
        }
        let lens = [
            ("model.kernel_size", self.kernel_size.to_vec().len()),
            ("model.stride", self.stride.to_vec().len()),
            (
                "model.padding",
                self.padding.as_ref().map_or(1, |p| p.to_vec().len()),
            ),
            ("model.batch_norm", self.batch_norm.to_vec().len()),
            ("model.pool", self.pool.to_vec().len()),
        ];
        match lens.iter().find(|(_, n)| *n != 1 && *n != blocks) {
            Some((key, n)) => Err(KeyError::new(
                key,
                KeyProblem::PerBlockLength { got: *n, blocks },
            )),
            None => Ok(()),
        }
    }

    /// The blocks, each per-block value expanded.
    pub fn blocks(&self) -> Result<Vec<ConvBlockSpec>, KeyError> {
        self.check_blocks()?;
        let n = self.conv_channels.len();
        let at = |v: Vec<usize>, i: usize| if v.len() == 1 { v[0] } else { v[i] };
        let (kernel, stride, pool) = (
            self.kernel_size.to_vec(),
            self.stride.to_vec(),
            self.pool.to_vec(),
        );
        let padding = self.padding.as_ref().map(PerBlock::to_vec);
        let bn = self.batch_norm.to_vec();
        Ok((0..n)
            .map(|i| {
                let k = at(kernel.clone(), i);
                ConvBlockSpec {
                    out_channels: self.conv_channels[i],
                    kernel_size: k,
                    stride: at(stride.clone(), i),
                    padding: padding.clone().map_or(k / 2, |p| at(p, i)),
                    batch_norm: if bn.len() == 1 { bn[0] } else { bn[i] },
                    pool: at(pool.clone(), i),
                }
            })
            .collect())
    }

    /// The spec of `arch` (`spatial_dims` 2 for `cnn`, 1 for `cnn1d`) for
    /// samples of `sample_shape`; the error says why it does not fit.
    pub fn resolve(
        &self,
        arch: &'static str,
        spatial_dims: usize,
        common: &Common,
        sample_shape: &[usize],
    ) -> Result<CnnSpec, ModelError> {
        let (in_channels, input_size) = if sample_shape.len() == spatial_dims {
            (1, sample_shape.to_vec())
        } else if sample_shape.len() == spatial_dims + 1 {
            (sample_shape[0], sample_shape[1..].to_vec())
        } else {
            return Err(ModelError::SampleShape {
                arch,
                spatial_dims,
                shape: sample_shape.to_vec(),
            });
        };
        let spec = CnnSpec {
            in_channels,
            input_size,
            blocks: self.blocks()?,
            num_classes: common.num_classes,
            activation: common.activation,
            dropout: common.dropout,
            flatten: false,
            hidden: Vec::new(),
        };
        spec.feature_sizes()
            .map_err(|source| ModelError::Spec { arch, source })?;
        Ok(spec)
    }
}

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
    /// global average. Not a config key: set by `edge-trainer bench`'s CNN
    /// (and kept by checkpoints that have it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flatten: bool,
    /// Widths of hidden fully-connected layers (each followed by the
    /// activation) between the features and the head. Not a config key, as
    /// `flatten`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<usize>,
}

impl CnnSpec {
    /// Width of the features entering the fully-connected part.
    pub fn features_out(&self) -> Result<usize, SpecError> {
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
    pub fn feature_sizes(&self) -> Result<Vec<Vec<usize>>, SpecError> {
        if self.blocks.is_empty() {
            return Err(SpecError::NoConvBlocks);
        }
        let mut size = self.input_size.clone();
        let mut out = Vec::with_capacity(self.blocks.len());
        for (i, b) in self.blocks.iter().enumerate() {
            if b.out_channels == 0 || b.kernel_size == 0 || b.stride == 0 || b.pool == 0 {
                return Err(SpecError::ZeroBlockSize { block: i });
            }
            for n in size.iter_mut() {
                let padded = *n + 2 * b.padding;
                if padded < b.kernel_size {
                    return Err(SpecError::ShapeTooSmall {
                        block: i,
                        input: self.input_size.clone(),
                        padded,
                        kernel: b.kernel_size,
                    });
                }
                let conv = (padded - b.kernel_size) / b.stride + 1;
                if conv < b.pool {
                    return Err(SpecError::PoolTooLarge {
                        block: i,
                        size: conv,
                        pool: b.pool,
                        input: self.input_size.clone(),
                    });
                }
                *n = conv / b.pool;
            }
            out.push(size.clone());
        }
        Ok(out)
    }
}

impl CnnConfig {
    /// The spec of a `spatial_dims`-D net for samples of `sample_shape`
    /// (`[C, ...]`), without checking that the input is large enough: for
    /// estimating the footprint before the data is known.
    pub fn sketch(
        &self,
        spatial_dims: usize,
        common: &Common,
        sample_shape: &[usize],
    ) -> Result<CnnSpec, KeyError> {
        let (in_channels, input_size) = match sample_shape.split_first() {
            Some((&c, rest)) if rest.len() == spatial_dims => (c, rest.to_vec()),
            _ => (1, vec![1; spatial_dims]),
        };
        Ok(CnnSpec {
            in_channels,
            input_size,
            blocks: self.blocks()?,
            num_classes: common.num_classes,
            activation: common.activation,
            dropout: common.dropout,
            flatten: false,
            hidden: Vec::new(),
        })
    }
}

impl CnnSpec {
    /// Config keys that size the parameters.
    pub const PARAM_KEYS: &'static [&'static str] = &["model.conv_channels", "model.kernel_size"];
    /// Config keys that size the activations.
    pub const ACTIVATION_KEYS: &'static [&'static str] = &[
        "model.conv_channels",
        "model.padding",
        "model.stride",
        "model.pool",
    ];

    /// Parameters and per-sample activations (see [`Footprint`]); sizes that
    /// run out of input count as zero instead of failing.
    pub fn footprint(&self) -> Footprint {
        let dims = self.input_size.len() as u32;
        let mut size: Vec<u64> = self.input_size.iter().map(|&v| n(v)).collect();
        let mut cin = n(self.in_channels);
        let (mut params, mut buffers, mut activations) = (0u64, 0u64, 0u64);
        for b in &self.blocks {
            let (k, s, p, pool) = (
                n(b.kernel_size),
                n(b.stride).max(1),
                n(b.padding),
                n(b.pool).max(1),
            );
            let cout = n(b.out_channels);
            let window = k.saturating_pow(dims);
            let padded: Vec<u64> = size
                .iter()
                .map(|&v| v.saturating_add(p.saturating_mul(2)))
                .collect();
            let conv: Vec<u64> = padded
                .iter()
                .map(|&v| if v >= k { (v - k) / s + 1 } else { 0 })
                .collect();
            let pooled: Vec<u64> = conv.iter().map(|&v| v / pool).collect();
            let (conv_n, pooled_n) = (
                product(conv.iter().copied()),
                product(pooled.iter().copied()),
            );
            let conv_params = cout.saturating_mul(cin).saturating_mul(window);
            params = sum([
                params,
                conv_params,
                if b.batch_norm { 2 * cout } else { cout },
            ]);
            if b.batch_norm {
                buffers = sum([buffers, 2 * cout, 1]);
            }
            // Outputs of the convolution, the batch-norm and the activation.
            let maps = 2 + u64::from(b.batch_norm);
            activations = sum([
                activations,
                // The padded input and its unfolded windows.
                cin.saturating_mul(product(padded.iter().copied())),
                cin.saturating_mul(window).saturating_mul(conv_n),
                cout.saturating_mul(conv_n).saturating_mul(maps),
                // The pooled map and where each maximum came from.
                if b.pool > 1 {
                    cout.saturating_mul(pooled_n).saturating_mul(2)
                } else {
                    0
                },
            ]);
            size = if b.pool > 1 { pooled } else { conv };
            cin = cout;
        }
        let mut width = if self.flatten {
            cin.saturating_mul(product(size.iter().copied()))
        } else {
            activations = activations.saturating_add(cin);
            cin
        };
        let per_layer = if self.dropout > 0.0 { 4 } else { 2 };
        for &h in &self.hidden {
            let h = n(h);
            params = params.saturating_add(linear_params(width, h));
            activations = activations.saturating_add(h.saturating_mul(per_layer));
            width = h;
        }
        let classes = n(self.num_classes);
        params = params.saturating_add(linear_params(width, classes));
        activations = sum([
            activations,
            width.saturating_mul(2),
            classes.saturating_mul(3),
        ]);
        Footprint {
            params,
            buffers,
            input: n(self.in_channels)
                .saturating_mul(product(self.input_size.iter().map(|&v| n(v)))),
            activations,
            activation_bound: false,
        }
        .finish()
    }
}

struct Block {
    conv: Conv,
    bn: Option<BatchNorm>,
    /// Max-pool after the activation (`None` for pool 1).
    pool: Option<MaxPool>,
}

/// The network of `spec`, which must have `spatial_dims` spatial dims (2 for
/// `cnn`, 1 for `cnn1d`).
pub fn build(spec: &CnnSpec, spatial_dims: usize, vb: VarBuilder) -> candle_core::Result<ConvNet> {
    if spec.input_size.len() != spatial_dims {
        candle_core::bail!(
            "{} takes samples of {} but the spec has input size {:?}",
            if spatial_dims == 2 { "cnn" } else { "cnn1d" },
            if spatial_dims == 2 {
                "[C, H, W]"
            } else {
                "[C, L]"
            },
            spec.input_size
        );
    }
    ConvNet::new(spec, vb)
}

/// A `cnn` or `cnn1d`.
pub struct ConvNet {
    spec: CnnSpec,
    blocks: Vec<Block>,
    fc: Vec<Linear>,
    head: Linear,
    dropout: Dropout,
}

impl ConvNet {
    /// Builds the network under `vb` (`features.N.*`, `head.*`).
    pub fn new(spec: &CnnSpec, vb: VarBuilder) -> candle_core::Result<Self> {
        let dims = spec.input_size.len();
        if !(dims == 1 || dims == 2) {
            candle_core::bail!("a conv net takes [C, L] or [C, H, W] samples");
        }
        let mut width = spec.features_out().map_err(candle_core::Error::wrap)?;
        let fv = vb.pp("features");
        let mut cin = spec.in_channels;
        let mut blocks = Vec::with_capacity(spec.blocks.len());
        for (i, b) in spec.blocks.iter().enumerate() {
            let bv = fv.pp(i.to_string());
            let cfg = ConvConfig {
                stride: b.stride,
                padding: b.padding,
                ..ConvConfig::default()
            };
            let conv = conv(
                dims,
                (cin, b.out_channels),
                b.kernel_size,
                cfg,
                !b.batch_norm,
                bv.pp("conv"),
            )?;
            let bn = if b.batch_norm {
                Some(BatchNorm::new(b.out_channels, bv.pp("bn"))?)
            } else {
                None
            };
            let pool = if b.pool > 1 {
                Some(MaxPool::new(PoolConfig::tiling(b.pool))?)
            } else {
                None
            };
            blocks.push(Block { conv, bn, pool });
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
            dropout: Dropout::new(spec.dropout),
        })
    }
}

impl Staged for ConvNet {
    /// Stage boundaries: 0 the input, `i + 1` after conv block `features.i`,
    /// `B + 1` after flattening (or global pooling), `B + 2 + j` after hidden
    /// layer `fc.j`, then the logits (dropout and `head`).
    fn stage_count(&self) -> usize {
        self.blocks.len() + self.fc.len() + 2
    }

    /// A point after a hidden layer is listed only without dropout (dropout
    /// precedes each).
    fn cuts(&self) -> Vec<(usize, SplitPoint)> {
        let (nb, nf) = (self.blocks.len(), self.fc.len());
        let mut out = Vec::new();
        let fc_from = |j: usize| {
            (j..nf)
                .map(|k| format!("fc.{k}."))
                .chain(["head.".to_string()])
        };
        // After the last block comes `pooled` (the same parameters after it).
        for i in 0..nb.saturating_sub(1) {
            let rest = (i + 1..nb).map(|k| format!("features.{k}."));
            out.push((
                i + 1,
                SplitPoint::new(format!("features.{i}"), rest.chain(fc_from(0))),
            ));
        }
        out.push((nb + 1, SplitPoint::new("pooled", fc_from(0))));
        if self.dropout.p <= 0.0 {
            for j in 0..nf {
                out.push((
                    nb + 2 + j,
                    SplitPoint::new(format!("fc.{j}"), fc_from(j + 1)),
                ));
            }
        }
        out
    }

    /// The input batch as `[B, C, ...input_size]`.
    fn input(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut shape = vec![x.dim(0)?, self.spec.in_channels];
        shape.extend_from_slice(&self.spec.input_size);
        x.reshape(shape.as_slice())
    }

    /// Stage `s` of the forward pass (see [`Self::stage_count`]).
    fn stage(&self, s: usize, x: Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        let nb = self.blocks.len();
        let act = self.spec.activation;
        if let Some(block) = self.blocks.get(s) {
            if let (None, Activation::Relu, Some(pool)) = (&block.bn, act, &block.pool) {
                // Convolution, ReLU and max-pool as one kernel where it applies.
                if let Some(y) = block.conv.forward_relu_pool(&x, pool, ctx)? {
                    return Ok(y);
                }
            }
            let mut x = block.conv.forward(&x, ctx)?;
            if let Some(bn) = &block.bn {
                x = bn.forward(&x, ctx)?;
            }
            return match (&block.pool, act) {
                // ReLU and max-pool as one kernel on the CPU (same values and gradients).
                (Some(pool), Activation::Relu) => pool.forward_relu(&x, ctx),
                (Some(pool), act) => pool.forward(&act.apply(&x)?, ctx),
                (None, act) => act.apply(&x),
            };
        }
        if s == nb {
            return if self.spec.flatten {
                x.flatten_from(1)
            } else if self.spec.input_size.len() == 2 {
                x.mean((2, 3))
            } else {
                x.mean(2)
            };
        }
        let x = self.dropout.forward(&x, ctx)?;
        match self.fc.get(s - nb - 1) {
            Some(fc) => fc.forward_activated(&x, act, ctx),
            None => self.head.forward(&x, ctx),
        }
    }
}

impl Classifier for ConvNet {
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        split::forward(self, x, ctx)
    }

    fn staged(&self) -> Option<&dyn Staged> {
        Some(self)
    }

    fn export_onnx(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let dims = self.spec.input_size.len();
        let mut shape = vec![self.spec.in_channels];
        shape.extend_from_slice(&self.spec.input_size);
        let mut x = if g.sample_shape() == shape.as_slice() {
            x.to_string()
        } else {
            onnx::reshape(g, x, &shape)
        };
        let act = self.spec.activation;
        for block in &self.blocks {
            x = block.conv.emit(g, &x)?;
            if let Some(bn) = &block.bn {
                x = bn.emit(g, &x)?;
            }
            x = onnx::activation(g, act, &x);
            if let Some(pool) = &block.pool {
                x = onnx::max_pool(g, pool, dims, &x);
            }
        }
        x = if self.spec.flatten {
            onnx::flatten(g, &x)
        } else {
            onnx::global_avg_pool(g, &x)
        };
        for fc in &self.fc {
            x = fc.emit(g, &x)?;
            x = onnx::activation(g, act, &x);
        }
        self.head.emit(g, &x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{Model, ModelSpec};
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

    /// Two blocks over 3x8x10 images (the second without batch-norm), 3 classes.
    fn two_block_spec() -> CnnSpec {
        CnnSpec {
            in_channels: 3,
            input_size: vec![8, 10],
            blocks: vec![block(4, true, 2), block(5, false, 2)],
            num_classes: 3,
            activation: Activation::Relu,
            dropout: 0.0,
            flatten: false,
            hidden: Vec::new(),
        }
    }

    #[test]
    fn names_shapes_and_output() {
        let spec = two_block_spec();
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
    fn footprint_counts_the_real_parameters_and_bounds_the_activations() {
        let spec = two_block_spec();
        let fp = spec.footprint();
        let m = Model::new(ModelSpec::Cnn(spec.clone()), 1, &Device::Cpu).unwrap();
        let count = |buffers: bool| -> u64 {
            m.params
                .state_dict()
                .iter()
                .filter(|(n, _)| {
                    let buffer = n.contains("running") || n.contains("num_batches");
                    buffer == buffers
                })
                .map(|(_, t)| t.elem_count() as u64)
                .sum()
        };
        assert_eq!(fp.params, count(false));
        assert_eq!(fp.buffers, count(true));
        // What a forward keeps per sample: the conv, batch-norm and ReLU maps
        // of block 0 (4 x 8 x 10 each), its pooled map (4 x 4 x 5), block 1's
        // conv and ReLU maps (5 x 4 x 5) and pooled map (5 x 2 x 2), the
        // unfolded windows (27 x 80, 36 x 20), the features and the logits.
        let kept = 3 * 320 + 80 + 2 * 100 + 20 + 27 * 80 + 36 * 20 + 5 + 3;
        assert!(fp.activations >= kept, "{} < {kept}", fp.activations);
        assert!(
            fp.activations <= 3 * kept,
            "{} > 3 * {kept}",
            fp.activations
        );
        assert_eq!(fp.input, 3 * 8 * 10);
        // Padding far beyond the input grows the activations, not the parameters.
        let mut padded = spec.clone();
        padded.input_size = vec![1];
        padded.blocks = vec![ConvBlockSpec {
            padding: 1_000_000,
            ..block(16, true, 2)
        }];
        let fp = padded.footprint();
        assert!(fp.activation_bound && fp.activations > 16 * 2_000_000 * 3);
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
        assert!(
            matches!(
                e,
                SpecError::ShapeTooSmall { block: 2, .. }
                    | SpecError::PoolTooLarge { block: 2, .. }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("block 2"), "{e}");
    }
}
