//! Normalisation and batching: gathers samples into tensors, normalised with the
//! statistics of the training split, in a seeded per-epoch order.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

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
        if let Some(src) = data.features.images() {
            if src.options().normalize == super::NormalizeKind::Imagenet {
                return Self::imagenet(data.sample_shape.first().copied().unwrap_or(3));
            }
        }
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
        if let Some(src) = data.features.images() {
            let (sum, sq, n) = src.channel_sums(indices);
            return Self::from_sums(&sum, &sq, n);
        }
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
        Self::from_sums(&sum, &sq, (indices.len() * plane) as f64)
    }

    /// torchvision's ImageNet statistics (`Normalize(mean=[0.485, 0.456, 0.406],
    /// std=[0.229, 0.224, 0.225])` on values in [0, 1]) for 8-bit values; one
    /// channel gets their luminance-weighted means.
    pub fn imagenet(channels: usize) -> Self {
        let (mean, std) = if channels == 1 {
            (vec![0.449], vec![0.226])
        } else {
            (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225])
        };
        Self {
            mean: mean.into_iter().map(|m: f32| m * 255.0).collect(),
            std: std.into_iter().map(|s: f32| s * 255.0).collect(),
            per_channel: true,
        }
    }

    /// Per-channel statistics from sums of values and squares over `n` values a channel.
    fn from_sums(sum: &[f64], sq: &[f64], n: f64) -> Self {
        let n = n.max(1.0);
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
    /// The samples of the batch (dataset indices), in order.
    pub indices: Vec<usize>,
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
    mean: Arc<[f32]>,
    inv_std: Arc<[f32]>,
    device: Device,
}

impl<'a> Batcher<'a> {
    /// A batcher over `data`, normalising with `norm`, putting tensors on `device`.
    pub fn new(data: &'a Dataset, norm: &'a Normalization, device: &Device) -> Self {
        let (mean, inv_std) = norm.expanded(data.sample_len());
        Self {
            data,
            mean: mean.into(),
            inv_std: inv_std.into(),
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

    /// Gathers the given samples into one batch (no augmentation). Streamed
    /// images that fail to decode are left out of it (and reported by their source).
    pub fn batch(&self, indices: &[usize]) -> candle_core::Result<Batch> {
        self.batch_with(indices, None)
    }

    /// The training batch of `indices` in `epoch`: augmented (streamed images
    /// with `[data.augment]`) with randomness keyed by (seed, epoch, sample).
    pub fn train_batch(
        &self,
        indices: &[usize],
        seed: u64,
        epoch: u64,
    ) -> candle_core::Result<Batch> {
        self.batch_with(indices, Some((seed, epoch)))
    }

    /// The batches of `chunks` in order: prepared ahead on `data.workers`
    /// threads for streamed images, built as they are asked for otherwise.
    /// `aug = Some((seed, epoch))` for training batches.
    pub fn batches(&self, chunks: Vec<Vec<usize>>, aug: Option<(u64, u64)>) -> Batches<'_, 'a> {
        Batches::new(self, chunks, aug)
    }

    fn batch_with(&self, indices: &[usize], aug: Option<(u64, u64)>) -> candle_core::Result<Batch> {
        if let Some(src) = self.data.features.images() {
            let (x, kept) = src
                .host_batch(indices, aug, &self.mean, &self.inv_std)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            return self.assemble(x, &kept);
        }
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
            let stats = self.mean.iter().zip(self.inv_std.iter());
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
                super::Features::Images(_) => {}
            }
            labels.push(self.data.labels[i]);
        }
        let mut shape = vec![indices.len()];
        shape.extend_from_slice(&self.data.sample_shape);
        let x = Tensor::from_vec(x, shape, &self.device)?;
        let y = Tensor::from_vec(labels.clone(), indices.len(), &self.device)?;
        Ok(Batch {
            x,
            y,
            labels,
            indices: indices.to_vec(),
        })
    }

    /// The batch of the samples `kept`, whose normalised values are `x`.
    fn assemble(&self, x: Vec<f32>, kept: &[usize]) -> candle_core::Result<Batch> {
        let labels: Vec<u32> = kept.iter().map(|&i| self.data.labels[i]).collect();
        let mut shape = vec![kept.len()];
        shape.extend_from_slice(&self.data.sample_shape);
        let x = Tensor::from_vec(x, shape, &self.device)?;
        let y = Tensor::from_vec(labels.clone(), kept.len(), &self.device)?;
        Ok(Batch {
            x,
            y,
            labels,
            indices: kept.to_vec(),
        })
    }
}

/// What a prefetch worker sends: the normalised values of a batch and the
/// samples they are, or why the batch could not be made.
type HostBatch = Result<(Vec<f32>, Vec<usize>), String>;

/// The batches of an epoch (or an evaluation pass) in order, see
/// [`Batcher::batches`]. Dropping it stops its workers.
pub struct Batches<'b, 'a> {
    batcher: &'b Batcher<'a>,
    chunks: Arc<Vec<Vec<usize>>>,
    aug: Option<(u64, u64)>,
    next: usize,
    /// Worker `w` makes batches `w`, `w + W`, `w + 2W`, ...: receiving from
    /// the workers in turn delivers the batches in order.
    rx: Vec<Receiver<HostBatch>>,
    handles: Vec<JoinHandle<()>>,
}

impl<'b, 'a> Batches<'b, 'a> {
    fn new(batcher: &'b Batcher<'a>, chunks: Vec<Vec<usize>>, aug: Option<(u64, u64)>) -> Self {
        let chunks = Arc::new(chunks);
        let mut rx = Vec::new();
        let mut handles = Vec::new();
        if let Some(src) = batcher.data.features.images() {
            let opts = src.options();
            let workers = opts.workers.min(chunks.len());
            for w in 0..workers {
                let (tx, r) = sync_channel::<HostBatch>(opts.prefetch.max(1));
                let (src, chunks) = (Arc::clone(src), Arc::clone(&chunks));
                let (mean, inv) = (Arc::clone(&batcher.mean), Arc::clone(&batcher.inv_std));
                let spawned =
                    std::thread::Builder::new()
                        .name(format!("data-{w}"))
                        .spawn(move || {
                            for chunk in chunks.iter().skip(w).step_by(workers) {
                                let b = src
                                    .host_batch(chunk, aug, &mean, &inv)
                                    .map_err(|e| e.to_string());
                                // The receiver is gone: the epoch ended early.
                                if tx.send(b).is_err() {
                                    return;
                                }
                            }
                        });
                match spawned {
                    Ok(h) => {
                        rx.push(r);
                        handles.push(h);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start a data worker; batches are made in the training thread");
                        rx.clear();
                        break;
                    }
                }
            }
        }
        Self {
            batcher,
            chunks,
            aug,
            next: 0,
            rx,
            handles,
        }
    }
}

impl Iterator for Batches<'_, '_> {
    type Item = candle_core::Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let k = self.next;
        let chunk = self.chunks.get(k)?;
        self.next += 1;
        if self.rx.is_empty() {
            return Some(self.batcher.batch_with(chunk, self.aug));
        }
        let got = self.rx[k % self.rx.len()].recv();
        Some(match got {
            Ok(Ok((x, kept))) => self.batcher.assemble(x, &kept),
            Ok(Err(e)) => Err(candle_core::Error::Msg(e)),
            Err(_) => Err(candle_core::Error::Msg("a data worker stopped".into())),
        })
    }
}

impl Drop for Batches<'_, '_> {
    fn drop(&mut self) {
        // Receivers first: a worker blocked on a full channel then returns.
        self.rx.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
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
