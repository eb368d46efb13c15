//! ONNX export of a checkpoint, for TensorRT and onnxruntime on the device.
//!
//! The graph takes `input_0`, `[N, ...sample_shape]` float32 with a dynamic
//! batch dim `N` (NCHW for images), holding the values as the data reader
//! produces them: pixels 0-255 in RGB (or grey) channel order, CSV and
//! safetensors features as they are, token ids (as floats) for text. The
//! checkpoint's input normalisation is folded into the graph (`Sub` the
//! training mean, `Mul` by 1/std, the very f32 arithmetic of training), and
//! also stated in the model's `metadata_props`. The output `output_0` is
//! `[N, classes]`: the logits, or with `softmax` the probabilities.
//!
//! The architectures build the graph from their layers' emitters
//! ([`layers::Emit`]) through [`Classifier::export_onnx`](crate::engine::model::Classifier::export_onnx).

pub mod graph;
pub mod layers;
pub mod proto;

use std::path::{Path, PathBuf};

use candle_core::Device;
use prost::Message;

use super::checkpoint::{self, CheckpointError, CheckpointMeta};
use super::fsutil::atomic_write;
use super::model::Model;
pub use graph::{Attr, Graph};

/// The name of the graph's input, as NVIDIA's `onnx_export.py` and the
/// `imagenet --input_blob` default.
pub const INPUT_NAME: &str = "input_0";
/// The name of the graph's output (`--output_blob`).
pub const OUTPUT_NAME: &str = "output_0";
/// The opset written unless asked otherwise: TensorRT 8.2 (JetPack 4.6) reads up to 13.
pub const DEFAULT_OPSET: i64 = 13;
/// The opsets this exporter can write.
pub const OPSETS: std::ops::RangeInclusive<i64> = 11..=21;

/// How to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    pub opset: i64,
    /// Append a `Softmax`: `output_0` holds probabilities instead of logits.
    pub softmax: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            opset: DEFAULT_OPSET,
            softmax: false,
        }
    }
}

/// Why a model could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The architecture has no ONNX export (yet).
    #[error("this architecture has no ONNX export")]
    Unsupported,
    #[error("`{arch}` models have no ONNX export")]
    UnsupportedArch { arch: String },
    #[error("opset {0} is not supported (this exporter writes opsets 11 to 21)")]
    Opset(i64),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("cannot rebuild the model of {path}: {reason}")]
    Build { path: PathBuf, reason: String },
    #[error("tensor `{name}`: {source}")]
    Tensor {
        name: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An exported model, in memory.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The `.onnx` file's bytes.
    pub onnx: Vec<u8>,
    /// `labels.txt`: the class names, one per line, in output order.
    pub labels: String,
    /// The operator types the graph uses, sorted.
    pub operators: Vec<String>,
    pub opset: i64,
}

/// The `labels.txt` beside `onnx_path`: `model.onnx` -> `model.labels.txt`
/// for [`crate::engine::promote`]'s `current.onnx`, `labels.txt` in the same
/// folder otherwise.
pub fn labels_path(onnx_path: &Path, beside_as_stem: bool) -> PathBuf {
    let dir = onnx_path.parent().unwrap_or(Path::new(""));
    match onnx_path.file_stem() {
        Some(stem) if beside_as_stem => dir.join(format!("{}.labels.txt", stem.to_string_lossy())),
        _ => dir.join("labels.txt"),
    }
}

/// Exports the checkpoint at `path`.
pub fn export_checkpoint(path: &Path, opts: ExportOptions) -> Result<Exported, ExportError> {
    let ck = checkpoint::load(path, &Device::Cpu)?;
    let build = |reason: String| ExportError::Build {
        path: path.to_path_buf(),
        reason,
    };
    let model =
        Model::new(ck.meta.model.clone(), 0, &Device::Cpu).map_err(|e| build(e.to_string()))?;
    model
        .params
        .load(&ck.tensors)
        .map_err(|e| build(e.to_string()))?;
    export_model(&model, &ck.meta, opts)
}

/// Exports a model with its checkpoint metadata.
pub fn export_model(
    model: &Model,
    meta: &CheckpointMeta,
    opts: ExportOptions,
) -> Result<Exported, ExportError> {
    if !OPSETS.contains(&opts.opset) {
        return Err(ExportError::Opset(opts.opset));
    }
    let shape = &meta.input.sample_shape;
    let mut g = Graph::new(opts.opset, shape);
    let x = normalise(&mut g, meta, INPUT_NAME);
    let logits = model.net.export_onnx(&mut g, &x).map_err(|e| match e {
        ExportError::Unsupported => ExportError::UnsupportedArch {
            arch: meta.model.arch_name().to_string(),
        },
        e => e,
    })?;
    if opts.softmax {
        g.node_into(
            "Softmax",
            &[&logits],
            &[("axis", Attr::Int(1))],
            OUTPUT_NAME,
        );
    } else {
        g.node_into("Identity", &[&logits], &[], OUTPUT_NAME);
    }
    let operators: Vec<String> = g.operators().into_iter().collect();
    let metadata = metadata_props(meta, opts);
    let m = g.into_model(INPUT_NAME, OUTPUT_NAME, meta.classes.len(), &metadata);
    let onnx = m.encode_to_vec();
    let mut labels = meta.classes.join("\n");
    labels.push('\n');
    Ok(Exported {
        onnx,
        labels,
        operators,
        opset: opts.opset,
    })
}

/// The normalisation of `meta` as `Sub` and `Mul` nodes on `x` (none for the
/// identity, as for text): the same `(x - mean) * (1 / std)` in f32 as the
/// batcher computes.
fn normalise(g: &mut Graph, meta: &CheckpointMeta, x: &str) -> String {
    let n = &meta.input.normalization;
    let identity = n.mean.iter().all(|&m| m == 0.0) && n.std.iter().all(|&s| s == 1.0);
    if identity || n.is_empty() {
        return x.to_string();
    }
    let shape = &meta.input.sample_shape;
    // Per channel: [C, 1, 1...] broadcast over the sample; per feature: the sample's shape.
    let dims: Vec<usize> = if n.per_channel {
        let mut d = vec![n.len()];
        d.extend(std::iter::repeat_n(1, shape.len().saturating_sub(1)));
        d
    } else {
        shape.clone()
    };
    let inv: Vec<f32> = n.std.iter().map(|s| 1.0 / s).collect();
    let mean = g.floats("norm_mean", &n.mean, &dims);
    let inv = g.floats("norm_inv_std", &inv, &dims);
    let centred = g.node("Sub", &[x, &mean], &[]);
    g.node("Mul", &[&centred, &inv], &[])
}

/// What the model's `metadata_props` say: classes, input layout, how the
/// normalisation is handled, where the model comes from.
fn metadata_props(meta: &CheckpointMeta, opts: ExportOptions) -> Vec<(String, String)> {
    let input_values = match meta.input.format {
        super::data::DataFormat::ImageFolder => {
            "pixel values 0-255, channels first (RGB or grey), resized to the sample shape"
        }
        super::data::DataFormat::TextTsv => {
            "token ids (as floats) of the vocabulary in `edge_trainer.input`"
        }
        _ => "feature values as in the training data",
    };
    vec![
        ("edge_trainer.arch".into(), meta.model.arch_name().into()),
        ("edge_trainer.classes".into(), json(&meta.classes)),
        ("edge_trainer.input".into(), json(&meta.input)),
        ("edge_trainer.input_values".into(), input_values.into()),
        (
            "edge_trainer.normalization".into(),
            "folded into the graph: input_0 takes raw values; `input.normalization` gives the mean and std subtracted and divided by inside".into(),
        ),
        (
            "edge_trainer.output".into(),
            if opts.softmax { "probabilities" } else { "logits" }.into(),
        ),
        ("edge_trainer.run_id".into(), meta.run_id.clone()),
        ("edge_trainer.epoch".into(), meta.epoch.to_string()),
        ("edge_trainer.created".into(), meta.created.clone()),
        ("edge_trainer.version".into(), meta.version.clone()),
    ]
}

/// JSON for the metadata (these types always serialise).
fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Writes `exported` to `onnx_path` and its labels to `labels`, each atomically.
pub fn write_files(
    exported: &Exported,
    onnx_path: &Path,
    labels: &Path,
) -> Result<(), ExportError> {
    let write = |p: &Path, b: &[u8]| {
        atomic_write(p, b).map_err(|source| ExportError::Write {
            path: p.to_path_buf(),
            source,
        })
    };
    write(labels, exported.labels.as_bytes())?;
    write(onnx_path, &exported.onnx)
}

#[cfg(test)]
mod tests {
    use super::proto::ModelProto;
    use super::*;
    use crate::engine::checkpoint::{CheckpointMetrics, InputSpec};
    use crate::engine::data::{DataFormat, Normalization};
    use crate::engine::model::{Activation, CnnSpec, ConvBlockSpec, MlpSpec, ModelSpec};

    fn meta(model: ModelSpec, shape: Vec<usize>, norm: Normalization) -> CheckpointMeta {
        CheckpointMeta {
            classes: (0..model.num_classes()).map(|i| format!("c{i}")).collect(),
            model,
            input: InputSpec {
                format: DataFormat::Safetensors,
                sample_shape: shape,
                normalization: norm,
                text: None,
                resize: None,
            },
            run_id: "r".into(),
            epoch: 1,
            step: 1,
            metrics: CheckpointMetrics::default(),
            version: "t".into(),
            created: "2026-01-01T00:00:00Z".into(),
        }
    }

    fn ops(e: &Exported) -> Vec<String> {
        let m = ModelProto::decode(e.onnx.as_slice()).unwrap();
        let g = m.graph.unwrap();
        g.node.iter().map(|n| n.op_type.clone()).collect()
    }

    #[test]
    fn an_mlp_exports_with_the_nvidia_names_and_folded_normalisation() {
        let spec = ModelSpec::Mlp(MlpSpec {
            input_dim: 4,
            hidden: vec![3],
            num_classes: 2,
            activation: Activation::Gelu,
            dropout: 0.5,
        });
        let norm = Normalization {
            mean: vec![1.0; 4],
            std: vec![2.0; 4],
            per_channel: false,
        };
        let m = meta(spec.clone(), vec![4], norm);
        let model = Model::new(spec, 1, &Device::Cpu).unwrap();
        let e = export_model(&model, &m, ExportOptions::default()).unwrap();
        assert_eq!(e.labels, "c0\nc1\n");
        let p = ModelProto::decode(e.onnx.as_slice()).unwrap();
        assert_eq!(p.opset_import[0].version, 13);
        assert_eq!(p.ir_version, 7);
        let g = p.graph.as_ref().unwrap();
        assert_eq!(g.input[0].name, INPUT_NAME);
        assert_eq!(g.output[0].name, OUTPUT_NAME);
        assert_eq!(
            ops(&e),
            [
                "Sub", "Mul", "Flatten", "Gemm", "Div", "Erf", "Add", "Mul", "Mul", "Gemm",
                "Identity"
            ]
        );
        assert!(p
            .metadata_props
            .iter()
            .any(|kv| kv.key == "edge_trainer.normalization" && kv.value.contains("folded")));
        let soft = export_model(
            &model,
            &m,
            ExportOptions {
                opset: 17,
                softmax: true,
            },
        )
        .unwrap();
        assert_eq!(ops(&soft).last().map(String::as_str), Some("Softmax"));
        assert!(matches!(
            export_model(
                &model,
                &m,
                ExportOptions {
                    opset: 9,
                    softmax: false
                }
            ),
            Err(ExportError::Opset(9))
        ));
    }

    #[test]
    fn a_cnn_exports_its_blocks_in_forward_order() {
        let spec = ModelSpec::Cnn(CnnSpec {
            in_channels: 1,
            input_size: vec![8, 8],
            blocks: vec![ConvBlockSpec {
                out_channels: 4,
                kernel_size: 3,
                stride: 1,
                padding: 1,
                batch_norm: true,
                pool: 2,
            }],
            num_classes: 3,
            activation: Activation::Relu,
            dropout: 0.0,
            flatten: false,
            hidden: vec![],
        });
        // Samples stored without their channel dim are reshaped first.
        let m = meta(spec.clone(), vec![8, 8], Normalization::identity(64));
        let model = Model::new(spec, 1, &Device::Cpu).unwrap();
        let e = export_model(&model, &m, ExportOptions::default()).unwrap();
        assert_eq!(
            ops(&e),
            [
                "Reshape",
                "Conv",
                "BatchNormalization",
                "Relu",
                "MaxPool",
                "GlobalAveragePool",
                "Flatten",
                "Gemm",
                "Identity"
            ]
        );
    }
}
