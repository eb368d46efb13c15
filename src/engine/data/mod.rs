//! Training data: reading files of each format, validating them one by one,
//! assembling the valid ones into an in-memory [`Dataset`], the deterministic
//! train/val/test split, normalisation and batching.

pub mod augment;
mod batch;
pub mod csv_file;
mod entries;
mod error;
pub mod image_folder;
mod labels;
mod outliers;
pub mod safetensors_file;
mod scan;
mod split;
pub mod stream;
pub mod text_tsv;
pub mod vocab;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use batch::{Batch, Batcher, Normalization};
pub use error::{BadValue, FileError};
pub use outliers::{outlier_files, Outliers};
pub use scan::{file_labels, scan_file, FileCheck};
pub use split::{fixed_split, split_of, Split, SplitIndices};
pub use stream::{ImageOptions, ImageSource, NormalizeKind};
pub use vocab::{tokenize, Vocab};

/// The on-disk layout of the training data.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// A folder of `*.safetensors` shards with `x` and `y` tensors.
    #[default]
    Safetensors,
    /// `*.csv` files with a header, numeric feature columns and a label column.
    Csv,
    /// `class_name/*.png|jpg`.
    ImageFolder,
    /// `text<TAB>label` lines.
    TextTsv,
}

impl DataFormat {
    /// The file extension this format reads.
    pub fn extension(self) -> &'static str {
        match self {
            DataFormat::Safetensors => "safetensors",
            DataFormat::Csv => "csv",
            DataFormat::ImageFolder => "png",
            DataFormat::TextTsv => "txt",
        }
    }
}

/// How text is split into tokens.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    #[default]
    Char,
    Whitespace,
}

/// Everything the engine needs to know to read a data folder.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSpec {
    pub dir: PathBuf,
    pub format: DataFormat,
    pub val_fraction: f64,
    pub test_fraction: f64,
    pub split_seed: u64,
    pub x_key: String,
    pub y_key: String,
    pub label_column: String,
    pub delimiter: u8,
    /// Class names given by the user (or a checkpoint), in label order.
    pub classes: Option<Vec<String>>,
    /// image-folder: `[height, width]` every image is resized to.
    pub image_size: [usize; 2],
    /// image-folder: 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// text-tsv: how texts are split into tokens.
    pub tokenizer: TokenizerKind,
    /// text-tsv: tokens per sample (longer texts are cut, shorter ones padded).
    pub max_len: usize,
    /// text-tsv: a vocabulary file to use instead of building one.
    pub vocab_file: Option<PathBuf>,
    /// text-tsv: at most this many tokens in a built vocabulary (plus `<UNK>`, `<PAD>`).
    pub max_vocab: usize,
    /// text-tsv: tokens seen fewer times in the training split are left out.
    pub min_freq: usize,
    /// text-tsv: the vocabulary to use (from a checkpoint); overrides `vocab_file`.
    pub vocab: Option<Vocab>,
    /// Read only these files (names relative to `dir`), e.g. to resume a run
    /// on exactly the data it started with; `None` reads every file.
    pub only_files: Option<Vec<String>>,
    /// Files larger than this are refused before they are read.
    pub max_file_bytes: u64,
    /// Float feature values beyond ±this are refused as absurd (`data.max_abs_value`).
    pub max_abs_value: f32,
    /// image-folder: normalisation, resizing, cache, workers and augmentation.
    pub images: ImageOptions,
}

/// `data.max_abs_value` by default: well beyond any scaled feature, far below
/// what overflows f32 once squared or summed in a layer.
pub const DEFAULT_MAX_ABS_VALUE: f32 = 1e6;

impl DataSpec {
    /// A spec for `dir` in `format` with every other setting at its default.
    pub fn new(dir: impl Into<PathBuf>, format: DataFormat) -> Self {
        Self {
            dir: dir.into(),
            format,
            val_fraction: 0.1,
            test_fraction: 0.1,
            split_seed: 42,
            x_key: "x".into(),
            y_key: "y".into(),
            label_column: "label".into(),
            delimiter: b',',
            classes: None,
            image_size: [32, 32],
            channels: 3,
            tokenizer: TokenizerKind::Char,
            max_len: 32,
            vocab_file: None,
            max_vocab: 10_000,
            min_freq: 1,
            vocab: None,
            only_files: None,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_abs_value: DEFAULT_MAX_ABS_VALUE,
            images: ImageOptions::default(),
        }
    }
}

/// Default limit on the size of one data file (512 MiB).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 512 << 20;

/// Refuses a file that is too large, or a link that leads out of the data folder,
/// before anything is read from it.
fn check_file(path: &Path, spec: &DataSpec) -> Result<(), FileError> {
    entries::refuse_unreadable(path, &spec.dir)?;
    let meta = std::fs::metadata(path).map_err(FileError::Io)?;
    if meta.len() > spec.max_file_bytes {
        return Err(FileError::TooLarge {
            bytes: meta.len(),
            limit: spec.max_file_bytes,
        });
    }
    Ok(())
}

/// Why data could not be loaded at all.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read data folder {dir}: {reason}")]
    Folder { dir: PathBuf, reason: String },
    #[error("no usable data in {dir}: {reason}")]
    NoData { dir: PathBuf, reason: String },
    #[error("data format `{0:?}` is not supported by this build")]
    Unsupported(DataFormat),
    #[error("{file}: {reason}")]
    ClassFile { file: PathBuf, reason: String },
    #[error("{0}")]
    Vocab(FileError),
}

/// A data file that was left out, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SkippedFile {
    pub file: String,
    pub reason: String,
}

/// Feature values of many samples, row-major, one sample after another; or
/// images read when a batch needs them.
#[derive(Debug, Clone, PartialEq)]
pub enum Features {
    F32(Vec<f32>),
    U8(Vec<u8>),
    /// image-folder data, streamed: nothing of it is held here but a bounded cache.
    Images(std::sync::Arc<ImageSource>),
}

impl Features {
    fn len(&self) -> usize {
        match self {
            Features::F32(v) => v.len(),
            Features::U8(v) => v.len(),
            Features::Images(_) => 0,
        }
    }

    /// Value `i` as f32 (0 for streamed images, which hold no values here).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Features::F32(v) => v[i],
            Features::U8(v) => v[i] as f32,
            Features::Images(_) => 0.0,
        }
    }

    /// The streamed images, if the samples are streamed.
    pub fn images(&self) -> Option<&std::sync::Arc<ImageSource>> {
        match self {
            Features::Images(s) => Some(s),
            _ => None,
        }
    }

    fn append(&mut self, other: Features) {
        match (self, other) {
            (_, Features::Images(_)) | (Features::Images(_), _) => {}
            (Features::F32(a), Features::F32(b)) => a.extend(b),
            (Features::U8(a), Features::U8(b)) => a.extend(b),
            (Features::F32(a), Features::U8(b)) => a.extend(b.into_iter().map(f32::from)),
            (this @ Features::U8(_), Features::F32(b)) => {
                let mut a: Vec<f32> = match this {
                    Features::U8(a) => a.iter().map(|&x| f32::from(x)).collect(),
                    _ => Vec::new(),
                };
                a.extend(b);
                *this = Features::F32(a);
            }
        }
    }
}

/// Labels as read from one file: class indices or class names.
#[derive(Debug, Clone, PartialEq)]
pub enum RawLabels {
    Index(Vec<i64>),
    Name(Vec<String>),
}

/// The samples of one file, checked on their own (not yet against other files).
#[derive(Debug, Clone)]
pub struct FileSamples {
    pub features: Features,
    pub labels: RawLabels,
    /// Shape of one sample (without the batch dimension).
    pub sample_shape: Vec<usize>,
}

impl FileSamples {
    /// Number of samples in the file.
    pub fn len(&self) -> usize {
        match &self.labels {
            RawLabels::Index(v) => v.len(),
            RawLabels::Name(v) => v.len(),
        }
    }

    /// Whether the file holds no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads and checks one data file on its own: format, dtype, shapes, finite values.
/// The error is a reason fit for a user (the caller adds the file name).
pub fn read_file(path: &Path, spec: &DataSpec) -> Result<FileSamples, FileError> {
    check_file(path, spec)?;
    let samples = match spec.format {
        DataFormat::Safetensors => safetensors_file::read(path, &spec.x_key, &spec.y_key)?,
        DataFormat::Csv => csv_file::read_limited(
            path,
            &spec.label_column,
            spec.delimiter,
            spec.max_file_bytes,
        )?,
        DataFormat::ImageFolder => {
            image_folder::read(path, &spec.dir, spec.image_size, spec.channels)?
        }
        DataFormat::TextTsv => text_tsv::read_samples(path, spec)?,
    };
    if samples.is_empty() {
        return Err(FileError::NoSamples);
    }
    let per = samples.sample_shape.iter().product::<usize>();
    if per == 0 {
        return Err(FileError::EmptyShape {
            shape: samples.sample_shape,
        });
    }
    if samples.features.len() != per * samples.len() {
        return Err(FileError::FeatureCount {
            values: samples.features.len(),
            samples: samples.len(),
            shape: samples.sample_shape,
        });
    }
    if let Features::F32(v) = &samples.features {
        if let Some((pos, bad)) = BadValue::first(v, spec.max_abs_value) {
            return Err(FileError::BadSampleValue {
                sample: pos / per,
                bad,
            });
        }
    }
    if let RawLabels::Index(v) = &samples.labels {
        if let Some((i, l)) = v.iter().enumerate().find(|(_, l)| **l < 0) {
            return Err(FileError::NegativeLabel {
                sample: i,
                label: *l,
            });
        }
    }
    Ok(samples)
}

/// Resolves the labels of one file to class indices, given the class list.
pub fn resolve_labels(labels: &RawLabels, classes: &[String]) -> Result<Vec<u32>, FileError> {
    match labels {
        RawLabels::Index(v) => v
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                if (l as u64) < classes.len() as u64 {
                    Ok(l as u32)
                } else {
                    Err(FileError::LabelOutOfRange {
                        sample: i,
                        label: l,
                        classes: classes.len(),
                    })
                }
            })
            .collect(),
        RawLabels::Name(v) => {
            let index: BTreeMap<&str, u32> = classes
                .iter()
                .enumerate()
                .map(|(i, c)| (c.as_str(), i as u32))
                .collect();
            v.iter()
                .enumerate()
                .map(|(i, name)| {
                    index
                        .get(name.as_str())
                        .copied()
                        .ok_or_else(|| FileError::UnknownClass {
                            sample: i,
                            label: format!("{name:?}"),
                        })
                })
                .collect()
        }
    }
}

/// All valid samples of a data folder, in memory.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub features: Features,
    /// Class index of each sample.
    pub labels: Vec<u32>,
    /// Shape of one sample.
    pub sample_shape: Vec<usize>,
    /// Class names in label order.
    pub classes: Vec<String>,
    /// File (index into `files`) and position in it of each sample.
    pub origins: Vec<(u32, u32)>,
    /// Names (relative to the data folder) of the files that were used.
    pub files: Vec<String>,
    /// Files that were left out, with the reason.
    pub skipped: Vec<SkippedFile>,
    /// text-tsv: the vocabulary the token ids refer to.
    pub vocab: Option<Vocab>,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the dataset holds no sample.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of feature values per sample.
    pub fn sample_len(&self) -> usize {
        self.sample_shape.iter().product()
    }

    /// Splits the samples into train/val/test: by file where files are named
    /// for a split (see [`fixed_split`]), else by the hash of (file, index, seed).
    pub fn split(&self, spec: &DataSpec) -> SplitIndices {
        split_indices(&self.origins, &self.files, spec)
    }
}

/// The split of samples given their origins (file index, position) and file
/// names. Files named for a split (`train.txt`, `dev.csv`, `test/cat/1.png`, see
/// [`fixed_split`]) go wholly to it, except that a train file also gives the
/// validation (test) samples when no file is named for validation (test); every
/// other file is split by hash.
pub fn split_indices(origins: &[(u32, u32)], files: &[String], spec: &DataSpec) -> SplitIndices {
    let roles: Vec<Option<Split>> = files.iter().map(|f| fixed_split(f, spec.format)).collect();
    let has_val = roles.contains(&Some(Split::Val));
    let has_test = roles.contains(&Some(Split::Test));
    let mut out = SplitIndices::default();
    for (i, (file, pos)) in origins.iter().enumerate() {
        let name = &files[*file as usize];
        let (vf, tf) = match roles[*file as usize] {
            None => (spec.val_fraction, spec.test_fraction),
            Some(Split::Train) => (
                if has_val { 0.0 } else { spec.val_fraction },
                if has_test { 0.0 } else { spec.test_fraction },
            ),
            Some(Split::Val) => {
                out.val.push(i);
                continue;
            }
            Some(Split::Test) => {
                out.test.push(i);
                continue;
            }
        };
        match split_of(name, *pos as u64, spec.split_seed, vf, tf) {
            Split::Train => out.train.push(i),
            Split::Val => out.val.push(i),
            Split::Test => out.test.push(i),
        }
    }
    out
}

/// Lists the data files of a folder (sorted, hidden files and `rejected/` left
/// out): the images of every class folder for `image-folder`; for `text-tsv` the
/// `*.txt` and `*.tsv` files except `class.txt`, `classes.txt` and `vocab.txt`.
pub fn list_files(spec: &DataSpec) -> Result<Vec<PathBuf>, DataError> {
    let mut files = list_all_files(spec)?;
    if let Some(only) = &spec.only_files {
        files.retain(|p| only.contains(&relative_name(&spec.dir, p)));
    }
    Ok(files)
}

fn list_all_files(spec: &DataSpec) -> Result<Vec<PathBuf>, DataError> {
    if spec.format == DataFormat::ImageFolder {
        return image_folder::list(&spec.dir);
    }
    let ext = spec.format.extension();
    let vocab_file = spec.vocab_file.as_ref().and_then(|p| p.canonicalize().ok());
    let entries = std::fs::read_dir(&spec.dir).map_err(|e| DataError::Folder {
        dir: spec.dir.clone(),
        reason: e.to_string(),
    })?;
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        // Not-regular entries with a data name are listed: they are skipped with a reason.
        if name.starts_with('.') {
            continue;
        }
        let file_ext = path.extension().and_then(|e| e.to_str());
        let wanted = match spec.format {
            DataFormat::TextTsv => {
                matches!(file_ext, Some("txt" | "tsv"))
                    && !text_tsv::RESERVED.contains(&name.as_str())
                    && (vocab_file.is_none() || path.canonicalize().ok() != vocab_file)
            }
            _ => file_ext == Some(ext),
        };
        if wanted {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads the class list from `class.txt` / `classes.txt` in the data folder, if any.
pub fn read_class_file(dir: &Path) -> Result<Option<Vec<String>>, DataError> {
    for name in ["class.txt", "classes.txt"] {
        let path = dir.join(name);
        if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| DataError::ClassFile {
                file: path.clone(),
                reason: e.to_string(),
            })?;
            let classes: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            let unique: BTreeSet<&String> = classes.iter().collect();
            if classes.len() < 2 || unique.len() != classes.len() {
                return Err(DataError::ClassFile {
                    file: path,
                    reason: "needs at least two distinct class names, one per line".into(),
                });
            }
            return Ok(Some(classes));
        }
    }
    Ok(None)
}

/// Reads every file of the data folder, skips the bad ones (naming each and the
/// reason), and assembles the rest. Fails only when no valid data is left.
pub fn load_dataset(spec: &DataSpec) -> Result<Dataset, DataError> {
    if spec.format == DataFormat::TextTsv {
        return text_tsv::load(spec);
    }
    let paths = list_files(spec)?;
    if spec.format == DataFormat::ImageFolder {
        return stream::load(spec, &paths);
    }
    let mut skipped = Vec::new();
    let mut good: Vec<(String, FileSamples)> = Vec::new();
    for path in &paths {
        let name = relative_name(&spec.dir, path);
        match read_file(path, spec) {
            Ok(s) => good.push((name, s)),
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
                match spec.format {
                    DataFormat::ImageFolder => {
                        "no class folders with *.png / *.jpg images".to_string()
                    }
                    _ => format!("no *.{} files", spec.format.extension()),
                }
            } else {
                format!("all {} files were rejected", paths.len())
            },
        });
    }

    // The sample shape held by most samples wins; files of another shape are skipped.
    let mut by_shape: BTreeMap<Vec<usize>, usize> = BTreeMap::new();
    for (_, s) in &good {
        *by_shape.entry(s.sample_shape.clone()).or_default() += s.len();
    }
    let shape = by_shape
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(s, _)| s.clone())
        .unwrap_or_default();
    good.retain(|(name, s)| {
        if s.sample_shape == shape {
            true
        } else {
            let reason = format!(
                "sample shape {:?} differs from {:?} of the other files",
                s.sample_shape, shape
            );
            tracing::warn!(file = %name, %reason, "skipping data file");
            skipped.push(SkippedFile {
                file: name.clone(),
                reason,
            });
            false
        }
    });

    let classes = match (&spec.classes, read_class_file(&spec.dir)?) {
        (Some(c), _) => c.clone(),
        (None, Some(c)) => c,
        (None, None) => infer_classes(good.iter().map(|(_, s)| &s.labels)),
    };

    let mut features: Option<Features> = None;
    let mut labels = Vec::new();
    let mut origins = Vec::new();
    let mut files = Vec::new();
    for (name, s) in good {
        let resolved = match resolve_labels(&s.labels, &classes) {
            Ok(l) => l,
            Err(reason) => {
                tracing::warn!(file = %name, %reason, "skipping data file");
                skipped.push(SkippedFile {
                    file: name,
                    reason: reason.to_string(),
                });
                continue;
            }
        };
        let file_idx = files.len() as u32;
        origins.extend((0..resolved.len() as u32).map(|i| (file_idx, i)));
        labels.extend(resolved);
        files.push(name);
        match &mut features {
            None => features = Some(s.features),
            Some(f) => f.append(s.features),
        }
    }
    let Some(features) = features else {
        return Err(DataError::NoData {
            dir: spec.dir.clone(),
            reason: "every file has labels outside the class list".into(),
        });
    };
    skipped.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(Dataset {
        features,
        labels,
        sample_shape: shape,
        classes,
        origins,
        files,
        skipped,
        vocab: None,
    })
}

/// The classes a run would infer from `files` when no class list is given
/// (files that do not read are left out); `None` when none reads. Reads every
/// file; memory per file is bounded as in [`scan_file`].
pub fn infer_classes_of(spec: &DataSpec, files: &[PathBuf]) -> Option<Vec<String>> {
    let labels: Vec<RawLabels> = files
        .iter()
        .filter_map(|f| file_labels(f, spec).ok())
        .collect();
    if labels.is_empty() {
        return None;
    }
    Some(infer_classes(labels.iter()))
}

/// Class names when no list is given: sorted label names, or `0..=max` for indices.
fn infer_classes<'a>(labels: impl Iterator<Item = &'a RawLabels>) -> Vec<String> {
    let mut names = BTreeSet::new();
    let mut max_index: i64 = -1;
    for l in labels {
        match l {
            RawLabels::Index(v) => {
                max_index = max_index.max(v.iter().copied().max().unwrap_or(-1));
            }
            RawLabels::Name(v) => names.extend(v.iter().cloned()),
        }
    }
    if names.is_empty() {
        (0..=max_index.max(1)).map(|i| i.to_string()).collect()
    } else {
        names.into_iter().collect()
    }
}

/// A file's name relative to the data folder, as used in hashing and reports.
pub fn relative_name(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inferred_classes() {
        let a = RawLabels::Index(vec![0, 3, 1]);
        assert_eq!(infer_classes([&a].into_iter()), vec!["0", "1", "2", "3"]);
        let b = RawLabels::Name(vec!["cat".into(), "ant".into(), "cat".into()]);
        assert_eq!(infer_classes([&b].into_iter()), vec!["ant", "cat"]);
    }

    #[test]
    fn label_resolution() {
        let classes: Vec<String> = vec!["a".into(), "b".into()];
        assert_eq!(
            resolve_labels(&RawLabels::Index(vec![1, 0]), &classes).unwrap(),
            vec![1, 0]
        );
        let e = resolve_labels(&RawLabels::Index(vec![2]), &classes).unwrap_err();
        assert!(
            matches!(
                e,
                FileError::LabelOutOfRange {
                    sample: 0,
                    label: 2,
                    classes: 2
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("label 2"));
        let e = resolve_labels(&RawLabels::Name(vec!["c".into()]), &classes).unwrap_err();
        assert!(
            matches!(e, FileError::UnknownClass { sample: 0, .. }),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "sample 0 has label \"c\", which is not a known class"
        );
    }

    #[test]
    fn oversized_files_and_escaping_links_are_refused_unread() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret.csv");
        std::fs::write(&secret, "a,label\n1,0\n").unwrap();
        let link = dir.path().join("x.csv");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let mut spec = DataSpec::new(dir.path(), DataFormat::Csv);
        let e = read_file(&link, &spec).unwrap_err();
        assert!(matches!(e, FileError::LinkOutside { .. }), "{e}");
        assert!(e.to_string().contains("outside the data folder"), "{e}");
        let big = dir.path().join("big.csv");
        std::fs::write(&big, "a,label\n1,0\n2,1\n").unwrap();
        spec.max_file_bytes = 8;
        let e = read_file(&big, &spec).unwrap_err();
        assert!(matches!(e, FileError::TooLarge { limit: 8, .. }), "{e}");
        assert!(e.to_string().contains("data.max_file_mb"), "{e}");
        spec.max_file_bytes = DEFAULT_MAX_FILE_BYTES;
        assert_eq!(read_file(&big, &spec).unwrap().len(), 2);
    }

    #[test]
    fn fifos_and_folders_with_a_data_name_are_skipped_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("good.csv"), "a,label\n1,0\n2,1\n").unwrap();
        std::fs::create_dir(d.join("folder.csv")).unwrap();
        let fifo = std::ffi::CString::new(d.join("pipe.csv").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let ds = load_dataset(&DataSpec::new(d, DataFormat::Csv)).unwrap();
        assert_eq!(ds.len(), 2);
        let skipped: Vec<(&str, &str)> = ds
            .skipped
            .iter()
            .map(|s| (s.file.as_str(), s.reason.as_str()))
            .collect();
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert_eq!(skipped[0].0, "folder.csv");
        assert!(skipped[0].1.contains("a folder"), "{skipped:?}");
        assert_eq!(skipped[1].0, "pipe.csv");
        assert!(skipped[1].1.contains("FIFO"), "{skipped:?}");
    }

    #[test]
    fn mixed_feature_append_widens_to_f32() {
        let mut f = Features::U8(vec![1, 2]);
        f.append(Features::F32(vec![0.5]));
        assert_eq!(f, Features::F32(vec![1.0, 2.0, 0.5]));
    }
}
