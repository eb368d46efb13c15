//! Evaluation during training, burn-style: [`decide`] turns one validation
//! result into pure decisions (save as best? new learning rate? stop?), and
//! [`apply`] carries them out (checkpoint, learning rate, metrics line, events).

use super::session::{Session, Tracker};
use super::{BEST_FILE, METRICS_FILE};
use crate::engine::checkpoint::{self, CheckpointMeta, CheckpointMetrics, InputSpec};
use crate::engine::data::Batcher;
use crate::engine::error::RunError;
use crate::engine::eval::{evaluate, evaluate_batches, EvalReport};
use crate::engine::fsutil::append_line;
use crate::engine::resume::IntervalState as Interval;
use crate::engine::run::{
    now_rfc3339, BestRecord, CancelFlag, CheckpointSaved, EarlyStopped, Metrics, Monitor, RunEvent,
    RunSummary,
};

/// One validation result and where the run stands.
#[derive(Debug, Clone)]
pub(super) struct Observation<'a> {
    pub run_id: &'a str,
    pub epoch: u64,
    pub step: u64,
    pub val_loss: f64,
    pub val_acc: f64,
    /// The learning rate used since the last evaluation.
    pub lr: f64,
    pub elapsed_s: f64,
    pub interval: &'a Interval,
}

/// Why the run stops early.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Stop {
    pub reason: String,
    pub monitor: Monitor,
    pub best_value: f64,
}

/// What one evaluation decided; nothing has been written or sent yet.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Decisions {
    /// The line for `metrics.jsonl` and the `Evaluated` event.
    pub metrics: Metrics,
    /// The model improved: save it as the best checkpoint.
    pub save_best: bool,
    /// The plateau scheduler lowered the learning rate to this.
    pub new_lr: Option<f64>,
    /// The run stops early.
    pub stop: Option<Stop>,
}

/// Feeds one validation result to the policies (early stopping, plateau
/// scheduler, best values) and returns their decisions. No I/O.
pub(super) fn decide(
    tracker: &mut Tracker,
    monitor: Monitor,
    patience: usize,
    obs: &Observation,
) -> Decisions {
    let decision = tracker
        .early
        .observe(monitor.pick(obs.val_loss, obs.val_acc));
    if obs.val_loss.is_finite() {
        tracker.best_val_loss = tracker.best_val_loss.min(obs.val_loss);
    }
    tracker.best_val_acc = tracker.best_val_acc.max(obs.val_acc);
    tracker.last_eval_step = obs.step;
    let metrics = Metrics {
        run_id: obs.run_id.to_string(),
        epoch: obs.epoch,
        step: obs.step,
        train_loss: obs.interval.loss(),
        train_acc: obs.interval.acc(),
        val_loss: obs.val_loss,
        val_acc: obs.val_acc,
        lr: obs.lr,
        elapsed_s: obs.elapsed_s,
        improved: decision.improved,
        best_val_loss: tracker.best_val_loss,
        best_val_acc: tracker.best_val_acc,
    };
    let new_lr = tracker.scheduler.as_mut().and_then(|(m, sched)| {
        let lr = sched.step(m.pick(obs.val_loss, obs.val_acc), obs.lr);
        (lr != obs.lr).then_some(lr)
    });
    let stop = decision.stop.then(|| {
        let best_value = tracker.early.best().unwrap_or(f64::NAN);
        Stop {
            reason: format!(
                "no improvement of {} for {} evaluations (patience {patience}); best {} = {best_value:.6}",
                monitor.name(),
                tracker.early.wait(),
                monitor.name()
            ),
            monitor,
            best_value,
        }
    });
    Decisions {
        metrics,
        save_best: decision.improved,
        new_lr,
        stop,
    }
}

/// Evaluates on the validation split, decides and applies; returns whether to stop early.
pub(super) fn evaluate_and_apply(
    s: &mut Session,
    summary: &mut RunSummary,
) -> Result<bool, RunError> {
    // A validation pass belongs to the step that triggered it: it is not cut
    // short, so that a resumed run reproduces the same metrics.
    let prep = s.prep;
    let rep = evaluate_indices(s, &prep.split.val, &CancelFlag::new())?;
    let (monitor, early_cfg) = &s.req.train.early_stopping;
    let obs = Observation {
        run_id: &s.req.run_id,
        epoch: s.epoch,
        step: s.step,
        val_loss: rep.loss,
        val_acc: rep.accuracy,
        lr: s.optimizer.learning_rate(),
        elapsed_s: s.elapsed(),
        interval: &s.interval,
    };
    let d = decide(&mut s.tracker, *monitor, early_cfg.patience, &obs);
    apply(s, d, summary)
}

/// Carries out the decisions: saves the best checkpoint, sets the learning
/// rate, appends the metrics line and emits the events. Returns whether to stop.
pub(super) fn apply(
    s: &mut Session,
    d: Decisions,
    summary: &mut RunSummary,
) -> Result<bool, RunError> {
    let (epoch, step) = (s.epoch, s.step);
    let m = &d.metrics;
    s.interval = Interval::default();
    if d.save_best {
        let p = s.prep;
        let path = s.file(BEST_FILE);
        let meta = CheckpointMeta {
            model: p.model.spec.clone(),
            classes: p.data.classes.clone(),
            input: InputSpec {
                format: s.req.data.format,
                sample_shape: p.data.sample_shape.clone(),
                normalization: p.norm.clone(),
                text: p.text.clone(),
                resize: p.data.features.images().map(|src| src.options().resize),
            },
            run_id: s.req.run_id.clone(),
            epoch,
            step,
            metrics: CheckpointMetrics {
                val_loss: Some(m.val_loss),
                val_acc: Some(m.val_acc),
                train_loss: Some(m.train_loss).filter(|v| v.is_finite()),
                train_acc: Some(m.train_acc).filter(|v| v.is_finite()),
            },
            version: env!("CARGO_PKG_VERSION").to_string(),
            created: now_rfc3339(),
        };
        let snapshot = p.model.params.snapshot()?;
        checkpoint::save(&path, &snapshot, &meta)?;
        s.tracker.best_snapshot = Some(snapshot);
        s.tracker.best = Some(BestRecord {
            epoch,
            step,
            val_loss: m.val_loss,
            val_acc: m.val_acc,
        });
        summary.best = s.tracker.best.clone();
        summary.best_checkpoint = Some(path.clone());
        s.sink.emit(RunEvent::CheckpointSaved(CheckpointSaved {
            run_id: s.req.run_id.clone(),
            path,
            epoch,
            step,
            val_loss: m.val_loss,
            val_acc: m.val_acc,
        }));
    }
    if let Some(new_lr) = d.new_lr {
        tracing::info!(run_id = %s.req.run_id, from = m.lr, to = new_lr, "reducing learning rate on plateau");
        s.optimizer.set_learning_rate(new_lr);
    }
    let line = serde_json::to_string(m)?;
    let metrics_path = s.file(METRICS_FILE);
    append_line(&metrics_path, &line).map_err(|e| RunError::io("append to", &metrics_path, e))?;
    s.sink.emit(RunEvent::Evaluated(d.metrics));
    if let Some(stop) = d.stop {
        s.sink.emit(RunEvent::EarlyStopped(EarlyStopped {
            run_id: s.req.run_id.clone(),
            epoch,
            step,
            reason: stop.reason.clone(),
            monitor: stop.monitor.name().to_string(),
            best_value: stop.best_value,
        }));
        summary.reason = stop.reason;
        return Ok(true);
    }
    Ok(false)
}

/// Evaluates the session's model on the samples `indices`: on the cached
/// frozen features when the run has them (computing those not yet known),
/// from the input otherwise.
pub(super) fn evaluate_indices(
    s: &mut Session,
    indices: &[usize],
    cancel: &CancelFlag,
) -> Result<EvalReport, RunError> {
    let p = s.prep;
    let bs = s.req.train.batch_size;
    let batcher = Batcher::new(&p.data, &p.norm, &s.req.device);
    match s.features.as_mut() {
        Some(t) => {
            let chunks: Vec<Vec<usize>> =
                indices.chunks(bs.max(1)).map(<[usize]>::to_vec).collect();
            let images = batcher.batches(t.needing_images(&chunks), None);
            let point = t.point;
            evaluate_batches(
                &p.model,
                t.batches(chunks, images, &p.model),
                Some(point),
                &s.loss_fn,
                &p.data.classes,
                cancel,
            )
        }
        None => evaluate(
            &p.model,
            &batcher,
            indices,
            &s.loss_fn,
            bs,
            &p.data.classes,
            cancel,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::early_stop::{EarlyStopConfig, EarlyStopping};
    use crate::engine::schedule::{Mode, PlateauConfig, ReduceLrOnPlateau};

    fn tracker(patience: usize, plateau_patience: Option<usize>) -> Tracker {
        Tracker {
            early: EarlyStopping::new(EarlyStopConfig {
                enabled: true,
                mode: Mode::Min,
                patience,
                min_delta: 0.0,
            }),
            scheduler: plateau_patience.map(|p| {
                (
                    Monitor::ValLoss,
                    ReduceLrOnPlateau::new(PlateauConfig {
                        patience: p,
                        factor: 0.5,
                        ..PlateauConfig::default()
                    }),
                )
            }),
            best: None,
            best_snapshot: None,
            best_val_loss: f64::INFINITY,
            best_val_acc: f64::NEG_INFINITY,
            last_eval_step: 0,
        }
    }

    /// Feeds `val_losses` in order; returns (save_best, new_lr, stops) per evaluation.
    fn run(t: &mut Tracker, val_losses: &[f64]) -> Vec<(bool, Option<f64>, bool)> {
        let interval = Interval::default();
        let mut lr = 1.0;
        val_losses
            .iter()
            .enumerate()
            .map(|(i, &val_loss)| {
                let obs = Observation {
                    run_id: "r",
                    epoch: i as u64 + 1,
                    step: 10 * (i as u64 + 1),
                    val_loss,
                    val_acc: 0.5,
                    lr,
                    elapsed_s: 0.0,
                    interval: &interval,
                };
                let d = decide(t, Monitor::ValLoss, 2, &obs);
                assert_eq!(d.metrics.step, obs.step);
                assert_eq!(d.metrics.lr, lr, "the line records the lr that was used");
                assert_eq!(d.metrics.improved, d.save_best);
                if let Some(n) = d.new_lr {
                    lr = n;
                }
                (d.save_best, d.new_lr, d.stop.is_some())
            })
            .collect()
    }

    #[test]
    fn improvements_are_saved_and_patience_stops() {
        let mut t = tracker(2, None);
        let got = run(&mut t, &[1.0, 0.8, 0.9, 0.85, 0.7]);
        assert_eq!(
            got,
            vec![
                (true, None, false),
                (true, None, false),
                (false, None, false),
                (false, None, true),
                // (the run would have stopped; the policy still answers)
                (true, None, false),
            ]
        );
        assert_eq!(t.last_eval_step, 50);
        assert_eq!(t.best_val_loss, 0.7);
    }

    #[test]
    fn plateau_lowers_the_learning_rate_once_per_plateau() {
        let mut t = tracker(100, Some(1));
        let got = run(&mut t, &[1.0, 1.0, 1.0, 0.5, 0.6, 0.6]);
        assert_eq!(
            got,
            vec![
                (true, None, false),
                (false, None, false),
                (false, Some(0.5), false),
                (true, None, false),
                (false, None, false),
                (false, Some(0.25), false),
            ]
        );
    }

    #[test]
    fn non_finite_losses_never_improve_nor_count_as_best() {
        let mut t = tracker(5, None);
        let got = run(&mut t, &[f64::NAN, 2.0, f64::INFINITY]);
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            vec![false, true, false]
        );
        assert_eq!(t.best_val_loss, 2.0);
    }

    #[test]
    fn the_stop_reason_names_the_monitor_and_best_value() {
        let mut t = tracker(1, None);
        let interval = Interval::default();
        let mut last = None;
        for (i, v) in [0.5, 0.6].into_iter().enumerate() {
            let obs = Observation {
                run_id: "r",
                epoch: 1,
                step: i as u64,
                val_loss: v,
                val_acc: 0.0,
                lr: 0.1,
                elapsed_s: 0.0,
                interval: &interval,
            };
            last = Some(decide(&mut t, Monitor::ValLoss, 1, &obs));
        }
        let stop = last.and_then(|d| d.stop).expect("stops after patience 1");
        assert_eq!(
            stop.reason,
            "no improvement of val_loss for 1 evaluations (patience 1); best val_loss = 0.500000"
        );
        assert_eq!(stop.best_value, 0.5);
    }
}
