//! Why a run (or an evaluation, or a promotion) failed, typed until the edge:
//! [`RunError`] keeps the cause and its source, [`FailureKind`] is the
//! machine-readable class written to `summary.json` and sent in `run_failed`.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::budget::OverBudget;
use super::checkpoint::CheckpointError;
use super::data::{DataError, Split};
use super::model::{LoadError, ModelError};
use super::optim::OptimStateError;

/// The class of a failure, for machines (`summary.json` `failure`, `run_failed` `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// A setting cannot work (e.g. a freeze pattern matching nothing).
    BadConfig,
    /// There is no (or not enough) usable data.
    NoData,
    /// The data is there but unreadable or inconsistent.
    DataInvalid,
    /// A write failed because the disk (or quota) is full.
    DiskFull,
    /// Training produced non-finite losses or no finite validation metric.
    Diverged,
    /// A checkpoint or weights file does not fit the model or the data.
    ModelMismatch,
    /// A checkpoint or resume state cannot be read.
    CheckpointInvalid,
    /// A run cannot be resumed as it was started.
    ResumeMismatch,
    /// Another file-system error.
    Io,
    /// Stopped on request before it completed.
    Cancelled,
    /// A bug or an unexpected tensor-library error.
    Internal,
}

impl FailureKind {
    /// The snake_case name used in payloads.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::BadConfig => "bad_config",
            FailureKind::NoData => "no_data",
            FailureKind::DataInvalid => "data_invalid",
            FailureKind::DiskFull => "disk_full",
            FailureKind::Diverged => "diverged",
            FailureKind::ModelMismatch => "model_mismatch",
            FailureKind::CheckpointInvalid => "checkpoint_invalid",
            FailureKind::ResumeMismatch => "resume_mismatch",
            FailureKind::Io => "io",
            FailureKind::Cancelled => "cancelled",
            FailureKind::Internal => "internal",
        }
    }

    /// `disk_full` for ENOSPC/EDQUOT, `io` for any other I/O error.
    pub fn of_io(e: &io::Error) -> Self {
        if is_disk_full(e) {
            FailureKind::DiskFull
        } else {
            FailureKind::Io
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether an I/O error means the disk (or the user's quota) is full.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Why a run, an evaluation or a scoring ended without a result.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Weights that do not fit the model; `context` names where they came from.
    #[error("{context}: {source}")]
    Load {
        context: String,
        #[source]
        source: LoadError,
    },
    /// A resume state whose optimiser part does not fit.
    #[error("resume state of run {run_id}: {source}")]
    OptimizerState {
        run_id: String,
        #[source]
        source: Box<OptimStateError>,
    },
    /// A split the run or evaluation needs has no samples.
    #[error("{}", empty_split_text(*.split, *.samples, .dir, *.val_fraction))]
    EmptySplit {
        split: Split,
        /// Samples in the whole data set.
        samples: usize,
        /// The data folder.
        dir: PathBuf,
        val_fraction: f64,
    },
    /// A checkpoint made for samples of another shape.
    #[error("checkpoint {} expects samples of shape {expected:?} but {} has {found:?}", .checkpoint.display(), .data_dir.display())]
    SampleShape {
        checkpoint: PathBuf,
        expected: Vec<usize>,
        data_dir: PathBuf,
        found: Vec<usize>,
    },
    /// The normalisation does not fit the sample shape.
    #[error("the normalisation ({values} values{}) does not fit samples of shape {shape:?}", if *.per_channel { ", per channel" } else { "" })]
    Normalization {
        values: usize,
        per_channel: bool,
        shape: Vec<usize>,
    },
    /// The vocabulary and the model's embedding disagree.
    #[error("the vocabulary has {tokens} tokens but the model's embedding has {rows} rows")]
    Vocabulary { tokens: usize, rows: usize },
    /// `train.class_weights` does not have one weight per class.
    #[error("train.class_weights has {weights} entries but the data has {} classes ({})", .classes.len(), .classes.join(", "))]
    ClassWeights {
        weights: usize,
        classes: Vec<String>,
    },
    /// The model settings cannot be resolved for this data.
    #[error(transparent)]
    ModelConfig(#[from] ModelError),
    /// The model, for this data, would need more memory than the budget.
    #[error("model.arch = {arch:?} on samples of shape {shape:?}: {source}")]
    OverBudget {
        arch: &'static str,
        shape: Vec<usize>,
        #[source]
        source: OverBudget,
    },
    /// A `model.freeze` pattern matches no parameter.
    #[error("model.freeze pattern {0:?} matches no parameter")]
    FreezeMatchesNothing(String),
    /// `model.freeze` freezes everything.
    #[error("model.freeze leaves no parameter to train")]
    NothingToTrain,
    /// `model.finetune` does not fit the model.
    #[error(transparent)]
    FineTune(#[from] crate::engine::model::FineTuneError),
    /// The training loss became NaN or infinite.
    #[error("training loss became {loss} at epoch {epoch}, step {step}; the learning rate ({lr}) may be too high{suspects}")]
    Diverged {
        epoch: u64,
        step: u64,
        loss: f64,
        lr: f64,
        /// Data files whose values dwarf the others' (named when any).
        suspects: crate::engine::data::Outliers,
    },
    /// No evaluation gave a finite validation metric, so no model was kept.
    #[error("no evaluation produced a finite validation metric; no model was saved")]
    NoFiniteMetric,
    /// The resume state belongs to another run.
    #[error("{} belongs to run {found}, not {expected}", .path.display())]
    ResumeOtherRun {
        path: PathBuf,
        found: String,
        expected: String,
    },
    /// The settings of a resumed run changed.
    #[error(
        "cannot resume run {run_id}: the [{section}] settings differ from the ones it started with"
    )]
    ResumeSettings {
        run_id: String,
        section: &'static str,
    },
    /// Data files a resumed run trained on are gone.
    #[error("cannot resume run {run_id}: data files it trained on are gone or now invalid: {}", .missing.join(", "))]
    ResumeDataGone {
        run_id: String,
        missing: Vec<String>,
    },
    /// The resume state's dropout RNG position is unreadable.
    #[error("resume state: bad dropout RNG position")]
    ResumeRng,
    /// A file-system operation failed.
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// Stopped on request.
    #[error("cancelled")]
    Cancelled,
}

fn empty_split_text(split: Split, samples: usize, dir: &Path, val_fraction: f64) -> String {
    match split {
        Split::Train => format!("the training split is empty ({samples} samples in all)"),
        Split::Val => format!(
            "the validation split is empty ({samples} samples, data.val_fraction = {val_fraction}): add data or raise it"
        ),
        Split::Test => format!("the Test split of {} is empty", dir.display()),
    }
}

impl RunError {
    /// An I/O error with what was being done and to which file.
    pub fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        RunError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The failure's class, for machines.
    pub fn kind(&self) -> FailureKind {
        use FailureKind as K;
        match self {
            RunError::Data(e) => data_kind(e),
            RunError::Checkpoint(e) => checkpoint_kind(e),
            RunError::Load { source, .. } => match source {
                LoadError::Mismatch(_) => K::ModelMismatch,
                LoadError::Candle(_) => K::Internal,
            },
            RunError::OptimizerState { .. }
            | RunError::ResumeOtherRun { .. }
            | RunError::ResumeSettings { .. }
            | RunError::ResumeDataGone { .. }
            | RunError::ResumeRng => K::ResumeMismatch,
            RunError::EmptySplit { .. } => K::NoData,
            RunError::SampleShape { .. }
            | RunError::Normalization { .. }
            | RunError::Vocabulary { .. } => K::ModelMismatch,
            RunError::ClassWeights { .. }
            | RunError::ModelConfig(_)
            | RunError::OverBudget { .. }
            | RunError::FreezeMatchesNothing(_)
            | RunError::FineTune(_)
            | RunError::NothingToTrain => K::BadConfig,
            RunError::Diverged { .. } | RunError::NoFiniteMetric => K::Diverged,
            RunError::Io { source, .. } => FailureKind::of_io(source),
            RunError::Json(_) => K::Internal,
            RunError::Tensor(e) => tensor_kind(e),
            RunError::Cancelled => K::Cancelled,
        }
    }

    /// Whether this is the given split being empty.
    pub fn is_empty_split(&self, which: Split) -> bool {
        matches!(self, RunError::EmptySplit { split, .. } if *split == which)
    }
}

/// The class of a data-loading failure.
pub fn data_kind(e: &DataError) -> FailureKind {
    match e {
        DataError::Folder { .. } | DataError::NoData { .. } => FailureKind::NoData,
        DataError::Unsupported(_) => FailureKind::BadConfig,
        DataError::ClassFile { .. } | DataError::Vocab(_) => FailureKind::DataInvalid,
    }
}

/// The class of a checkpoint failure: `disk_full` when a write hit ENOSPC/EDQUOT.
pub fn checkpoint_kind(e: &CheckpointError) -> FailureKind {
    match e {
        CheckpointError::WriteIo { source, .. } | CheckpointError::ReadIo { source, .. } => {
            FailureKind::of_io(source)
        }
        CheckpointError::Write { .. } => FailureKind::Internal,
        CheckpointError::Read { .. } => FailureKind::CheckpointInvalid,
    }
}

fn tensor_kind(e: &candle_core::Error) -> FailureKind {
    match e {
        candle_core::Error::Io(io) => FailureKind::of_io(io),
        candle_core::Error::WithBacktrace { inner, .. } => tensor_kind(inner),
        candle_core::Error::Context { inner, .. } => tensor_kind(inner),
        _ => FailureKind::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_disk_and_quota_are_disk_full() {
        for code in [libc::ENOSPC, libc::EDQUOT] {
            let e = RunError::io("write", Path::new("x"), io::Error::from_raw_os_error(code));
            assert_eq!(e.kind(), FailureKind::DiskFull);
        }
        let e = RunError::io(
            "write",
            Path::new("x"),
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert_eq!(e.kind(), FailureKind::Io);
    }

    #[test]
    fn checkpoint_write_on_a_full_disk_is_disk_full_and_keeps_the_message() {
        let e: RunError = CheckpointError::WriteIo {
            path: PathBuf::from("/r/best.safetensors"),
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        }
        .into();
        assert_eq!(e.kind(), FailureKind::DiskFull);
        let text = e.to_string();
        assert!(text.contains("/r/best.safetensors"), "{text}");
        assert!(text.contains("No space left on device"), "{text}");
        let read: RunError = CheckpointError::Read {
            path: PathBuf::from("x"),
            reason: "garbage".into(),
        }
        .into();
        assert_eq!(read.kind(), FailureKind::CheckpointInvalid);
    }

    #[test]
    fn kinds_of_typical_failures() {
        let cases: Vec<(RunError, FailureKind)> = vec![
            (
                RunError::Diverged {
                    epoch: 1,
                    step: 3,
                    loss: f64::NAN,
                    lr: 10.0,
                    suspects: Default::default(),
                },
                FailureKind::Diverged,
            ),
            (RunError::NoFiniteMetric, FailureKind::Diverged),
            (
                RunError::EmptySplit {
                    split: Split::Val,
                    samples: 3,
                    dir: PathBuf::from("d"),
                    val_fraction: 0.0,
                },
                FailureKind::NoData,
            ),
            (
                DataError::NoData {
                    dir: PathBuf::from("d"),
                    reason: "no files".into(),
                }
                .into(),
                FailureKind::NoData,
            ),
            (
                DataError::Vocab(crate::engine::data::FileError::DuplicateToken {
                    token: "a".into(),
                })
                .into(),
                FailureKind::DataInvalid,
            ),
            (RunError::NothingToTrain, FailureKind::BadConfig),
            (
                crate::engine::model::ModelError::CannotReadText { arch: "mlp" }.into(),
                FailureKind::BadConfig,
            ),
            (
                RunError::FreezeMatchesNothing("x.*".into()),
                FailureKind::BadConfig,
            ),
            (
                RunError::Load {
                    context: "checkpoint c".into(),
                    source: LoadError::Mismatch(" w".into()),
                },
                FailureKind::ModelMismatch,
            ),
            (
                RunError::ResumeSettings {
                    run_id: "r".into(),
                    section: "data",
                },
                FailureKind::ResumeMismatch,
            ),
            (RunError::Cancelled, FailureKind::Cancelled),
            (
                candle_core::Error::Msg("boom".into()).into(),
                FailureKind::Internal,
            ),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e}");
        }
    }

    #[test]
    fn messages_keep_their_wording() {
        let e = RunError::EmptySplit {
            split: Split::Val,
            samples: 3,
            dir: PathBuf::from("d"),
            val_fraction: 0.0,
        };
        assert_eq!(
            e.to_string(),
            "the validation split is empty (3 samples, data.val_fraction = 0): add data or raise it"
        );
        let e = RunError::EmptySplit {
            split: Split::Test,
            samples: 3,
            dir: PathBuf::from("data/x"),
            val_fraction: 0.2,
        };
        assert_eq!(e.to_string(), "the Test split of data/x is empty");
        assert!(e.is_empty_split(Split::Test));
        assert!(!e.is_empty_split(Split::Val));
        let e = RunError::Diverged {
            epoch: 2,
            step: 7,
            loss: f64::INFINITY,
            lr: 5.0,
            suspects: Default::default(),
        };
        assert_eq!(
            e.to_string(),
            "training loss became inf at epoch 2, step 7; the learning rate (5) may be too high"
        );
    }

    #[test]
    fn kinds_serialise_snake_case() {
        assert_eq!(
            serde_json::to_string(&FailureKind::DiskFull).unwrap(),
            "\"disk_full\""
        );
        let k: FailureKind = serde_json::from_str("\"model_mismatch\"").unwrap();
        assert_eq!(k, FailureKind::ModelMismatch);
        for k in [
            FailureKind::BadConfig,
            FailureKind::NoData,
            FailureKind::DataInvalid,
            FailureKind::DiskFull,
            FailureKind::Diverged,
            FailureKind::ModelMismatch,
            FailureKind::CheckpointInvalid,
            FailureKind::ResumeMismatch,
            FailureKind::Io,
            FailureKind::Cancelled,
            FailureKind::Internal,
        ] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
    }
}
