//! `resnet18` and `resnet34`: torchvision's ResNet with `BasicBlock`s, with
//! its exact `state_dict` (names, shapes, batch-norm buffers), so that
//! `torchvision.models.resnet18(weights=...).state_dict()` saved with
//! safetensors is a valid `model.init`, and a checkpoint loads back into
//! torchvision with `load_state_dict(strict=True)`.
//!
//! Layout (torchvision's `ResNet.forward`): `conv1` (7x7, stride 2, padding
//! 3, no bias), `bn1`, ReLU, max-pool (3x3, stride 2, padding 1); four stages
//! `layer1..layer4` of 2, 2, 2, 2 (resnet18) or 3, 4, 6, 3 (resnet34) blocks
//! with 1, 2, 4 and 8 times `model.base_width` channels (64 in torchvision),
//! stages 2 to 4 starting with stride 2; global average pooling, optional
//! dropout (`model.dropout`, default 0 as torchvision) and `fc`. A block
//! `layer{s}.{i}` is `conv1` (3x3, the stage's stride), `bn1`, ReLU, `conv2`
//! (3x3), `bn2`, plus the shortcut: the input, or for the first block of
//! stages 2 to 4 `downsample.0` (1x1 conv, stride 2) and `downsample.1`
//! (batch-norm); then ReLU of the sum.
//!
//! `model.base_width` other than 64 keeps every name and changes only the
//! widths: it exists for small test fixtures and tiny models (torchvision's
//! own `BasicBlock` refuses other widths; the twin in
//! `scripts/pytorch_twins.py` builds them with the same module tree).

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::backbone::{BackboneConfig, Tally, CONV_INIT};
use super::error::{KeyError, KeyProblem};
use super::layers::batchnorm::BnAct;
use super::layers::conv_bn_chain::{self, ChainPart, Join};
use super::layers::{
    conv_with_init, linear, BatchNorm, Conv, ConvConfig, Dropout, GlobalAvgPool, Linear, MaxPool,
    PoolConfig, Residual,
};
use super::registry::Common;
use super::split::{self, SplitPoint, Staged};
use super::{Classifier, ForwardCtx};
use crate::engine::budget::{n, product, Footprint};
use crate::engine::export::layers::{self as onnx, Emit};
use crate::engine::export::{ExportError, Graph};

/// Dropout before `fc` when `model.dropout` is not set (torchvision has none).
pub const DEFAULT_DROPOUT: f64 = 0.0;

/// torchvision's stem and first-stage width.
pub const TORCHVISION_WIDTH: usize = 64;

/// The `[model]` keys of `resnet18` and `resnet34`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResNetConfig {
    /// Channels of the stem and the first stage (`model.base_width`); the
    /// stages have 1, 2, 4 and 8 times as many. 64 is torchvision's (and
    /// what its ImageNet weights need); smaller values are for tests and
    /// tiny models.
    pub base_width: usize,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        Self {
            base_width: TORCHVISION_WIDTH,
        }
    }
}

impl ResNetConfig {
    /// Checks the keys on their own.
    pub fn validate(&self) -> Result<(), KeyError> {
        if self.base_width == 0 {
            return Err(KeyError::new("model.base_width", KeyProblem::Zero));
        }
        Ok(())
    }
}

impl BackboneConfig for ResNetConfig {
    type Spec = ResNetSpec;

    fn spec(&self, common: &Common, in_channels: usize, input_size: [usize; 2]) -> ResNetSpec {
        ResNetSpec {
            in_channels,
            input_size,
            base_width: self.base_width,
            num_classes: common.num_classes,
            dropout: common.dropout,
        }
    }
}

/// Sizes of a `resnet18` or `resnet34` (the depth is the architecture's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetSpec {
    /// Channels of one sample (3 for RGB, 1 for grayscale).
    pub in_channels: usize,
    /// `[H, W]` of one sample (any size: the head pools globally).
    pub input_size: [usize; 2],
    /// Channels of the stem and first stage (64 in torchvision).
    pub base_width: usize,
    pub num_classes: usize,
    #[serde(default)]
    pub dropout: f64,
}

/// Blocks per stage of resnet18.
pub const RESNET18_BLOCKS: [usize; 4] = [2, 2, 2, 2];
/// Blocks per stage of resnet34.
pub const RESNET34_BLOCKS: [usize; 4] = [3, 4, 6, 3];

impl ResNetSpec {
    /// Config keys that size the parameters and the activations.
    pub const SIZE_KEYS: &'static [&'static str] = &["model.base_width"];

    /// The stages' names, first to last (`model.finetune = "last:N"`).
    pub const STAGES: [&'static str; 4] = ["layer1", "layer2", "layer3", "layer4"];

    /// Parameters and per-sample activations of the network with `blocks`
    /// blocks per stage (see [`Footprint`]).
    pub fn footprint(&self, blocks: &[usize; 4]) -> Footprint {
        let mut t = Tally::new(self.in_channels, self.input_size);
        let w = self.base_width;
        t.conv(w, 7, 2, 3, 1);
        t.batch_norm();
        t.elementwise(1);
        t.max_pool(3, 2, 1);
        for (stage, &count) in blocks.iter().enumerate() {
            let planes = w.saturating_mul(1 << stage);
            for i in 0..count {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let shortcut = stride != 1 || t.channels != n(planes);
                let before = t;
                t.conv(planes, 3, stride, 1, 1);
                t.batch_norm();
                t.elementwise(1);
                t.conv(planes, 3, 1, 1, 1);
                t.batch_norm();
                if shortcut {
                    let mut s = before;
                    s.activations = 0;
                    s.conv(planes, 1, stride, 0, 1);
                    s.batch_norm();
                    t.params = t.params.saturating_add(s.params - before.params);
                    t.buffers = t.buffers.saturating_add(s.buffers - before.buffers);
                    t.activations = t.activations.saturating_add(s.activations);
                }
                // The sum and its ReLU.
                t.elementwise(2);
            }
        }
        t.head(self.num_classes, self.dropout > 0.0);
        Footprint {
            params: t.params,
            buffers: t.buffers,
            input: n(self.in_channels).saturating_mul(product(self.input_size.map(n))),
            activations: t.activations,
            activation_bound: false,
        }
        .finish()
    }
}

/// A conv followed by its batch-norm (`conv1`/`bn1`, `downsample.0`/`.1`).
struct ConvBn {
    conv: Conv,
    bn: BatchNorm,
}

impl ConvBn {
    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        self.bn.forward(&self.conv.forward(x, ctx)?, ctx)
    }

    /// The conv and batch-norm as ONNX nodes (evaluation mode).
    fn emit(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let y = self.conv.emit(g, x)?;
        self.bn.emit(g, &y)
    }

    /// The pair as a unit of a fused chain, `act` after it.
    fn part(&self, act: BnAct) -> ChainPart<'_> {
        ChainPart {
            conv: &self.conv,
            bn: &self.bn,
            act,
        }
    }

    /// `relu(forward(x))`, the ReLU fused into the batch-norm.
    fn forward_relu(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        self.bn
            .forward_act(&self.conv.forward(x, ctx)?, BnAct::Relu, ctx)
    }
}

fn conv_bn(
    (cin, cout): (usize, usize),
    k: usize,
    stride: usize,
    conv_vb: VarBuilder,
    bn_vb: VarBuilder,
) -> candle_core::Result<ConvBn> {
    let cfg = ConvConfig {
        stride,
        padding: k / 2,
        ..ConvConfig::default()
    };
    Ok(ConvBn {
        conv: conv_with_init(2, (cin, cout), k, cfg, None, CONV_INIT, conv_vb)?,
        bn: BatchNorm::new(cout, bn_vb)?,
    })
}

/// torchvision's `BasicBlock`.
struct BasicBlock {
    first: ConvBn,
    second: ConvBn,
    downsample: Option<ConvBn>,
    join: Residual,
}

impl BasicBlock {
    fn new(cin: usize, planes: usize, stride: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let first = conv_bn((cin, planes), 3, stride, vb.pp("conv1"), vb.pp("bn1"))?;
        let second = conv_bn((planes, planes), 3, 1, vb.pp("conv2"), vb.pp("bn2"))?;
        let downsample = if stride != 1 || cin != planes {
            let d = vb.pp("downsample");
            Some(conv_bn((cin, planes), 1, stride, d.pp("0"), d.pp("1"))?)
        } else {
            None
        };
        Ok(Self {
            first,
            second,
            downsample,
            join: Residual { relu: true },
        })
    }

    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let parts = [self.first.part(BnAct::Relu), self.second.part(BnAct::Relu)];
        let join = match &self.downsample {
            Some(d) => Join::Projected(&d.conv, &d.bn),
            None => Join::Identity,
        };
        if let Some(y) = conv_bn_chain::forward(x, &parts, join, ctx)? {
            return Ok(y);
        }
        let out = self.first.forward_relu(x, ctx)?;
        let out = self.second.forward(&out, ctx)?;
        let identity = match &self.downsample {
            Some(d) => d.forward(x, ctx)?,
            None => x.clone(),
        };
        self.join.forward(&out, &identity, ctx)
    }

    /// The block as ONNX nodes: `Relu(Add(second(Relu(first(x))), identity))`.
    fn emit(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let out = self.first.emit(g, x)?;
        let out = onnx::activation(g, crate::engine::model::layers::Activation::Relu, &out);
        let out = self.second.emit(g, &out)?;
        let identity = match &self.downsample {
            Some(d) => d.emit(g, x)?,
            None => x.to_string(),
        };
        let sum = onnx::add(g, &out, &identity);
        Ok(onnx::activation(
            g,
            crate::engine::model::layers::Activation::Relu,
            &sum,
        ))
    }
}

/// A `resnet18` or `resnet34`.
pub struct ResNet {
    spec: ResNetSpec,
    stem: ConvBn,
    pool: MaxPool,
    blocks: Vec<BasicBlock>,
    /// Blocks per stage (`layer1..layer4`).
    counts: [usize; 4],
    gap: GlobalAvgPool,
    dropout: Dropout,
    fc: Linear,
}

impl ResNet {
    /// Builds the network with `blocks` blocks per stage under `vb`, with
    /// torchvision's names and init (Kaiming-normal fan-out convolutions,
    /// batch-norm 1 and 0, `fc` as `nn.Linear`).
    pub fn new(
        spec: &ResNetSpec,
        blocks: &[usize; 4],
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let w = spec.base_width;
        if w == 0 || spec.in_channels == 0 {
            candle_core::bail!("resnet: base_width and in_channels must be >= 1");
        }
        let stem = conv_bn((spec.in_channels, w), 7, 2, vb.pp("conv1"), vb.pp("bn1"))?;
        let mut all = Vec::new();
        let mut cin = w;
        for (stage, &count) in blocks.iter().enumerate() {
            let planes = w * (1 << stage);
            let sv = vb.pp(format!("layer{}", stage + 1));
            for i in 0..count {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                all.push(BasicBlock::new(cin, planes, stride, sv.pp(i.to_string()))?);
                cin = planes;
            }
        }
        let fc = linear(cin, spec.num_classes, vb.pp("fc"))?;
        Ok(Self {
            spec: spec.clone(),
            stem,
            pool: MaxPool::new(PoolConfig {
                kernel: 3,
                stride: 2,
                padding: 1,
            })?,
            blocks: all,
            counts: *blocks,
            gap: GlobalAvgPool,
            dropout: Dropout::new(spec.dropout),
            fc,
        })
    }
}

/// Stage boundaries of the forward pass: 0 the input, 1 after the stem and
/// max-pool, 2..=5 after `layer1..layer4`, 6 after global pooling, 7 the logits.
const RESNET_LOGITS: usize = 7;

/// The split points (stage boundary, name) of a resnet.
const RESNET_POINTS: [(usize, &str); 5] = [
    (1, "stem"),
    (2, "layer1"),
    (3, "layer2"),
    (4, "layer3"),
    (6, "pool"),
];

impl Staged for ResNet {
    fn stage_count(&self) -> usize {
        RESNET_LOGITS
    }

    fn cuts(&self) -> Vec<(usize, SplitPoint)> {
        RESNET_POINTS
            .iter()
            .map(|&(b, name)| {
                let layers = (b..=4).map(|i| format!("layer{i}."));
                (b, SplitPoint::new(name, layers.chain(["fc.".to_string()])))
            })
            .collect()
    }

    /// Stage `s` of the forward pass (see [`RESNET_LOGITS`]).
    fn stage(&self, s: usize, x: Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        match s {
            0 => {
                let b = x.dim(0)?;
                let [h, w] = self.spec.input_size;
                let x = x.reshape((b, self.spec.in_channels, h, w))?;
                let stem = [self.stem.part(BnAct::Relu)];
                if let Some(y) =
                    conv_bn_chain::forward_pooled(&x, &stem, Join::None, Some(&self.pool), ctx)?
                {
                    return Ok(y);
                }
                let x = self.stem.forward(&x, ctx)?;
                self.pool.forward_relu(&x, ctx)
            }
            1..=4 => {
                let start: usize = self.counts[..s - 1].iter().sum();
                let mut x = x;
                for block in &self.blocks[start..start + self.counts[s - 1]] {
                    x = block.forward(&x, ctx)?;
                }
                Ok(x)
            }
            5 => self.gap.forward(&x, ctx),
            _ => {
                let x = self.dropout.forward(&x, ctx)?;
                self.fc.forward(&x, ctx)
            }
        }
    }
}

impl Classifier for ResNet {
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        split::forward(self, x, ctx)
    }

    fn staged(&self) -> Option<&dyn Staged> {
        Some(self)
    }

    fn export_onnx(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let [h, w] = self.spec.input_size;
        let shape = [self.spec.in_channels, h, w];
        let x = if g.sample_shape() == shape.as_slice() {
            x.to_string()
        } else {
            onnx::reshape(g, x, &shape)
        };
        let x = self.stem.emit(g, &x)?;
        let x = onnx::activation(g, crate::engine::model::layers::Activation::Relu, &x);
        let mut x = onnx::max_pool(g, &self.pool, 2, &x);
        for block in &self.blocks {
            x = block.emit(g, &x)?;
        }
        let x = onnx::global_avg_pool(g, &x);
        self.fc.emit(g, &x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{Model, ModelSpec};
    use candle_core::{DType, Device};

    fn spec(base_width: usize, size: [usize; 2]) -> ResNetSpec {
        ResNetSpec {
            in_channels: 3,
            input_size: size,
            base_width,
            num_classes: 5,
            dropout: 0.0,
        }
    }

    /// Full-width resnet18 has torchvision's 11,689,512 parameters (with
    /// 1000 classes) and its state_dict's 122 tensors.
    #[test]
    fn resnet18_has_torchvisions_state_dict() {
        let mut s = spec(64, [32, 32]);
        s.num_classes = 1000;
        let fp = s.footprint(&RESNET18_BLOCKS);
        assert_eq!(fp.params, 11_689_512);
        let m = Model::new(ModelSpec::Resnet18(s), 1, &Device::Cpu).unwrap();
        assert_eq!(m.params.num_params(), 11_689_512);
        let sd = m.params.state_dict();
        assert_eq!(sd.len(), 122);
        let buffers: u64 = sd
            .iter()
            .filter(|(n, _)| n.contains("running") || n.contains("num_batches"))
            .map(|(_, t)| t.elem_count() as u64)
            .sum();
        assert_eq!(fp.buffers, buffers);
        let dims = |name: &str| {
            sd.iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.dims().to_vec())
        };
        assert_eq!(dims("conv1.weight"), Some(vec![64, 3, 7, 7]));
        assert_eq!(dims("layer1.1.conv2.weight"), Some(vec![64, 64, 3, 3]));
        assert_eq!(
            dims("layer2.0.downsample.0.weight"),
            Some(vec![128, 64, 1, 1])
        );
        assert_eq!(dims("layer4.0.downsample.1.running_var"), Some(vec![512]));
        assert_eq!(dims("layer1.0.downsample.0.weight"), None);
        assert_eq!(dims("fc.weight"), Some(vec![1000, 512]));
    }

    #[test]
    fn resnet34_counts_and_any_input_size() {
        let mut s = spec(64, [32, 32]);
        s.num_classes = 1000;
        assert_eq!(s.footprint(&RESNET34_BLOCKS).params, 21_797_672);
        // A small width on odd, non-square grayscale input.
        let mut s = spec(4, [33, 41]);
        s.in_channels = 1;
        let m = Model::new(ModelSpec::Resnet34(s), 1, &Device::Cpu).unwrap();
        let x = Tensor::ones((2, 33 * 41), DType::F32, &Device::Cpu).unwrap();
        let y = m.forward(&x, &mut ForwardCtx::train(0)).unwrap();
        assert_eq!(y.dims(), &[2, 5]);
    }
}
