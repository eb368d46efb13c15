//! Normalisation and batching: gathers samples into tensors, normalised with the
//! statistics of the training split, in a seeded per-epoch order.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::Dataset;

/// Per-feature (or per-channel) mean and standard deviation, computed once on
/// the training split and stored with the model: `x' = (x - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// One mean/std per channel (the first sample dimension, as torchvision's
    /// `Normalize` on `[C, H, W]`) instead of one per feature value.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_channel: bool,
}

impl Normalization {
    /// The normalisation a data format calls for: per channel for images, none
    /// for text (token ids must stay ids), per feature otherwise.
    pub fn for_format(data: &Dataset, indices: &[usize], format: super::DataFormat) -> Self {
        match format {
            super::DataFormat::ImageFolder => Self::fit_per_channel(data, indices),
            super::DataFormat::TextTsv => Self::identity(data.sample_len()),
            _ => Self::fit(data, indices),
        }
    }

    /// Per-channel statistics of the given samples (`[C, ...]`; population std,
    /// channels with std ~ 0 get 1).
    pub fn fit_per_channel(data: &Dataset, indices: &[usize]) -> Self {
        let d = data.sample_len();
        let c = data.sample_shape.first().copied().unwrap_or(1).max(1);
        let plane = d / c;
        let mut sum = vec![0f64; c];
        let mut sq = vec![0f64; c];
        for &i in indices {
            let base = i * d;
            for (ch, (s, q)) in sum.iter_mut().zip(sq.iter_mut()).enumerate() {
                let start = base + ch * plane;
                for j in start..start + plane {
                    let v = f64::from(data.features.get(j));
                    *s += v;
                    *q += v * v;
                }
            }
        }
        let n = (indices.len() * plane).max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| {
                let sd = (q / n - m * m).max(0.0).sqrt();
                if sd < 1e-6 {
                    1.0
                } else {
                    sd as f32
                }
            })
            .collect();
        Self {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            std,
            per_channel: true,
        }
    }

    /// Whether it fits samples of `shape`.
    pub fn covers(&self, shape: &[usize]) -> bool {
        let d: usize = shape.iter().product();
        if self.per_channel {
            shape.first() == Some(&self.len()) && self.std.len() == self.len()
        } else {
            self.len() == d && self.std.len() == d
        }
    }

    /// Mean and 1/std for every feature value of a sample of `sample_len` values.
    fn expanded(&self, sample_len: usize) -> (Vec<f32>, Vec<f32>) {
        let inv: Vec<f32> = self.std.iter().map(|s| 1.0 / s).collect();
        if !self.per_channel || self.mean.is_empty() {
            return (self.mean.clone(), inv);
        }
        let plane = sample_len / self.mean.len();
        let mean = self
            .mean
            .iter()
            .flat_map(|&m| std::iter::repeat_n(m, plane))
            .collect();
        let inv = inv
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, plane))
            .collect();
        (mean, inv)
    }

    /// Statistics of the given samples (population std; features with std ~ 0 get 1).
    pub fn fit(data: &Dataset, indices: &[usize]) -> Self {
        let d = data.sample_len();
        let mut sum = vec![0f64; d];
        let mut sq = vec![0f64; d];
        for &i in indices {
            let base = i * d;
            for j in 0..d {
                let v = f64::from(data.features.get(base + j));
                sum[j] += v;
                sq[j] += v * v;
            }
        }
        let n = indices.len().max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(s, m)| {
                let var = (s / n - m * m).max(0.0);
                let sd = var.sqrt();
                if sd < 1e-6 {
                    1.0
                } else {
                    sd as f32
                }
            })
            .collect();
        Self {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            std,
            per_channel: false,
        }
    }

    /// The identity normalisation for `d` features.
    pub fn identity(d: usize) -> Self {
        Self {
            mean: vec![0.0; d],
            std: vec![1.0; d],
            per_channel: false,
        }
    }

    /// Number of features this normalisation covers.
    pub fn len(&self) -> usize {
        self.mean.len()
    }

    /// Whether it covers no feature.
    pub fn is_empty(&self) -> bool {
        self.mean.is_empty()
    }
}

/// One batch, ready for the model.
#[derive(Debug)]
pub struct Batch {
    /// `[B, ...sample_shape]`, f32, normalised.
    pub x: Tensor,
    /// `[B]`, u32 class indices.
    pub y: Tensor,
    /// The labels on the host, for metrics.
    pub labels: Vec<u32>,
}

impl Batch {
    /// Number of samples in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Builds batches from a dataset with a fixed normalisation.
pub struct Batcher<'a> {
    data: &'a Dataset,
    /// Mean and 1/std of every feature value of a sample.
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    device: Device,
}

impl<'a> Batcher<'a> {
    /// A batcher over `data`, normalising with `norm`, putting tensors on `device`.
    pub fn new(data: &'a Dataset, norm: &'a Normalization, device: &Device) -> Self {
        let (mean, inv_std) = norm.expanded(data.sample_len());
        Self {
            data,
            mean,
            inv_std,
            device: device.clone(),
        }
    }

    /// The sample order of `epoch`: a seeded shuffle of `indices`.
    pub fn epoch_order(indices: &[usize], seed: u64, epoch: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch);
        let mut order = indices.to_vec();
        order.shuffle(&mut rng);
        order
    }

    /// Gathers the given samples into one batch.
    pub fn batch(&self, indices: &[usize]) -> candle_core::Result<Batch> {
        let d = self.data.sample_len();
        // Sized by the data: allocated fallibly, an error instead of an abort.
        let values = indices.len().saturating_mul(d);
        let mut x: Vec<f32> = Vec::new();
        x.try_reserve_exact(values).map_err(|e| {
            candle_core::Error::Msg(format!(
                "cannot allocate a batch of {} samples of {d} values: {e}",
                indices.len()
            ))
        })?;
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let base = i * d;
            // Zipped iterators (no indexing) so that the loop vectorises.
            let stats = self.mean.iter().zip(&self.inv_std);
            match &self.data.features {
                super::Features::F32(v) => x.extend(
                    v[base..base + d]
                        .iter()
                        .zip(stats)
                        .map(|(&val, (&m, &s))| (val - m) * s),
                ),
                super::Features::U8(v) => x.extend(
                    v[base..base + d]
                        .iter()
                        .zip(stats)
                        .map(|(&val, (&m, &s))| (f32::from(val) - m) * s),
                ),
            }
            labels.push(self.data.labels[i]);
        }
        let mut shape = vec![indices.len()];
        shape.extend_from_slice(&self.data.sample_shape);
        let x = Tensor::from_vec(x, shape, &self.device)?;
        let y = Tensor::from_vec(labels.clone(), indices.len(), &self.device)?;
        Ok(Batch { x, y, labels })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Dataset, Features};
    use super::*;

    fn tiny() -> Dataset {
        Dataset {
            features: Features::F32(vec![1.0, 10.0, 3.0, 10.0, 5.0, 10.0]),
            labels: vec![0, 1, 0],
            sample_shape: vec![2],
            classes: vec!["a".into(), "b".into()],
            origins: vec![(0, 0), (0, 1), (0, 2)],
            files: vec!["f".into()],
            skipped: vec![],
            vocab: None,
        }
    }

    #[test]
    fn per_channel_statistics_and_batches() {
        // Two samples of [2 channels, 2 values]: channel 0 holds 0, 2, 4, 6; channel 1 is 5.
        let d = Dataset {
            features: Features::U8(vec![0, 2, 5, 5, 4, 6, 5, 5]),
            labels: vec![0, 1],
            sample_shape: vec![2, 2],
            classes: vec!["a".into(), "b".into()],
            origins: vec![(0, 0), (0, 1)],
            files: vec!["f".into()],
            skipped: vec![],
            vocab: None,
        };
        let n = Normalization::fit_per_channel(&d, &[0, 1]);
        assert_eq!(n.mean, vec![3.0, 5.0]);
        assert!((n.std[0] - 5f32.sqrt()).abs() < 1e-6);
        assert_eq!(n.std[1], 1.0);
        assert!(n.covers(&[2, 2]) && !n.covers(&[4]));
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(serde_json::from_str::<Normalization>(&json).unwrap(), n);
        let b = Batcher::new(&d, &n, &Device::Cpu).batch(&[1]).unwrap();
        let v = b.x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((v[0] - 1.0 / 5f32.sqrt()).abs() < 1e-6);
        assert_eq!(&v[2..], &[0.0, 0.0]);
        // Per-feature normalisation keeps its old serialised form.
        let plain = Normalization::identity(2);
        assert!(!serde_json::to_string(&plain)
            .unwrap()
            .contains("per_channel"));
    }

    #[test]
    fn normalisation_statistics() {
        let d = tiny();
        let n = Normalization::fit(&d, &[0, 1, 2]);
        assert!((n.mean[0] - 3.0).abs() < 1e-6);
        assert!((n.std[0] - (8.0f32 / 3.0).sqrt()).abs() < 1e-5);
        // Constant feature: std replaced by 1.
        assert_eq!(n.std[1], 1.0);
    }

    #[test]
    fn batches_are_normalised() {
        let d = tiny();
        let n = Normalization::fit(&d, &[0, 1, 2]);
        let b = Batcher::new(&d, &n, &Device::Cpu).batch(&[2, 0]).unwrap();
        assert_eq!(b.x.dims(), &[2, 2]);
        let v = b.x.to_vec2::<f32>().unwrap();
        assert!(v[0][0] > 0.0 && v[1][0] < 0.0);
        assert_eq!(v[0][1], 0.0);
        assert_eq!(b.labels, vec![0, 0]);
    }

    #[test]
    fn epoch_order_is_seeded() {
        let idx: Vec<usize> = (0..50).collect();
        let a = Batcher::epoch_order(&idx, 1, 0);
        assert_eq!(a, Batcher::epoch_order(&idx, 1, 0));
        assert_ne!(a, Batcher::epoch_order(&idx, 1, 1));
        assert_ne!(a, Batcher::epoch_order(&idx, 2, 0));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, idx);
    }
}
