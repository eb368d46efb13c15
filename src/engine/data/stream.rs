//! Streaming image-folder data: the images are listed and checked up front
//! from their headers only (format, dimensions, readable), then decoded,
//! resized and (train split) augmented when a batch needs them, on the
//! prefetch workers. A bounded cache (`data.cache_mb`) keeps resized samples
//! so that later epochs skip decoding those that fit; nothing else of the data
//! set is held in memory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::augment::{self, AugmentSpec, Hwc};
use super::image_folder::{self, ResizeMode};
use super::{
    check_file, read_class_file, relative_name, resolve_labels, DataError, DataSpec, Dataset,
    Features, FileError, RawLabels, SkippedFile,
};

/// Which statistics image batches are normalised with (`data.normalize`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormalizeKind {
    /// Per-channel mean and std of the training split.
    #[default]
    Dataset,
    /// torchvision's ImageNet mean and std (what its pretrained weights expect).
    Imagenet,
}

/// How image-folder samples are produced (`data.normalize`, `data.resize`,
/// `data.cache_mb`, `data.workers`, `data.prefetch`, `[data.augment]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageOptions {
    pub normalize: NormalizeKind,
    pub resize: ResizeMode,
    /// Bytes of resized samples kept in memory across epochs.
    pub cache_bytes: u64,
    /// Threads that decode and augment batches ahead of the training step.
    pub workers: usize,
    /// Batches each worker prepares ahead.
    pub prefetch: usize,
    /// Train-split augmentation.
    pub augment: AugmentSpec,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            normalize: NormalizeKind::Dataset,
            resize: ResizeMode::Stretch,
            cache_bytes: 256 << 20,
            workers: 2,
            prefetch: 2,
            augment: AugmentSpec::default(),
        }
    }
}

impl ImageOptions {
    /// Bytes the pipeline may hold for samples of `sample_len` values in
    /// batches of `batch_size`: the full cache plus `workers x prefetch`
    /// normalised batches (f32) waiting for the step.
    pub fn pipeline_bytes(&self, sample_len: usize, batch_size: usize) -> u64 {
        let batch = (sample_len as u64)
            .saturating_mul(batch_size as u64)
            .saturating_mul(4);
        let ahead = (self.workers as u64).saturating_mul(self.prefetch.max(1) as u64);
        self.cache_bytes.saturating_add(ahead.saturating_mul(batch))
    }
}

/// Training images that fail to decode during a run are left out of their
/// batches and reported; at most this many are named.
const MAX_NAMED_FAILURES: usize = 1000;

/// Images per run whose statistics are measured for `data.normalize = "dataset"`
/// (evenly spread over the training split; all of them when fewer).
pub const STATS_SAMPLES: usize = 512;

/// The images of a streamed data set and how each becomes a sample.
pub struct ImageSource {
    dir: PathBuf,
    /// Relative file name of each sample.
    names: Vec<String>,
    size: [usize; 2],
    channels: usize,
    opts: ImageOptions,
    cache: Mutex<Cache>,
    /// Whether decoded samples are kept (off when the frozen-feature cache keeps their features).
    caching: AtomicBool,
    failed: Mutex<BTreeMap<String, String>>,
}

#[derive(Default)]
struct Cache {
    used: u64,
    samples: HashMap<usize, Arc<Hwc>>,
}

impl std::fmt::Debug for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageSource")
            .field("dir", &self.dir)
            .field("images", &self.names.len())
            .field("size", &self.size)
            .field("channels", &self.channels)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ImageSource {
    fn eq(&self, other: &Self) -> bool {
        self.dir == other.dir
            && self.names == other.names
            && self.size == other.size
            && self.channels == other.channels
            && self.opts == other.opts
    }
}

impl ImageSource {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The sampling options.
    pub fn options(&self) -> &ImageOptions {
        &self.opts
    }

    /// What identifies image `i` as a file: its name relative to the data
    /// folder, its size and its modification time (nanoseconds since the
    /// epoch); what the frozen-feature cache keys a sample by.
    pub fn file_identity(&self, i: usize) -> std::io::Result<(&str, u64, u128)> {
        let name = self
            .names
            .get(i)
            .ok_or_else(|| std::io::Error::other(format!("no image {i}")))?;
        let meta = std::fs::metadata(self.dir.join(name))?;
        let mtime = meta
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok((name, meta.len(), mtime))
    }

    /// Keeps decoded samples in the cache (`data.cache_mb`) or not; turning
    /// it off empties it.
    pub fn set_caching(&self, on: bool) {
        self.caching.store(on, Ordering::Relaxed);
        if !on {
            if let Ok(mut c) = self.cache.lock() {
                *c = Cache::default();
            }
        }
    }

    /// Bytes of resized samples held by the cache now.
    pub fn cached_bytes(&self) -> u64 {
        self.cache.lock().map_or(0, |c| c.used)
    }

    /// The resized sample `i` (`[h, w, c]`), from the cache or decoded.
    pub fn base(&self, i: usize) -> Result<Arc<Hwc>, FileError> {
        if let Ok(c) = self.cache.lock() {
            if let Some(s) = c.samples.get(&i) {
                return Ok(Arc::clone(s));
            }
        }
        let name = self.names.get(i).ok_or(FileError::NoSamples)?;
        let img = image_folder::decode(&self.dir.join(name), self.channels)?;
        let sample = Arc::new(image_folder::resize_to(&img, self.size, self.opts.resize)?);
        drop(img);
        let bytes = sample.data.len() as u64;
        if !self.caching.load(Ordering::Relaxed) {
            return Ok(sample);
        }
        if let Ok(mut c) = self.cache.lock() {
            // Kept while there is room, never evicted: epochs visit every
            // sample once in a new order, where evicting only churns.
            if c.used + bytes <= self.opts.cache_bytes && !c.samples.contains_key(&i) {
                c.used += bytes;
                c.samples.insert(i, Arc::clone(&sample));
            }
        }
        Ok(sample)
    }

    /// Appends sample `i`, normalised with `mean` and `inv_std` (one per value
    /// of `[c, h, w]`), to `out`; augmented with `aug = (seed, epoch)`.
    fn write(
        &self,
        i: usize,
        aug: Option<(u64, u64)>,
        mean: &[f32],
        inv_std: &[f32],
        out: &mut Vec<f32>,
    ) -> Result<(), FileError> {
        let base = self.base(i)?;
        let plane = base.w as usize * base.h as usize;
        let c = base.c;
        let start = out.len();
        out.resize(start + c * plane, 0.0);
        let dst = &mut out[start..];
        let mut put = |p: usize, k: usize, v: f32| {
            let j = k * plane + p;
            dst[j] = (v - mean[j]) * inv_std[j];
        };
        match aug {
            Some((seed, epoch)) if !self.opts.augment.is_off() => {
                let mut rng = augment::sample_rng(seed, epoch, &self.names[i], 0);
                let px = augment::apply(&self.opts.augment, &base, &mut rng);
                for (p, v) in px.chunks_exact(c).enumerate() {
                    v.iter().enumerate().for_each(|(k, &v)| put(p, k, v));
                }
            }
            _ => {
                for (p, v) in base.data.chunks_exact(c).enumerate() {
                    v.iter()
                        .enumerate()
                        .for_each(|(k, &v)| put(p, k, f32::from(v)));
                }
            }
        }
        Ok(())
    }

    /// The normalised values of the samples `indices` that decode, and which
    /// those are; a sample that fails is left out, logged and remembered.
    pub fn host_batch(
        &self,
        indices: &[usize],
        aug: Option<(u64, u64)>,
        mean: &[f32],
        inv_std: &[f32],
    ) -> Result<(Vec<f32>, Vec<usize>), FileError> {
        let per: usize = self.channels * self.size[0] * self.size[1];
        let mut x: Vec<f32> = Vec::new();
        x.try_reserve_exact(indices.len().saturating_mul(per))
            .map_err(|_| FileError::Budget {
                limit: (indices.len().saturating_mul(per) * 4) as u64,
                sample: 0,
            })?;
        let mut kept = Vec::with_capacity(indices.len());
        for &i in indices {
            let len = x.len();
            match self.write(i, aug, mean, inv_std, &mut x) {
                Ok(()) => kept.push(i),
                Err(reason) => {
                    x.truncate(len);
                    self.note_failure(i, &reason);
                }
            }
        }
        Ok((x, kept))
    }

    fn note_failure(&self, i: usize, reason: &FileError) {
        let name = self.names.get(i).cloned().unwrap_or_default();
        if let Ok(mut f) = self.failed.lock() {
            if f.len() < MAX_NAMED_FAILURES && !f.contains_key(&name) {
                tracing::warn!(file = %name, %reason, "image left out: it cannot be decoded");
                f.insert(name, reason.to_string());
            }
        }
    }

    /// Images left out of batches because they failed to decode.
    pub fn failures(&self) -> Vec<SkippedFile> {
        self.failed.lock().map_or_else(
            |_| Vec::new(),
            |f| {
                f.iter()
                    .map(|(file, reason)| SkippedFile {
                        file: file.clone(),
                        reason: reason.clone(),
                    })
                    .collect()
            },
        )
    }

    /// Per-channel sums of values and squares, and the value count per
    /// channel, over at most [`STATS_SAMPLES`] of `indices` (evenly spread),
    /// decoded on `data.workers` threads.
    pub fn channel_sums(&self, indices: &[usize]) -> (Vec<f64>, Vec<f64>, f64) {
        let step = indices.len().div_ceil(STATS_SAMPLES).max(1);
        let picked: Vec<usize> = indices.iter().step_by(step).copied().collect();
        let workers = self.opts.workers.clamp(1, 16);
        let per = picked.len().div_ceil(workers).max(1);
        let c = self.channels;
        let parts: Vec<(Vec<f64>, Vec<f64>, f64)> = std::thread::scope(|s| {
            let handles: Vec<_> = picked
                .chunks(per)
                .map(|chunk| {
                    s.spawn(move || {
                        let (mut sum, mut sq, mut n) = (vec![0f64; c], vec![0f64; c], 0f64);
                        for &i in chunk {
                            match self.base(i) {
                                Ok(img) => {
                                    for px in img.data.chunks_exact(c) {
                                        for (k, &v) in px.iter().enumerate() {
                                            let v = f64::from(v);
                                            sum[k] += v;
                                            sq[k] += v * v;
                                        }
                                    }
                                    n += (img.w * img.h) as f64;
                                }
                                Err(reason) => self.note_failure(i, &reason),
                            }
                        }
                        (sum, sq, n)
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let (mut sum, mut sq, mut n) = (vec![0f64; c], vec![0f64; c], 0f64);
        for (s, q, m) in parts {
            sum.iter_mut().zip(s).for_each(|(a, b)| *a += b);
            sq.iter_mut().zip(q).for_each(|(a, b)| *a += b);
            n += m;
        }
        (sum, sq, n)
    }
}

/// Lists and checks (headers only) the images of `paths`, skipping the bad
/// ones with their reason, and returns the streamed data set.
pub fn load(spec: &DataSpec, paths: &[PathBuf]) -> Result<Dataset, DataError> {
    let mut skipped = Vec::new();
    let mut good: Vec<(String, String)> = Vec::new();
    for path in paths {
        let name = relative_name(&spec.dir, path);
        match check(path, spec, &name) {
            Ok(class) => good.push((name, class)),
            Err(reason) => {
                tracing::warn!(file = %path.display(), %reason, "skipping data file");
                skipped.push(SkippedFile {
                    file: name,
                    reason: reason.to_string(),
                });
            }
        }
    }
    if good.is_empty() {
        return Err(DataError::NoData {
            dir: spec.dir.clone(),
            reason: if paths.is_empty() {
                "no class folders with *.png / *.jpg images".to_string()
            } else {
                format!("all {} files were rejected", paths.len())
            },
        });
    }
    let classes = match (&spec.classes, read_class_file(&spec.dir)?) {
        (Some(c), _) => c.clone(),
        (None, Some(c)) => c,
        (None, None) => {
            let names: std::collections::BTreeSet<&String> = good.iter().map(|(_, c)| c).collect();
            names.into_iter().cloned().collect()
        }
    };
    let mut labels = Vec::with_capacity(good.len());
    let mut files = Vec::with_capacity(good.len());
    for (name, class) in good {
        match resolve_labels(&RawLabels::Name(vec![class]), &classes) {
            Ok(l) => {
                labels.extend(l);
                files.push(name);
            }
            Err(reason) => {
                tracing::warn!(file = %name, %reason, "skipping data file");
                skipped.push(SkippedFile {
                    file: name,
                    reason: reason.to_string(),
                });
            }
        }
    }
    if files.is_empty() {
        return Err(DataError::NoData {
            dir: spec.dir.clone(),
            reason: "every file has labels outside the class list".into(),
        });
    }
    skipped.sort_by(|a, b| a.file.cmp(&b.file));
    let channels = if spec.channels == 1 { 1 } else { 3 };
    let source = ImageSource {
        dir: spec.dir.clone(),
        names: files.clone(),
        size: spec.image_size,
        channels,
        opts: spec.images.clone(),
        cache: Mutex::new(Cache::default()),
        caching: AtomicBool::new(true),
        failed: Mutex::new(BTreeMap::new()),
    };
    Ok(Dataset {
        features: Features::Images(Arc::new(source)),
        labels,
        sample_shape: vec![channels, spec.image_size[0], spec.image_size[1]],
        classes,
        origins: (0..files.len() as u32).map(|i| (i, 0)).collect(),
        files,
        skipped,
        vocab: None,
    })
}

/// The class of one image, after checking it without decoding it.
fn check(path: &Path, spec: &DataSpec, name: &str) -> Result<String, FileError> {
    check_file(path, spec)?;
    let class = image_folder::class_of(name)?;
    image_folder::check_header(path)?;
    Ok(class)
}

#[cfg(test)]
mod tests {
    use super::super::{load_dataset, DataFormat};
    use super::*;

    fn folder(n: usize) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for class in ["a", "b"] {
            std::fs::create_dir(t.path().join(class)).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(12, 8, |x, y| {
                    image::Rgb([(x * 20) as u8, (y * 30) as u8, (i * 40) as u8])
                });
                img.save(t.path().join(format!("{class}/{i}.png"))).unwrap();
            }
        }
        t
    }

    #[test]
    fn headers_checked_up_front_bodies_on_demand_and_cache_bounded() {
        let t = folder(3);
        let d = t.path();
        std::fs::write(d.join("a/bad.png"), b"not a png").unwrap();
        // A valid header over a truncated body passes the listing, fails at decode.
        let full = std::fs::read(d.join("a/0.png")).unwrap();
        std::fs::write(d.join("b/cut.png"), &full[..full.len() / 2]).unwrap();
        let mut spec = DataSpec::new(d, DataFormat::ImageFolder);
        spec.image_size = [4, 6];
        // Room for exactly two resized samples.
        spec.images.cache_bytes = 2 * 4 * 6 * 3;
        let ds = load_dataset(&spec).unwrap();
        assert_eq!(ds.len(), 7);
        assert_eq!(ds.skipped.len(), 1);
        assert_eq!(ds.skipped[0].file, "a/bad.png");
        assert_eq!(ds.sample_shape, vec![3, 4, 6]);
        assert_eq!(ds.classes, vec!["a", "b"]);
        let Features::Images(src) = &ds.features else {
            panic!("not streamed")
        };
        let mean = vec![0.0; 72];
        let inv = vec![1.0; 72];
        let all: Vec<usize> = (0..ds.len()).collect();
        let (x, kept) = src.host_batch(&all, None, &mean, &inv).unwrap();
        let cut = ds.files.iter().position(|f| f == "b/cut.png").unwrap();
        assert!(!kept.contains(&cut));
        assert_eq!(kept.len(), 6);
        assert_eq!(x.len(), 6 * 72);
        assert_eq!(src.failures().len(), 1);
        assert_eq!(src.failures()[0].file, "b/cut.png");
        assert_eq!(src.cached_bytes(), 2 * 72);
        // The same values whether cached or decoded again; the same as the
        // in-memory reader's stretch (CHW).
        let (again, _) = src.host_batch(&all, None, &mean, &inv).unwrap();
        assert_eq!(x, again);
        let one = image_folder::read(&d.join("a/0.png"), d, [4, 6], 3).unwrap();
        let Features::U8(v) = one.features else {
            panic!()
        };
        let i0 = ds.files.iter().position(|f| f == "a/0.png").unwrap();
        let (x0, _) = src.host_batch(&[i0], None, &mean, &inv).unwrap();
        assert_eq!(x0, v.iter().map(|&b| f32::from(b)).collect::<Vec<_>>());
    }

    #[test]
    fn centre_crop_keeps_the_middle() {
        // 20 x 10: covering 8 x 8 / 0.875 = 9.14 -> 18 x 9 (rounded, >= 8), crop x 5, y 1 (rounded half).
        let data: Vec<u8> = (0..200).map(|i| (i % 20) as u8 * 10).collect();
        let img = Hwc {
            w: 20,
            h: 10,
            c: 1,
            data,
        };
        let out = image_folder::resize_to(&img, [8, 8], ResizeMode::CenterCrop).unwrap();
        assert_eq!((out.w, out.h), (8, 8));
        // Columns increase left to right; the crop is centred: mean near the middle.
        let mean = out.data.iter().map(|&v| f64::from(v)).sum::<f64>() / 64.0;
        assert!((mean - 95.0).abs() < 15.0, "{mean}");
    }
}
