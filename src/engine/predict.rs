//! Predictions of a checkpoint on files or on a split of the configured data,
//! through exactly the preprocessing of training: the data readers' decoding
//! (images decoded, converted and resized by [`image_folder::decode`] and [`image_folder::resize_to`], CSV rows
//! by [`csv_file::for_each_row`], safetensors by [`safetensors_file`], text
//! tokenised with the checkpoint's vocabulary) and the [`Batcher`]'s
//! normalisation with the checkpoint's statistics.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::SafeTensors;
use serde::Serialize;

use super::checkpoint::{self, CheckpointMeta};
use super::data::{
    csv_file, image_folder, resolve_labels, safetensors_file, BadValue, Batcher, DataFormat,
    DataSpec, Dataset, Features, FileError, RawLabels, Split, DEFAULT_MAX_ABS_VALUE,
};
use super::error::RunError;
use super::model::{ForwardCtx, Model};
use super::trainer::{open_with_data, split_indices};

/// Why one input file cannot be predicted (the others still are).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{0}")]
    File(#[from] FileError),
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("samples of shape {found:?}, but the model takes {expected:?}")]
    Shape {
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("no samples in the file")]
    Empty,
    #[error("line {line} is not UTF-8")]
    NotUtf8 { line: usize },
    #[error("sample {sample}: {bad}")]
    BadValue { sample: usize, bad: BadValue },
}

/// One file's samples as read: values, the shape of one sample, the truth of each.
type Read = (Features, Vec<usize>, Vec<Option<u32>>);

/// How input files are read (what the checkpoint does not say).
#[derive(Debug, Clone)]
pub struct InputOptions {
    /// CSV: the column taken as the true label when present (`data.label_column`).
    pub label_column: String,
    pub delimiter: u8,
    /// Safetensors: the features (`data.x_key`) and labels (`data.y_key`, optional).
    pub x_key: String,
    pub y_key: String,
    /// Files larger than this are refused unread (`data.max_file_mb`).
    pub max_file_bytes: u64,
}

impl Default for InputOptions {
    fn default() -> Self {
        let d = DataSpec::new("", DataFormat::Csv);
        Self {
            label_column: d.label_column,
            delimiter: d.delimiter,
            x_key: d.x_key,
            y_key: d.y_key,
            max_file_bytes: d.max_file_bytes,
        }
    }
}

impl InputOptions {
    /// The options of a data config.
    pub fn of(spec: &DataSpec) -> Self {
        Self {
            label_column: spec.label_column.clone(),
            delimiter: spec.delimiter,
            x_key: spec.x_key.clone(),
            y_key: spec.y_key.clone(),
            max_file_bytes: spec.max_file_bytes,
        }
    }
}

/// Samples to predict: their values as the data reader gives them, a name
/// for each and the true class where the input says it.
#[derive(Debug, Clone)]
pub struct Samples {
    pub features: Features,
    pub names: Vec<String>,
    /// The class index given by the input (CSV label column, `text<TAB>label`,
    /// the image's folder, safetensors `y`), when it names a known class.
    pub truth: Vec<Option<u32>>,
}

impl Samples {
    /// The samples of several inputs, one after the other (so that they are
    /// predicted in the same batches as `eval` forms from the same files).
    pub fn concat(parts: Vec<Samples>) -> Samples {
        let all_u8 = parts.iter().all(|p| matches!(p.features, Features::U8(_)));
        let mut out = Samples {
            features: if all_u8 {
                Features::U8(Vec::new())
            } else {
                Features::F32(Vec::new())
            },
            names: Vec::new(),
            truth: Vec::new(),
        };
        for p in parts {
            match (&mut out.features, p.features) {
                (Features::U8(a), Features::U8(b)) => a.extend(b),
                (Features::F32(a), Features::F32(b)) => a.extend(b),
                (Features::F32(a), Features::U8(b)) => a.extend(b.into_iter().map(f32::from)),
                // Not reached: `all_u8` is false when any part is F32, and
                // predict's readers never stream (`Images`).
                (Features::U8(_), Features::F32(_))
                | (Features::Images(_), _)
                | (_, Features::Images(_)) => {}
            }
            out.names.extend(p.names);
            out.truth.extend(p.truth);
        }
        out
    }
}

/// One sample's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// `file` for one-sample inputs, `file:N` for sample N (from 1) of a file.
    pub input: String,
    /// Class indices by decreasing logit (ties: the lower index first, as argmax).
    pub ranked: Vec<u32>,
    /// Softmax probabilities, by class index.
    pub probs: Vec<f32>,
    /// The raw logits, by class index.
    pub logits: Vec<f32>,
    pub truth: Option<u32>,
}

/// A checkpoint's model, ready to predict.
pub struct Predictor {
    pub model: Model,
    pub meta: CheckpointMeta,
    pub path: PathBuf,
    device: Device,
}

impl Predictor {
    /// Loads the checkpoint at `path`.
    pub fn open(path: &Path, device: &Device) -> Result<Self, RunError> {
        let ck = checkpoint::load(path, device)?;
        let model = Model::new(ck.meta.model.clone(), 0, device)?;
        model
            .params
            .load(&ck.tensors)
            .map_err(|source| RunError::Load {
                context: format!("checkpoint {}", path.display()),
                source,
            })?;
        Ok(Self {
            model,
            meta: ck.meta,
            path: path.to_path_buf(),
            device: device.clone(),
        })
    }

    /// Reads the samples of one input file, in the checkpoint's data format.
    pub fn read_input(&self, path: &Path, opts: &InputOptions) -> Result<Samples, InputError> {
        let expected = &self.meta.input.sample_shape;
        let name = path.display().to_string();
        // As the training readers: nothing larger than data.max_file_mb is read.
        let bytes = std::fs::metadata(path)?.len();
        if bytes > opts.max_file_bytes {
            return Err(FileError::TooLarge {
                bytes,
                limit: opts.max_file_bytes,
            }
            .into());
        }
        let (features, shape, truth) = match self.meta.input.format {
            DataFormat::ImageFolder => self.read_image(path)?,
            DataFormat::Csv => self.read_csv(path, opts)?,
            DataFormat::Safetensors => self.read_safetensors(path, opts)?,
            DataFormat::TextTsv => self.read_text(path)?,
        };
        if &shape != expected {
            return Err(InputError::Shape {
                found: shape,
                expected: expected.clone(),
            });
        }
        if truth.is_empty() {
            return Err(InputError::Empty);
        }
        if let Features::F32(v) = &features {
            let per = expected.iter().product::<usize>().max(1);
            if let Some((pos, bad)) = BadValue::first(v, DEFAULT_MAX_ABS_VALUE) {
                return Err(InputError::BadValue {
                    sample: pos / per + 1,
                    bad,
                });
            }
        }
        let names = if truth.len() == 1 && self.meta.input.format == DataFormat::ImageFolder {
            vec![name]
        } else {
            (1..=truth.len()).map(|i| format!("{name}:{i}")).collect()
        };
        Ok(Samples {
            features,
            names,
            truth,
        })
    }

    fn read_image(&self, path: &Path) -> Result<Read, InputError> {
        let shape = self.meta.input.sample_shape.clone();
        let [c, h, w] = shape[..] else {
            return Err(InputError::Shape {
                found: vec![],
                expected: shape,
            });
        };
        // As the training reader: decoded, resized to the checkpoint's size
        // the way it was trained (`data.resize`; stretch for checkpoints
        // written before it was stored).
        let img = image_folder::decode(path, c)?;
        let mode = self.meta.input.resize.unwrap_or_default();
        let img = image_folder::resize_to(&img, [h, w], mode)?;
        let data = image_folder::hwc_to_chw(&img);
        let folder = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        let truth = folder.and_then(|f| self.meta.classes.iter().position(|c| *c == f));
        Ok((Features::U8(data), shape, vec![truth.map(|t| t as u32)]))
    }

    fn read_csv(&self, path: &Path, opts: &InputOptions) -> Result<Read, InputError> {
        let mut values = Vec::new();
        let mut labels = Vec::new();
        let n = csv_file::for_each_row(
            path,
            &opts.label_column,
            false,
            opts.delimiter,
            |_, row, label| {
                values.extend_from_slice(row);
                labels.push(label.to_string());
                Ok(())
            },
        )?;
        Ok((Features::F32(values), vec![n], self.truth_of_texts(&labels)))
    }

    fn read_safetensors(&self, path: &Path, opts: &InputOptions) -> Result<Read, InputError> {
        let bytes = std::fs::read(path)?;
        let st = SafeTensors::deserialize(&bytes).map_err(FileError::Safetensors)?;
        let (features, shape, n) = safetensors_file::read_features(&st, &opts.x_key)?;
        let truth = if st.names().contains(&opts.y_key.as_str()) {
            let y = safetensors_file::read_labels(&st, &opts.y_key, &opts.x_key, n)?;
            y.iter()
                .map(|&l| {
                    resolve_labels(&RawLabels::Index(vec![l]), &self.meta.classes)
                        .ok()
                        .and_then(|v| v.first().copied())
                })
                .collect()
        } else {
            vec![None; n]
        };
        Ok((features, shape, truth))
    }

    /// Lines of text, one sample each (trimmed, empty ones skipped); in a
    /// `text<TAB>label` line the label is taken as the truth, as in training.
    fn read_text(&self, path: &Path) -> Result<Read, InputError> {
        let Some(text) = &self.meta.input.text else {
            return Err(InputError::Shape {
                found: vec![],
                expected: self.meta.input.sample_shape.clone(),
            });
        };
        let file = std::fs::File::open(path)?;
        let mut ids = Vec::new();
        let mut labels = Vec::new();
        for (i, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
            let line = line?;
            let line =
                std::str::from_utf8(&line).map_err(|_| InputError::NotUtf8 { line: i + 1 })?;
            let line = if i == 0 {
                line.strip_prefix('\u{feff}').unwrap_or(line)
            } else {
                line
            };
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (content, label) = match line.rsplit_once('\t') {
                Some((c, l)) => (c, l.trim()),
                None => (line, ""),
            };
            ids.extend(
                text.vocab
                    .encode(content, text.tokenizer, text.max_len)
                    .into_iter()
                    .map(|i| i as f32),
            );
            labels.push(label.to_string());
        }
        Ok((
            Features::F32(ids),
            vec![text.max_len],
            self.truth_of_texts(&labels),
        ))
    }

    /// Labels as written in a file: class indices when every one is an
    /// integer, class names otherwise (as the training readers decide).
    fn truth_of_texts(&self, labels: &[String]) -> Vec<Option<u32>> {
        let ints: Option<Vec<i64>> = labels.iter().map(|l| l.parse().ok()).collect();
        let classes = &self.meta.classes;
        match ints {
            Some(v) => v
                .into_iter()
                .map(|l| {
                    resolve_labels(&RawLabels::Index(vec![l]), classes)
                        .ok()
                        .and_then(|v| v.first().copied())
                })
                .collect(),
            None => {
                let index: BTreeMap<&str, u32> = classes
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.as_str(), i as u32))
                    .collect();
                labels
                    .iter()
                    .map(|l| index.get(l.as_str()).copied())
                    .collect()
            }
        }
    }

    /// Predicts every sample of `samples`, `batch_size` at a time.
    pub fn predict(
        &self,
        samples: &Samples,
        batch_size: usize,
    ) -> Result<Vec<Prediction>, RunError> {
        let n = samples.truth.len();
        let data = Dataset {
            features: samples.features.clone(),
            labels: vec![0; n],
            sample_shape: self.meta.input.sample_shape.clone(),
            classes: self.meta.classes.clone(),
            origins: (0..n as u32).map(|i| (0, i)).collect(),
            files: vec![String::new()],
            skipped: Vec::new(),
            vocab: None,
        };
        let indices: Vec<usize> = (0..n).collect();
        let logits = logits_of(
            &self.model,
            &data,
            &self.meta,
            &indices,
            batch_size,
            &self.device,
        )?;
        Ok(logits
            .into_iter()
            .zip(samples.names.iter().zip(&samples.truth))
            .map(|(l, (name, truth))| Prediction::new(name.clone(), l, *truth))
            .collect())
    }
}

impl Prediction {
    fn new(input: String, logits: Vec<f32>, truth: Option<u32>) -> Self {
        let mut ranked: Vec<u32> = (0..logits.len() as u32).collect();
        ranked.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        let probs = exps.iter().map(|e| e / sum).collect();
        Self {
            input,
            ranked,
            probs,
            logits,
            truth,
        }
    }

    /// The predicted class (the highest logit).
    pub fn top(&self) -> u32 {
        self.ranked.first().copied().unwrap_or(0)
    }
}

/// The logits of the samples `indices` of `data`, normalised as `meta` says,
/// in batches of `batch_size` (the evaluation's batching).
fn logits_of(
    model: &Model,
    data: &Dataset,
    meta: &CheckpointMeta,
    indices: &[usize],
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>, RunError> {
    let batcher = Batcher::new(data, &meta.input.normalization, device);
    let mut ctx = ForwardCtx::eval();
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(batch_size.max(1)) {
        let batch = batcher.batch(chunk)?;
        let logits: Tensor = model.forward(&batch.x, &mut ctx)?.detach();
        let logits = logits.to_dtype(candle_core::DType::F32)?;
        out.extend(logits.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// Predicts every sample of one split of the configured data, read and split
/// exactly as `eval` reads and splits it; the truth is the data's label.
pub fn predict_split(
    checkpoint: &Path,
    data: &DataSpec,
    split: Split,
    device: &Device,
    batch_size: usize,
) -> Result<(Vec<Prediction>, CheckpointMeta), RunError> {
    let o = open_with_data(checkpoint, data, device, 0)?;
    let split_idx = o.data.split(&o.spec);
    let indices = split_indices(&split_idx, split);
    let logits = logits_of(&o.model, &o.data, &o.meta, indices, batch_size, device)?;
    let preds = logits
        .into_iter()
        .zip(indices)
        .map(|(l, &i)| {
            let (file, pos) = o.data.origins[i];
            let name = format!("{}:{}", o.data.files[file as usize], pos + 1);
            Prediction::new(name, l, Some(o.data.labels[i]))
        })
        .collect();
    Ok((preds, o.meta))
}

/// Accuracy of the predictions that have a truth: (correct, labelled).
pub fn accuracy(preds: &[Prediction]) -> (u64, u64) {
    let labelled: Vec<&Prediction> = preds.iter().filter(|p| p.truth.is_some()).collect();
    let correct = labelled.iter().filter(|p| p.truth == Some(p.top())).count();
    (correct as u64, labelled.len() as u64)
}
