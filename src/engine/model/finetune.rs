//! `model.finetune`: which parameters a run trains, in the terms people
//! fine-tuning pretrained backbones use.
//!
//! - `"full"` (the default): every parameter (less `model.freeze`).
//! - `"head"`: the classifier head only (`fc.*` for resnet and textcnn,
//!   `classifier.*` for the mobilenets, `head.*` for mlp and cnn).
//! - `"last:N"`: the last N stages and the head. The stages are resnet's
//!   `layer1..layer4`, mobilenet_v2's `features.0..features.18`,
//!   mobilenet_v3_small's `features.0..features.12`, the conv
//!   blocks `features.{i}` and hidden layers `fc.{i}` of cnn, the hidden
//!   layers `layers.{i}` of mlp, and textcnn's `embedding` then `convs`.
//! - `"bias"`: TinyTL-style: every bias, every batch-norm weight (its affine
//!   scale) and the head; convolution and linear weights stay fixed.
//!
//! The parameters outside the selection are frozen exactly as `model.freeze`
//! freezes them (the two combine), and a batch-norm layer whose `weight` is
//! frozen normalises with its running statistics and leaves them as they are,
//! in training too (see `layers::batchnorm`). PyTorch users get something
//! else from `model.train()` on a partly frozen model unless they also put the
//! frozen batch-norm layers in `.eval()`: there, a layer with
//! `requires_grad = False` still normalises with batch statistics and updates
//! its running statistics. So `"head"` and `"last:N"` here are what PyTorch
//! gives with the frozen part in `.eval()` (torchvision's `FrozenBatchNorm2d`),
//! and `"bias"` (batch-norm affine trained) keeps batch statistics in every layer.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ModelSpec;

/// `model.finetune`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FineTune {
    /// Every parameter.
    #[default]
    Full,
    /// The classifier head only.
    Head,
    /// The last N stages and the head.
    Last(usize),
    /// Biases, batch-norm weights and the head (TinyTL).
    Bias,
}

/// A `model.finetune` value that does not parse, or does not fit the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FineTuneError {
    #[error(
        "model.finetune = {0:?}: expected \"full\", \"head\", \"last:N\" (N >= 1) or \"bias\""
    )]
    Parse(String),
    #[error("model.finetune = \"last:{n}\": {arch} has {stages} stages ({names}); use at most \"last:{stages}\" or \"full\"")]
    TooManyStages {
        n: usize,
        arch: &'static str,
        stages: usize,
        names: String,
    },
}

impl FromStr for FineTune {
    type Err = FineTuneError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(FineTune::Full),
            "head" => Ok(FineTune::Head),
            "bias" => Ok(FineTune::Bias),
            _ => match s.strip_prefix("last:").map(str::parse::<usize>) {
                Some(Ok(n)) if n >= 1 => Ok(FineTune::Last(n)),
                _ => Err(FineTuneError::Parse(s.to_string())),
            },
        }
    }
}

impl TryFrom<String> for FineTune {
    type Error = FineTuneError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<FineTune> for String {
    fn from(f: FineTune) -> String {
        f.to_string()
    }
}

impl fmt::Display for FineTune {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FineTune::Full => write!(f, "full"),
            FineTune::Head => write!(f, "head"),
            FineTune::Last(n) => write!(f, "last:{n}"),
            FineTune::Bias => write!(f, "bias"),
        }
    }
}

impl ModelSpec {
    /// Name prefix of the classifier head's parameters.
    pub fn head_prefix(&self) -> &'static str {
        match self {
            ModelSpec::Mlp(_) | ModelSpec::Cnn(_) | ModelSpec::Cnn1d(_) => "head.",
            ModelSpec::TextCnn(_) | ModelSpec::Resnet18(_) | ModelSpec::Resnet34(_) => "fc.",
            ModelSpec::MobilenetV2(_) | ModelSpec::MobilenetV3Small(_) => "classifier.",
        }
    }

    /// Name prefixes of the stages `model.finetune = "last:N"` counts, first to last.
    pub fn stages(&self) -> Vec<String> {
        match self {
            ModelSpec::Mlp(s) => (0..s.hidden.len())
                .map(|i| format!("layers.{i}."))
                .collect(),
            ModelSpec::Cnn(s) | ModelSpec::Cnn1d(s) => (0..s.blocks.len())
                .map(|i| format!("features.{i}."))
                .chain((0..s.hidden.len()).map(|i| format!("fc.{i}.")))
                .collect(),
            ModelSpec::TextCnn(_) => vec!["embedding.".into(), "convs.".into()],
            ModelSpec::Resnet18(_) | ModelSpec::Resnet34(_) => {
                (1..=4).map(|i| format!("layer{i}.")).collect()
            }
            ModelSpec::MobilenetV2(_) => (0..super::mobilenet::MobileNetSpec::STAGES)
                .map(|i| format!("features.{i}."))
                .collect(),
            ModelSpec::MobilenetV3Small(_) => (0..super::mobilenet_v3::STAGES)
                .map(|i| format!("features.{i}."))
                .collect(),
        }
    }
}

impl FineTune {
    /// The parameters of `trainable` (names) this mode holds fixed, for a
    /// model of `spec` whose state dict has the names `all` (parameters and
    /// buffers: a batch-norm weight is one with a `running_mean` beside it).
    pub fn frozen(
        self,
        spec: &ModelSpec,
        trainable: &[String],
        all: &BTreeSet<String>,
    ) -> Result<Vec<String>, FineTuneError> {
        let head = spec.head_prefix();
        let keep: Box<dyn Fn(&str) -> bool + '_> = match self {
            FineTune::Full => return Ok(Vec::new()),
            FineTune::Head => Box::new(move |n: &str| n.starts_with(head)),
            FineTune::Last(k) => {
                let stages = spec.stages();
                if k > stages.len() {
                    let names: Vec<&str> = stages.iter().map(|s| s.trim_end_matches('.')).collect();
                    return Err(FineTuneError::TooManyStages {
                        n: k,
                        arch: spec.arch_name(),
                        stages: stages.len(),
                        names: if names.is_empty() {
                            "none".into()
                        } else {
                            names.join(", ")
                        },
                    });
                }
                let last: Vec<String> = stages[stages.len() - k..].to_vec();
                Box::new(move |n: &str| {
                    n.starts_with(head) || last.iter().any(|p| n.starts_with(p.as_str()))
                })
            }
            FineTune::Bias => Box::new(move |n: &str| {
                let bn_weight = n
                    .strip_suffix(".weight")
                    .is_some_and(|p| all.contains(&format!("{p}.running_mean")));
                n.starts_with(head) || n.ends_with(".bias") || bn_weight
            }),
        };
        Ok(trainable
            .iter()
            .filter(|n| !keep(n.as_str()))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{Model, ResNetSpec};
    use candle_core::Device;

    fn resnet() -> (ModelSpec, Vec<String>, BTreeSet<String>) {
        let spec = ModelSpec::Resnet18(ResNetSpec {
            in_channels: 3,
            input_size: [32, 32],
            base_width: 4,
            num_classes: 3,
            dropout: 0.0,
        });
        let m = Model::new(spec.clone(), 0, &Device::Cpu).unwrap();
        let trainable = m.params.trainable().into_iter().map(|(n, _)| n).collect();
        let all = m.params.state_dict().into_iter().map(|(n, _)| n).collect();
        (spec, trainable, all)
    }

    #[test]
    fn parses_and_prints() {
        for s in ["full", "head", "last:2", "bias"] {
            assert_eq!(s.parse::<FineTune>().unwrap().to_string(), s);
        }
        for bad in ["last:0", "last:", "last:x", "tail", ""] {
            assert!(bad.parse::<FineTune>().is_err(), "{bad}");
        }
        let e = "heads".parse::<FineTune>().unwrap_err().to_string();
        assert!(e.contains("\"last:N\""), "{e}");
    }

    #[test]
    fn modes_select_torchvision_names() {
        let (spec, trainable, all) = resnet();
        let trains = |mode: FineTune| -> Vec<String> {
            let frozen = mode.frozen(&spec, &trainable, &all).unwrap();
            trainable
                .iter()
                .filter(|n| !frozen.contains(n))
                .cloned()
                .collect()
        };
        assert_eq!(trains(FineTune::Full), trainable);
        assert_eq!(trains(FineTune::Head), vec!["fc.bias", "fc.weight"]);
        let last = trains(FineTune::Last(1));
        assert!(last
            .iter()
            .all(|n| n.starts_with("layer4.") || n.starts_with("fc.")));
        assert!(last.contains(&"layer4.0.downsample.0.weight".to_string()));
        assert!(!last.iter().any(|n| n.starts_with("layer3.")));
        let bias = trains(FineTune::Bias);
        assert!(bias.contains(&"bn1.weight".to_string()));
        assert!(bias.contains(&"layer2.0.downsample.1.weight".to_string()));
        assert!(bias.contains(&"fc.weight".to_string()));
        assert!(!bias.iter().any(|n| n.ends_with("conv1.weight")));
        let e = FineTune::Last(5)
            .frozen(&spec, &trainable, &all)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("resnet18 has 4 stages (layer1, layer2, layer3, layer4)"),
            "{e}"
        );
    }
}
