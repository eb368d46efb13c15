//! The training loop, split burn-style: [`prepare`] reads the data and builds
//! (or warm-starts) the model, [`session`] holds what lives across steps and
//! resumes, [`step`] is one optimiser step (shared with `bench`), and
//! [`evaluate`] turns each validation pass into decisions and applies them.
//! [`run`] strings them together: prepare, start or resume, epochs, finish.
//! Emits [`RunEvent`]s through an [`EventSink`]; checks the cancel flag after every batch.

mod evaluate;
mod feature_cache;
mod prepare;
mod session;
mod step;

use std::path::Path;
use std::time::Instant;

pub use prepare::{open_with_data, split_indices, Opened};
pub use step::{train_step, train_step_from, Phase, StepError, StepObserver, StepOut};

use self::session::{Position, Session};
use super::data::Batcher;
use super::device::describe;
use super::error::RunError;
use super::eval::EvalReport;
use super::fsutil::atomic_write;
use super::resume::RESUME_FILE;
use super::run::*;

/// File names inside a run folder.
pub const BEST_FILE: &str = "best.safetensors";
/// One JSON line per evaluation.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// How the run ended.
pub const SUMMARY_FILE: &str = "summary.json";

/// Runs one training run to its end and returns its summary (also sent as the
/// final [`RunEvent::Ended`] and written to `summary.json`).
pub fn run(req: &RunRequest, sink: &dyn EventSink, cancel: &CancelFlag) -> RunSummary {
    let t0 = Instant::now();
    let run_dir = prepare::run_folder(req);
    let mut summary = RunSummary {
        run_id: req.run_id.clone(),
        outcome: Outcome::Failed,
        reason: String::new(),
        epochs: 0,
        steps: 0,
        best: None,
        test: None,
        skipped_files: Vec::new(),
        config: req.config.clone(),
        best_checkpoint: None,
        classes: Vec::new(),
        samples: SplitSizes::default(),
        device: describe(&req.device),
        started: now_rfc3339(),
        ended: String::new(),
        wall_s: 0.0,
        failure: None,
        feature_cache: None,
    };
    if let Err(e) = train(req, &run_dir, sink, cancel, t0, &mut summary) {
        tracing::debug!(run_id = %req.run_id, kind = %e.kind(), error = ?e, "run failed");
        summary.outcome = Outcome::Failed;
        summary.reason = e.to_string();
        summary.failure = Some(e.kind());
    }
    summary.ended = now_rfc3339();
    summary.wall_s = t0.elapsed().as_secs_f64();
    if run_dir.is_dir() {
        match serde_json::to_vec_pretty(&summary) {
            Ok(bytes) => {
                if let Err(e) = atomic_write(&run_dir.join(SUMMARY_FILE), &bytes) {
                    tracing::error!(run_id = %req.run_id, error = %e, "cannot write summary.json");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot serialise the summary"),
        }
    }
    sink.emit(RunEvent::Ended(Box::new(summary.clone())));
    summary
}

fn train(
    req: &RunRequest,
    run_dir: &Path,
    sink: &dyn EventSink,
    cancel: &CancelFlag,
    t0: Instant,
    summary: &mut RunSummary,
) -> Result<(), RunError> {
    let state = session::load_resume_state(req, run_dir)?;
    let req = session::resumed_request(req, state.as_ref());
    let prep = prepare::prepare(&req)?;
    let mut s = Session::start(&req, run_dir, sink, &prep, state, t0, summary)?;
    summary.reason = format!("reached max_epochs = {}", req.train.max_epochs);
    let outcome = epochs(&mut s, cancel, summary);
    let result = outcome.and_then(|o| finish(s, o, cancel, summary));
    if let Some(src) = prep.data.features.images() {
        // Images whose header passed but whose body failed to decode.
        summary.skipped_files.extend(src.failures());
        summary.skipped_files.sort_by(|a, b| a.file.cmp(&b.file));
    }
    result
}

/// Trains epoch after epoch until the end, an early stop or a cancel.
fn epochs(
    s: &mut Session,
    cancel: &CancelFlag,
    summary: &mut RunSummary,
) -> Result<Outcome, RunError> {
    let (req, prep) = (s.req, s.prep);
    let batcher = Batcher::new(&prep.data, &prep.norm, &req.device);
    let bs = req.train.batch_size;
    let max_steps = req.train.max_steps.unwrap_or(u64::MAX);
    while s.epoch < req.train.max_epochs {
        s.epoch += 1;
        let epoch = s.epoch;
        summary.epochs = epoch;
        let order = Batcher::epoch_order(&prep.split.train, req.train.seed, epoch);
        s.sink.emit(RunEvent::EpochStarted {
            epoch,
            batches: s.steps_per_epoch,
        });
        let first = std::mem::take(&mut s.skip) as usize;
        let chunks: Vec<Vec<usize>> = order
            .chunks(bs)
            .skip(first)
            .map(<[usize]>::to_vec)
            .collect();
        // Streamed images are decoded and augmented ahead, on worker threads;
        // with cached frozen features, only those of batches not yet cached.
        let from = s.features.as_ref().map(|t| t.point);
        let mut images = match &s.features {
            Some(t) => batcher.batches(t.needing_images(&chunks), None),
            None => batcher.batches(chunks.clone(), Some((req.train.seed, epoch))),
        };
        for (bi, chunk) in (first..).zip(&chunks) {
            if cancel.is_cancelled() {
                summary.reason = format!("cancelled at epoch {epoch}, step {}", s.step);
                if let Some(t) = &mut s.features {
                    t.save();
                }
                s.save_resume(Position {
                    next_epoch: epoch,
                    skip_batches: bi as u64,
                })?;
                return Ok(Outcome::Cancelled);
            }
            let batch = match &mut s.features {
                None => images.next(),
                Some(t) if t.missing(chunk) => images
                    .next()
                    .map(|b| b.and_then(|b| t.fill(chunk, &b, &prep.model))),
                Some(t) => Some(t.batch(chunk)),
            };
            let Some(batch) = batch else { break };
            let batch = batch?;
            if batch.is_empty() {
                // Every image of the batch failed to decode (reported at the end).
                continue;
            }
            let out = train_step_from(
                &prep.model,
                from,
                &batch,
                &s.loss_fn,
                &mut s.optimizer,
                &mut s.ctx,
                &mut (),
            )
            .map_err(|e| match e {
                StepError::NonFinite(loss) => RunError::Diverged {
                    epoch,
                    step: s.step + 1,
                    loss,
                    lr: s.optimizer.learning_rate(),
                    // A file of huge values is the likelier cause: name it.
                    suspects: crate::engine::data::outlier_files(&prep.data),
                },
                StepError::Tensor(e) => RunError::Tensor(e),
            })?;
            s.step += 1;
            summary.steps = s.step;
            s.interval.add(out.loss, out.denom, out.correct, out.seen);
            s.sink.emit(RunEvent::Step {
                epoch,
                step: s.step,
                loss: out.loss,
            });
            if let EvalEvery::Steps(n) = req.train.eval_every {
                if s.step % n == 0 {
                    if evaluate::evaluate_and_apply(s, summary)? {
                        return Ok(Outcome::EarlyStopped);
                    }
                    s.save_resume(Position::after(epoch, bi as u64 + 1, s.steps_per_epoch))?;
                }
            }
            if s.step >= max_steps {
                summary.reason = format!("reached max_steps = {max_steps}");
                return finished(s, summary);
            }
        }
        if let Some(t) = &mut s.features {
            t.save();
        }
        if req.train.eval_every == EvalEvery::Epoch {
            if evaluate::evaluate_and_apply(s, summary)? {
                return Ok(Outcome::EarlyStopped);
            }
            s.save_resume(Position::after(epoch, s.steps_per_epoch, s.steps_per_epoch))?;
        }
    }
    finished(s, summary)
}

/// Training ran to its end: steps since the last evaluation still count, so
/// they are evaluated once more.
fn finished(s: &mut Session, summary: &mut RunSummary) -> Result<Outcome, RunError> {
    if s.step > s.tracker.last_eval_step && evaluate::evaluate_and_apply(s, summary)? {
        return Ok(Outcome::EarlyStopped);
    }
    Ok(Outcome::Finished)
}

/// Records the outcome and tests the best model on the test split.
fn finish(
    mut s: Session,
    outcome: Outcome,
    cancel: &CancelFlag,
    summary: &mut RunSummary,
) -> Result<(), RunError> {
    summary.outcome = outcome;
    if outcome != Outcome::Cancelled {
        // The run is over: nothing left to resume.
        let _ = std::fs::remove_file(s.file(RESUME_FILE));
    }
    let Some(snapshot) = s.tracker.best_snapshot.take() else {
        if outcome == Outcome::Cancelled {
            return Ok(());
        }
        return Err(RunError::NoFiniteMetric);
    };
    if !outcome.is_success() {
        return Ok(());
    }
    let prep = s.prep;
    prep.model
        .params
        .restore(&snapshot)
        .map_err(|source| RunError::Load {
            context: "the best model".into(),
            source,
        })?;
    if prep.split.test.is_empty() {
        tracing::warn!(run_id = %s.req.run_id, "the test split is empty; no final test");
        return Ok(());
    }
    let test = evaluate::evaluate_indices(&mut s, &prep.split.test, cancel);
    if let Some(t) = &mut s.features {
        t.save();
    }
    match test {
        Ok(rep) => summary.test = Some(test_record(rep)),
        Err(RunError::Cancelled) => {
            summary.outcome = Outcome::Cancelled;
            summary.reason = format!(
                "cancelled during the final test, after epoch {}, step {}",
                s.epoch, s.step
            );
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

fn test_record(rep: EvalReport) -> TestRecord {
    TestRecord {
        loss: rep.loss,
        accuracy: rep.accuracy,
        samples: rep.samples,
        macro_f1: rep.macro_f1,
        per_class: rep.per_class,
        confusion_matrix: rep.confusion_matrix,
    }
}
