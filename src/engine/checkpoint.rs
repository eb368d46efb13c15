//! Checkpoints: safetensors files whose tensor names and layouts match the
//! PyTorch twin's `state_dict`, and whose `__metadata__` holds everything needed
//! to rebuild and evaluate the model. Written atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::data::{DataFormat, Normalization, TokenizerKind, Vocab};
use super::fsutil::atomic_write;
use super::model::ModelSpec;

/// Tensors by name.
pub type TensorMap = HashMap<String, Tensor>;
/// A safetensors file's `__metadata__` map.
pub type Metadata = HashMap<String, String>;

/// Marks files written by this program (metadata key `format`).
pub const FORMAT: &str = "edge-trainer/1";

/// Why a checkpoint could not be written or read.
/// The I/O variants keep their `io::Error`, so a full disk is recognisable.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The content could not be serialised.
    #[error("cannot write checkpoint {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    /// The file could not be written.
    #[error("cannot write checkpoint {path}: {source}")]
    WriteIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid checkpoint.
    #[error("cannot read checkpoint {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// The file could not be read.
    #[error("cannot read checkpoint {path}: {source}")]
    ReadIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What is wrong with the content of a checkpoint (its path is added by
/// [`CheckpointError`]).
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("metadata has no `{0}`")]
    MissingKey(String),
    #[error("unsupported checkpoint format {0:?} (expected {FORMAT:?})")]
    UnsupportedFormat(String),
    #[error("no edge-trainer metadata: this looks like a plain state dict; use it as model.init instead")]
    PlainStateDict,
    #[error("metadata `{key}` is not valid JSON: {source}")]
    NotJson {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("metadata `{0}` is not a number")]
    NotANumber(String),
    #[error("metadata `{key}`: {source}")]
    Field {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("tensor `{name}`: {source}")]
    Tensor {
        name: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("tensor `{name}`: {source}")]
    View {
        name: String,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error(transparent)]
    Safetensors(#[from] safetensors::SafeTensorError),
}

/// Validation metrics of the model in a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMetrics {
    pub val_loss: Option<f64>,
    pub val_acc: Option<f64>,
    pub train_loss: Option<f64>,
    pub train_acc: Option<f64>,
}

/// How text becomes the model's token ids (text data only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextInput {
    pub tokenizer: TokenizerKind,
    /// Tokens per sample: longer texts are cut, shorter ones padded.
    pub max_len: usize,
    pub vocab: Vocab,
}

/// What the data going into the model looks like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    pub format: DataFormat,
    /// Shape of one sample.
    pub sample_shape: Vec<usize>,
    pub normalization: Normalization,
    /// Tokeniser and vocabulary, for text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextInput>,
    /// image-folder: how images were brought to the sample size
    /// (`data.resize`); absent in checkpoints written before it was stored,
    /// which were trained on stretched images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<crate::engine::data::image_folder::ResizeMode>,
}

/// Everything in a checkpoint besides the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub model: ModelSpec,
    pub classes: Vec<String>,
    pub input: InputSpec,
    pub run_id: String,
    pub epoch: u64,
    pub step: u64,
    pub metrics: CheckpointMetrics,
    /// Version of edge-trainer that wrote it.
    pub version: String,
    /// RFC 3339 UTC time of writing.
    pub created: String,
}

impl CheckpointMeta {
    /// The metadata as safetensors' string map (one JSON value per key).
    fn to_map(&self) -> Result<HashMap<String, String>, serde_json::Error> {
        let mut m = HashMap::new();
        m.insert("format".to_string(), FORMAT.to_string());
        m.insert("arch".to_string(), self.model.arch_name().to_string());
        m.insert("model".to_string(), serde_json::to_string(&self.model)?);
        m.insert("classes".to_string(), serde_json::to_string(&self.classes)?);
        m.insert("input".to_string(), serde_json::to_string(&self.input)?);
        m.insert("run_id".to_string(), self.run_id.clone());
        m.insert("epoch".to_string(), self.epoch.to_string());
        m.insert("step".to_string(), self.step.to_string());
        m.insert("metrics".to_string(), serde_json::to_string(&self.metrics)?);
        m.insert("version".to_string(), self.version.clone());
        m.insert("created".to_string(), self.created.clone());
        Ok(m)
    }

    fn from_map(m: &HashMap<String, String>) -> Result<Self, FormatError> {
        let get = |k: &str| {
            m.get(k)
                .ok_or_else(|| FormatError::MissingKey(k.to_string()))
        };
        match m.get("format") {
            Some(f) if f == FORMAT => {}
            Some(f) => return Err(FormatError::UnsupportedFormat(f.clone())),
            None => return Err(FormatError::PlainStateDict),
        }
        let json = |k: &str| -> Result<serde_json::Value, FormatError> {
            serde_json::from_str(get(k)?).map_err(|source| FormatError::NotJson {
                key: k.to_string(),
                source,
            })
        };
        let parse = |k: &str| -> Result<u64, FormatError> {
            get(k)?
                .parse()
                .map_err(|_| FormatError::NotANumber(k.to_string()))
        };
        fn field<T: serde::de::DeserializeOwned>(
            key: &str,
            v: serde_json::Value,
        ) -> Result<T, FormatError> {
            serde_json::from_value(v).map_err(|source| FormatError::Field {
                key: key.to_string(),
                source,
            })
        }
        Ok(Self {
            model: field("model", json("model")?)?,
            classes: field("classes", json("classes")?)?,
            input: field("input", json("input")?)?,
            run_id: get("run_id")?.clone(),
            epoch: parse("epoch")?,
            step: parse("step")?,
            metrics: field("metrics", json("metrics")?)?,
            version: get("version")?.clone(),
            created: get("created")?.clone(),
        })
    }
}

/// Serialises named f32 tensors (plus optional metadata) to safetensors bytes.
pub fn to_safetensors_bytes(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, FormatError> {
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let shape = t.dims().to_vec();
        let values = t
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|source| FormatError::Tensor {
                name: name.clone(),
                source,
            })?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        buffers.push((name.clone(), shape, bytes));
    }
    let views: Vec<(String, TensorView)> = buffers
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|source| FormatError::View {
                    name: n.clone(),
                    source,
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(safetensors::tensor::serialize(views, metadata)?)
}

/// Writes a checkpoint atomically.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    meta: &CheckpointMeta,
) -> Result<(), CheckpointError> {
    let err = |reason: String| CheckpointError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let map = meta.to_map().map_err(|e| err(e.to_string()))?;
    let bytes = to_safetensors_bytes(tensors, Some(map)).map_err(|e| err(e.to_string()))?;
    atomic_write(path, &bytes).map_err(|source| CheckpointError::WriteIo {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads every tensor of a safetensors file as f32 on `device`, plus its metadata map.
pub fn read_tensors(
    path: &Path,
    device: &Device,
) -> Result<(TensorMap, Metadata), CheckpointError> {
    let err = |reason: String| CheckpointError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::ReadIo {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = view_to_tensor(&view, device).map_err(|e| err(format!("tensor `{name}`: {e}")))?;
        out.insert(name, t);
    }
    let meta = header.metadata().clone().unwrap_or_default();
    Ok((out, meta))
}

/// The `run_id` in a checkpoint's metadata, read from its header only (a
/// ResNet-18 checkpoint is 45 MB; its header a few KB). `None` when the file
/// is missing, not safetensors, or has no run id.
pub fn read_run_id(path: &Path) -> Option<String> {
    use std::io::Read;
    /// safetensors refuses headers over 100 MB; so does this.
    const MAX_HEADER: u64 = 100 << 20;
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return None;
    }
    let mut header = vec![0u8; usize::try_from(n).ok()?];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    Some(v.get("__metadata__")?.get("run_id")?.as_str()?.to_string())
}

/// A tensor of a checkpoint or init file, as f32 (every dtype candle reads).
fn view_to_tensor(
    view: &TensorView,
    device: &Device,
) -> Result<Tensor, super::st_decode::DecodeError> {
    super::st_decode::decode_f32(view, device)
}

/// A checkpoint read back: weights and metadata.
pub struct Checkpoint {
    pub tensors: HashMap<String, Tensor>,
    pub meta: CheckpointMeta,
}

/// Reads a checkpoint written by [`save`]; the error says what is wrong with it.
pub fn load(path: &Path, device: &Device) -> Result<Checkpoint, CheckpointError> {
    let (tensors, map) = read_tensors(path, device)?;
    let meta = CheckpointMeta::from_map(&map).map_err(|e| CheckpointError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(Checkpoint { tensors, meta })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{Activation, MlpSpec, Model};

    fn meta() -> CheckpointMeta {
        CheckpointMeta {
            model: ModelSpec::Mlp(MlpSpec {
                input_dim: 4,
                hidden: vec![3],
                num_classes: 2,
                activation: Activation::Relu,
                dropout: 0.0,
            }),
            classes: vec!["a".into(), "b".into()],
            input: InputSpec {
                format: DataFormat::Safetensors,
                sample_shape: vec![4],
                normalization: Normalization::identity(4),
                text: None,
                resize: None,
            },
            run_id: "r1".into(),
            epoch: 3,
            step: 30,
            metrics: CheckpointMetrics {
                val_loss: Some(0.5),
                val_acc: Some(0.75),
                ..Default::default()
            },
            version: "0.1.0".into(),
            created: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn round_trip_rebuilds_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("best.safetensors");
        let m = meta();
        let model = Model::new(m.model.clone(), 7, &Device::Cpu).unwrap();
        save(&p, &model.params.state_dict(), &m).unwrap();
        let ck = load(&p, &Device::Cpu).unwrap();
        assert_eq!(ck.meta, m);
        let again = Model::new(ck.meta.model.clone(), 99, &Device::Cpu).unwrap();
        again.params.load(&ck.tensors).unwrap();
        let a = model.params.state_dict();
        let b = again.params.state_dict();
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert_eq!(
                ta.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                tb.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn garbage_and_plain_state_dicts_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        std::fs::write(&p, b"definitely not safetensors").unwrap();
        let e = load(&p, &Device::Cpu).err().unwrap().to_string();
        assert!(
            e.contains("x.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );
        let t = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap();
        let bytes = to_safetensors_bytes(&[("w".into(), t)], None).unwrap();
        std::fs::write(&p, bytes).unwrap();
        let e = load(&p, &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("plain state dict"), "{e}");
    }
}
