//! Early stopping and best-model tracking as pure decisions over a sequence of
//! evaluations: has the monitored metric improved, and is it time to stop?

use serde::{Deserialize, Serialize};

use super::schedule::Mode;

/// Settings of the early-stopping policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopConfig {
    /// Whether a run may stop early at all.
    pub enabled: bool,
    pub mode: Mode,
    /// Evaluations without an improvement larger than `min_delta` before stopping.
    pub patience: usize,
    pub min_delta: f64,
}

/// What the policy decided after one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Strictly better than the best so far: save this model as the best.
    pub improved: bool,
    /// The run should stop now.
    pub stop: bool,
}

/// The policy's state (saved with resume state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    cfg: EarlyStopConfig,
    /// Best value seen (the checkpoint's), `None` before the first evaluation.
    best: Option<f64>,
    /// Reference for patience: the last value that improved by more than `min_delta`.
    reference: Option<f64>,
    /// Evaluations since `reference` was set.
    wait: usize,
}

impl EarlyStopping {
    /// A policy with nothing seen yet.
    pub fn new(cfg: EarlyStopConfig) -> Self {
        Self {
            cfg,
            best: None,
            reference: None,
            wait: 0,
        }
    }

    /// Best value of the monitored metric so far.
    pub fn best(&self) -> Option<f64> {
        self.best
    }

    /// Evaluations since the last significant improvement.
    pub fn wait(&self) -> usize {
        self.wait
    }

    fn better(&self, value: f64, than: f64, delta: f64) -> bool {
        match self.cfg.mode {
            Mode::Min => value < than - delta,
            Mode::Max => value > than + delta,
        }
    }

    /// Feeds one evaluation's monitored value and returns the decision.
    /// A non-finite value is never an improvement.
    pub fn observe(&mut self, value: f64) -> Decision {
        let finite = value.is_finite();
        let improved = finite && self.best.is_none_or(|b| self.better(value, b, 0.0));
        if improved {
            self.best = Some(value);
        }
        let significant = finite
            && self
                .reference
                .is_none_or(|r| self.better(value, r, self.cfg.min_delta));
        if significant {
            self.reference = Some(value);
            self.wait = 0;
        } else {
            self.wait += 1;
        }
        Decision {
            improved,
            stop: self.cfg.enabled && self.wait >= self.cfg.patience.max(1) && !significant,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: Mode, patience: usize, min_delta: f64, values: &[f64]) -> Vec<(bool, bool)> {
        let mut es = EarlyStopping::new(EarlyStopConfig {
            enabled: true,
            mode,
            patience,
            min_delta,
        });
        values
            .iter()
            .map(|&v| {
                let d = es.observe(v);
                (d.improved, d.stop)
            })
            .collect()
    }

    #[test]
    fn table() {
        let t = true;
        let f = false;
        // (mode, patience, min_delta, values, expected (improved, stop) per step)
        type Case = (Mode, usize, f64, Vec<f64>, Vec<(bool, bool)>);
        let cases: Vec<Case> = vec![
            // Steady improvement never stops.
            (
                Mode::Min,
                2,
                0.0,
                vec![3.0, 2.0, 1.0],
                vec![(t, f), (t, f), (t, f)],
            ),
            // Two evaluations without improvement with patience 2: stop at the second.
            (
                Mode::Min,
                2,
                0.0,
                vec![1.0, 1.5, 1.2],
                vec![(t, f), (f, f), (f, t)],
            ),
            // An equal value is not an improvement.
            (Mode::Min, 1, 0.0, vec![1.0, 1.0], vec![(t, f), (f, t)]),
            // Max mode.
            (
                Mode::Max,
                2,
                0.0,
                vec![0.5, 0.6, 0.6, 0.55],
                vec![(t, f), (t, f), (f, f), (f, t)],
            ),
            // Improvements smaller than min_delta save a better model but do not reset patience.
            (
                Mode::Min,
                2,
                0.1,
                vec![1.0, 0.95, 0.93],
                vec![(t, f), (t, f), (t, t)],
            ),
            // A large enough improvement resets the wait.
            (
                Mode::Min,
                2,
                0.1,
                vec![1.0, 1.05, 0.8, 0.85, 0.9],
                vec![(t, f), (f, f), (t, f), (f, f), (f, t)],
            ),
            // NaN is never an improvement and counts as a bad evaluation.
            (
                Mode::Min,
                2,
                0.0,
                vec![f64::NAN, 1.0, f64::NAN, f64::NAN],
                vec![(f, f), (t, f), (f, f), (f, t)],
            ),
        ];
        for (i, (mode, p, d, values, want)) in cases.into_iter().enumerate() {
            assert_eq!(run(mode, p, d, &values), want, "case {i}");
        }
    }

    #[test]
    fn disabled_never_stops() {
        let mut es = EarlyStopping::new(EarlyStopConfig {
            enabled: false,
            mode: Mode::Min,
            patience: 1,
            min_delta: 0.0,
        });
        for v in [1.0, 2.0, 3.0, 4.0] {
            assert!(!es.observe(v).stop);
        }
        assert_eq!(es.best(), Some(1.0));
    }
}
