//! Split points: where an architecture's forward pass can be cut into a
//! frozen prefix and a trainable rest, for the frozen-feature cache
//! (`train.cache_features`).
//!
//! Each architecture lists its points ([`Classifier::split_points`]), shallow
//! to deep, each with the parameter-name prefixes of the part after it. A
//! point is usable when every trainable parameter outside those prefixes is
//! frozen, and the prefix is deterministic (no dropout before the point: an
//! architecture lists a point after a dropout only when its probability is 0).
//! [`Classifier::forward_prefix`] runs the part before a point,
//! [`Classifier::forward_rest`] the part after it from the prefix's output;
//! together they are [`Classifier::forward`].
//!
//! [`Classifier::split_points`]: super::Classifier::split_points
//! [`Classifier::forward_prefix`]: super::Classifier::forward_prefix
//! [`Classifier::forward_rest`]: super::Classifier::forward_rest
//! [`Classifier::forward`]: super::Classifier::forward

use candle_core::Tensor;

use super::ForwardCtx;

/// One place the forward pass can be cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPoint {
    /// A short name (`layer3`, `pool`, `features.17`), for reports and cache keys.
    pub name: String,
    /// Name prefixes of the parameters after the point (the trainable rest).
    pub rest: Vec<String>,
}

impl SplitPoint {
    /// A point named `name` whose rest holds the parameters under `rest`.
    pub fn new(name: impl Into<String>, rest: impl IntoIterator<Item = String>) -> Self {
        Self {
            name: name.into(),
            rest: rest.into_iter().collect(),
        }
    }

    /// Whether the parameter `name` lies after the point.
    pub fn in_rest(&self, name: &str) -> bool {
        self.rest.iter().any(|p| name.starts_with(p.as_str()))
    }
}

/// The deepest of `points` before which every trainable parameter is frozen
/// (`is_frozen`), as its index; `None` when there is none.
pub fn deepest_frozen(
    points: &[SplitPoint],
    trainable: &[String],
    is_frozen: impl Fn(&str) -> bool,
) -> Option<usize> {
    points.iter().rposition(|p| {
        trainable
            .iter()
            .filter(|n| !p.in_rest(n))
            .all(|n| is_frozen(n))
    })
}

/// A network computed as consecutive stages, each from the previous one's
/// output, and cut for the feature cache at stage boundaries. An
/// architecture that implements it and returns itself from
/// [`Classifier::staged`](super::Classifier::staged) gets its split points,
/// prefix and rest from [`forward_prefix`] and [`forward_rest`].
pub trait Staged {
    /// Stages in all; the last one's output is the logits.
    fn stage_count(&self) -> usize;

    /// The split points, shallow to deep, each with the stage boundary it
    /// cuts at (the number of stages before it).
    fn cuts(&self) -> Vec<(usize, SplitPoint)>;

    /// The input as stage 0 takes it (a reshape); the batch itself by default.
    fn input(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(x.clone())
    }

    /// Stage `s`, from the previous stage's output.
    fn stage(&self, s: usize, x: Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor>;
}

/// Every stage of `net`: its forward pass.
pub fn forward(net: &dyn Staged, x: &Tensor, ctx: &mut ForwardCtx) -> candle_core::Result<Tensor> {
    let x = net.input(x)?;
    run_stages(&x, 0, net.stage_count(), |s, x| net.stage(s, x, ctx))
}

/// The split points of `net`, shallow to deep.
pub fn points(net: &dyn Staged) -> Vec<SplitPoint> {
    net.cuts().into_iter().map(|(_, p)| p).collect()
}

fn boundary(net: &dyn Staged, point: usize) -> candle_core::Result<usize> {
    match net.cuts().get(point) {
        Some((b, _)) => Ok(*b),
        None => candle_core::bail!("no split point {point}"),
    }
}

/// The stages of `net` before split point `point`.
pub fn forward_prefix(
    net: &dyn Staged,
    x: &Tensor,
    point: usize,
    ctx: &mut ForwardCtx,
) -> candle_core::Result<Tensor> {
    let b = boundary(net, point)?;
    let x = net.input(x)?;
    run_stages(&x, 0, b, |s, x| net.stage(s, x, ctx))
}

/// The stages of `net` after split point `point`, from the prefix's output.
pub fn forward_rest(
    net: &dyn Staged,
    features: &Tensor,
    point: usize,
    ctx: &mut ForwardCtx,
) -> candle_core::Result<Tensor> {
    let b = boundary(net, point)?;
    run_stages(features, b, net.stage_count(), |s, x| net.stage(s, x, ctx))
}

/// Runs the consecutive stages `from..to` of a staged network: `stage(s, x)`
/// computes stage `s` from the previous stage's output.
fn run_stages<F>(x: &Tensor, from: usize, to: usize, mut stage: F) -> candle_core::Result<Tensor>
where
    F: FnMut(usize, Tensor) -> candle_core::Result<Tensor>,
{
    let mut x = x.clone();
    for s in from..to {
        x = stage(s, x)?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{
        Activation, CnnSpec, ConvBlockSpec, ForwardCtx, MobileNetSpec, Model, ModelSpec,
        ResNetSpec, TextCnnSpec,
    };
    use candle_core::{Device, Tensor};

    fn block(out_channels: usize, batch_norm: bool) -> ConvBlockSpec {
        ConvBlockSpec {
            out_channels,
            kernel_size: 3,
            stride: 1,
            padding: 1,
            batch_norm,
            pool: 2,
        }
    }

    /// At every split point of every architecture that has them, the rest
    /// of the prefix is the whole forward pass; the parameters the points
    /// name exist, and deeper points leave fewer of them to the rest.
    #[test]
    fn prefix_then_rest_is_the_forward_pass() {
        let image = [3usize, 12, 12];
        let specs = vec![
            ModelSpec::Resnet18(ResNetSpec {
                in_channels: 3,
                input_size: [12, 12],
                base_width: 2,
                num_classes: 3,
                dropout: 0.0,
            }),
            ModelSpec::MobilenetV2(MobileNetSpec {
                in_channels: 3,
                input_size: [12, 12],
                width_mult: 0.1,
                num_classes: 3,
                dropout: 0.2,
            }),
            ModelSpec::MobilenetV3Small(MobileNetSpec {
                in_channels: 3,
                input_size: [12, 12],
                width_mult: 0.1,
                num_classes: 3,
                dropout: 0.2,
            }),
            ModelSpec::Cnn(CnnSpec {
                in_channels: 3,
                input_size: vec![12, 12],
                blocks: vec![block(4, true), block(5, false)],
                num_classes: 3,
                activation: Activation::Relu,
                dropout: 0.0,
                flatten: true,
                hidden: vec![6, 7],
            }),
            ModelSpec::TextCnn(TextCnnSpec {
                vocab_size: 20,
                pad_index: 1,
                embed_dim: 4,
                filter_sizes: vec![2, 3],
                num_filters: 3,
                seq_len: 8,
                num_classes: 3,
                dropout: 0.5,
            }),
        ];
        for spec in specs {
            let text = matches!(spec, ModelSpec::TextCnn(_));
            let m = Model::new(spec, 4, &Device::Cpu).unwrap();
            let x = if text {
                let ids: Vec<f32> = (0..16).map(|i| (i * 7 % 20) as f32).collect();
                Tensor::from_vec(ids, (2, 8), &Device::Cpu).unwrap()
            } else {
                let n = 2 * image.iter().product::<usize>();
                let v: Vec<f32> = (0..n)
                    .map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0)
                    .collect();
                Tensor::from_vec(v, (2, image[0], image[1], image[2]), &Device::Cpu).unwrap()
            };
            let full = m.forward(&x, &mut ForwardCtx::eval()).unwrap();
            let full = full.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let points = m.net.split_points();
            assert!(points.len() >= 2, "{}", m.spec.arch_name());
            let names: Vec<String> = m.params.trainable().into_iter().map(|(n, _)| n).collect();
            let mut last_rest = usize::MAX;
            for (p, point) in points.iter().enumerate() {
                let f = m
                    .net
                    .forward_prefix(&x, p, &mut ForwardCtx::eval())
                    .unwrap();
                let y = m
                    .forward_from(&f, Some(p), &mut ForwardCtx::eval())
                    .unwrap();
                let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (a, b) in y.iter().zip(&full) {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{} at {}: {a} vs {b}",
                        m.spec.arch_name(),
                        point.name
                    );
                }
                let rest = names.iter().filter(|n| point.in_rest(n)).count();
                assert!(
                    rest >= 2 && rest < last_rest,
                    "{} at {}",
                    m.spec.arch_name(),
                    point.name
                );
                last_rest = rest;
            }
        }
    }

    #[test]
    fn the_deepest_point_with_a_frozen_prefix_wins() {
        let points = vec![
            SplitPoint::new("a", ["b.".to_string(), "head.".to_string()]),
            SplitPoint::new("b", ["head.".to_string()]),
        ];
        let names: Vec<String> = ["a.w", "b.w", "head.w"].map(String::from).to_vec();
        assert_eq!(deepest_frozen(&points, &names, |n| n != "head.w"), Some(1));
        assert_eq!(deepest_frozen(&points, &names, |n| n == "a.w"), Some(0));
        assert_eq!(deepest_frozen(&points, &names, |_| false), None);
    }
}
