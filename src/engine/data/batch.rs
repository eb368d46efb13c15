//! Normalisation and batching: gathers samples into tensors, normalised with the
//! statistics of the training split, in a seeded per-epoch order.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::Dataset;

/// Per-feature mean and standard deviation, computed once on the training split
/// and stored with the model: `x' = (x - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalization {
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
        }
    }

    /// The identity normalisation for `d` features.
    pub fn identity(d: usize) -> Self {
        Self {
            mean: vec![0.0; d],
            std: vec![1.0; d],
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
    norm: &'a Normalization,
    inv_std: Vec<f32>,
    device: Device,
}

impl<'a> Batcher<'a> {
    /// A batcher over `data`, normalising with `norm`, putting tensors on `device`.
    pub fn new(data: &'a Dataset, norm: &'a Normalization, device: &Device) -> Self {
        Self {
            data,
            norm,
            inv_std: norm.std.iter().map(|s| 1.0 / s).collect(),
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
        let mut x = Vec::with_capacity(indices.len() * d);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let base = i * d;
            match &self.data.features {
                super::Features::F32(v) => {
                    for (j, &val) in v[base..base + d].iter().enumerate() {
                        x.push((val - self.norm.mean[j]) * self.inv_std[j]);
                    }
                }
                super::Features::U8(v) => {
                    for (j, &val) in v[base..base + d].iter().enumerate() {
                        x.push((f32::from(val) - self.norm.mean[j]) * self.inv_std[j]);
                    }
                }
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
        }
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
