//! Preparing a run: its data, split and normalisation, and the model it
//! trains (fresh, from a state dict, or from an edge-trainer checkpoint).
//! [`open_with_data`] is shared with `eval` and `promote`.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::engine::budget::{optimizer_copies, Estimate};
use crate::engine::checkpoint::{self, CheckpointMeta, TextInput};
use crate::engine::data::{self, DataSpec, Dataset, Normalization, Split, SplitIndices};
use crate::engine::error::RunError;
use crate::engine::model::{load_init, Model, ModelSpec};
use crate::engine::run::{RunRequest, WarmStart};

/// Data, split and normalisation of a run, plus the model to train.
pub(super) struct Prepared {
    pub data: Dataset,
    pub split: SplitIndices,
    pub norm: Normalization,
    pub model: Model,
    /// How the weights started, for the `Started` event.
    pub warm_start: String,
    /// Tokeniser and vocabulary, for text data.
    pub text: Option<TextInput>,
}

/// A checkpoint opened together with the data it describes.
pub struct Opened {
    /// The checkpoint's model with its weights loaded.
    pub model: Model,
    pub meta: CheckpointMeta,
    /// The data, read with the checkpoint's classes and tokenisation.
    pub data: Dataset,
    /// The data spec re-pointed at the checkpoint's classes and tokenisation.
    pub spec: DataSpec,
}

/// `spec` with the class list and text tokenisation a checkpoint was trained with.
fn repoint(spec: &DataSpec, meta: &CheckpointMeta) -> DataSpec {
    let mut spec = spec.clone();
    spec.classes = Some(meta.classes.clone());
    if let Some(t) = &meta.input.text {
        spec.tokenizer = t.tokenizer;
        spec.max_len = t.max_len;
        spec.vocab = Some(t.vocab.clone());
    }
    spec
}

/// Opens a checkpoint, reads `spec`'s data the way the checkpoint expects it,
/// checks the sample shape and loads the weights into its model.
pub fn open_with_data(
    path: &Path,
    spec: &DataSpec,
    device: &Device,
    seed: u64,
) -> Result<Opened, RunError> {
    let ck = checkpoint::load(path, device)?;
    let spec = repoint(spec, &ck.meta);
    let data = data::load_dataset(&spec)?;
    if data.sample_shape != ck.meta.input.sample_shape {
        return Err(RunError::SampleShape {
            checkpoint: path.to_path_buf(),
            expected: ck.meta.input.sample_shape.clone(),
            data_dir: spec.dir.clone(),
            found: data.sample_shape.clone(),
        });
    }
    let model = Model::new(ck.meta.model.clone(), seed, device)?;
    model
        .params
        .load(&ck.tensors)
        .map_err(|source| RunError::Load {
            context: format!("checkpoint {}", path.display()),
            source,
        })?;
    Ok(Opened {
        model,
        meta: ck.meta,
        data,
        spec,
    })
}

/// The samples of one split.
pub fn split_indices(split: &SplitIndices, which: Split) -> &[usize] {
    match which {
        Split::Train => &split.train,
        Split::Val => &split.val,
        Split::Test => &split.test,
    }
}

/// An empty-split error for `which`.
fn empty(which: Split, data: &Dataset, spec: &DataSpec) -> RunError {
    RunError::EmptySplit {
        split: which,
        samples: data.len(),
        dir: spec.dir.clone(),
        val_fraction: spec.val_fraction,
    }
}

/// Reads the data, splits it and builds (or warm-starts) the model of `req`.
pub(super) fn prepare(req: &RunRequest) -> Result<Prepared, RunError> {
    let (spec, data, built) = match &req.warm_start {
        WarmStart::Checkpoint(path) => {
            // Fine-tuning keeps the class list and the tokenisation the model was trained with.
            let o = open_with_data(path, &req.data, &req.device, req.train.seed)?;
            (o.spec, o.data, Some((path.clone(), o.model, o.meta)))
        }
        _ => {
            let data = data::load_dataset(&req.data)?;
            (req.data.clone(), data, None)
        }
    };
    let split = data.split(&spec);
    if split.train.is_empty() {
        return Err(empty(Split::Train, &data, &spec));
    }
    if split.val.is_empty() {
        return Err(empty(Split::Val, &data, &spec));
    }
    let (model, norm, warm_start) = match built {
        Some((path, model, meta)) => {
            check_budget(req, &model.spec, &data.sample_shape)?;
            (
                model,
                meta.input.normalization,
                format!("checkpoint {}", path.display()),
            )
        }
        None => fresh_model(req, &data, &split, &spec)?,
    };
    if !norm.covers(&data.sample_shape) {
        return Err(RunError::Normalization {
            values: norm.len(),
            per_channel: norm.per_channel,
            shape: data.sample_shape.clone(),
        });
    }
    if let (Some(v), ModelSpec::TextCnn(s)) = (&data.vocab, &model.spec) {
        if v.len() != s.vocab_size {
            return Err(RunError::Vocabulary {
                tokens: v.len(),
                rows: s.vocab_size,
            });
        }
    }
    let text = data.vocab.clone().map(|vocab| TextInput {
        tokenizer: spec.tokenizer,
        max_len: spec.max_len,
        vocab,
    });
    if let Some(w) = &req.train.class_weights {
        if w.len() != data.classes.len() {
            return Err(RunError::ClassWeights {
                weights: w.len(),
                classes: data.classes.clone(),
            });
        }
    }
    Ok(Prepared {
        data,
        split,
        norm,
        model,
        warm_start,
        text,
    })
}

/// A model built from the configured template: seeded, or from a state dict.
fn fresh_model(
    req: &RunRequest,
    data: &Dataset,
    split: &SplitIndices,
    spec: &DataSpec,
) -> Result<(Model, Normalization, String), RunError> {
    let model_spec =
        req.model
            .resolve(&data.sample_shape, data.classes.len(), data.vocab.as_ref())?;
    check_budget(req, &model_spec, &data.sample_shape)?;
    let model = Model::new(model_spec, req.train.seed, &req.device)?;
    let from = match &req.warm_start {
        WarmStart::StateDict(path) => {
            let (tensors, _) = checkpoint::read_tensors(path, &req.device)?;
            let report = load_init(&model.params, tensors, &req.train.init).map_err(|source| {
                RunError::Load {
                    context: format!("model.init {}", path.display()),
                    source,
                }
            })?;
            format!("state dict {} ({})", path.display(), report.describe())
        }
        _ => "scratch".to_string(),
    };
    let norm = Normalization::for_format(data, &split.train, spec.format);
    Ok((model, norm, from))
}

/// Refuses a model whose training step would need more memory than the
/// budget, before anything of its size is allocated.
fn check_budget(req: &RunRequest, spec: &ModelSpec, shape: &[usize]) -> Result<(), RunError> {
    let t = &req.train;
    let mut estimate = Estimate::new(
        &spec.footprint(),
        t.batch_size,
        optimizer_copies(&t.optimizer),
    );
    if req.data.format == data::DataFormat::ImageFolder {
        let sample: usize = shape.iter().product();
        estimate = estimate.with_data(req.data.images.pipeline_bytes(sample, t.batch_size));
    }
    match t.memory_budget.check(estimate) {
        Ok(e) => {
            tracing::debug!(run_id = %req.run_id, estimate = %e, budget = %t.memory_budget, "memory budget");
            Ok(())
        }
        Err(source) => Err(RunError::OverBudget {
            arch: spec.arch_name(),
            shape: shape.to_vec(),
            source,
        }),
    }
}

/// The folder of a run.
pub(super) fn run_folder(req: &RunRequest) -> PathBuf {
    req.runs_dir.join(&req.run_id)
}
