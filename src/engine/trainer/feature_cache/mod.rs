//! The frozen-feature cache (`train.cache_features`): when every parameter
//! before one of the model's split points is frozen and no augmentation
//! changes the input, the part before that point is a fixed function of each
//! sample. Its output is computed once per sample, when a batch first needs
//! it (evaluation mode: frozen batch-norm uses its running statistics, as it
//! does in training), and the run trains and evaluates the rest on it; the
//! results are those of the uncached run up to float summation order.
//!
//! The features are kept on disk ([`store`]) under a key of everything they
//! depend on: the frozen tensors' values, the architecture and split point,
//! the sample shape, the normalisation statistics, the resize mode, the
//! device and kernels. Each sample is found by its own key: an image file by
//! name, size and modification time; an in-memory sample by its values. A
//! later run (or the daemon's next retrain) with the same key reads them back
//! and computes only the samples it does not find.

pub mod store;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use xxhash_rust::xxh3::Xxh3;

use super::prepare::Prepared;
use crate::engine::data::{Batch, Dataset, Features};
use crate::engine::model::{
    matches_pattern, split::deepest_frozen, ForwardCtx, KernelPolicy, Model,
};
use crate::engine::run::{CacheFeatures, FeatureCacheReport, FeatureCacheSpec, RunRequest};

/// Bumped when what a key covers or the features' meaning changes.
const KEY_VERSION: &str = "edge-trainer feature cache v1";

/// The features of the samples of a run, in memory, and where they start.
/// Those not found stored are computed when a batch first needs them (the
/// first epoch, the first validation pass), from the streamed images.
pub(super) struct FeatureTable {
    /// The split point (index into the model's split points) the features are taken at.
    pub point: usize,
    shape: Vec<usize>,
    per: usize,
    /// Row of each dataset sample in `values`, once known.
    rows: Vec<Option<u32>>,
    /// Samples that were asked for and could not be read (left out as uncached runs do).
    failed: Vec<bool>,
    values: Vec<f32>,
    labels: Vec<u32>,
    /// Each sample's key (`None`: not storable).
    keys: Vec<Option<u128>>,
    frozen: Vec<String>,
    device: Device,
    /// The cache file and its limits.
    path: PathBuf,
    spec: FeatureCacheSpec,
    /// Rows added since the file was last written.
    dirty: bool,
}

impl FeatureTable {
    /// Whether a sample of `chunk` still needs its features computed.
    pub fn missing(&self, chunk: &[usize]) -> bool {
        chunk
            .iter()
            .any(|&i| self.rows.get(i).is_some_and(Option::is_none) && !self.failed[i])
    }

    /// The batch of the samples `indices`, whose features are known (those
    /// without features left out).
    pub fn batch(&self, indices: &[usize]) -> candle_core::Result<Batch> {
        let mut x = Vec::with_capacity(indices.len() * self.per);
        let mut kept = Vec::with_capacity(indices.len());
        for &i in indices {
            if let Some(Some(r)) = self.rows.get(i) {
                let r = *r as usize;
                x.extend_from_slice(&self.values[r * self.per..(r + 1) * self.per]);
                kept.push(i);
            }
        }
        self.assemble(x, kept)
    }

    fn assemble(&self, x: Vec<f32>, kept: Vec<usize>) -> candle_core::Result<Batch> {
        let labels: Vec<u32> = kept.iter().map(|&i| self.labels[i]).collect();
        let mut shape = vec![kept.len()];
        shape.extend_from_slice(&self.shape);
        Ok(Batch {
            x: Tensor::from_vec(x, shape, &self.device)?,
            y: Tensor::from_vec(labels.clone(), kept.len(), &self.device)?,
            labels,
            indices: kept,
        })
    }

    /// The features of `images` (the input batch of `chunk`): the frozen
    /// prefix run once, its output kept for every later epoch; returned as the
    /// batch to train or evaluate the rest on.
    pub fn fill(
        &mut self,
        chunk: &[usize],
        images: &Batch,
        model: &Model,
    ) -> candle_core::Result<Batch> {
        for &i in chunk {
            if !images.indices.contains(&i) {
                self.failed[i] = true;
            }
        }
        if images.is_empty() {
            return self.assemble(Vec::new(), Vec::new());
        }
        let mut ctx = ForwardCtx::eval().with_frozen(self.frozen.clone());
        let f = model
            .net
            .forward_prefix(&images.x, self.point, &mut ctx)?
            .detach()
            .to_dtype(DType::F32)?;
        if f.dims()[1..] != self.shape[..] {
            candle_core::bail!(
                "features of shape {:?}, expected {:?}",
                &f.dims()[1..],
                self.shape
            );
        }
        let v = f.flatten_all()?.to_vec1::<f32>()?;
        let per = self.per;
        for (j, &i) in images.indices.iter().enumerate() {
            if self.rows[i].is_none() {
                self.rows[i] = Some((self.values.len() / per.max(1)) as u32);
                self.values.extend_from_slice(&v[j * per..(j + 1) * per]);
                self.dirty = true;
            }
        }
        self.assemble(v, images.indices.clone())
    }

    /// The batches of `chunks` in order: known features from memory, the
    /// others computed from `images` (the input batches of exactly the
    /// chunks [`Self::missing`] reports, in order).
    pub fn batches<'t, I>(
        &'t mut self,
        chunks: Vec<Vec<usize>>,
        mut images: I,
        model: &'t Model,
    ) -> impl Iterator<Item = candle_core::Result<Batch>> + 't
    where
        I: Iterator<Item = candle_core::Result<Batch>> + 't,
    {
        chunks.into_iter().map(move |c| {
            if !self.missing(&c) {
                return self.batch(&c);
            }
            match images.next() {
                Some(b) => self.fill(&c, &b?, model),
                None => candle_core::bail!("no input batch for a sample without features"),
            }
        })
    }

    /// The chunks of `chunks` that need input batches.
    pub fn needing_images(&self, chunks: &[Vec<usize>]) -> Vec<Vec<usize>> {
        chunks.iter().filter(|c| self.missing(c)).cloned().collect()
    }

    /// Writes the features known now to the cache file, if any were added
    /// since the last write, and evicts other files over the limit. A
    /// failure is logged: the run keeps its features in memory.
    pub fn save(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let per = self.per;
        let mut rows: Vec<(u128, &[f32])> = self
            .keys
            .iter()
            .zip(&self.rows)
            .filter_map(|(k, r)| {
                let (k, r) = ((*k)?, (*r)? as usize);
                Some((k, &self.values[r * per..(r + 1) * per]))
            })
            .collect();
        rows.sort_by_key(|(k, _)| *k);
        rows.dedup_by_key(|(k, _)| *k);
        match store::write(&self.path, &self.shape, rows.into_iter()) {
            Ok(bytes) => {
                tracing::debug!(file = %self.path.display(), bytes, "feature cache written");
                for f in store::evict(&self.spec.dir, &self.path, self.spec.max_bytes) {
                    tracing::info!(file = %f.display(), "feature cache file evicted");
                }
            }
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot write the feature cache")
            }
        }
    }
}

/// Decides whether the run uses the cache and, if so, loads and computes
/// the features of every sample. Never fails the run: a reason not to use
/// the cache, or a problem with it, is reported and the run trains uncached.
pub(super) fn prepare(
    req: &RunRequest,
    prep: &Prepared,
    frozen: &[String],
) -> (Option<FeatureTable>, FeatureCacheReport) {
    let (point, name) = match plan(req, prep, frozen) {
        Ok(p) => p,
        Err(reason) => {
            tracing::info!(run_id = %req.run_id, %reason, "frozen-feature cache not used");
            return (None, FeatureCacheReport::unused(reason));
        }
    };
    match build(req, prep, frozen, point) {
        Ok((table, mut report)) => {
            report.split = Some(name.clone());
            tracing::info!(
                run_id = %req.run_id,
                split = %name,
                hits = report.hits,
                misses = report.misses,
                bytes = report.bytes,
                "training on cached frozen features"
            );
            if let Some(src) = prep.data.features.images() {
                // Decoded images are needed once each: keeping them is no use.
                src.set_caching(false);
            }
            (Some(table), report)
        }
        Err(reason) => {
            tracing::info!(run_id = %req.run_id, %reason, "frozen-feature cache not used");
            (None, FeatureCacheReport::unused(reason))
        }
    }
}

/// The split point to cache at (index, name), or why there is none.
fn plan(req: &RunRequest, prep: &Prepared, frozen: &[String]) -> Result<(usize, String), String> {
    if req.train.feature_cache.mode == CacheFeatures::Off {
        return Err("train.cache_features = \"off\"".into());
    }
    if let Some(src) = prep.data.features.images() {
        if !src.options().augment.is_off() {
            return Err("[data.augment] changes the training input every epoch".into());
        }
    }
    let model = &prep.model;
    let points = model.net.split_points();
    let arch = model.spec.arch_name();
    if points.is_empty() {
        return Err(format!("{arch} has no split point"));
    }
    let trainable: Vec<String> = model
        .params
        .trainable()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let is_frozen = |n: &str| frozen.iter().any(|p| matches_pattern(p, n));
    match deepest_frozen(&points, &trainable, is_frozen) {
        Some(i) => Ok((i, points[i].name.clone())),
        None if frozen.is_empty() => Err(format!(
            "every layer trains (model.finetune = \"{}\" and no model.freeze)",
            req.train.finetune
        )),
        None => {
            let first = &points[0];
            let training = trainable
                .iter()
                .find(|n| !first.in_rest(n) && !is_frozen(n))
                .cloned()
                .unwrap_or_default();
            Err(format!(
                "{arch} trains {training}, before its first split point ({})",
                first.name
            ))
        }
    }
}

/// The key of everything the features of split point `point` depend on
/// besides the sample itself.
fn cache_key(req: &RunRequest, prep: &Prepared, point: usize) -> Result<u128, String> {
    let model = &prep.model;
    let points = model.net.split_points();
    let p = &points[point];
    let mut h = Xxh3::new();
    let put = |h: &mut Xxh3, s: &str| {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    put(&mut h, KEY_VERSION);
    put(&mut h, model.spec.arch_name());
    put(&mut h, &p.name);
    // The spec without what only the rest uses (classes, dropout).
    let mut spec = serde_json::to_value(model.spec.without_dropout()).map_err(|e| e.to_string())?;
    if let Some(o) = spec.as_object_mut() {
        o.remove("num_classes");
    }
    put(&mut h, &spec.to_string());
    put(&mut h, &format!("{:?}", prep.data.sample_shape));
    put(&mut h, &format!("{:?}", req.data.format));
    let n = &prep.norm;
    put(
        &mut h,
        &format!("{:?} {:?} {}", n.mean, n.std, n.per_channel),
    );
    if let Some(src) = prep.data.features.images() {
        put(&mut h, &format!("{:?}", src.options().resize));
    }
    put(&mut h, &format!("{:?}", req.device.location()));
    put(&mut h, &format!("{:?}", KernelPolicy::from_env()));
    put(&mut h, "f32");
    let mut tensors = model.params.state_dict();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in tensors.iter().filter(|(n, _)| !p.in_rest(n)) {
        put(&mut h, name);
        put(&mut h, &format!("{:?}", t.dims()));
        let v = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| e.to_string())?;
        for x in v {
            h.update(&x.to_le_bytes());
        }
    }
    Ok(h.digest128())
}

/// The key of sample `i`: an image file's name, size and modification time,
/// or an in-memory sample's values; `None` when it cannot be told (an image
/// whose file cannot be read now: its features are computed, not stored).
fn sample_key(data: &Dataset, i: usize) -> Option<u128> {
    let mut h = Xxh3::new();
    match &data.features {
        Features::Images(src) => {
            let (name, len, mtime) = src.file_identity(i).ok()?;
            h.update(b"image");
            h.update(name.as_bytes());
            h.update(&len.to_le_bytes());
            h.update(&mtime.to_le_bytes());
        }
        f => {
            h.update(b"values");
            let d = data.sample_len();
            for j in i * d..(i + 1) * d {
                h.update(&f.get(j).to_le_bytes());
            }
        }
    }
    Some(h.digest128())
}

/// Loads what is stored and sets up the table (the rest is computed as
/// batches need it); the error is the reason the cache is not used.
fn build(
    req: &RunRequest,
    prep: &Prepared,
    frozen: &[String],
    point: usize,
) -> Result<(FeatureTable, FeatureCacheReport), String> {
    let spec = &req.train.feature_cache;
    let data = &prep.data;
    let n = data.len();
    // The features' shape, from the prefix on one blank sample.
    let mut blank = vec![1];
    blank.extend_from_slice(&data.sample_shape);
    let mut ctx = ForwardCtx::eval().with_frozen(frozen.to_vec());
    let shape = Tensor::zeros(blank, DType::F32, &req.device)
        .and_then(|x| prep.model.net.forward_prefix(&x, point, &mut ctx))
        .map(|f| f.dims()[1..].to_vec())
        .map_err(|e| format!("computing the features: {e}"))?;
    let per: usize = shape.iter().product();
    let bytes = (n as u64).saturating_mul(per as u64 * 4);
    if bytes > spec.max_bytes {
        return Err(format!(
            "the features of {n} samples ({per} values each at split point {}) take {} MiB, over train.cache_features_mb = {}",
            prep.model.net.split_points()[point].name,
            bytes.div_ceil(1 << 20),
            spec.max_bytes >> 20
        ));
    }
    let mut values = Vec::new();
    values
        .try_reserve_exact(n * per)
        .map_err(|e| format!("cannot hold the cached features: {e}"))?;
    let key = cache_key(req, prep, point)?;
    let path = store::path_of(&spec.dir, key);
    let stored = match store::read(&path, spec.max_bytes) {
        Ok(s) => s.filter(|s| s.shape == shape),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a feature cache file");
            None
        }
    };
    let keys: Vec<Option<u128>> = (0..n).map(|i| sample_key(data, i)).collect();
    let mut rows: Vec<Option<u32>> = vec![None; n];
    let mut hits = 0u64;
    if let Some(s) = &stored {
        let index = s.index();
        for (i, k) in keys.iter().enumerate() {
            if let Some(&r) = k.as_ref().and_then(|k| index.get(k)) {
                rows[i] = Some((values.len() / per.max(1)) as u32);
                values.extend_from_slice(s.row(r));
                hits += 1;
            }
        }
        store::touch(&path);
    }
    let report = FeatureCacheReport {
        used: true,
        reason: None,
        split: None,
        hits,
        misses: n as u64 - hits,
        bytes,
    };
    Ok((
        FeatureTable {
            point,
            shape,
            per,
            rows,
            failed: vec![false; n],
            values,
            labels: data.labels.clone(),
            keys,
            frozen: frozen.to_vec(),
            device: req.device.clone(),
            path,
            spec: spec.clone(),
            // A file that is missing, corrupt or lacks samples is (re)written.
            dirty: stored.is_none(),
        },
        report,
    ))
}
