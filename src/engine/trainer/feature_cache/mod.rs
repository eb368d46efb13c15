//! The frozen-feature cache (`train.cache_features`): when every parameter
//! before one of the model's split points is frozen and no augmentation
//! changes the input, the part before that point is a fixed function of each
//! sample. Its output is computed once per sample (evaluation mode: frozen
//! batch-norm uses its running statistics, as it does in training) and the run
//! trains and evaluates the rest on it; the results are those of the uncached
//! run up to float summation order.
//!
//! The features are kept on disk ([`store`]) under a key of everything they
//! depend on: the frozen tensors' values, the architecture and split point,
//! the sample shape, the normalisation statistics, the resize mode, the
//! device and kernels. Each sample is found by its own key: an image file by
//! name, size and modification time; an in-memory sample by its values. A
//! later run (or the daemon's next retrain) with the same key reads them back
//! and computes only the samples it does not find.

pub mod store;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use xxhash_rust::xxh3::Xxh3;

use super::prepare::Prepared;
use crate::engine::data::{Batch, Batcher, Dataset, Features};
use crate::engine::model::{matches_pattern, split::deepest_frozen, ForwardCtx, KernelPolicy};
use crate::engine::run::{CacheFeatures, CancelFlag, FeatureCacheReport, RunRequest};

/// Bumped when what a key covers or the features' meaning changes.
const KEY_VERSION: &str = "edge-trainer feature cache v1";

/// The features of every sample of a run, in memory, and where they start.
pub(super) struct FeatureTable {
    /// The split point (index into the model's split points) the features are taken at.
    pub point: usize,
    shape: Vec<usize>,
    per: usize,
    /// Row of each dataset sample in `values`; `None` for one that failed to decode.
    rows: Vec<Option<u32>>,
    values: Vec<f32>,
    labels: Vec<u32>,
    device: Device,
}

impl FeatureTable {
    /// The batch of the samples `indices` (those without features left out).
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

    /// The batches of `chunks`, in order.
    pub fn batches(
        &self,
        chunks: Vec<Vec<usize>>,
    ) -> impl Iterator<Item = candle_core::Result<Batch>> + '_ {
        chunks.into_iter().map(move |c| self.batch(&c))
    }
}

/// Decides whether the run uses the cache and, if so, loads and computes
/// the features of every sample. Never fails the run: a reason not to use
/// the cache, or a problem with it, is reported and the run trains uncached.
pub(super) fn prepare(
    req: &RunRequest,
    prep: &Prepared,
    frozen: &[String],
    cancel: &CancelFlag,
) -> (Option<Arc<FeatureTable>>, FeatureCacheReport) {
    let (point, name) = match plan(req, prep, frozen) {
        Ok(p) => p,
        Err(reason) => {
            tracing::info!(run_id = %req.run_id, %reason, "frozen-feature cache not used");
            return (None, FeatureCacheReport::unused(reason));
        }
    };
    match build(req, prep, frozen, point, cancel) {
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
            (Some(Arc::new(table)), report)
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

/// Loads what is stored, computes the rest, stores the result and returns
/// the table; the error is the reason the cache is not used.
fn build(
    req: &RunRequest,
    prep: &Prepared,
    frozen: &[String],
    point: usize,
    cancel: &CancelFlag,
) -> Result<(FeatureTable, FeatureCacheReport), String> {
    let spec = &req.train.feature_cache;
    let data = &prep.data;
    let key = cache_key(req, prep, point)?;
    let path = store::path_of(&spec.dir, key);
    let stored = match store::read(&path, spec.max_bytes) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a feature cache file");
            None
        }
    };
    let stored_index = stored
        .as_ref()
        .map(store::Stored::index)
        .unwrap_or_default();
    let keys: Vec<Option<u128>> = (0..data.len()).map(|i| sample_key(data, i)).collect();
    let n = data.len();
    let mut rows: Vec<Option<u32>> = vec![None; n];
    let mut table: Option<(Vec<usize>, Vec<f32>)> = None;
    let mut hits = 0u64;
    // Room for every sample's features, checked once their size is known.
    let reserve = |shape: &[usize]| -> Result<(Vec<usize>, Vec<f32>), String> {
        let per: usize = shape.iter().product();
        let bytes = (n as u64).saturating_mul(per as u64 * 4);
        if bytes > spec.max_bytes {
            return Err(format!(
                "the features of {n} samples ({} values each at split point {}) take {} MiB, over train.cache_features_mb = {}",
                per,
                prep.model.net.split_points()[point].name,
                bytes.div_ceil(1 << 20),
                spec.max_bytes >> 20
            ));
        }
        let mut v = Vec::new();
        v.try_reserve_exact(n * per)
            .map_err(|e| format!("cannot hold the cached features: {e}"))?;
        Ok((shape.to_vec(), v))
    };
    if let Some(s) = &stored {
        let (shape, mut values) = reserve(&s.shape)?;
        for (i, k) in keys.iter().enumerate() {
            if let Some(&r) = k.as_ref().and_then(|k| stored_index.get(k)) {
                rows[i] = Some((values.len() / s.per()) as u32);
                values.extend_from_slice(s.row(r));
                hits += 1;
            }
        }
        table = Some((shape, values));
    }
    let misses: Vec<usize> = (0..n).filter(|&i| rows[i].is_none()).collect();
    let batcher = Batcher::new(data, &prep.norm, &req.device);
    let chunks: Vec<Vec<usize>> = misses
        .chunks(req.train.batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect();
    let mut ctx = ForwardCtx::eval().with_frozen(frozen.to_vec());
    for batch in batcher.batches(chunks, None) {
        if cancel.is_cancelled() {
            return Err("cancelled while computing the features".into());
        }
        let batch = batch.map_err(|e| e.to_string())?;
        if batch.is_empty() {
            continue;
        }
        let f = prep
            .model
            .net
            .forward_prefix(&batch.x, point, &mut ctx)
            .and_then(|f| f.detach().to_dtype(DType::F32))
            .map_err(|e| format!("computing the features: {e}"))?;
        let shape = f.dims()[1..].to_vec();
        let v = f
            .flatten_all()
            .and_then(|f| f.to_vec1::<f32>())
            .map_err(|e| e.to_string())?;
        if table.is_none() {
            table = Some(reserve(&shape)?);
        }
        if let Some((tshape, values)) = table.as_mut() {
            if *tshape != shape {
                return Err(format!(
                    "stored features have shape {tshape:?}, computed {shape:?}"
                ));
            }
            let per = v.len() / batch.len().max(1);
            for (j, &i) in batch.indices.iter().enumerate() {
                rows[i] = Some((values.len() / per.max(1)) as u32);
                values.extend_from_slice(&v[j * per..(j + 1) * per]);
            }
        }
    }
    let (shape, values) = table.ok_or("no sample could be read")?;
    let per: usize = shape.iter().product();
    let computed = misses.iter().filter(|&&i| rows[i].is_some()).count() as u64;
    if computed > 0 || stored.is_none() {
        save(spec, &path, &shape, &keys, &rows, &values, stored.as_ref());
    } else {
        store::touch(&path);
    }
    let report = FeatureCacheReport {
        used: true,
        reason: None,
        split: None,
        hits,
        misses: misses.len() as u64,
        bytes: (values.len() * 4) as u64,
    };
    Ok((
        FeatureTable {
            point,
            shape,
            per,
            rows,
            values,
            labels: data.labels.clone(),
            device: req.device.clone(),
        },
        report,
    ))
}

/// Writes the run's features (and, while they fit, the stored ones of
/// samples the run no longer has) and evicts other files over the limit.
/// A failure is logged: the run keeps its features in memory.
fn save(
    spec: &crate::engine::run::FeatureCacheSpec,
    path: &std::path::Path,
    shape: &[usize],
    keys: &[Option<u128>],
    rows: &[Option<u32>],
    values: &[f32],
    stored: Option<&store::Stored>,
) {
    let per: usize = shape.iter().product();
    let mut out: HashMap<u128, &[f32]> = HashMap::new();
    for (k, r) in keys.iter().zip(rows) {
        if let (Some(k), Some(r)) = (k, r) {
            let r = *r as usize;
            out.insert(*k, &values[r * per..(r + 1) * per]);
        }
    }
    let row_bytes = 16 + per as u64 * 4;
    if let Some(s) = stored.filter(|s| s.shape == shape) {
        for (r, k) in s.keys.iter().enumerate() {
            if (out.len() as u64 + 1) * row_bytes + 1024 > spec.max_bytes {
                break;
            }
            out.entry(*k).or_insert_with(|| s.row(r));
        }
    }
    let mut rows: Vec<(u128, &[f32])> = out.into_iter().collect();
    rows.sort_by_key(|(k, _)| *k);
    match store::write(path, shape, rows.into_iter()) {
        Ok(bytes) => {
            tracing::debug!(file = %path.display(), bytes, "feature cache written");
            for f in store::evict(&spec.dir, path, spec.max_bytes) {
                tracing::info!(file = %f.display(), "feature cache file evicted");
            }
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot write the feature cache")
        }
    }
}
