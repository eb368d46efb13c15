//! The one list of architectures, and the only place that matches on them.
//!
//! Each architecture lives in one file that owns its `[model]` keys (a config
//! struct flattened into `[model]`, with its defaults and validation), its
//! resolved spec (what checkpoints store), and its builder. Adding one means
//! that file plus an entry in each list below: [`ArchKind`], [`ModelSpec`],
//! [`ArchConfigs`] and the dispatch arms in this file.

use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::backbone::BackboneConfig;
use super::cnn::{self, CnnConfig, CnnSpec};
use super::error::{KeyError, KeyProblem, ModelError};
use super::mlp::{self, MlpConfig, MlpSpec};
use super::mobilenet::{self, MobileNetConfig, MobileNetSpec};
use super::mobilenet_v3;
use super::resnet::{self, ResNetConfig, ResNetSpec};
use super::textcnn::{self, TextCnnConfig, TextCnnSpec};
use super::{Activation, Classifier};
use crate::engine::budget::Footprint;
use crate::engine::data::Vocab;

/// `model.arch`: the architectures by name.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ArchKind {
    #[default]
    Mlp,
    Cnn,
    Cnn1d,
    Textcnn,
    /// torchvision's `resnet18`.
    Resnet18,
    /// torchvision's `resnet34`.
    Resnet34,
    /// torchvision's `mobilenet_v2`.
    #[serde(rename = "mobilenet_v2")]
    MobilenetV2,
    /// torchvision's `mobilenet_v3_small`.
    #[serde(rename = "mobilenet_v3_small")]
    MobilenetV3Small,
}

impl ArchKind {
    /// The name as in `model.arch`.
    pub fn name(self) -> &'static str {
        match self {
            ArchKind::Mlp => "mlp",
            ArchKind::Cnn => "cnn",
            ArchKind::Cnn1d => "cnn1d",
            ArchKind::Textcnn => "textcnn",
            ArchKind::Resnet18 => "resnet18",
            ArchKind::Resnet34 => "resnet34",
            ArchKind::MobilenetV2 => "mobilenet_v2",
            ArchKind::MobilenetV3Small => "mobilenet_v3_small",
        }
    }

    /// Whether the architecture reads text (token ids) rather than numbers.
    pub fn reads_text(self) -> bool {
        matches!(self, ArchKind::Textcnn)
    }

    /// Dropout when `model.dropout` is not set.
    pub fn default_dropout(self) -> f64 {
        match self {
            ArchKind::Mlp => mlp::DEFAULT_DROPOUT,
            ArchKind::Cnn | ArchKind::Cnn1d => cnn::DEFAULT_DROPOUT,
            ArchKind::Textcnn => textcnn::DEFAULT_DROPOUT,
            ArchKind::Resnet18 | ArchKind::Resnet34 => resnet::DEFAULT_DROPOUT,
            ArchKind::MobilenetV2 => mobilenet::DEFAULT_DROPOUT,
            ArchKind::MobilenetV3Small => mobilenet_v3::DEFAULT_DROPOUT,
        }
    }

    /// Whether the architecture is a torchvision backbone, whose activations
    /// are fixed (`model.activation` does not apply).
    pub fn is_torchvision(self) -> bool {
        matches!(
            self,
            ArchKind::Resnet18
                | ArchKind::Resnet34
                | ArchKind::MobilenetV2
                | ArchKind::MobilenetV3Small
        )
    }
}

/// An architecture and its sizes: everything needed to rebuild the model.
/// Stored as JSON in every checkpoint's metadata (tagged by `arch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "lowercase")]
pub enum ModelSpec {
    Mlp(MlpSpec),
    /// Image classifier over `[C, H, W]` samples.
    Cnn(CnnSpec),
    /// Signal classifier over `[C, L]` samples.
    Cnn1d(CnnSpec),
    /// Text classifier over token ids.
    TextCnn(TextCnnSpec),
    /// torchvision's resnet18 over `[C, H, W]` images.
    Resnet18(ResNetSpec),
    /// torchvision's resnet34 over `[C, H, W]` images.
    Resnet34(ResNetSpec),
    /// torchvision's mobilenet_v2 over `[C, H, W]` images.
    #[serde(rename = "mobilenet_v2")]
    MobilenetV2(MobileNetSpec),
    /// torchvision's mobilenet_v3_small over `[C, H, W]` images.
    #[serde(rename = "mobilenet_v3_small")]
    MobilenetV3Small(MobileNetSpec),
}

impl ModelSpec {
    /// Number of classes the model predicts.
    pub fn num_classes(&self) -> usize {
        match self {
            ModelSpec::Mlp(s) => s.num_classes,
            ModelSpec::Cnn(s) | ModelSpec::Cnn1d(s) => s.num_classes,
            ModelSpec::TextCnn(s) => s.num_classes,
            ModelSpec::Resnet18(s) | ModelSpec::Resnet34(s) => s.num_classes,
            ModelSpec::MobilenetV2(s) | ModelSpec::MobilenetV3Small(s) => s.num_classes,
        }
    }

    /// Short name of the architecture (as in `model.arch`).
    pub fn arch_name(&self) -> &'static str {
        self.arch().name()
    }

    /// The architecture.
    pub fn arch(&self) -> ArchKind {
        match self {
            ModelSpec::Mlp(_) => ArchKind::Mlp,
            ModelSpec::Cnn(_) => ArchKind::Cnn,
            ModelSpec::Cnn1d(_) => ArchKind::Cnn1d,
            ModelSpec::TextCnn(_) => ArchKind::Textcnn,
            ModelSpec::Resnet18(_) => ArchKind::Resnet18,
            ModelSpec::Resnet34(_) => ArchKind::Resnet34,
            ModelSpec::MobilenetV2(_) => ArchKind::MobilenetV2,
            ModelSpec::MobilenetV3Small(_) => ArchKind::MobilenetV3Small,
        }
    }

    /// Rows of the token embedding, for architectures that read text.
    pub fn vocab_size(&self) -> Option<usize> {
        match self {
            ModelSpec::TextCnn(s) => Some(s.vocab_size),
            _ => None,
        }
    }

    /// The same spec with every dropout probability at zero.
    pub fn without_dropout(&self) -> ModelSpec {
        let mut s = self.clone();
        match &mut s {
            ModelSpec::Mlp(m) => m.dropout = 0.0,
            ModelSpec::Cnn(c) | ModelSpec::Cnn1d(c) => c.dropout = 0.0,
            ModelSpec::TextCnn(t) => t.dropout = 0.0,
            ModelSpec::Resnet18(r) | ModelSpec::Resnet34(r) => r.dropout = 0.0,
            ModelSpec::MobilenetV2(m) | ModelSpec::MobilenetV3Small(m) => m.dropout = 0.0,
        }
        s
    }

    /// Parameters and per-sample activations, from the resolved shapes.
    pub fn footprint(&self) -> Footprint {
        match self {
            ModelSpec::Mlp(s) => s.footprint(),
            ModelSpec::Cnn(s) | ModelSpec::Cnn1d(s) => s.footprint(),
            ModelSpec::TextCnn(s) => s.footprint(),
            ModelSpec::Resnet18(s) => s.footprint(&resnet::RESNET18_BLOCKS),
            ModelSpec::Resnet34(s) => s.footprint(&resnet::RESNET34_BLOCKS),
            ModelSpec::MobilenetV2(s) => s.footprint(),
            ModelSpec::MobilenetV3Small(s) => mobilenet_v3::footprint(s),
        }
    }

    /// The `[model]` keys that size the parameters, or (`activations`) the
    /// activations: what a refusal over the memory budget names.
    pub fn size_keys(&self, activations: bool) -> &'static [&'static str] {
        match (self, activations) {
            (ModelSpec::Mlp(_), _) => MlpSpec::SIZE_KEYS,
            (ModelSpec::Cnn(_) | ModelSpec::Cnn1d(_), false) => CnnSpec::PARAM_KEYS,
            (ModelSpec::Cnn(_) | ModelSpec::Cnn1d(_), true) => CnnSpec::ACTIVATION_KEYS,
            (ModelSpec::TextCnn(_), false) => TextCnnSpec::PARAM_KEYS,
            (ModelSpec::TextCnn(_), true) => TextCnnSpec::ACTIVATION_KEYS,
            (ModelSpec::Resnet18(_) | ModelSpec::Resnet34(_), _) => ResNetSpec::SIZE_KEYS,
            (ModelSpec::MobilenetV2(_) | ModelSpec::MobilenetV3Small(_), _) => {
                MobileNetSpec::SIZE_KEYS
            }
        }
    }

    /// Builds the network, its parameters created under `vb`.
    pub fn build(&self, vb: VarBuilder) -> candle_core::Result<Box<dyn Classifier>> {
        Ok(match self {
            ModelSpec::Mlp(s) => Box::new(mlp::Mlp::new(s, vb)?),
            ModelSpec::Cnn(s) => Box::new(cnn::build(s, 2, vb)?),
            ModelSpec::Cnn1d(s) => Box::new(cnn::build(s, 1, vb)?),
            ModelSpec::TextCnn(s) => Box::new(textcnn::TextCnn::new(s, vb)?),
            ModelSpec::Resnet18(s) => {
                Box::new(resnet::ResNet::new(s, &resnet::RESNET18_BLOCKS, vb)?)
            }
            ModelSpec::Resnet34(s) => {
                Box::new(resnet::ResNet::new(s, &resnet::RESNET34_BLOCKS, vb)?)
            }
            ModelSpec::MobilenetV2(s) => Box::new(mobilenet::MobileNetV2::new(s, vb)?),
            ModelSpec::MobilenetV3Small(s) => Box::new(mobilenet_v3::MobileNetV3Small::new(s, vb)?),
        })
    }
}

/// Every architecture's own `[model]` keys. Each is flattened into `[model]`,
/// so the keys stay flat (`model.hidden`, `model.conv_channels`,
/// `model.embed_dim`) as the user writes them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ArchConfigs {
    #[serde(flatten)]
    pub mlp: MlpConfig,
    /// `cnn` and `cnn1d`.
    #[serde(flatten)]
    pub cnn: CnnConfig,
    #[serde(flatten)]
    pub textcnn: TextCnnConfig,
    /// `resnet18` and `resnet34`.
    #[serde(flatten)]
    pub resnet: ResNetConfig,
    /// `mobilenet_v2` and `mobilenet_v3_small`.
    #[serde(flatten)]
    pub mobilenet: MobileNetConfig,
}

/// What an architecture's key checks need from the rest of the config.
#[derive(Debug, Clone, Copy)]
pub struct ConfigContext {
    /// The selected architecture (`model.arch`).
    pub arch: ArchKind,
    /// Tokens per text sample (`data.max_len`).
    pub max_len: usize,
}

/// Deserialises one architecture's config from wherever the keys live, to
/// find a value of the wrong type with its key named (see [`ArchConfigs::visit`]).
pub trait ConfigVisitor {
    type Error;
    /// Deserialises a `T` from the `[model]` table.
    fn visit<T: serde::de::DeserializeOwned>(&mut self) -> Result<(), Self::Error>;
}

impl ArchConfigs {
    /// Checks every architecture's keys (each whether or not it is selected;
    /// the selected one also against the rest of the config).
    pub fn validate(&self, ctx: &ConfigContext) -> Result<(), KeyError> {
        self.mlp.validate()?;
        self.cnn.validate()?;
        self.resnet.validate()?;
        self.mobilenet.validate()?;
        self.textcnn
            .validate(ctx.arch == ArchKind::Textcnn, ctx.max_len)
    }

    /// Visits each architecture's config type in turn.
    pub fn visit<V: ConfigVisitor>(v: &mut V) -> Result<(), V::Error> {
        v.visit::<MlpConfig>()?;
        v.visit::<CnnConfig>()?;
        v.visit::<ResNetConfig>()?;
        v.visit::<MobileNetConfig>()?;
        v.visit::<TextCnnConfig>()
    }
}

/// The keys every architecture shares, resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Common {
    pub activation: Activation,
    /// `model.dropout`, or the architecture's default.
    pub dropout: f64,
    pub num_classes: usize,
}

/// The `[model]` section before the data tells the input and output sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelTemplate {
    pub arch: ArchKind,
    pub activation: Activation,
    /// `model.dropout`, or the architecture's default.
    pub dropout: f64,
    pub archs: ArchConfigs,
}

impl ModelTemplate {
    /// The template of `arch` with its keys in `archs`; `text` says whether
    /// the data is text (`data.format = "text-tsv"`). The error names the key.
    pub fn new(
        arch: ArchKind,
        activation: Activation,
        dropout: Option<f64>,
        archs: ArchConfigs,
        text: bool,
    ) -> Result<Self, KeyError> {
        match (arch.reads_text(), text) {
            (true, false) => {
                return Err(KeyError::new(
                    "model.arch",
                    KeyProblem::ArchNeedsText { arch: arch.name() },
                ))
            }
            (false, true) => {
                return Err(KeyError::new("model.arch", KeyProblem::TextNeedsTextArch))
            }
            _ => {}
        }
        if matches!(arch, ArchKind::Cnn | ArchKind::Cnn1d) {
            archs.cnn.check_blocks()?;
        }
        if arch.is_torchvision() && activation != Activation::Relu {
            return Err(KeyError::new(
                "model.activation",
                KeyProblem::FixedActivation { arch: arch.name() },
            ));
        }
        Ok(Self {
            arch,
            activation,
            dropout: dropout.unwrap_or(arch.default_dropout()),
            archs,
        })
    }

    /// The architecture's name as in `model.arch`.
    pub fn arch_name(&self) -> &'static str {
        self.arch.name()
    }

    /// A spec for estimating the footprint before the data is read: samples
    /// of `sample_shape` (as far as the config knows it; sizes it does not
    /// know are best given as 1, a lower bound), `num_classes` classes and a
    /// vocabulary of `vocab_size` tokens for text. Unlike [`Self::resolve`],
    /// inputs too small for the architecture are not refused.
    pub fn sketch(
        &self,
        sample_shape: &[usize],
        num_classes: usize,
        vocab_size: usize,
    ) -> Result<ModelSpec, KeyError> {
        let common = Common {
            activation: self.activation,
            dropout: self.dropout,
            num_classes,
        };
        let a = &self.archs;
        Ok(match self.arch {
            ArchKind::Mlp => ModelSpec::Mlp(a.mlp.resolve(&common, sample_shape)),
            ArchKind::Cnn => ModelSpec::Cnn(a.cnn.sketch(2, &common, sample_shape)?),
            ArchKind::Cnn1d => ModelSpec::Cnn1d(a.cnn.sketch(1, &common, sample_shape)?),
            ArchKind::Textcnn => {
                let seq_len = sample_shape.iter().product();
                ModelSpec::TextCnn(a.textcnn.sketch(&common, seq_len, vocab_size))
            }
            ArchKind::Resnet18 => ModelSpec::Resnet18(a.resnet.sketch(&common, sample_shape)),
            ArchKind::Resnet34 => ModelSpec::Resnet34(a.resnet.sketch(&common, sample_shape)),
            ArchKind::MobilenetV2 => {
                ModelSpec::MobilenetV2(a.mobilenet.sketch(&common, sample_shape))
            }
            ArchKind::MobilenetV3Small => {
                ModelSpec::MobilenetV3Small(a.mobilenet.sketch(&common, sample_shape))
            }
        })
    }

    /// The full spec for samples of `sample_shape` and `num_classes` classes;
    /// `vocab` is the vocabulary when the samples are token ids (text data).
    /// The error says why the architecture does not fit the data.
    pub fn resolve(
        &self,
        sample_shape: &[usize],
        num_classes: usize,
        vocab: Option<&Vocab>,
    ) -> Result<ModelSpec, ModelError> {
        if vocab.is_some() && !self.arch.reads_text() {
            return Err(ModelError::CannotReadText {
                arch: self.arch_name(),
            });
        }
        let common = Common {
            activation: self.activation,
            dropout: self.dropout,
            num_classes,
        };
        let a = &self.archs;
        Ok(match self.arch {
            ArchKind::Mlp => ModelSpec::Mlp(a.mlp.resolve(&common, sample_shape)),
            ArchKind::Cnn => ModelSpec::Cnn(a.cnn.resolve("cnn", 2, &common, sample_shape)?),
            ArchKind::Cnn1d => {
                ModelSpec::Cnn1d(a.cnn.resolve("cnn1d", 1, &common, sample_shape)?)
            }
            ArchKind::Textcnn => {
                ModelSpec::TextCnn(a.textcnn.resolve(&common, sample_shape, vocab)?)
            }
            ArchKind::Resnet18 => {
                ModelSpec::Resnet18(a.resnet.resolve("resnet18", &common, sample_shape)?)
            }
            ArchKind::Resnet34 => {
                ModelSpec::Resnet34(a.resnet.resolve("resnet34", &common, sample_shape)?)
            }
            ArchKind::MobilenetV2 => ModelSpec::MobilenetV2(a.mobilenet.resolve(
                "mobilenet_v2",
                &common,
                sample_shape,
            )?),
            ArchKind::MobilenetV3Small => ModelSpec::MobilenetV3Small(a.mobilenet.resolve(
                "mobilenet_v3_small",
                &common,
                sample_shape,
            )?),
        })
    }
}
