//! What the torchvision backbones (`resnet18`, `resnet34`, `mobilenet_v2`,
//! `mobilenet_v3_small`) share: reading the image shape from the data, the
//! Kaiming init torchvision gives their convolutions, its
//! `Conv2dNormActivation` block, and the running tally their footprints are
//! counted with.

use candle_core::Tensor;
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::{Init, VarBuilder};

use super::error::ModelError;
use super::layers::batchnorm::{BnAct, EPS, MOMENTUM};
use super::layers::conv_bn_chain::{self, ChainPart, Join};
use super::layers::{conv_with_init, BatchNorm, Conv, ConvConfig, Hardswish};
use super::registry::Common;
use super::ForwardCtx;
use crate::engine::budget::{n, product, sum};
use crate::engine::export::layers::{self as onnx, Emit};
use crate::engine::export::{ExportError, Graph};

/// torchvision's init for a backbone's convolutions:
/// `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
pub const CONV_INIT: Init = Init::Kaiming {
    dist: NormalOrUniform::Normal,
    fan: FanInOut::FanOut,
    non_linearity: NonLinearity::ReLU,
};

/// Channels and `[H, W]` of image samples `[C, H, W]` (or grayscale `[H, W]`);
/// the error names `arch`.
pub fn image_input(
    arch: &'static str,
    sample_shape: &[usize],
) -> Result<(usize, [usize; 2]), ModelError> {
    match *sample_shape {
        [h, w] => Ok((1, [h, w])),
        [c, h, w] => Ok((c, [h, w])),
        _ => Err(ModelError::SampleShape {
            arch,
            spatial_dims: 2,
            shape: sample_shape.to_vec(),
        }),
    }
}

/// [`image_input`] without failing: a shape the architecture cannot take is
/// sketched as a 1-channel 1x1 image (a lower bound), for footprints before
/// the data is read.
pub fn sketch_input(sample_shape: &[usize]) -> (usize, [usize; 2]) {
    match *sample_shape {
        [h, w] => (1, [h, w]),
        [c, h, w] => (c, [h, w]),
        _ => (1, [1, 1]),
    }
}

/// The `[model]` keys of a torchvision backbone, which resolve to its spec
/// once the data tells the image shape.
pub trait BackboneConfig {
    /// What checkpoints store of the architecture.
    type Spec;

    /// The spec for `in_channels` x `input_size` images.
    fn spec(&self, common: &Common, in_channels: usize, input_size: [usize; 2]) -> Self::Spec;

    /// The spec of `arch` for image samples of `sample_shape` (`[C, H, W]`
    /// or `[H, W]`); the error names `arch`.
    fn resolve(
        &self,
        arch: &'static str,
        common: &Common,
        sample_shape: &[usize],
    ) -> Result<Self::Spec, ModelError> {
        let (c, size) = image_input(arch, sample_shape)?;
        Ok(self.spec(common, c, size))
    }

    /// The spec without checking the sample shape (footprints before the data).
    fn sketch(&self, common: &Common, sample_shape: &[usize]) -> Self::Spec {
        let (c, size) = sketch_input(sample_shape);
        self.spec(common, c, size)
    }
}

/// A running count of a convolutional network's parameters, buffers and the
/// per-sample activations its forward pass keeps, layer by layer, following
/// the feature map's size (all arithmetic saturating).
#[derive(Debug, Clone, Copy)]
pub struct Tally {
    pub params: u64,
    pub buffers: u64,
    pub activations: u64,
    /// Channels of the current feature map.
    pub channels: u64,
    /// `[H, W]` of the current feature map.
    pub size: [u64; 2],
}

impl Tally {
    /// The tally at the input: `channels` x `size`.
    pub fn new(channels: usize, size: [usize; 2]) -> Self {
        Self {
            params: 0,
            buffers: 0,
            activations: 0,
            channels: n(channels),
            size: [n(size[0]), n(size[1])],
        }
    }

    /// Values of the current feature map.
    pub fn map(&self) -> u64 {
        self.channels.saturating_mul(product(self.size))
    }

    /// A `k`x`k` convolution to `cout` channels (stride, zero padding,
    /// groups, no bias): its weight, its output and, for `k > 1`, the padded
    /// input and the unfolded windows, except for a depthwise convolution
    /// (one group per channel), which the CPU kernel computes directly from
    /// the input without either.
    pub fn conv(&mut self, cout: usize, k: usize, stride: usize, padding: usize, groups: usize) {
        let (cout, k, s, p, g) = (
            n(cout),
            n(k),
            n(stride).max(1),
            n(padding),
            n(groups).max(1),
        );
        let cin = self.channels;
        let padded = self.size.map(|v| v.saturating_add(p.saturating_mul(2)));
        let out = padded.map(|v| if v >= k { (v - k) / s + 1 } else { 0 });
        let window = k.saturating_mul(k);
        self.params = sum([
            self.params,
            cout.saturating_mul(cin / g).saturating_mul(window),
        ]);
        let depthwise = g > 1 && g == cin && cout == cin;
        if k > 1 && !depthwise {
            self.activations = sum([
                self.activations,
                cin.saturating_mul(product(padded)),
                cin.saturating_mul(window).saturating_mul(product(out)),
            ]);
        }
        self.channels = cout;
        self.size = out;
        self.activations = self.activations.saturating_add(self.map());
    }

    /// A batch-norm layer: weight and bias, running statistics, and its
    /// normalised and output maps.
    pub fn batch_norm(&mut self) {
        let c = self.channels;
        self.params = sum([self.params, c.saturating_mul(2)]);
        self.buffers = sum([self.buffers, c.saturating_mul(2), 1]);
        self.activations = sum([self.activations, self.map().saturating_mul(2)]);
    }

    /// An element-wise layer (activation, residual sum) keeping `maps`
    /// maps of the current size.
    pub fn elementwise(&mut self, maps: u64) {
        self.activations = sum([self.activations, self.map().saturating_mul(maps)]);
    }

    /// A max-pool (`k`, `stride`, `padding`): the windows and the pooled map.
    pub fn max_pool(&mut self, k: usize, stride: usize, padding: usize) {
        let (k, s, p) = (n(k), n(stride).max(1), n(padding));
        let out = self.size.map(|v| {
            let padded = v.saturating_add(p.saturating_mul(2));
            if padded >= k {
                (padded - k) / s + 1
            } else {
                0
            }
        });
        self.size = out;
        self.activations = sum([
            self.activations,
            self.map()
                .saturating_mul(k.saturating_mul(k).saturating_add(1)),
        ]);
    }

    /// Global average pooling, dropout (when `dropout`) and the linear head
    /// to `classes` (logits, softmax and the loss's gradient).
    pub fn head(&mut self, classes: usize, dropout: bool) {
        let (c, classes) = (self.channels, n(classes));
        self.params = sum([self.params, c.saturating_mul(classes), classes]);
        self.size = [1, 1];
        self.activations = sum([
            self.activations,
            c.saturating_mul(if dropout { 3 } else { 1 }),
            classes.saturating_mul(3),
        ]);
    }
}

/// The activation after a [`ConvBnAct`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockAct {
    None,
    Relu,
    /// MobileNetV2's.
    Relu6,
    /// MobileNetV3's.
    Hardswish,
}

/// The shape of a [`ConvBnAct`]: channels in and out, a square kernel
/// (padded by `(k - 1) / 2`), stride, groups, the activation, and the
/// batch-norm's `eps` and `momentum`.
#[derive(Debug, Clone, Copy)]
pub struct ConvBnShape {
    pub channels: (usize, usize),
    pub kernel: usize,
    pub stride: usize,
    pub groups: usize,
    pub act: BlockAct,
    pub norm: (f64, f64),
}

impl ConvBnShape {
    /// A `kernel`x`kernel` convolution from `cin` to `cout` channels, stride
    /// 1, no groups, with `act` and PyTorch's default batch-norm.
    pub fn new((cin, cout): (usize, usize), kernel: usize, act: BlockAct) -> Self {
        Self {
            channels: (cin, cout),
            kernel,
            stride: 1,
            groups: 1,
            act,
            norm: (EPS, MOMENTUM),
        }
    }

    /// The same with `stride`.
    pub fn stride(self, stride: usize) -> Self {
        Self { stride, ..self }
    }

    /// The same as a depthwise convolution (one group per channel).
    pub fn depthwise(self) -> Self {
        Self {
            groups: self.channels.0,
            ..self
        }
    }

    /// The same with the batch-norm's `eps` and `momentum`.
    pub fn norm(self, eps: f64, momentum: f64) -> Self {
        Self {
            norm: (eps, momentum),
            ..self
        }
    }
}

/// torchvision's `Conv2dNormActivation`: a convolution without bias (under
/// `conv_vb`), a batch-norm (under `bn_vb`) and an activation.
pub struct ConvBnAct {
    conv: Conv,
    bn: BatchNorm,
    act: BlockAct,
}

impl ConvBnAct {
    /// The block of `shape`, the convolution with torchvision's init.
    pub fn new(
        shape: ConvBnShape,
        conv_vb: VarBuilder,
        bn_vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let k = shape.kernel;
        let cfg = ConvConfig {
            stride: shape.stride,
            padding: (k.max(1) - 1) / 2,
            dilation: 1,
            groups: shape.groups,
        };
        let (eps, momentum) = shape.norm;
        Ok(Self {
            conv: conv_with_init(2, shape.channels, k, cfg, None, CONV_INIT, conv_vb)?,
            bn: BatchNorm::with_eps_momentum(shape.channels.1, eps, momentum, bn_vb)?,
            act: shape.act,
        })
    }

    /// The block as a unit of a fused chain (`None` for hard swish, which
    /// the chain kernel does not have).
    pub fn part(&self) -> Option<ChainPart<'_>> {
        let act = match self.act {
            BlockAct::None => BnAct::None,
            BlockAct::Relu => BnAct::Relu,
            BlockAct::Relu6 => BnAct::Relu6,
            BlockAct::Hardswish => return None,
        };
        Some(ChainPart {
            conv: &self.conv,
            bn: &self.bn,
            act,
        })
    }

    /// `act(bn(conv(x)))`; ReLU and ReLU6 are fused into the batch-norm (one
    /// kernel on the CPU; in training the convolution too, see
    /// [`conv_bn_chain`]).
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        if let Some(part) = self.part() {
            if let Some(y) = conv_bn_chain::forward(x, &[part], Join::None, ctx)? {
                return Ok(y);
            }
        }
        let y = self.conv.forward(x, ctx)?;
        match self.act {
            BlockAct::None => self.bn.forward_act(&y, BnAct::None, ctx),
            BlockAct::Relu => self.bn.forward_act(&y, BnAct::Relu, ctx),
            BlockAct::Relu6 => self.bn.forward_act(&y, BnAct::Relu6, ctx),
            BlockAct::Hardswish => {
                Hardswish.forward(&self.bn.forward_act(&y, BnAct::None, ctx)?, ctx)
            }
        }
    }

    /// The conv, batch-norm and activation as ONNX nodes.
    pub fn emit(&self, g: &mut Graph, x: &str) -> Result<String, ExportError> {
        let y = self.conv.emit(g, x)?;
        let y = self.bn.emit(g, &y)?;
        Ok(match self.act {
            BlockAct::None => y,
            BlockAct::Relu => g.node("Relu", &[&y], &[]),
            BlockAct::Relu6 => onnx::relu6(g, &y),
            BlockAct::Hardswish => onnx::hard_swish(g, &y),
        })
    }
}
