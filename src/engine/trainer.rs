//! The training loop: the seed loop done properly. Loads and splits the data,
//! builds (or warm-starts) the model, trains with the configured optimiser,
//! evaluates at the configured cadence, keeps the best checkpoint, lowers the
//! learning rate on plateaus, stops early, tests the best model and writes the
//! run's files. Emits [`RunEvent`]s; checks the cancel flag after every batch.

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::Instant;

use candle_core::{Tensor, D};

use super::checkpoint::{self, CheckpointMeta, CheckpointMetrics, InputSpec, TextInput};
use super::data::{self, Batcher, Dataset, Normalization, SplitIndices};
use super::device::describe;
use super::early_stop::EarlyStopping;
use super::eval::{evaluate, EvalReport};
use super::fsutil::{append_line, atomic_write};
use super::loss::CrossEntropy;
use super::model::{load_init, matches_pattern, ForwardCtx, Model};
use super::optim::AnyOptimizer;
use super::resume::{self, IntervalState as Interval, ResumeMeta, ResumeState, RESUME_FILE};
use super::run::*;
use super::schedule::ReduceLrOnPlateau;

/// File names inside a run folder.
pub const BEST_FILE: &str = "best.safetensors";
/// One JSON line per evaluation.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// How the run ended.
pub const SUMMARY_FILE: &str = "summary.json";

/// Sends events to the driver; a driver that stopped listening is not an error.
struct Emitter<'a> {
    tx: &'a Sender<RunEvent>,
}

impl Emitter<'_> {
    fn emit(&self, ev: RunEvent) {
        let _ = self.tx.send(ev);
    }
}

/// An error that ends a run as `failed`, with a reason for the user.
struct Fail(String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(e.to_string())
    }
}

/// Data, split and normalisation of a run, plus the model to train.
struct Prepared {
    data: Dataset,
    split: SplitIndices,
    norm: Normalization,
    model: Model,
    warm_start: String,
    /// Tokeniser and vocabulary, for text data.
    text: Option<TextInput>,
}

/// Runs one training run to its end and returns its summary (also sent as the
/// final [`RunEvent::Ended`] and written to `summary.json`).
pub fn run(req: &RunRequest, tx: &Sender<RunEvent>, cancel: &CancelFlag) -> RunSummary {
    let started = now_rfc3339();
    let t0 = Instant::now();
    let run_dir = req.runs_dir.join(&req.run_id);
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
        started,
        ended: String::new(),
        wall_s: 0.0,
    };
    let em = Emitter { tx };
    if let Err(Fail(reason)) = train(req, &run_dir, &em, cancel, t0, &mut summary) {
        summary.outcome = Outcome::Failed;
        summary.reason = reason;
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
    em.emit(RunEvent::Ended(Box::new(summary.clone())));
    summary
}

fn prepare(req: &RunRequest) -> Result<Prepared, Fail> {
    let mut spec = req.data.clone();
    let warm = match &req.warm_start {
        WarmStart::Checkpoint(path) => {
            let ck = checkpoint::load(path, &req.device)?;
            // Fine-tuning keeps the class list the model was trained with.
            spec.classes = Some(ck.meta.classes.clone());
            // ... and the tokenisation of its text.
            if let Some(t) = &ck.meta.input.text {
                spec.tokenizer = t.tokenizer;
                spec.max_len = t.max_len;
                spec.vocab = Some(t.vocab.clone());
            }
            Some((path.clone(), ck))
        }
        _ => None,
    };
    let data = data::load_dataset(&spec)?;
    let split = data.split(&spec);
    if split.train.is_empty() {
        return Err(Fail(format!(
            "the training split is empty ({} samples in all)",
            data.len()
        )));
    }
    if split.val.is_empty() {
        return Err(Fail(format!(
            "the validation split is empty ({} samples, data.val_fraction = {}): add data or raise it",
            data.len(),
            spec.val_fraction
        )));
    }
    let (model, norm, warm_start) = match warm {
        Some((path, ck)) => {
            if ck.meta.input.sample_shape != data.sample_shape {
                return Err(Fail(format!(
                    "checkpoint {} expects samples of shape {:?} but the data has {:?}",
                    path.display(),
                    ck.meta.input.sample_shape,
                    data.sample_shape
                )));
            }
            let model = Model::new(ck.meta.model.clone(), req.train.seed, &req.device)?;
            model
                .params
                .load(&ck.tensors)
                .map_err(|e| Fail(format!("checkpoint {}: {e}", path.display())))?;
            (
                model,
                ck.meta.input.normalization,
                format!("checkpoint {}", path.display()),
            )
        }
        None => {
            let model_spec = req
                .model
                .resolve(&data.sample_shape, data.classes.len(), data.vocab.as_ref())
                .map_err(Fail)?;
            let model = Model::new(model_spec, req.train.seed, &req.device)?;
            let from = match &req.warm_start {
                WarmStart::StateDict(path) => {
                    let (tensors, _) = checkpoint::read_tensors(path, &req.device)?;
                    let report = load_init(&model.params, tensors, &req.train.init)
                        .map_err(|e| Fail(format!("model.init {}: {e}", path.display())))?;
                    format!("state dict {} ({})", path.display(), report.describe())
                }
                _ => "scratch".to_string(),
            };
            (
                model,
                Normalization::for_format(&data, &split.train, spec.format),
                from,
            )
        }
    };
    if !norm.covers(&data.sample_shape) {
        return Err(Fail(format!(
            "the normalisation ({} values{}) does not fit samples of shape {:?}",
            norm.len(),
            if norm.per_channel {
                ", per channel"
            } else {
                ""
            },
            data.sample_shape
        )));
    }
    if let (Some(v), crate::engine::model::ModelSpec::TextCnn(s)) = (&data.vocab, &model.spec) {
        if v.len() != s.vocab_size {
            return Err(Fail(format!(
                "the vocabulary has {} tokens but the model's embedding has {} rows",
                v.len(),
                s.vocab_size
            )));
        }
    }
    let text = data.vocab.clone().map(|vocab| TextInput {
        tokenizer: spec.tokenizer,
        max_len: spec.max_len,
        vocab,
    });
    if let Some(w) = &req.train.class_weights {
        if w.len() != data.classes.len() {
            return Err(Fail(format!(
                "train.class_weights has {} entries but the data has {} classes ({})",
                w.len(),
                data.classes.len(),
                data.classes.join(", ")
            )));
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

// `Interval` (sums over the steps since the last evaluation, weighted by batch
// size) is the resume module's `IntervalState`, so it is saved as it is.
impl Interval {
    fn add(&mut self, loss: f64, denom: f64, correct: u64, seen: u64) {
        self.loss_sum += loss * denom;
        self.loss_den += denom;
        self.correct += correct;
        self.seen += seen;
    }

    fn loss(&self) -> f64 {
        if self.loss_den > 0.0 {
            self.loss_sum / self.loss_den
        } else {
            f64::NAN
        }
    }

    fn acc(&self) -> f64 {
        if self.seen > 0 {
            self.correct as f64 / self.seen as f64
        } else {
            f64::NAN
        }
    }
}

/// State that lives across evaluations.
struct Tracker {
    early: EarlyStopping,
    scheduler: Option<(Monitor, ReduceLrOnPlateau)>,
    best: Option<BestRecord>,
    best_snapshot: Option<Vec<(String, Tensor)>>,
    best_val_loss: f64,
    best_val_acc: f64,
    last_eval_step: u64,
}

struct Loop<'a> {
    req: &'a RunRequest,
    run_dir: &'a Path,
    em: &'a Emitter<'a>,
    prep: &'a Prepared,
    loss_fn: CrossEntropy,
    t0: Instant,
    /// Seconds trained before a resume.
    elapsed_before: f64,
}

/// Where the next run of the loop starts: epoch (1-based) and batches to skip in it.
#[derive(Clone, Copy)]
struct Position {
    next_epoch: u64,
    skip_batches: u64,
}

impl Loop<'_> {
    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.t0.elapsed().as_secs_f64()
    }

    /// Writes the resume state for continuing at `pos` after `step` steps.
    #[allow(clippy::too_many_arguments)]
    fn save_resume(
        &self,
        pos: Position,
        step: u64,
        tracker: &Tracker,
        interval: &Interval,
        optimizer: &AnyOptimizer,
        ctx: &ForwardCtx,
    ) -> Result<(), Fail> {
        let finite = |v: f64| Some(v).filter(|v| v.is_finite());
        let meta = ResumeMeta {
            format: resume::RESUME_FORMAT.to_string(),
            run_id: self.req.run_id.clone(),
            next_epoch: pos.next_epoch,
            skip_batches: pos.skip_batches,
            step,
            elapsed_s: self.elapsed(),
            data_files: self.prep.data.files.clone(),
            early_stopping: tracker.early.clone(),
            scheduler: tracker.scheduler.as_ref().map(|(_, s)| s.clone()),
            best: tracker.best.clone(),
            best_val_loss: finite(tracker.best_val_loss),
            best_val_acc: finite(tracker.best_val_acc),
            last_eval_step: tracker.last_eval_step,
            interval: interval.clone(),
            optimizer: optimizer.state_meta(),
            dropout_rng_word_pos: ctx.rng_word_pos().to_string(),
            config: self.req.config.clone(),
        };
        resume::save(
            &self.run_dir.join(RESUME_FILE),
            &meta,
            &self.prep.model.params.state_dict(),
            &optimizer.state_tensors()?,
            tracker.best_snapshot.as_deref(),
        )?;
        Ok(())
    }

    /// Evaluates, records and decides; returns whether to stop early.
    fn evaluate(
        &self,
        epoch: u64,
        step: u64,
        interval: &mut Interval,
        tracker: &mut Tracker,
        optimizer: &mut AnyOptimizer,
        summary: &mut RunSummary,
    ) -> Result<bool, Fail> {
        let p = self.prep;
        let batcher = Batcher::new(&p.data, &p.norm, &self.req.device);
        let rep = evaluate(
            &p.model,
            &batcher,
            &p.split.val,
            &self.loss_fn,
            self.req.train.batch_size,
            &p.data.classes,
        )?;
        let (monitor, _) = &self.req.train.early_stopping;
        let value = monitor.pick(rep.loss, rep.accuracy);
        let decision = tracker.early.observe(value);
        if rep.loss.is_finite() {
            tracker.best_val_loss = tracker.best_val_loss.min(rep.loss);
        }
        tracker.best_val_acc = tracker.best_val_acc.max(rep.accuracy);
        let lr = optimizer.learning_rate();
        let metrics = Metrics {
            run_id: self.req.run_id.clone(),
            epoch,
            step,
            train_loss: interval.loss(),
            train_acc: interval.acc(),
            val_loss: rep.loss,
            val_acc: rep.accuracy,
            lr,
            elapsed_s: self.elapsed(),
            improved: decision.improved,
            best_val_loss: tracker.best_val_loss,
            best_val_acc: tracker.best_val_acc,
        };
        *interval = Interval::default();
        tracker.last_eval_step = step;
        if decision.improved {
            let path = self.run_dir.join(BEST_FILE);
            let meta = CheckpointMeta {
                model: p.model.spec.clone(),
                classes: p.data.classes.clone(),
                input: InputSpec {
                    format: self.req.data.format,
                    sample_shape: p.data.sample_shape.clone(),
                    normalization: p.norm.clone(),
                    text: p.text.clone(),
                },
                run_id: self.req.run_id.clone(),
                epoch,
                step,
                metrics: CheckpointMetrics {
                    val_loss: Some(rep.loss),
                    val_acc: Some(rep.accuracy),
                    train_loss: Some(metrics.train_loss).filter(|v| v.is_finite()),
                    train_acc: Some(metrics.train_acc).filter(|v| v.is_finite()),
                },
                version: env!("CARGO_PKG_VERSION").to_string(),
                created: now_rfc3339(),
            };
            let snapshot = p.model.params.snapshot()?;
            checkpoint::save(&path, &snapshot, &meta)?;
            tracker.best_snapshot = Some(snapshot);
            tracker.best = Some(BestRecord {
                epoch,
                step,
                val_loss: rep.loss,
                val_acc: rep.accuracy,
            });
            summary.best = tracker.best.clone();
            summary.best_checkpoint = Some(path.clone());
            self.em.emit(RunEvent::CheckpointSaved(CheckpointSaved {
                run_id: self.req.run_id.clone(),
                path,
                epoch,
                step,
                val_loss: rep.loss,
                val_acc: rep.accuracy,
            }));
        }
        if let Some((sched_monitor, sched)) = &mut tracker.scheduler {
            let new_lr = sched.step(sched_monitor.pick(rep.loss, rep.accuracy), lr);
            if new_lr != lr {
                tracing::info!(run_id = %self.req.run_id, from = lr, to = new_lr, "reducing learning rate on plateau");
                optimizer.set_learning_rate(new_lr);
            }
        }
        let line = serde_json::to_string(&metrics)?;
        append_line(&self.run_dir.join(METRICS_FILE), &line)
            .map_err(|e| Fail(format!("cannot append to {METRICS_FILE}: {e}")))?;
        self.em.emit(RunEvent::Evaluated(metrics));
        if decision.stop {
            let best = tracker.early.best().unwrap_or(f64::NAN);
            let reason = format!(
                "no improvement of {} for {} evaluations (patience {}); best {} = {best:.6}",
                monitor.name(),
                tracker.early.wait(),
                self.req.train.early_stopping.1.patience,
                monitor.name()
            );
            self.em.emit(RunEvent::EarlyStopped(EarlyStopped {
                run_id: self.req.run_id.clone(),
                epoch,
                step,
                reason: reason.clone(),
                monitor: monitor.name().to_string(),
                best_value: best,
            }));
            summary.reason = reason;
            return Ok(true);
        }
        Ok(false)
    }
}

fn train(
    req: &RunRequest,
    run_dir: &Path,
    em: &Emitter,
    cancel: &CancelFlag,
    t0: Instant,
    summary: &mut RunSummary,
) -> Result<(), Fail> {
    let state = load_resume_state(req, run_dir)?;
    let resumed_req;
    let req = match &state {
        Some(st) => {
            let mut r = req.clone();
            r.data.only_files = Some(st.meta.data_files.clone());
            resumed_req = r;
            &resumed_req
        }
        None => req,
    };
    let prep = prepare(req)?;
    if let Some(st) = &state {
        let missing: Vec<&String> = st
            .meta
            .data_files
            .iter()
            .filter(|f| !prep.data.files.contains(f))
            .collect();
        if !missing.is_empty() {
            return Err(Fail(format!(
                "cannot resume run {}: data files it trained on are gone or now invalid: {}",
                req.run_id,
                missing
                    .iter()
                    .map(|f| f.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        prep.model
            .params
            .load(&st.model)
            .map_err(|e| Fail(format!("resume state of run {}: {e}", req.run_id)))?;
    }
    summary.skipped_files = prep.data.skipped.clone();
    summary.classes = prep.data.classes.clone();
    summary.samples = SplitSizes {
        train: prep.split.train.len(),
        val: prep.split.val.len(),
        test: prep.split.test.len(),
    };
    std::fs::create_dir_all(run_dir).map_err(|e| {
        Fail(format!(
            "cannot create run folder {}: {e}",
            run_dir.display()
        ))
    })?;

    let named: Vec<_> = prep
        .model
        .params
        .trainable()
        .into_iter()
        .filter(|(name, _)| !req.train.freeze.iter().any(|p| matches_pattern(p, name)))
        .collect();
    for pattern in &req.train.freeze {
        let hits = prep
            .model
            .params
            .trainable()
            .iter()
            .any(|(n, _)| matches_pattern(pattern, n));
        if !hits {
            return Err(Fail(format!(
                "model.freeze pattern {pattern:?} matches no parameter"
            )));
        }
    }
    if named.is_empty() {
        return Err(Fail("model.freeze leaves no parameter to train".into()));
    }
    let trainable_params: usize = named.iter().map(|(_, v)| v.elem_count()).sum();
    let mut optimizer = AnyOptimizer::new(named, &req.train.optimizer)?;
    if let Some(st) = &state {
        optimizer
            .load_state(&st.optim, &st.meta.optimizer)
            .map_err(|e| Fail(format!("resume state of run {}: {e}", req.run_id)))?;
    }
    let bs = req.train.batch_size;
    let steps_per_epoch = prep.split.train.len().div_ceil(bs) as u64;
    let lp = Loop {
        req,
        run_dir,
        em,
        prep: &prep,
        loss_fn: CrossEntropy::new(
            req.train.class_weights.as_deref(),
            req.train.label_smoothing,
            &req.device,
        )?,
        t0,
        elapsed_before: state.as_ref().map_or(0.0, |s| s.meta.elapsed_s),
    };
    em.emit(RunEvent::Started(RunStarted {
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

    let mut tracker = Tracker {
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
    };
    let batcher = Batcher::new(&prep.data, &prep.norm, &req.device);
    let mut ctx = ForwardCtx::train(req.train.seed).with_frozen(req.train.freeze.clone());
    let mut interval = Interval::default();
    let mut step: u64 = 0;
    let mut outcome = Outcome::Finished;
    let mut epoch: u64 = 0;
    let mut skip: u64 = 0;
    if let Some(st) = state {
        let m = st.meta;
        tracker.early = m.early_stopping;
        if let (Some((_, sched)), Some(saved)) = (&mut tracker.scheduler, m.scheduler) {
            *sched = saved;
        }
        tracker.best = m.best;
        summary.best = tracker.best.clone();
        if !st.best.is_empty() {
            let mut snap: Vec<(String, Tensor)> = st.best.into_iter().collect();
            snap.sort_by(|a, b| a.0.cmp(&b.0));
            tracker.best_snapshot = Some(snap);
            summary.best_checkpoint = Some(run_dir.join(BEST_FILE));
        }
        tracker.best_val_loss = m.best_val_loss.unwrap_or(f64::INFINITY);
        tracker.best_val_acc = m.best_val_acc.unwrap_or(f64::NEG_INFINITY);
        tracker.last_eval_step = m.last_eval_step;
        interval = m.interval;
        let pos: u128 = m
            .dropout_rng_word_pos
            .parse()
            .map_err(|_| Fail("resume state: bad dropout RNG position".into()))?;
        ctx.set_rng_word_pos(pos);
        step = m.step;
        summary.steps = step;
        epoch = m.next_epoch.saturating_sub(1);
        skip = m.skip_batches;
        truncate_metrics(&run_dir.join(METRICS_FILE), step)?;
        tracing::info!(run_id = %req.run_id, step, epoch = m.next_epoch, "resuming run");
    }
    let max_steps = req.train.max_steps.unwrap_or(u64::MAX);
    summary.reason = format!("reached max_epochs = {}", req.train.max_epochs);

    'epochs: while epoch < req.train.max_epochs {
        epoch += 1;
        summary.epochs = epoch;
        let order = Batcher::epoch_order(&prep.split.train, req.train.seed, epoch);
        em.emit(RunEvent::EpochStarted {
            epoch,
            batches: steps_per_epoch,
        });
        let first = std::mem::take(&mut skip);
        for (bi, chunk) in order.chunks(bs).enumerate().skip(first as usize) {
            if cancel.is_cancelled() {
                outcome = Outcome::Cancelled;
                summary.reason = format!("cancelled at epoch {epoch}, step {step}");
                let pos = Position {
                    next_epoch: epoch,
                    skip_batches: bi as u64,
                };
                lp.save_resume(pos, step, &tracker, &interval, &optimizer, &ctx)?;
                break 'epochs;
            }
            let batch = batcher.batch(chunk)?;
            let logits = prep.model.forward(&batch.x, &mut ctx)?;
            let parts = lp.loss_fn.forward(&logits, &batch.y)?;
            let loss = f64::from(parts.loss.to_scalar::<f32>()?);
            if !loss.is_finite() {
                return Err(Fail(format!(
                    "training loss became {loss} at epoch {epoch}, step {}; the learning rate ({}) may be too high",
                    step + 1,
                    optimizer.learning_rate()
                )));
            }
            let grads = super::kernels::direct_grads::backward(&parts.loss)?;
            optimizer.step(&grads)?;
            step += 1;
            summary.steps = step;
            let preds = logits.detach().argmax(D::Minus1)?.to_vec1::<u32>()?;
            let correct = preds
                .iter()
                .zip(&batch.labels)
                .filter(|(p, t)| p == t)
                .count() as u64;
            interval.add(loss, parts.denom, correct, batch.len() as u64);
            em.emit(RunEvent::Step { epoch, step, loss });
            if let EvalEvery::Steps(n) = req.train.eval_every {
                if step % n == 0 {
                    if lp.evaluate(
                        epoch,
                        step,
                        &mut interval,
                        &mut tracker,
                        &mut optimizer,
                        summary,
                    )? {
                        outcome = Outcome::EarlyStopped;
                        break 'epochs;
                    }
                    let done = bi as u64 + 1;
                    let pos = if done >= steps_per_epoch {
                        Position {
                            next_epoch: epoch + 1,
                            skip_batches: 0,
                        }
                    } else {
                        Position {
                            next_epoch: epoch,
                            skip_batches: done,
                        }
                    };
                    lp.save_resume(pos, step, &tracker, &interval, &optimizer, &ctx)?;
                }
            }
            if step >= max_steps {
                summary.reason = format!("reached max_steps = {max_steps}");
                break 'epochs;
            }
        }
        if req.train.eval_every == EvalEvery::Epoch {
            if lp.evaluate(
                epoch,
                step,
                &mut interval,
                &mut tracker,
                &mut optimizer,
                summary,
            )? {
                outcome = Outcome::EarlyStopped;
                break 'epochs;
            }
            let pos = Position {
                next_epoch: epoch + 1,
                skip_batches: 0,
            };
            lp.save_resume(pos, step, &tracker, &interval, &optimizer, &ctx)?;
        }
    }
    // Steps since the last evaluation still count: evaluate them once more.
    if outcome == Outcome::Finished
        && step > tracker.last_eval_step
        && lp.evaluate(
            epoch,
            step,
            &mut interval,
            &mut tracker,
            &mut optimizer,
            summary,
        )?
    {
        outcome = Outcome::EarlyStopped;
    }
    summary.outcome = outcome;
    if outcome != Outcome::Cancelled {
        // The run is over: nothing left to resume.
        let _ = std::fs::remove_file(run_dir.join(RESUME_FILE));
    }

    let Some(snapshot) = tracker.best_snapshot.take() else {
        if outcome == Outcome::Cancelled {
            return Ok(());
        }
        return Err(Fail(
            "no evaluation produced a finite validation metric; no model was saved".into(),
        ));
    };
    if outcome.is_success() {
        prep.model.params.restore(&snapshot)?;
        if !prep.split.test.is_empty() {
            let rep = evaluate(
                &prep.model,
                &batcher,
                &prep.split.test,
                &lp.loss_fn,
                bs,
                &prep.data.classes,
            )?;
            summary.test = Some(test_record(rep));
        } else {
            tracing::warn!(run_id = %req.run_id, "the test split is empty; no final test");
        }
    }
    Ok(())
}

/// The resume state to continue from, when the request asks to resume and one exists.
fn load_resume_state(req: &RunRequest, run_dir: &Path) -> Result<Option<ResumeState>, Fail> {
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
        return Err(Fail(format!(
            "{} belongs to run {}, not {}",
            path.display(),
            st.meta.run_id,
            req.run_id
        )));
    }
    for section in ["data", "model", "train"] {
        if st.meta.config.get(section) != req.config.get(section) {
            return Err(Fail(format!(
                "cannot resume run {}: the [{section}] settings differ from the ones it started with",
                req.run_id
            )));
        }
    }
    Ok(Some(st))
}

/// Drops metrics lines written after `step` (they are produced again on resume).
fn truncate_metrics(path: &Path, step: u64) -> Result<(), Fail> {
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
        atomic_write(path, out.as_bytes())
            .map_err(|e| Fail(format!("cannot rewrite {}: {e}", path.display())))?;
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

/// Evaluates a checkpoint on one split of the data it describes (for `eval`).
pub fn evaluate_checkpoint(
    path: &Path,
    data: &data::DataSpec,
    split: data::Split,
    device: &candle_core::Device,
    batch_size: usize,
    loss: &CrossEntropy,
) -> Result<(EvalReport, CheckpointMeta, Vec<data::SkippedFile>), String> {
    let ck = checkpoint::load(path, device).map_err(|e| e.to_string())?;
    let mut spec = data.clone();
    spec.classes = Some(ck.meta.classes.clone());
    if let Some(t) = &ck.meta.input.text {
        spec.tokenizer = t.tokenizer;
        spec.max_len = t.max_len;
        spec.vocab = Some(t.vocab.clone());
    }
    let dataset = data::load_dataset(&spec).map_err(|e| e.to_string())?;
    if dataset.sample_shape != ck.meta.input.sample_shape {
        return Err(format!(
            "checkpoint {} expects samples of shape {:?} but {} has {:?}",
            path.display(),
            ck.meta.input.sample_shape,
            spec.dir.display(),
            dataset.sample_shape
        ));
    }
    let model = Model::new(ck.meta.model.clone(), 0, device).map_err(|e| e.to_string())?;
    model
        .params
        .load(&ck.tensors)
        .map_err(|e| format!("checkpoint {}: {e}", path.display()))?;
    let split_idx = dataset.split(&spec);
    let indices = match split {
        data::Split::Train => &split_idx.train,
        data::Split::Val => &split_idx.val,
        data::Split::Test => &split_idx.test,
    };
    if indices.is_empty() {
        return Err(format!(
            "the {split:?} split of {} is empty",
            spec.dir.display()
        ));
    }
    let batcher = Batcher::new(&dataset, &ck.meta.input.normalization, device);
    let rep = evaluate(
        &model,
        &batcher,
        indices,
        loss,
        batch_size,
        &ck.meta.classes,
    )
    .map_err(|e| e.to_string())?;
    Ok((rep, ck.meta, dataset.skipped))
}

/// The folder of a run.
pub fn run_dir(runs_dir: &Path, run_id: &str) -> PathBuf {
    runs_dir.join(run_id)
}
