//! Safe promotion: a run's best model replaces the one in service only when it is
//! at least as good. Both are scored on the same split of the same data; the
//! swap is atomic and the replaced model is kept as `previous.safetensors`.
//! A plain library function: the `train` command and the daemon both call it.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::checkpoint;
use super::data::{DataSpec, Split};
use super::error::{FailureKind, RunError};
use super::eval::evaluate_checkpoint;
use super::export;
use super::fsutil::atomic_write;
use super::loss::CrossEntropy;
use super::run::CancelFlag;

/// The model in service, under `output.dir`.
pub const CURRENT_FILE: &str = "current.safetensors";
/// The model that was in service before the last promotion.
pub const PREVIOUS_FILE: &str = "previous.safetensors";
/// The model in service as ONNX (`output.export_onnx`).
pub const CURRENT_ONNX_FILE: &str = "current.onnx";
/// Its class names, one per line (`output.export_onnx`).
pub const CURRENT_LABELS_FILE: &str = "current.labels.txt";

/// The metric a candidate must match or beat.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PromoteMetric {
    /// Higher is better.
    #[default]
    Accuracy,
    /// Cross-entropy; lower is better.
    Loss,
    /// Unweighted mean of the per-class F1 scores; higher is better.
    MacroF1,
}

impl PromoteMetric {
    /// The metric's name in payloads.
    pub fn name(self) -> &'static str {
        match self {
            PromoteMetric::Accuracy => "accuracy",
            PromoteMetric::Loss => "loss",
            PromoteMetric::MacroF1 => "macro_f1",
        }
    }

    /// The metric's value in a score.
    pub fn pick(self, s: &Score) -> f64 {
        match self {
            PromoteMetric::Accuracy => s.accuracy,
            PromoteMetric::Loss => s.loss,
            PromoteMetric::MacroF1 => s.macro_f1,
        }
    }

    /// Whether `candidate` is at least as good as `current`.
    pub fn at_least_as_good(self, candidate: &Score, current: &Score) -> bool {
        let (c, o) = (self.pick(candidate), self.pick(current));
        if !c.is_finite() {
            return false;
        }
        if !o.is_finite() {
            return true;
        }
        match self {
            PromoteMetric::Loss => c <= o,
            PromoteMetric::Accuracy | PromoteMetric::MacroF1 => c >= o,
        }
    }
}

/// A model's results on the comparison split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub loss: f64,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub samples: u64,
    /// Run id recorded in the checkpoint.
    pub run_id: String,
}

/// What [`promote`] decided and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Promotion {
    /// The candidate is now `current.safetensors`.
    pub promoted: bool,
    pub metric: PromoteMetric,
    /// The split both models were scored on (`test`, or `val` when the test split is empty).
    pub split: String,
    pub candidate: Score,
    /// `None` when there was no current model, or it could not be scored.
    pub current: Option<Score>,
    /// One sentence for logs and payloads.
    pub reason: String,
    /// `output.dir/current.safetensors`.
    pub current_path: PathBuf,
    /// Where the replaced model went, when one was replaced.
    pub previous_path: Option<PathBuf>,
    /// `current.onnx` and `current.labels.txt`, when written (`output.export_onnx`).
    pub onnx: Option<OnnxFiles>,
    /// Why they could not be written (the promotion stands; stale ones are removed).
    pub onnx_error: Option<String>,
}

/// The ONNX export of a promoted model and its labels, with their SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnnxFiles {
    pub path: PathBuf,
    pub sha256: String,
    pub labels_path: PathBuf,
    pub labels_sha256: String,
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Exports `candidate` as `current.onnx` and `current.labels.txt` in
/// `output_dir`, each written atomically. On failure the stale files of the
/// previous model are removed, so that no `current.onnx` ever disagrees with
/// `current.safetensors`.
fn export_current(candidate: &Path, output_dir: &Path) -> Result<OnnxFiles, String> {
    let onnx_path = output_dir.join(CURRENT_ONNX_FILE);
    let labels_path = output_dir.join(CURRENT_LABELS_FILE);
    let result = export::export_checkpoint(candidate, export::ExportOptions::default())
        .and_then(|e| export::write_files(&e, &onnx_path, &labels_path).map(|()| e));
    match result {
        Ok(e) => Ok(OnnxFiles {
            sha256: sha256_hex(&e.onnx),
            labels_sha256: sha256_hex(e.labels.as_bytes()),
            path: onnx_path,
            labels_path,
        }),
        Err(err) => {
            tracing::warn!(error = %err, "the promoted model could not be exported to ONNX");
            for p in [&onnx_path, &labels_path] {
                if let Err(e) = std::fs::remove_file(p) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(file = %p.display(), error = %e, "cannot remove the stale export");
                    }
                }
            }
            Err(err.to_string())
        }
    }
}

/// Why a promotion could not be carried out (the current model is then untouched).
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    /// The candidate checkpoint cannot be read or scored.
    #[error("cannot score the candidate {path}: {source}")]
    Candidate {
        path: PathBuf,
        #[source]
        source: Box<RunError>,
    },
    /// The candidate checkpoint cannot be read for copying.
    #[error("cannot read the candidate {path}: {source}")]
    ReadCandidate {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing `current.safetensors` or `previous.safetensors` failed.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Stopped on request before anything was replaced: the current model stays.
    #[error("the promotion was cancelled; the current model is kept")]
    Cancelled,
}

impl PromoteError {
    /// The failure's class, for machines (`disk_full` when a write hit ENOSPC).
    pub fn kind(&self) -> FailureKind {
        match self {
            PromoteError::Candidate { source, .. } => source.kind(),
            PromoteError::ReadCandidate { source, .. } | PromoteError::Write { source, .. } => {
                FailureKind::of_io(source)
            }
            PromoteError::Cancelled => FailureKind::Cancelled,
        }
    }
}

/// Inputs of a promotion.
#[derive(Debug, Clone)]
pub struct PromoteRequest<'a> {
    /// The run's best checkpoint.
    pub candidate: &'a Path,
    /// `output.dir`: holds `current.safetensors` and `previous.safetensors`.
    pub output_dir: &'a Path,
    /// The data both models are scored on.
    pub data: &'a DataSpec,
    pub device: &'a Device,
    pub batch_size: usize,
    pub metric: PromoteMetric,
    /// Also write `current.onnx` and `current.labels.txt` (`output.export_onnx`).
    pub export_onnx: bool,
}

/// Scores a checkpoint on `split` (plain cross-entropy, so scores of models
/// trained with different loss settings compare fairly).
fn score(
    req: &PromoteRequest,
    path: &Path,
    split: Split,
    cancel: &CancelFlag,
) -> Result<Score, RunError> {
    let loss = CrossEntropy::new(None, 0.0, req.device)?;
    let (rep, meta, _) = evaluate_checkpoint(
        path,
        req.data,
        split,
        req.device,
        req.batch_size,
        &loss,
        cancel,
    )?;
    Ok(Score {
        loss: rep.loss,
        accuracy: rep.accuracy,
        macro_f1: rep.macro_f1,
        samples: rep.samples,
        run_id: meta.run_id,
    })
}

/// Scores the candidate and the current model on the same split and, if the
/// candidate is at least as good on `metric` (or there is no usable current
/// model), makes it `current.safetensors` atomically, keeping the old one as
/// `previous.safetensors`. Scoring stops between batches once `cancel` is
/// raised: the promotion is then [`PromoteError::Cancelled`] and nothing changes.
pub fn promote(req: &PromoteRequest, cancel: &CancelFlag) -> Result<Promotion, PromoteError> {
    let candidate_err = |e: RunError| match e {
        RunError::Cancelled => PromoteError::Cancelled,
        e => PromoteError::Candidate {
            path: req.candidate.to_path_buf(),
            source: Box::new(e),
        },
    };
    let (split, candidate) = match score(req, req.candidate, Split::Test, cancel) {
        Ok(s) => ("test", s),
        // A data set too small for a test split is compared on validation data.
        Err(e) if e.is_empty_split(Split::Test) => (
            "val",
            score(req, req.candidate, Split::Val, cancel).map_err(candidate_err)?,
        ),
        Err(e) => return Err(candidate_err(e)),
    };
    let split_kind = if split == "test" {
        Split::Test
    } else {
        Split::Val
    };
    let current_path = req.output_dir.join(CURRENT_FILE);
    let metric = req.metric;
    let name = metric.name();

    let (current, promote, reason) = if !current_path.exists() {
        (
            None,
            true,
            "no current model: the first model is promoted".to_string(),
        )
    } else {
        match score(req, &current_path, split_kind, cancel) {
            Ok(cur) => {
                let better = metric.at_least_as_good(&candidate, &cur);
                let reason = format!(
                    "candidate {name} {:.6} {} current {:.6} on the {split} split ({} samples)",
                    metric.pick(&candidate),
                    if better {
                        "is at least as good as"
                    } else {
                        "is worse than"
                    },
                    metric.pick(&cur),
                    candidate.samples
                );
                (Some(cur), better, reason)
            }
            Err(RunError::Cancelled) => return Err(PromoteError::Cancelled),
            Err(e) => {
                tracing::warn!(current = %current_path.display(), error = %e, "the current model cannot be scored; replacing it");
                (
                    None,
                    true,
                    format!("the current model cannot be scored ({e}); it is replaced"),
                )
            }
        }
    };

    let mut previous_path = None;
    let (mut onnx, mut onnx_error) = (None, None);
    if promote {
        if cancel.is_cancelled() {
            return Err(PromoteError::Cancelled);
        }
        let write_err = |path: &Path, source: std::io::Error| PromoteError::Write {
            path: path.to_path_buf(),
            source,
        };
        let bytes = std::fs::read(req.candidate).map_err(|source| PromoteError::ReadCandidate {
            path: req.candidate.to_path_buf(),
            source,
        })?;
        if current_path.exists() {
            let prev = req.output_dir.join(PREVIOUS_FILE);
            let old = std::fs::read(&current_path).map_err(|e| write_err(&current_path, e))?;
            atomic_write(&prev, &old).map_err(|e| write_err(&prev, e))?;
            previous_path = Some(prev);
        }
        atomic_write(&current_path, &bytes).map_err(|e| write_err(&current_path, e))?;
        if req.export_onnx {
            match export_current(req.candidate, req.output_dir) {
                Ok(f) => onnx = Some(f),
                Err(e) => onnx_error = Some(e),
            }
        }
    }
    Ok(Promotion {
        promoted: promote,
        metric,
        split: split.to_string(),
        candidate,
        current,
        reason,
        current_path,
        previous_path,
        onnx,
        onnx_error,
    })
}

/// The run id recorded in `output_dir/current.safetensors` (read from its
/// header only; a damaged body is found and healed at start, see `recovery`).
pub fn current_model_run_id(output_dir: &Path) -> Option<String> {
    let path = output_dir.join(CURRENT_FILE);
    if !path.exists() {
        return None;
    }
    let id = checkpoint::read_run_id(&path);
    if id.is_none() {
        tracing::warn!(path = %path.display(), "the current model has no readable run id");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(loss: f64, accuracy: f64) -> Score {
        Score {
            loss,
            accuracy,
            macro_f1: accuracy,
            samples: 10,
            run_id: "r".into(),
        }
    }

    #[test]
    fn ties_promote_and_direction_follows_metric() {
        let m = PromoteMetric::Accuracy;
        assert!(m.at_least_as_good(&s(1.0, 0.9), &s(0.5, 0.9)));
        assert!(!m.at_least_as_good(&s(0.1, 0.8), &s(0.5, 0.9)));
        let m = PromoteMetric::Loss;
        assert!(m.at_least_as_good(&s(0.5, 0.1), &s(0.5, 0.9)));
        assert!(!m.at_least_as_good(&s(0.6, 1.0), &s(0.5, 0.9)));
    }

    /// A 2-feature CSV data set in `dir` (`rows` rows, label = x1 > x2)
    /// and an MLP checkpoint for it at `path`.
    fn fixture(dir: &Path, rows: usize, path: &Path) -> DataSpec {
        use crate::engine::checkpoint::{CheckpointMeta, CheckpointMetrics, InputSpec};
        use crate::engine::data::{DataFormat, Normalization};
        use crate::engine::model::{Model, ModelSpec};
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let mut csv = String::from("x1,x2,label\n");
        for i in 0..rows {
            let (a, b) = ((i * 7 % 10) as f32, (i * 3 % 10) as f32);
            csv.push_str(&format!("{a},{b},{}\n", if a > b { "hi" } else { "lo" }));
        }
        std::fs::write(data_dir.join("d.csv"), csv).unwrap();
        let spec: ModelSpec = serde_json::from_value(serde_json::json!({
            "arch": "mlp", "input_dim": 2, "hidden": [4], "num_classes": 2
        }))
        .unwrap();
        let model = Model::new(spec.clone(), 1, &Device::Cpu).unwrap();
        let meta = CheckpointMeta {
            model: spec,
            classes: vec!["hi".into(), "lo".into()],
            input: InputSpec {
                format: DataFormat::Csv,
                sample_shape: vec![2],
                normalization: Normalization::identity(2),
                text: None,
                resize: None,
            },
            run_id: "cand".into(),
            epoch: 1,
            step: 1,
            metrics: CheckpointMetrics::default(),
            version: "test".into(),
            created: "2026-01-01T00:00:00Z".into(),
        };
        checkpoint::save(path, &model.params.snapshot().unwrap(), &meta).unwrap();
        DataSpec::new(data_dir, DataFormat::Csv)
    }

    fn request<'a>(cand: &'a Path, out: &'a Path, data: &'a DataSpec) -> PromoteRequest<'a> {
        PromoteRequest {
            candidate: cand,
            output_dir: out,
            data,
            device: &Device::Cpu,
            batch_size: 4,
            metric: PromoteMetric::Accuracy,
            export_onnx: false,
        }
    }

    #[test]
    fn a_cancelled_promotion_keeps_the_current_model() {
        let tmp = tempfile::tempdir().unwrap();
        let cand = tmp.path().join("cand.safetensors");
        let data = fixture(tmp.path(), 60, &cand);
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let cancel = CancelFlag::new();
        cancel.cancel();
        let r = promote(&request(&cand, &out, &data), &cancel);
        assert!(matches!(r, Err(PromoteError::Cancelled)), "{r:?}");
        assert_eq!(r.unwrap_err().kind(), FailureKind::Cancelled);
        assert!(!out.join(CURRENT_FILE).exists());

        let p = promote(&request(&cand, &out, &data), &CancelFlag::new()).unwrap();
        assert!(p.promoted);
        let before = std::fs::read(out.join(CURRENT_FILE)).unwrap();
        let r = promote(&request(&cand, &out, &data), &cancel);
        assert!(matches!(r, Err(PromoteError::Cancelled)), "{r:?}");
        assert_eq!(std::fs::read(out.join(CURRENT_FILE)).unwrap(), before);
        assert!(!out.join(PREVIOUS_FILE).exists());
    }

    #[test]
    fn an_empty_test_split_compares_on_validation_data() {
        let tmp = tempfile::tempdir().unwrap();
        let cand = tmp.path().join("cand.safetensors");
        let mut data = fixture(tmp.path(), 40, &cand);
        data.test_fraction = 0.0;
        data.val_fraction = 0.5;
        let loss = CrossEntropy::new(None, 0.0, &Device::Cpu).unwrap();
        let e = evaluate_checkpoint(
            &cand,
            &data,
            Split::Test,
            &Device::Cpu,
            4,
            &loss,
            &CancelFlag::new(),
        )
        .unwrap_err();
        assert!(e.is_empty_split(Split::Test), "{e}");
        assert_eq!(e.kind(), FailureKind::NoData);
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let p = promote(&request(&cand, &out, &data), &CancelFlag::new()).unwrap();
        assert_eq!(p.split, "val");
        assert!(p.promoted);
        assert!(p.candidate.samples > 0);
    }

    #[test]
    fn the_onnx_export_follows_the_promoted_model_and_never_lags_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let cand = tmp.path().join("cand.safetensors");
        let data = fixture(tmp.path(), 40, &cand);
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let mut req = request(&cand, &out, &data);
        req.export_onnx = true;
        let p = promote(&req, &CancelFlag::new()).unwrap();
        let f = p.onnx.expect("exported");
        assert_eq!(f.path, out.join(CURRENT_ONNX_FILE));
        assert_eq!(f.sha256, sha256_hex(&std::fs::read(&f.path).unwrap()));
        assert_eq!(std::fs::read_to_string(&f.labels_path).unwrap(), "hi\nlo\n");
        assert!(p.onnx_error.is_none());
        // An export that cannot be written: the promotion stands, the stale
        // labels are removed, and the event will say why.
        std::fs::remove_file(&f.path).unwrap();
        std::fs::create_dir_all(f.path.join("in-the-way")).unwrap();
        let p = promote(&req, &CancelFlag::new()).unwrap();
        assert!(p.promoted && p.onnx.is_none());
        assert!(p.onnx_error.unwrap().contains("current.onnx"));
        assert!(!out.join(CURRENT_LABELS_FILE).exists());
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn an_unreadable_candidate_is_a_typed_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let cand = tmp.path().join("cand.safetensors");
        let data = fixture(tmp.path(), 20, &cand);
        std::fs::write(&cand, b"not a checkpoint").unwrap();
        let out = tmp.path().join("out");
        let e = promote(&request(&cand, &out, &data), &CancelFlag::new()).unwrap_err();
        assert_eq!(e.kind(), FailureKind::CheckpointInvalid, "{e}");
        assert!(e.to_string().contains("cannot score the candidate"), "{e}");
    }

    #[test]
    fn non_finite_candidate_never_wins() {
        assert!(!PromoteMetric::Loss.at_least_as_good(&s(f64::NAN, 1.0), &s(9.0, 0.0)));
        assert!(PromoteMetric::Loss.at_least_as_good(&s(1.0, 1.0), &s(f64::NAN, 0.0)));
    }
}
