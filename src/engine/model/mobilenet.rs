//! `mobilenet_v2`: torchvision's MobileNetV2 with its exact `state_dict`, so
//! that `torchvision.models.mobilenet_v2(weights=...).state_dict()` saved with
//! safetensors is a valid `model.init`, and a checkpoint loads back into
//! torchvision with `load_state_dict(strict=True)`.
//!
//! Layout (torchvision's `MobileNetV2`): `features.0` is a 3x3 stride-2
//! convolution (`features.0.0`), batch-norm (`features.0.1`) and ReLU6; then
//! 17 inverted-residual blocks `features.1..17` from the table
//! (expansion t, channels c, repeats n, first stride s) `[1, 16, 1, 1]`,
//! `[6, 24, 2, 2]`, `[6, 32, 3, 2]`, `[6, 64, 4, 2]`, `[6, 96, 3, 1]`,
//! `[6, 160, 3, 2]`, `[6, 320, 1, 1]`; `features.18` is a 1x1 convolution to
//! 1280 channels with batch-norm and ReLU6; then global average pooling,
//! dropout (`classifier.0`, p = `model.dropout`, 0.2 as torchvision) and
//! `classifier.1` (linear). A block's `conv` is: for t > 1 an expanding 1x1
//! conv-bn-ReLU6 (`conv.0.0`, `conv.0.1`), a depthwise 3x3 conv-bn-ReLU6
//! (stride s; `conv.{0|1}.0`, `.1`), a projecting 1x1 conv (`conv.{1|2}`) and
//! its batch-norm (`conv.{2|3}`); the input is added back when the stride is
//! 1 and the channels stay the same.
//!
//! `model.width_mult` scales every width as torchvision does
//! (`_make_divisible(c * width_mult, 8)`; the last layer never below 1280).

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::backbone::{BackboneConfig, BlockAct, ConvBnAct, ConvBnShape, Tally};
use super::error::{KeyError, KeyProblem};
use super::layers::conv_bn_chain::{self, ChainPart, Join};
use super::layers::{linear_with_init, Dropout, GlobalAvgPool, Linear, Residual};
use super::registry::Common;
use super::split::{self, SplitPoint, Staged};
use super::{Classifier, ForwardCtx};
use crate::engine::budget::{n, product, Footprint};
use crate::engine::export::layers::{self as onnx, Emit};
use crate::engine::export::{ExportError, Graph};

/// `classifier.0`'s dropout when `model.dropout` is not set (torchvision's).
pub const DEFAULT_DROPOUT: f64 = 0.2;

/// torchvision's inverted-residual table: expansion, channels, repeats, first stride.
pub const SETTINGS: [[usize; 4]; 7] = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
];

/// torchvision's `_make_divisible(v, 8)`: `v` rounded to the nearest
/// multiple of 8, at least 8, and not below 90% of `v`.
pub fn make_divisible(v: f64) -> usize {
    const D: f64 = 8.0;
    let mut new = (((v + D / 2.0) as usize) / 8 * 8).max(8);
    if (new as f64) < 0.9 * v {
        new += 8;
    }
    new
}

/// The `[model]` keys of `mobilenet_v2` and `mobilenet_v3_small`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MobileNetConfig {
    /// Width multiplier (`model.width_mult`, torchvision's `width_mult`;
    /// 1.0 is what its ImageNet weights need).
    pub width_mult: f64,
}

impl Default for MobileNetConfig {
    fn default() -> Self {
        Self { width_mult: 1.0 }
    }
}

impl MobileNetConfig {
    /// Checks the keys on their own.
    pub fn validate(&self) -> Result<(), KeyError> {
        if !(self.width_mult.is_finite() && self.width_mult > 0.0 && self.width_mult <= 16.0) {
            return Err(KeyError::new(
                "model.width_mult",
                KeyProblem::WidthMult(self.width_mult),
            ));
        }
        Ok(())
    }
}

impl BackboneConfig for MobileNetConfig {
    type Spec = MobileNetSpec;

    fn spec(&self, common: &Common, in_channels: usize, input_size: [usize; 2]) -> MobileNetSpec {
        MobileNetSpec {
            in_channels,
            input_size,
            width_mult: self.width_mult,
            num_classes: common.num_classes,
            dropout: common.dropout,
        }
    }
}

/// Sizes of a `mobilenet_v2` or a `mobilenet_v3_small`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MobileNetSpec {
    /// Channels of one sample (3 for RGB, 1 for grayscale).
    pub in_channels: usize,
    /// `[H, W]` of one sample (any size: the head pools globally).
    pub input_size: [usize; 2],
    pub width_mult: f64,
    pub num_classes: usize,
    #[serde(default)]
    pub dropout: f64,
}

/// One inverted-residual block's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    pub cin: usize,
    pub hidden: usize,
    pub cout: usize,
    pub stride: usize,
    /// Whether there is an expanding 1x1 convolution (t > 1).
    pub expand: bool,
}

impl BlockShape {
    /// Whether the input is added back.
    pub fn residual(&self) -> bool {
        self.stride == 1 && self.cin == self.cout
    }
}

impl MobileNetSpec {
    /// Config keys that size the parameters and the activations.
    pub const SIZE_KEYS: &'static [&'static str] = &["model.width_mult"];

    /// Modules of `features` (the stem, 17 blocks, the last 1x1 layer):
    /// `model.finetune = "last:N"` counts these from the end.
    pub const STAGES: usize = 19;

    /// Channels after the stem and after the last 1x1 layer.
    pub fn stem_and_last(&self) -> (usize, usize) {
        (
            make_divisible(32.0 * self.width_mult),
            make_divisible(1280.0 * self.width_mult.max(1.0)),
        )
    }

    /// The 17 blocks' shapes, as torchvision computes them.
    pub fn blocks(&self) -> Vec<BlockShape> {
        let (mut cin, _) = self.stem_and_last();
        let mut out = Vec::with_capacity(17);
        for [t, c, reps, s] in SETTINGS {
            let cout = make_divisible(c as f64 * self.width_mult);
            for i in 0..reps {
                out.push(BlockShape {
                    cin,
                    hidden: (cin as f64 * t as f64).round() as usize,
                    cout,
                    stride: if i == 0 { s } else { 1 },
                    expand: t != 1,
                });
                cin = cout;
            }
        }
        out
    }

    /// Parameters and per-sample activations (see [`Footprint`]).
    pub fn footprint(&self) -> Footprint {
        let (stem, last) = self.stem_and_last();
        let mut t = Tally::new(self.in_channels, self.input_size);
        let conv_bn_act = |t: &mut Tally, cout, k, stride, groups| {
            t.conv(cout, k, stride, k / 2, groups);
            t.batch_norm();
            t.elementwise(1);
        };
        conv_bn_act(&mut t, stem, 3, 2, 1);
        for b in self.blocks() {
            if b.expand {
                conv_bn_act(&mut t, b.hidden, 1, 1, 1);
            }
            conv_bn_act(&mut t, b.hidden, 3, b.stride, b.hidden);
            t.conv(b.cout, 1, 1, 0, 1);
            t.batch_norm();
            if b.residual() {
                t.elementwise(1);
            }
        }
        conv_bn_act(&mut t, last, 1, 1, 1);
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

/// torchvision's `InvertedResidual`.
struct InvertedResidual {
    expand: Option<ConvBnAct>,
    depthwise: ConvBnAct,
    project: ConvBnAct,
    join: Option<Residual>,
}

impl InvertedResidual {
    fn new(b: &BlockShape, vb: VarBuilder) -> candle_core::Result<Self> {
        let cv = vb.pp("conv");
        let mut i = 0;
        let expand = if b.expand {
            let e = ConvBnAct::new(
                ConvBnShape::new((b.cin, b.hidden), 1, BlockAct::Relu6),
                cv.pp("0").pp("0"),
                cv.pp("0").pp("1"),
            )?;
            i += 1;
            Some(e)
        } else {
            None
        };
        let dv = cv.pp(i.to_string());
        let depthwise = ConvBnAct::new(
            ConvBnShape::new((b.hidden, b.hidden), 3, BlockAct::Relu6)
                .stride(b.stride)
                .depthwise(),
            dv.pp("0"),
            dv.pp("1"),
        )?;
        let project = ConvBnAct::new(
            ConvBnShape::new((b.hidden, b.cout), 1, BlockAct::None),
            cv.pp((i + 1).to_string()),
            cv.pp((i + 2).to_string()),
        )?;
        Ok(Self {
            expand,
            depthwise,
            project,
            join: b.residual().then_some(Residual { relu: false }),
        })
    }
}

impl Block for InvertedResidual {
    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        // Expand, depthwise and project (and the join) as one kernel where it applies.
        let parts: Option<Vec<ChainPart>> = self
            .expand
            .iter()
            .chain([&self.depthwise, &self.project])
            .map(|b| b.part())
            .collect();
        if let Some(parts) = parts {
            let join = if self.join.is_some() {
                Join::Identity
            } else {
                Join::None
            };
            if let Some(y) = conv_bn_chain::forward(x, &parts, join, ctx)? {
                return Ok(y);
            }
        }
        let h = match &self.expand {
            Some(e) => e.forward(x, ctx)?,
            None => x.clone(),
        };
        let h = self.depthwise.forward(&h, ctx)?;
        let y = self.project.forward(&h, ctx)?;
        match &self.join {
            Some(j) => j.forward(&y, x, ctx),
            None => Ok(y),
        }
    }

    /// The block as ONNX nodes (the residual join an `Add`).
    fn emit(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let h = match &self.expand {
            Some(e) => e.emit(g, x)?,
            None => x.to_string(),
        };
        let h = self.depthwise.emit(g, &h)?;
        let y = self.project.emit(g, &h)?;
        Ok(if self.join.is_some() {
            onnx::add(g, &y, x)
        } else {
            y
        })
    }
}

/// An inverted-residual block of a mobilenet (`features.1..B`).
pub(super) trait Block {
    /// The block's output for `x` `[B, C, H, W]`.
    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor>;
    /// The block as ONNX nodes from the value `x`.
    fn emit(&self, g: &mut Graph, x: &str) -> Result<String, ExportError>;
}

/// The mobilenets' `features`: the stem `features.0`, the blocks
/// `features.1..B` and the last 1x1 layer `features.{B+1}`, over
/// `[B, C, H, W]` images.
pub(super) struct Features<B> {
    pub in_channels: usize,
    pub input_size: [usize; 2],
    pub stem: ConvBnAct,
    pub blocks: Vec<B>,
    pub last: ConvBnAct,
}

impl<B: Block> Features<B> {
    /// Stages: `features.0` .. `features.{B+1}`, one each.
    pub fn stages(&self) -> usize {
        self.blocks.len() + 2
    }

    /// Stage `s` (`features.{s}`); stage 0 takes the batch in any shape.
    pub fn stage(&self, s: usize, x: Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        if s == 0 {
            let b = x.dim(0)?;
            let [h, w] = self.input_size;
            let x = x.reshape((b, self.in_channels, h, w))?;
            return self.stem.forward(&x, ctx);
        }
        match self.blocks.get(s - 1) {
            Some(block) => block.forward(&x, ctx),
            None => self.last.forward(&x, ctx),
        }
    }

    /// Every stage as ONNX nodes, from the graph's input `x`.
    pub fn emit(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let [h, w] = self.input_size;
        let shape = [self.in_channels, h, w];
        let x = if g.sample_shape() == shape.as_slice() {
            x.to_string()
        } else {
            onnx::reshape(g, x, &shape)
        };
        let mut x = self.stem.emit(g, &x)?;
        for block in &self.blocks {
            x = block.emit(g, &x)?;
        }
        self.last.emit(g, &x)
    }
}

/// A `mobilenet_v2`.
pub struct MobileNetV2 {
    features: Features<InvertedResidual>,
    gap: GlobalAvgPool,
    dropout: Dropout,
    classifier: Linear,
}

impl MobileNetV2 {
    /// Builds the network under `vb`, with torchvision's names and init
    /// (Kaiming-normal fan-out convolutions, batch-norm 1 and 0,
    /// `classifier.1` N(0, 0.01) with zero bias).
    pub fn new(spec: &MobileNetSpec, vb: VarBuilder) -> candle_core::Result<Self> {
        if spec.in_channels == 0 || !(spec.width_mult > 0.0 && spec.width_mult.is_finite()) {
            candle_core::bail!("mobilenet_v2: in_channels and width_mult must be > 0");
        }
        let (stem_c, last_c) = spec.stem_and_last();
        let fv = vb.pp("features");
        let stem = ConvBnAct::new(
            ConvBnShape::new((spec.in_channels, stem_c), 3, BlockAct::Relu6).stride(2),
            fv.pp("0").pp("0"),
            fv.pp("0").pp("1"),
        )?;
        let shapes = spec.blocks();
        let mut blocks = Vec::with_capacity(shapes.len());
        let mut cin = stem_c;
        for (i, b) in shapes.iter().enumerate() {
            blocks.push(InvertedResidual::new(b, fv.pp((i + 1).to_string()))?);
            cin = b.cout;
        }
        let lv = fv.pp((shapes.len() + 1).to_string());
        let last = ConvBnAct::new(
            ConvBnShape::new((cin, last_c), 1, BlockAct::Relu6),
            lv.pp("0"),
            lv.pp("1"),
        )?;
        let classifier = linear_with_init(
            last_c,
            spec.num_classes,
            Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
            Init::Const(0.0),
            vb.pp("classifier").pp("1"),
        )?;
        Ok(Self {
            features: Features {
                in_channels: spec.in_channels,
                input_size: spec.input_size,
                stem,
                blocks,
                last,
            },
            gap: GlobalAvgPool,
            dropout: Dropout::new(spec.dropout),
            classifier,
        })
    }
}

impl Staged for MobileNetV2 {
    /// Stage 0 is `features.0`, stages `1..=B` the blocks `features.1..B`,
    /// then `features.{B+1}`, global pooling, and dropout with `classifier.1`.
    fn stage_count(&self) -> usize {
        self.features.stages() + 2
    }

    /// After each `features.i` but the last, and after global pooling (`pool`).
    fn cuts(&self) -> Vec<(usize, SplitPoint)> {
        let nb = self.features.blocks.len();
        let last = nb + 1;
        (0..=nb)
            .map(|i| (i + 1, format!("features.{i}")))
            .chain([(nb + 3, "pool".to_string())])
            .map(|(b, name)| {
                let rest = (b..=last).map(|i| format!("features.{i}."));
                (
                    b,
                    SplitPoint::new(name, rest.chain(["classifier.".to_string()])),
                )
            })
            .collect()
    }

    fn stage(&self, s: usize, x: Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        let nf = self.features.stages();
        if s < nf {
            return self.features.stage(s, x, ctx);
        }
        if s == nf {
            return self.gap.forward(&x, ctx);
        }
        let x = self.dropout.forward(&x, ctx)?;
        self.classifier.forward(&x, ctx)
    }
}

impl Classifier for MobileNetV2 {
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        split::forward(self, x, ctx)
    }

    fn staged(&self) -> Option<&dyn Staged> {
        Some(self)
    }

    fn export_onnx(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let x = self.features.emit(g, x)?;
        let x = onnx::global_avg_pool(g, &x);
        self.classifier.emit(g, &x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{Model, ModelSpec};
    use candle_core::{DType, Device};

    fn spec(width_mult: f64, classes: usize) -> MobileNetSpec {
        MobileNetSpec {
            in_channels: 3,
            input_size: [32, 32],
            width_mult,
            num_classes: classes,
            dropout: 0.2,
        }
    }

    #[test]
    fn make_divisible_is_torchvisions() {
        // _make_divisible(v, 8) in torchvision.
        for (v, want) in [
            (32.0 * 0.25, 8),
            (16.0 * 0.25, 8),
            (24.0 * 0.35, 8),
            (32.0 * 0.35, 16),
            (96.0 * 0.5, 48),
            (160.0 * 0.75, 120),
            (1280.0, 1280),
            (44.0, 48),
            (12.0, 16),
            (11.0, 16),
            (20.0, 24),
        ] {
            assert_eq!(make_divisible(v), want, "{v}");
        }
    }

    /// Full width with 1000 classes: torchvision's 3,504,872 parameters and
    /// its state_dict's 314 tensors.
    #[test]
    fn full_width_has_torchvisions_state_dict() {
        let s = spec(1.0, 1000);
        assert_eq!(s.footprint().params, 3_504_872);
        let m = Model::new(ModelSpec::MobilenetV2(s), 1, &Device::Cpu).unwrap();
        assert_eq!(m.params.num_params(), 3_504_872);
        let sd = m.params.state_dict();
        assert_eq!(sd.len(), 314);
        let dims = |name: &str| {
            sd.iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.dims().to_vec())
        };
        assert_eq!(dims("features.0.0.weight"), Some(vec![32, 3, 3, 3]));
        assert_eq!(dims("features.1.conv.0.0.weight"), Some(vec![32, 1, 3, 3]));
        assert_eq!(dims("features.1.conv.1.weight"), Some(vec![16, 32, 1, 1]));
        assert_eq!(dims("features.2.conv.0.0.weight"), Some(vec![96, 16, 1, 1]));
        assert_eq!(dims("features.2.conv.1.0.weight"), Some(vec![96, 1, 3, 3]));
        assert_eq!(dims("features.2.conv.3.running_mean"), Some(vec![24]));
        assert_eq!(dims("features.18.0.weight"), Some(vec![1280, 320, 1, 1]));
        assert_eq!(dims("classifier.1.weight"), Some(vec![1000, 1280]));
    }

    #[test]
    fn small_width_runs_on_grayscale() {
        let mut s = spec(0.25, 4);
        s.in_channels = 1;
        s.input_size = [35, 32];
        let m = Model::new(ModelSpec::MobilenetV2(s), 1, &Device::Cpu).unwrap();
        let x = Tensor::ones((2, 1, 35, 32), DType::F32, &Device::Cpu).unwrap();
        let y = m.forward(&x, &mut ForwardCtx::train(0)).unwrap();
        assert_eq!(y.dims(), &[2, 4]);
    }
}
