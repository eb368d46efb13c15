//! A run's session: everything that lives across steps and evaluations
//! (position, interval sums, policies, optimiser, dropout RNG), how it starts
//! fresh or from a resume state, and how it is saved for a resume.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;

use super::prepare::Prepared;
use super::{BEST_FILE, METRICS_FILE};
use crate::engine::device::describe;
use crate::engine::early_stop::EarlyStopping;
use crate::engine::error::RunError;
use crate::engine::fsutil::atomic_write;
use crate::engine::loss::CrossEntropy;
use crate::engine::model::{matches_pattern, ForwardCtx};
use crate::engine::optim::AnyOptimizer;
use crate::engine::resume::{
    self, IntervalState as Interval, ResumeMeta, ResumeState, RESUME_FILE,
};
use crate::engine::run::{
    BestRecord, EventSink, Metrics, Monitor, RunEvent, RunRequest, RunStarted, RunSummary,
    SplitSizes,
};
use crate::engine::schedule::ReduceLrOnPlateau;

/// Where the loop continues: epoch (1-based) and batches of it already trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Position {
    pub next_epoch: u64,
    pub skip_batches: u64,
}

impl Position {
    /// The position after `done` batches of `epoch`, which has `per_epoch` batches.
    pub fn after(epoch: u64, done: u64, per_epoch: u64) -> Self {
        if done >= per_epoch {
            Position {
                next_epoch: epoch + 1,
                skip_batches: 0,
            }
        } else {
            Position {
                next_epoch: epoch,
                skip_batches: done,
            }
        }
    }
}

/// Policies and records that live across evaluations.
pub(super) struct Tracker {
    pub early: EarlyStopping,
    pub scheduler: Option<(Monitor, ReduceLrOnPlateau)>,
    pub best: Option<BestRecord>,
    pub best_snapshot: Option<Vec<(String, Tensor)>>,
    pub best_val_loss: f64,
    pub best_val_acc: f64,
    pub last_eval_step: u64,
}

impl Tracker {
    /// Nothing seen yet.
    pub fn new(req: &RunRequest) -> Self {
        Tracker {
            early: EarlyStopping::new(req.train.early_stopping.1.clone()),
            scheduler: req
                .train
                .scheduler
                .clone()
                .map(|(m, cfg)| (m, ReduceLrOnPlateau::new(cfg))),
            best: None,
            best_snapshot: None,
            best_val_loss: f64::INFINITY,
            best_val_acc: f64::NEG_INFINITY,
            last_eval_step: 0,
        }
    }
}

/// The state of a run between steps.
pub(super) struct Session<'a> {
    pub req: &'a RunRequest,
    pub run_dir: &'a Path,
    pub sink: &'a dyn EventSink,
    pub prep: &'a Prepared,
    pub loss_fn: CrossEntropy,
    pub optimizer: AnyOptimizer,
    pub ctx: ForwardCtx,
    pub tracker: Tracker,
    /// Sums since the last evaluation.
    pub interval: Interval,
    /// Optimiser steps done.
    pub step: u64,
    /// Epochs started.
    pub epoch: u64,
    /// Batches of the next epoch already trained (set on resume).
    pub skip: u64,
    pub steps_per_epoch: u64,
    /// The cached frozen features the run trains on, if it uses the cache.
    pub features: Option<super::feature_cache::FeatureTable>,
    t0: Instant,
    /// Seconds trained before a resume.
    elapsed_before: f64,
}

/// The resume state to continue from, when the request asks to resume and one exists.
pub(super) fn load_resume_state(
    req: &RunRequest,
    run_dir: &Path,
) -> Result<Option<ResumeState>, RunError> {
    let path = run_dir.join(RESUME_FILE);
    if !req.resume {
        return Ok(None);
    }
    if !path.is_file() {
        // Interrupted before its first evaluation: start over in the same folder.
        let _ = std::fs::remove_file(run_dir.join(METRICS_FILE));
        return Ok(None);
    }
    let st = resume::load(&path, &req.device)?;
    if st.meta.run_id != req.run_id {
        return Err(RunError::ResumeOtherRun {
            path,
            found: st.meta.run_id.clone(),
            expected: req.run_id.clone(),
        });
    }
    for &section in &req.fixed_on_resume {
        if st
            .meta
            .config
            .pointer(&crate::engine::run::key_pointer(section))
            != req
                .config
                .pointer(&crate::engine::run::key_pointer(section))
        {
            return Err(RunError::ResumeSettings {
                run_id: req.run_id.clone(),
                section,
            });
        }
    }
    Ok(Some(st))
}

/// The request a resumed run continues with: the data files it started with.
pub(super) fn resumed_request(req: &RunRequest, state: Option<&ResumeState>) -> RunRequest {
    let mut r = req.clone();
    if let Some(st) = state {
        r.data.only_files = Some(st.meta.data_files.clone());
    }
    r
}

/// Drops metrics lines written after `step` (they are produced again on resume).
fn truncate_metrics(path: &Path, step: u64) -> Result<(), RunError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Metrics>(l)
                .map(|m| m.step <= step)
                .unwrap_or(false)
        })
        .collect();
    if kept.len() != text.lines().count() {
        let mut out = kept.join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        atomic_write(path, out.as_bytes()).map_err(|e| RunError::io("rewrite", path, e))?;
    }
    Ok(())
}

/// The parameters to train: all trainable ones minus the frozen patterns
/// (`model.freeze`) and the names `model.finetune` holds fixed; and every
/// frozen pattern (for the forward context).
#[allow(clippy::type_complexity)]
fn trainable(
    req: &RunRequest,
    prep: &Prepared,
) -> Result<(Vec<(String, candle_core::Var)>, Vec<String>), RunError> {
    let all = prep.model.params.trainable();
    for pattern in &req.train.freeze {
        if !all.iter().any(|(n, _)| matches_pattern(pattern, n)) {
            return Err(RunError::FreezeMatchesNothing(pattern.clone()));
        }
    }
    let names: Vec<String> = all.iter().map(|(n, _)| n.clone()).collect();
    let state: std::collections::BTreeSet<String> = prep
        .model
        .params
        .state_dict()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut frozen = req.train.freeze.clone();
    frozen.extend(
        req.train
            .finetune
            .frozen(&prep.model.spec, &names, &state)?,
    );
    let named: Vec<_> = all
        .into_iter()
        .filter(|(name, _)| !frozen.iter().any(|p| matches_pattern(p, name)))
        .collect();
    if named.is_empty() {
        return Err(RunError::NothingToTrain);
    }
    Ok((named, frozen))
}

impl<'a> Session<'a> {
    /// Starts (or resumes from `state`) the session of a prepared run: checks
    /// and restores the resume state, creates the run folder, sets up the
    /// optimiser, loads the cached frozen features and emits [`RunEvent::Started`].
    pub fn start(
        req: &'a RunRequest,
        run_dir: &'a Path,
        sink: &'a dyn EventSink,
        prep: &'a Prepared,
        state: Option<ResumeState>,
        t0: Instant,
        summary: &mut RunSummary,
    ) -> Result<Self, RunError> {
        if let Some(st) = &state {
            let missing: Vec<String> = st
                .meta
                .data_files
                .iter()
                .filter(|f| !prep.data.files.contains(f))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(RunError::ResumeDataGone {
                    run_id: req.run_id.clone(),
                    missing,
                });
            }
            prep.model
                .params
                .load(&st.model)
                .map_err(|source| RunError::Load {
                    context: format!("resume state of run {}", req.run_id),
                    source,
                })?;
        }
        summary.skipped_files = prep.data.skipped.clone();
        summary.classes = prep.data.classes.clone();
        summary.samples = SplitSizes {
            train: prep.split.train.len(),
            val: prep.split.val.len(),
            test: prep.split.test.len(),
        };
        std::fs::create_dir_all(run_dir)
            .map_err(|e| RunError::io("create run folder", run_dir, e))?;

        let (named, frozen) = trainable(req, prep)?;
        let trainable_params: usize = named.iter().map(|(_, v)| v.elem_count()).sum();
        let mut optimizer = AnyOptimizer::new(named, &req.train.optimizer)?;
        if let Some(st) = &state {
            optimizer
                .load_state(&st.optim, &st.meta.optimizer)
                .map_err(|source| RunError::OptimizerState {
                    run_id: req.run_id.clone(),
                    source: Box::new(source),
                })?;
        }
        let steps_per_epoch = prep.split.train.len().div_ceil(req.train.batch_size) as u64;
        let (features, cache_report) = super::feature_cache::prepare(req, prep, &frozen);
        summary.feature_cache = Some(cache_report.clone());
        let mut s = Session {
            req,
            run_dir,
            sink,
            prep,
            loss_fn: CrossEntropy::new(
                req.train.class_weights.as_deref(),
                req.train.label_smoothing,
                &req.device,
            )?,
            optimizer,
            ctx: ForwardCtx::train(req.train.seed).with_frozen(frozen),
            tracker: Tracker::new(req),
            interval: Interval::default(),
            step: 0,
            epoch: 0,
            skip: 0,
            steps_per_epoch,
            features,
            t0,
            elapsed_before: state.as_ref().map_or(0.0, |s| s.meta.elapsed_s),
        };
        sink.emit(RunEvent::Started(RunStarted {
            run_id: req.run_id.clone(),
            run_dir: run_dir.to_path_buf(),
            samples: summary.samples.clone(),
            classes: prep.data.classes.clone(),
            skipped_files: prep.data.skipped.clone(),
            trainable_params,
            steps_per_epoch,
            max_epochs: req.train.max_epochs,
            device: describe(&req.device),
            warm_start: prep.warm_start.clone(),
            resumed_at_step: state.as_ref().map(|s| s.meta.step),
            feature_cache: cache_report,
        }));
        tracing::info!(
            run_id = %req.run_id,
            train = prep.split.train.len(),
            val = prep.split.val.len(),
            test = prep.split.test.len(),
            params = trainable_params,
            from = %prep.warm_start,
            "run started"
        );
        if let Some(st) = state {
            s.restore(st, summary)?;
        }
        Ok(s)
    }

    /// Continues where a resume state left off.
    fn restore(&mut self, st: ResumeState, summary: &mut RunSummary) -> Result<(), RunError> {
        let m = st.meta;
        let t = &mut self.tracker;
        t.early = m.early_stopping;
        if let (Some((_, sched)), Some(saved)) = (&mut t.scheduler, m.scheduler) {
            *sched = saved;
        }
        t.best = m.best;
        summary.best = t.best.clone();
        if !st.best.is_empty() {
            let mut snap: Vec<(String, Tensor)> = st.best.into_iter().collect();
            snap.sort_by(|a, b| a.0.cmp(&b.0));
            t.best_snapshot = Some(snap);
            summary.best_checkpoint = Some(self.run_dir.join(BEST_FILE));
        }
        t.best_val_loss = m.best_val_loss.unwrap_or(f64::INFINITY);
        t.best_val_acc = m.best_val_acc.unwrap_or(f64::NEG_INFINITY);
        t.last_eval_step = m.last_eval_step;
        self.interval = m.interval;
        let pos: u128 = m
            .dropout_rng_word_pos
            .parse()
            .map_err(|_| RunError::ResumeRng)?;
        self.ctx.set_rng_word_pos(pos);
        self.step = m.step;
        summary.steps = m.step;
        self.epoch = m.next_epoch.saturating_sub(1);
        self.skip = m.skip_batches;
        truncate_metrics(&self.run_dir.join(METRICS_FILE), m.step)?;
        tracing::info!(run_id = %self.req.run_id, step = m.step, epoch = m.next_epoch, "resuming run");
        Ok(())
    }

    /// Seconds trained so far, resumes included.
    pub fn elapsed(&self) -> f64 {
        self.elapsed_before + self.t0.elapsed().as_secs_f64()
    }

    /// Writes the resume state for continuing at `pos`.
    pub fn save_resume(&self, pos: Position) -> Result<(), RunError> {
        let finite = |v: f64| Some(v).filter(|v| v.is_finite());
        let t = &self.tracker;
        let meta = ResumeMeta {
            format: resume::RESUME_FORMAT.to_string(),
            run_id: self.req.run_id.clone(),
            next_epoch: pos.next_epoch,
            skip_batches: pos.skip_batches,
            step: self.step,
            elapsed_s: self.elapsed(),
            data_files: self.prep.data.files.clone(),
            early_stopping: t.early.clone(),
            scheduler: t.scheduler.as_ref().map(|(_, s)| s.clone()),
            best: t.best.clone(),
            best_val_loss: finite(t.best_val_loss),
            best_val_acc: finite(t.best_val_acc),
            last_eval_step: t.last_eval_step,
            interval: self.interval.clone(),
            optimizer: self.optimizer.state_meta(),
            dropout_rng_word_pos: self.ctx.rng_word_pos().to_string(),
            config: self.req.config.clone(),
        };
        resume::save(
            &self.run_dir.join(RESUME_FILE),
            &meta,
            &self.prep.model.params.state_dict(),
            &self.optimizer.state_tensors()?,
            t.best_snapshot.as_deref(),
        )?;
        Ok(())
    }

    /// Path of a file in the run folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.run_dir.join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_after_a_full_epoch_moves_to_the_next() {
        assert_eq!(
            Position::after(3, 5, 5),
            Position {
                next_epoch: 4,
                skip_batches: 0
            }
        );
        assert_eq!(
            Position::after(3, 2, 5),
            Position {
                next_epoch: 3,
                skip_batches: 2
            }
        );
    }
}
