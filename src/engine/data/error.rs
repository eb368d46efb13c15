//! Why one data file (or a part of it) cannot be used: [`FileError`], one
//! variant per cause. Its text is the reason recorded for a skipped or rejected
//! file (`skipped_files[].reason`, `data_rejected.reason`).

use std::io;
use std::path::PathBuf;

use super::labels::MAX_DISTINCT_LABELS;

/// Why one data file (or a part of it) cannot be used. Pieces of the input
/// (labels, fields, header names) are kept quoted and cut to 64 bytes, as the
/// reason shows them.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file (or its metadata) cannot be read.
    #[error("cannot read: {0}")]
    Io(#[source] io::Error),
    /// A link whose target cannot be resolved.
    #[error("cannot resolve link: {0}")]
    ResolveLink(#[source] io::Error),
    /// The data folder itself cannot be resolved.
    #[error("cannot resolve the data folder: {0}")]
    ResolveDataDir(#[source] io::Error),
    /// A link out of the data folder.
    #[error("a link to {}, outside the data folder", .target.display())]
    LinkOutside { target: PathBuf },
    /// A link to something that is not a regular file.
    #[error("a link to {} ({kind}); links are followed to regular files only", .target.display())]
    LinkNotRegular { target: PathBuf, kind: &'static str },
    /// A FIFO, socket, device or folder where a data file is expected.
    #[error("{kind}, not a regular file: not read")]
    NotRegular { kind: &'static str },
    /// A file larger than `data.max_file_mb`.
    #[error("the file has {bytes} bytes, more than the limit of {limit} (data.max_file_mb)")]
    TooLarge { bytes: u64, limit: u64 },
    /// Decoded samples that would exceed `data.max_file_mb`.
    #[error("its samples would take more than {} MiB of memory once decoded (reached at sample {sample}), the limit of data.max_file_mb", .limit >> 20)]
    Budget { limit: u64, sample: usize },
    /// The CSV file cannot be opened.
    #[error("cannot read: {0}")]
    CsvOpen(#[source] csv::Error),
    /// The CSV header row cannot be read.
    #[error("cannot read the header row: {0}")]
    CsvHeader(#[source] csv::Error),
    /// A CSV record the parser refuses.
    #[error("line {line}: {source}")]
    CsvRecord {
        line: usize,
        #[source]
        source: csv::Error,
    },
    /// No column named `data.label_column`; `headers` are the names listed.
    #[error("no label column {column} in the header ({})", .headers.join(", "))]
    NoLabelColumn {
        column: String,
        headers: Vec<String>,
    },
    /// Only the label column.
    #[error("no feature columns besides the label")]
    NoFeatureColumns,
    /// A row with another number of fields than the header.
    #[error("line {line} has {got} fields, the header has {expected}")]
    FieldCount {
        line: usize,
        got: usize,
        expected: usize,
    },
    /// A field that does not parse as a number.
    #[error("line {line}, column {column}: {value} is not a number")]
    NotANumber {
        line: usize,
        column: String,
        value: String,
    },
    /// A field that parses as NaN or infinity.
    #[error("line {line}, column {column}: non-finite value {value}")]
    NonFiniteField {
        line: usize,
        column: String,
        value: String,
    },
    /// An empty label.
    #[error("line {line}: empty label")]
    EmptyLabel { line: usize },
    /// A text line without a TAB.
    #[error("line {line}: no TAB between text and label (expected `text<TAB>label`)")]
    NoTab { line: usize },
    /// Bytes that are not UTF-8.
    #[error("not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },
    /// A text file without any sample line.
    #[error("the file holds no `text<TAB>label` lines")]
    NoTextLines,
    /// A cause found in a given line.
    #[error("line {line}: {source}")]
    AtLine {
        line: usize,
        #[source]
        source: Box<FileError>,
    },
    /// More distinct labels than one file may hold.
    #[error("more than {MAX_DISTINCT_LABELS} distinct labels; is the label column right?")]
    TooManyLabels,
    /// A label that is neither an index nor a name of the reference classes.
    #[error("label {label}, which is not one of the {classes} classes")]
    NotAClass { label: String, classes: usize },
    /// A negative class index.
    #[error("sample {sample} has negative label {label}")]
    NegativeLabel { sample: usize, label: i64 },
    /// A class index past the class list.
    #[error("sample {sample} has label {label}, outside the {classes} classes [0, {classes})")]
    LabelOutOfRange {
        sample: usize,
        label: i64,
        classes: usize,
    },
    /// A class name not in the class list.
    #[error("sample {sample} has label {label}, which is not a known class")]
    UnknownClass { sample: usize, label: String },
    /// A sample shape other than the reference's.
    #[error(
        "sample shape {found:?} differs from {expected:?} expected by the model and the other data"
    )]
    Shape {
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    /// No samples at all.
    #[error("the file holds no samples")]
    NoSamples,
    /// A sample shape with a zero in it.
    #[error("empty sample shape {shape:?}")]
    EmptyShape { shape: Vec<usize> },
    /// Feature values that do not split into the samples.
    #[error("{values} feature values do not make {samples} samples of shape {shape:?}")]
    FeatureCount {
        values: usize,
        samples: usize,
        shape: Vec<usize>,
    },
    /// A feature value of a sample that no file may hold (`data.max_abs_value`).
    #[error("sample {sample} has {bad}")]
    BadSampleValue { sample: usize, bad: BadValue },
    /// A feature value of a CSV row that no file may hold (`data.max_abs_value`).
    #[error("feature {feature} has {bad}")]
    BadFeatureValue { feature: usize, bad: BadValue },
    /// An image outside any class folder.
    #[error("the image is not inside a class folder (expected class_name/image.png)")]
    NoClassFolder,
    /// The image decoder refused the file.
    #[error("cannot decode image: {0}")]
    Image(#[source] image::ImageError),
    /// `data.image_size` does not fit the image library's sizes.
    #[error("image_size too large")]
    ImageSizeTooLarge,
    /// The header names no image format this build reads (PNG, JPEG).
    #[error("cannot decode image: not a PNG or JPEG image")]
    ImageFormat,
    /// The header gives dimensions that are empty or beyond the decoder's limits.
    #[error(
        "the header gives {width}x{height} pixels; images of 1 to {max} pixels a side are read"
    )]
    ImageDimensions { width: u32, height: u32, max: u32 },
    /// Not a safetensors file.
    #[error("not a valid safetensors file: {0}")]
    Safetensors(#[source] safetensors::SafeTensorError),
    /// A tensor the settings name is missing; `has` are the tensors there.
    #[error("no tensor named {name:?} (has: {})", .has.join(", "))]
    NoTensor { name: String, has: Vec<String> },
    /// The features tensor has fewer than 2 dimensions.
    #[error("{key:?} has shape {shape:?}; expected [N, features...] with at least 2 dimensions")]
    FeatureRank { key: String, shape: Vec<usize> },
    /// The labels tensor is not one-dimensional.
    #[error("{key:?} has shape {shape:?}; expected [N]")]
    LabelRank { key: String, shape: Vec<usize> },
    /// Features and labels of different lengths.
    #[error("{x_key:?} has {samples} samples but {y_key:?} has {labels} labels")]
    LabelCount {
        x_key: String,
        samples: usize,
        y_key: String,
        labels: usize,
    },
    /// A features dtype that is not read.
    #[error("{key:?} has dtype {dtype:?}; supported: F32, F64, F16, BF16, U8")]
    FeatureDtype {
        key: String,
        dtype: safetensors::Dtype,
    },
    /// A labels dtype that is not an integer type.
    #[error("{key:?} has dtype {dtype:?}; labels must be an integer type")]
    LabelDtype {
        key: String,
        dtype: safetensors::Dtype,
    },
    /// A tensor whose bytes cannot be decoded.
    #[error("{key:?}: {source}")]
    Decode {
        key: String,
        #[source]
        source: crate::engine::st_decode::DecodeError,
    },
    /// Padding and unknown ids that do not fit the vocabulary.
    #[error("padding id {pad} and unknown id {unk} must be two different ids below {tokens}")]
    VocabIds {
        pad: usize,
        unk: usize,
        tokens: usize,
    },
    /// A token listed twice in a vocabulary.
    #[error("token {token:?} appears twice")]
    DuplicateToken { token: String },
    /// A vocabulary file that cannot be read.
    #[error("cannot read vocabulary {}: {source}", .path.display())]
    VocabRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An empty line in a vocabulary file.
    #[error("vocabulary {}: line {line} is empty (one token per line)", .path.display())]
    VocabEmptyLine { path: PathBuf, line: usize },
    /// A cause found in a vocabulary file.
    #[error("vocabulary {}: {source}", .path.display())]
    InVocab {
        path: PathBuf,
        #[source]
        source: Box<FileError>,
    },
}

/// A float feature value refused by [`BadValue::check`]: NaN or infinite, or
/// beyond `data.max_abs_value` (finite but absurd: 3e38 made training diverge).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BadValue {
    /// NaN or infinite.
    NonFinite(f32),
    /// Finite, but larger in magnitude than `max`.
    TooLarge { value: f32, max: f32 },
}

impl BadValue {
    /// Why `value` is refused under `max_abs`, if it is.
    pub fn check(value: f32, max_abs: f32) -> Option<Self> {
        if !value.is_finite() {
            Some(BadValue::NonFinite(value))
        } else if value.abs() > max_abs {
            Some(BadValue::TooLarge {
                value,
                max: max_abs,
            })
        } else {
            None
        }
    }

    /// The first refused value of `values`: its index and why.
    pub fn first(values: &[f32], max_abs: f32) -> Option<(usize, Self)> {
        values
            .iter()
            .enumerate()
            .find_map(|(i, &v)| Self::check(v, max_abs).map(|b| (i, b)))
    }
}

impl std::fmt::Display for BadValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadValue::NonFinite(v) => write!(f, "a non-finite value ({v})"),
            BadValue::TooLarge { value, max } => write!(
                f,
                "the value {value:e}, beyond data.max_abs_value = {max:e} (scale the data, or raise the limit)"
            ),
        }
    }
}

impl FileError {
    /// The reason, for a [`super::SkippedFile`] or a rejection.
    pub fn reason(&self) -> String {
        self.to_string()
    }

    /// `self` found in line `line` of the file.
    pub fn at_line(self, line: usize) -> Self {
        FileError::AtLine {
            line,
            source: Box::new(self),
        }
    }

    /// The cause itself, without the line it was found in.
    pub fn cause(&self) -> &FileError {
        match self {
            FileError::AtLine { source, .. } | FileError::InVocab { source, .. } => source.cause(),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_as_before() {
        let cases: Vec<(FileError, &str)> = vec![
            (
                FileError::TooLarge {
                    bytes: 20,
                    limit: 8,
                },
                "the file has 20 bytes, more than the limit of 8 (data.max_file_mb)",
            ),
            (
                FileError::Budget {
                    limit: 1 << 20,
                    sample: 7,
                }
                .at_line(9),
                "line 9: its samples would take more than 1 MiB of memory once decoded (reached at sample 7), the limit of data.max_file_mb",
            ),
            (
                FileError::FieldCount {
                    line: 3,
                    got: 2,
                    expected: 3,
                },
                "line 3 has 2 fields, the header has 3",
            ),
            (
                FileError::NoLabelColumn {
                    column: "\"label\"".into(),
                    headers: vec!["a".into(), "b".into()],
                },
                "no label column \"label\" in the header (a, b)",
            ),
            (
                FileError::Shape {
                    found: vec![2],
                    expected: vec![3],
                },
                "sample shape [2] differs from [3] expected by the model and the other data",
            ),
            (
                FileError::NoTensor {
                    name: "x".into(),
                    has: vec!["a".into(), "y".into()],
                },
                "no tensor named \"x\" (has: a, y)",
            ),
            (
                FileError::FeatureDtype {
                    key: "x".into(),
                    dtype: safetensors::Dtype::I64,
                },
                "\"x\" has dtype I64; supported: F32, F64, F16, BF16, U8",
            ),
            (
                FileError::InVocab {
                    path: PathBuf::from("v.txt"),
                    source: Box::new(FileError::DuplicateToken { token: "a".into() }),
                },
                "vocabulary v.txt: token \"a\" appears twice",
            ),
            (
                FileError::TooManyLabels,
                "more than 65536 distinct labels; is the label column right?",
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
        }
        let e = FileError::NoSamples.at_line(4);
        assert!(matches!(e.cause(), FileError::NoSamples));
    }
}
