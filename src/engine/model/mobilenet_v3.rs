//! `mobilenet_v3_small`: torchvision's MobileNetV3-Small with its exact
//! `state_dict`, so that `torchvision.models.mobilenet_v3_small(weights=...)`
//! saved with safetensors is a valid `model.init`, and a checkpoint loads back
//! into torchvision with `load_state_dict(strict=True)`.
//!
//! Layout (torchvision's `MobileNetV3` with the small table): `features.0` is a
//! 3x3 stride-2 convolution, batch-norm and hard swish; `features.1..11` are
//! inverted-residual blocks from the table below; `features.12` is a 1x1
//! convolution to six times the last block's channels with batch-norm and hard
//! swish; then global average pooling, `classifier.0` (linear to 1024),
//! hard swish, dropout (`model.dropout`, 0.2 as torchvision) and
//! `classifier.3` (linear to the classes). A block's `block` is: an
//! expanding 1x1 conv-bn-activation when the expansion changes the channels,
//! a depthwise `k`x`k` conv-bn-activation (stride s), a squeeze-excitation
//! gate where the table says (`fc1`, `fc2`), and a projecting 1x1 conv-bn; the
//! input is added back when the stride is 1 and the channels stay the same.
//! Every batch-norm has `eps = 1e-3` and `momentum = 0.01`, as torchvision's.
//!
//! `model.width_mult` scales every width as torchvision does
//! (`_make_divisible(c * width_mult, 8)`), the same key as `mobilenet_v2`'s.

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use super::backbone::{BlockAct, ConvBnAct, ConvBnShape, Tally, CONV_INIT};
use super::layers::{
    linear_with_init, Dropout, GlobalAvgPool, Hardswish, Linear, Residual, SqueezeExcite,
};
use super::mobilenet::{make_divisible, Block, Features, MobileNetSpec};
use super::split::{self, SplitPoint, Staged};
use super::{Classifier, ForwardCtx};
use crate::engine::budget::{n, product, sum, Footprint};
use crate::engine::export::layers::{self as onnx, Emit};
use crate::engine::export::{ExportError, Graph};

/// `classifier.2`'s dropout when `model.dropout` is not set (torchvision's).
pub const DEFAULT_DROPOUT: f64 = 0.2;

/// torchvision's batch-norm settings for MobileNetV3: `eps`, `momentum`.
pub const NORM: (f64, f64) = (1e-3, 0.01);

/// Modules of `features` (the stem, 11 blocks, the last 1x1 layer):
/// `model.finetune = "last:N"` counts these from the end.
pub const STAGES: usize = 13;

/// The small table (torchvision's `_mobilenet_v3_conf`): input channels,
/// kernel, expanded channels, output channels, squeeze-excitation, hard
/// swish (else ReLU), stride; the widths before `width_mult`.
const SETTINGS: [(usize, usize, usize, usize, bool, bool, usize); 11] = [
    (16, 3, 16, 16, true, false, 2),
    (16, 3, 72, 24, false, false, 2),
    (24, 3, 88, 24, false, false, 1),
    (24, 5, 96, 40, true, true, 2),
    (40, 5, 240, 40, true, true, 1),
    (40, 5, 240, 40, true, true, 1),
    (40, 5, 120, 48, true, true, 1),
    (48, 5, 144, 48, true, true, 1),
    (48, 5, 288, 96, true, true, 2),
    (96, 5, 576, 96, true, true, 1),
    (96, 5, 576, 96, true, true, 1),
];

/// One inverted-residual block's shape, after `width_mult`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    pub cin: usize,
    pub kernel: usize,
    pub hidden: usize,
    pub cout: usize,
    /// Channels inside the squeeze-excitation gate, where there is one.
    pub squeeze: Option<usize>,
    pub act: BlockAct,
    pub stride: usize,
}

impl BlockShape {
    /// Whether the input is added back.
    pub fn residual(&self) -> bool {
        self.stride == 1 && self.cin == self.cout
    }
}

/// A width scaled by `width_mult`, as torchvision's `adjust_channels`.
fn scaled(spec: &MobileNetSpec, c: usize) -> usize {
    make_divisible(c as f64 * spec.width_mult)
}

/// The 11 blocks' shapes of `spec`, as torchvision computes them.
pub fn blocks(spec: &MobileNetSpec) -> Vec<BlockShape> {
    SETTINGS
        .iter()
        .map(|&(cin, kernel, hidden, cout, se, hs, stride)| {
            let hidden = scaled(spec, hidden);
            BlockShape {
                cin: scaled(spec, cin),
                kernel,
                hidden,
                cout: scaled(spec, cout),
                squeeze: se.then(|| make_divisible((hidden / 4) as f64)),
                act: if hs {
                    BlockAct::Hardswish
                } else {
                    BlockAct::Relu
                },
                stride,
            }
        })
        .collect()
}

/// Channels after the stem, after the last 1x1 layer, and of `classifier.0`.
pub fn widths(spec: &MobileNetSpec) -> (usize, usize, usize) {
    let last_in = scaled(spec, SETTINGS[SETTINGS.len() - 1].3);
    (scaled(spec, 16), 6 * last_in, scaled(spec, 1024))
}

/// Parameters and per-sample activations (see [`Footprint`]).
pub fn footprint(spec: &MobileNetSpec) -> Footprint {
    let (stem, last, hidden) = widths(spec);
    let mut t = Tally::new(spec.in_channels, spec.input_size);
    let conv_bn_act = |t: &mut Tally, cout, k, stride, groups, act: bool| {
        t.conv(cout, k, stride, k / 2, groups);
        t.batch_norm();
        if act {
            t.elementwise(2);
        }
    };
    conv_bn_act(&mut t, stem, 3, 2, 1, true);
    for b in blocks(spec) {
        if b.hidden != b.cin {
            conv_bn_act(&mut t, b.hidden, 1, 1, 1, true);
        }
        conv_bn_act(&mut t, b.hidden, b.kernel, b.stride, b.hidden, true);
        if let Some(s) = b.squeeze {
            // fc1 and fc2 with biases; the pooled, squeezed and gate values
            // are per channel, the scaled map is a full one.
            let (c, s) = (n(b.hidden), n(s));
            t.params = sum([t.params, c.saturating_mul(s).saturating_mul(2), c, s]);
            t.activations = sum([t.activations, c.saturating_mul(3), s.saturating_mul(2)]);
            t.elementwise(1);
        }
        conv_bn_act(&mut t, b.cout, 1, 1, 1, false);
        if b.residual() {
            t.elementwise(1);
        }
    }
    conv_bn_act(&mut t, last, 1, 1, 1, true);
    // classifier.0 (a head to `hidden` values) and its hard swish, then classifier.3.
    t.head(hidden, false);
    t.channels = n(hidden);
    t.elementwise(2);
    t.head(spec.num_classes, spec.dropout > 0.0);
    Footprint {
        params: t.params,
        buffers: t.buffers,
        input: n(spec.in_channels).saturating_mul(product(spec.input_size.map(n))),
        activations: t.activations,
        activation_bound: false,
    }
    .finish()
}

/// torchvision's MobileNetV3 `InvertedResidual`.
struct InvertedResidual {
    expand: Option<ConvBnAct>,
    depthwise: ConvBnAct,
    gate: Option<SqueezeExcite>,
    project: ConvBnAct,
    join: Option<Residual>,
}

impl InvertedResidual {
    fn new(b: &BlockShape, vb: VarBuilder) -> candle_core::Result<Self> {
        let bv = vb.pp("block");
        let (eps, momentum) = NORM;
        let mut i = 0;
        let mut next = || {
            let v = bv.pp(i.to_string());
            i += 1;
            v
        };
        let expand = if b.hidden != b.cin {
            let v = next();
            Some(ConvBnAct::new(
                ConvBnShape::new((b.cin, b.hidden), 1, b.act).norm(eps, momentum),
                v.pp("0"),
                v.pp("1"),
            )?)
        } else {
            None
        };
        let v = next();
        let depthwise = ConvBnAct::new(
            ConvBnShape::new((b.hidden, b.hidden), b.kernel, b.act)
                .stride(b.stride)
                .depthwise()
                .norm(eps, momentum),
            v.pp("0"),
            v.pp("1"),
        )?;
        let gate = match b.squeeze {
            Some(s) => Some(SqueezeExcite::new(b.hidden, s, CONV_INIT, next())?),
            None => None,
        };
        let v = next();
        let project = ConvBnAct::new(
            ConvBnShape::new((b.hidden, b.cout), 1, BlockAct::None).norm(eps, momentum),
            v.pp("0"),
            v.pp("1"),
        )?;
        Ok(Self {
            expand,
            depthwise,
            gate,
            project,
            join: b.residual().then_some(Residual { relu: false }),
        })
    }
}

impl Block for InvertedResidual {
    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        let h = match &self.expand {
            Some(e) => e.forward(x, ctx)?,
            None => x.clone(),
        };
        let h = self.depthwise.forward(&h, ctx)?;
        let h = match &self.gate {
            Some(g) => g.forward(&h, ctx)?,
            None => h,
        };
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
        let h = match &self.gate {
            Some(se) => se.emit(g, &h)?,
            None => h,
        };
        let y = self.project.emit(g, &h)?;
        Ok(if self.join.is_some() {
            onnx::add(g, &y, x)
        } else {
            y
        })
    }
}

/// A `mobilenet_v3_small`.
pub struct MobileNetV3Small {
    features: Features<InvertedResidual>,
    gap: GlobalAvgPool,
    hidden: Linear,
    dropout: Dropout,
    classifier: Linear,
}

impl MobileNetV3Small {
    /// Builds the network under `vb`, with torchvision's names and init
    /// (Kaiming-normal fan-out convolutions with zero biases, batch-norm 1
    /// and 0, linear layers N(0, 0.01) with zero biases).
    pub fn new(spec: &MobileNetSpec, vb: VarBuilder) -> candle_core::Result<Self> {
        if spec.in_channels == 0 || !(spec.width_mult > 0.0 && spec.width_mult.is_finite()) {
            candle_core::bail!("mobilenet_v3_small: in_channels and width_mult must be > 0");
        }
        let (stem_c, last_c, hidden_c) = widths(spec);
        let (eps, momentum) = NORM;
        let fv = vb.pp("features");
        let stem = ConvBnAct::new(
            ConvBnShape::new((spec.in_channels, stem_c), 3, BlockAct::Hardswish)
                .stride(2)
                .norm(eps, momentum),
            fv.pp("0").pp("0"),
            fv.pp("0").pp("1"),
        )?;
        let shapes = blocks(spec);
        let blocks = shapes
            .iter()
            .enumerate()
            .map(|(i, b)| InvertedResidual::new(b, fv.pp((i + 1).to_string())))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let cin = shapes.last().map_or(stem_c, |b| b.cout);
        let lv = fv.pp((shapes.len() + 1).to_string());
        let last = ConvBnAct::new(
            ConvBnShape::new((cin, last_c), 1, BlockAct::Hardswish).norm(eps, momentum),
            lv.pp("0"),
            lv.pp("1"),
        )?;
        let normal = Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        };
        let cv = vb.pp("classifier");
        let hidden = linear_with_init(last_c, hidden_c, normal, Init::Const(0.0), cv.pp("0"))?;
        let classifier = linear_with_init(
            hidden_c,
            spec.num_classes,
            normal,
            Init::Const(0.0),
            cv.pp("3"),
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
            hidden,
            dropout: Dropout::new(spec.dropout),
            classifier,
        })
    }
}

impl Staged for MobileNetV3Small {
    /// Stage 0 is `features.0`, stages `1..=B` the blocks `features.1..B`,
    /// then `features.{B+1}`, global pooling, `classifier.0` with its hard
    /// swish, and dropout with `classifier.3`.
    fn stage_count(&self) -> usize {
        self.features.stages() + 3
    }

    /// After each `features.i` but the last, after global pooling (`pool`)
    /// and after `classifier.0`'s hard swish (`classifier.0`).
    fn cuts(&self) -> Vec<(usize, SplitPoint)> {
        let nb = self.features.blocks.len();
        let last = nb + 1;
        let rest_from = |b: usize| {
            (b..=last)
                .map(|i| format!("features.{i}."))
                .chain(["classifier.".to_string()])
                .collect::<Vec<_>>()
        };
        (0..=nb)
            .map(|i| (i + 1, format!("features.{i}"), rest_from(i + 1)))
            .chain([
                (nb + 3, "pool".to_string(), rest_from(nb + 3)),
                (
                    nb + 4,
                    "classifier.0".to_string(),
                    vec!["classifier.3.".to_string()],
                ),
            ])
            .map(|(b, name, rest)| (b, SplitPoint::new(name, rest)))
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
        if s == nf + 1 {
            return Hardswish.forward(&self.hidden.forward(&x, ctx)?, ctx);
        }
        let x = self.dropout.forward(&x, ctx)?;
        self.classifier.forward(&x, ctx)
    }
}

impl Classifier for MobileNetV3Small {
    fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
        split::forward(self, x, ctx)
    }

    fn staged(&self) -> Option<&dyn Staged> {
        Some(self)
    }

    fn export_onnx(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let x = self.features.emit(g, x)?;
        let x = onnx::global_avg_pool(g, &x);
        let x = self.hidden.emit(g, &x)?;
        let x = onnx::hard_swish(g, &x);
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

    /// Full width with 1000 classes: torchvision's 2,542,856 parameters and
    /// its state_dict's 244 tensors, names and shapes.
    #[test]
    fn full_width_has_torchvisions_state_dict() {
        let s = spec(1.0, 1000);
        assert_eq!(footprint(&s).params, 2_542_856);
        let m = Model::new(ModelSpec::MobilenetV3Small(s), 1, &Device::Cpu).unwrap();
        assert_eq!(m.params.num_params(), 2_542_856);
        let sd = m.params.state_dict();
        assert_eq!(sd.len(), 244);
        let dims = |name: &str| {
            sd.iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.dims().to_vec())
        };
        assert_eq!(dims("features.0.0.weight"), Some(vec![16, 3, 3, 3]));
        assert_eq!(dims("features.1.block.0.0.weight"), Some(vec![16, 1, 3, 3]));
        assert_eq!(
            dims("features.1.block.1.fc1.weight"),
            Some(vec![8, 16, 1, 1])
        );
        assert_eq!(dims("features.1.block.1.fc2.bias"), Some(vec![16]));
        assert_eq!(
            dims("features.1.block.2.0.weight"),
            Some(vec![16, 16, 1, 1])
        );
        assert_eq!(
            dims("features.2.block.0.0.weight"),
            Some(vec![72, 16, 1, 1])
        );
        assert_eq!(dims("features.4.block.1.0.weight"), Some(vec![96, 1, 5, 5]));
        assert_eq!(
            dims("features.4.block.2.fc1.weight"),
            Some(vec![24, 96, 1, 1])
        );
        assert_eq!(dims("features.11.block.3.1.running_var"), Some(vec![96]));
        assert_eq!(dims("features.12.0.weight"), Some(vec![576, 96, 1, 1]));
        assert_eq!(dims("classifier.0.weight"), Some(vec![1024, 576]));
        assert_eq!(dims("classifier.3.weight"), Some(vec![1000, 1024]));
    }

    #[test]
    fn small_width_runs_on_grayscale() {
        let mut s = spec(0.5, 4);
        s.in_channels = 1;
        s.input_size = [35, 32];
        let m = Model::new(ModelSpec::MobilenetV3Small(s), 1, &Device::Cpu).unwrap();
        let x = Tensor::ones((2, 1, 35, 32), DType::F32, &Device::Cpu).unwrap();
        let y = m.forward(&x, &mut ForwardCtx::train(0)).unwrap();
        assert_eq!(y.dims(), &[2, 4]);
    }
}
