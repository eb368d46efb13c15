//! Learning-rate schedules. [`ReduceLrOnPlateau`] reproduces
//! `torch.optim.lr_scheduler.ReduceLROnPlateau` (one parameter group) exactly,
//! and its whole state can be serialised for resume.

use serde::{Deserialize, Serialize};

/// Whether a smaller or a larger metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Lower is better (a loss).
    #[default]
    Min,
    /// Higher is better (an accuracy).
    Max,
}

/// How `threshold` defines a significant improvement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThresholdMode {
    /// Relative: better than `best * (1 -/+ threshold)`.
    #[default]
    Rel,
    /// Absolute: better than `best -/+ threshold`.
    Abs,
}

/// Settings of [`ReduceLrOnPlateau`], named and defaulted as in torch.
/// Missing fields deserialise to their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlateauConfig {
    /// Whether lower (`min`) or higher (`max`) metrics are better.
    pub mode: Mode,
    /// Multiplier applied to the lr on a plateau (torch default 0.1).
    pub factor: f64,
    /// Bad epochs tolerated before reducing (torch default 10).
    pub patience: usize,
    /// Minimum change that counts as an improvement (torch default 1e-4).
    pub threshold: f64,
    /// Relative or absolute threshold (torch default `rel`).
    pub threshold_mode: ThresholdMode,
    /// Epochs to wait after a reduction before counting bad epochs again.
    pub cooldown: usize,
    /// Lower bound on the lr.
    pub min_lr: f64,
    /// A reduction smaller than this is not applied (torch default 1e-8).
    pub eps: f64,
}

impl Default for PlateauConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Min,
            factor: 0.1,
            patience: 10,
            threshold: 1e-4,
            threshold_mode: ThresholdMode::Rel,
            cooldown: 0,
            min_lr: 0.0,
            eps: 1e-8,
        }
    }
}

/// A [`PlateauConfig`] that is rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid plateau schedule config: {0}")]
pub struct InvalidPlateauConfig(pub String);

impl PlateauConfig {
    /// Checks the settings: torch requires `factor < 1`; this also requires
    /// `factor`, `threshold`, `min_lr` and `eps` to be finite and non-negative.
    pub fn validate(&self) -> Result<(), InvalidPlateauConfig> {
        if !(self.factor.is_finite() && (0.0..1.0).contains(&self.factor)) {
            return Err(InvalidPlateauConfig(format!(
                "factor must be in [0, 1), got {}",
                self.factor
            )));
        }
        for (name, v) in [
            ("threshold", self.threshold),
            ("min_lr", self.min_lr),
            ("eps", self.eps),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(InvalidPlateauConfig(format!(
                    "{name} must be finite and >= 0, got {v}"
                )));
            }
        }
        Ok(())
    }
}

/// Reduces the learning rate when a metric stops improving, exactly as
/// torch's `ReduceLROnPlateau` does. Serialise it to save its state (config,
/// best, bad-epoch count, cooldown counter, epoch count); non-finite `best`
/// values are written as the strings `"inf"`, `"-inf"` or `"nan"` so JSON can
/// hold them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReduceLrOnPlateau {
    config: PlateauConfig,
    #[serde(with = "nonfinite_f64")]
    best: f64,
    num_bad_epochs: usize,
    cooldown_counter: usize,
    last_epoch: u64,
}

impl ReduceLrOnPlateau {
    /// A fresh schedule; `best` starts at the worst value for the mode. The
    /// config is taken as is (see [`PlateauConfig::validate`]).
    pub fn new(config: PlateauConfig) -> Self {
        let mut s = Self {
            config,
            best: 0.0,
            num_bad_epochs: 0,
            cooldown_counter: 0,
            last_epoch: 0,
        };
        s.reset();
        s
    }

    /// torch's `_reset`: forgets the best value, bad epochs and cooldown
    /// (the epoch count is kept).
    pub fn reset(&mut self) {
        self.best = self.mode_worse();
        self.num_bad_epochs = 0;
        self.cooldown_counter = 0;
    }

    fn mode_worse(&self) -> f64 {
        match self.config.mode {
            Mode::Min => f64::INFINITY,
            Mode::Max => f64::NEG_INFINITY,
        }
    }

    fn is_better(&self, a: f64, best: f64) -> bool {
        let th = self.config.threshold;
        match (self.config.mode, self.config.threshold_mode) {
            (Mode::Min, ThresholdMode::Rel) => a < best * (1.0 - th),
            (Mode::Min, ThresholdMode::Abs) => a < best - th,
            (Mode::Max, ThresholdMode::Rel) => a > best * (th + 1.0),
            (Mode::Max, ThresholdMode::Abs) => a > best + th,
        }
    }

    /// Records one epoch's `metric` (NaN counts as a bad epoch) and returns the
    /// lr to use from now on, given the lr `current_lr` in use.
    pub fn step(&mut self, metric: f64, current_lr: f64) -> f64 {
        self.last_epoch = self.last_epoch.saturating_add(1);
        if self.is_better(metric, self.best) {
            self.best = metric;
            self.num_bad_epochs = 0;
        } else {
            self.num_bad_epochs = self.num_bad_epochs.saturating_add(1);
        }
        if self.in_cooldown() {
            self.cooldown_counter -= 1;
            self.num_bad_epochs = 0;
        }
        let mut lr = current_lr;
        if self.num_bad_epochs > self.config.patience {
            // Python's max(a, b) returns a unless b > a.
            let scaled = current_lr * self.config.factor;
            let new_lr = if self.config.min_lr > scaled {
                self.config.min_lr
            } else {
                scaled
            };
            if current_lr - new_lr > self.config.eps {
                lr = new_lr;
            }
            self.cooldown_counter = self.config.cooldown;
            self.num_bad_epochs = 0;
        }
        lr
    }

    /// The best metric so far (`+inf` / `-inf` before the first finite one).
    pub fn best(&self) -> f64 {
        self.best
    }

    /// Consecutive epochs without significant improvement.
    pub fn num_bad_epochs(&self) -> usize {
        self.num_bad_epochs
    }

    /// Epochs of cooldown left.
    pub fn cooldown_counter(&self) -> usize {
        self.cooldown_counter
    }

    /// Whether a cooldown is running.
    pub fn in_cooldown(&self) -> bool {
        self.cooldown_counter > 0
    }

    /// The number of [`Self::step`] calls so far.
    pub fn last_epoch(&self) -> u64 {
        self.last_epoch
    }

    /// The settings.
    pub fn config(&self) -> &PlateauConfig {
        &self.config
    }
}

/// Serialises an `f64` as a number when finite and as `"inf"`, `"-inf"` or
/// `"nan"` otherwise; reads either form back.
mod nonfinite_f64 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Num(f64),
        Str(String),
    }

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        let repr = if v.is_finite() {
            Repr::Num(*v)
        } else if v.is_nan() {
            Repr::Str("nan".into())
        } else if *v > 0.0 {
            Repr::Str("inf".into())
        } else {
            Repr::Str("-inf".into())
        };
        repr.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Num(v) => Ok(v),
            Repr::Str(s) => match s.as_str() {
                "inf" | "+inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                "nan" => Ok(f64::NAN),
                other => Err(serde::de::Error::custom(format!(
                    "expected a number, \"inf\", \"-inf\" or \"nan\", got \"{other}\""
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cfg: PlateauConfig, lr0: f64, metrics: &[f64]) -> Vec<f64> {
        let mut s = ReduceLrOnPlateau::new(cfg);
        let mut lr = lr0;
        metrics
            .iter()
            .map(|&m| {
                lr = s.step(m, lr);
                lr
            })
            .collect()
    }

    fn base(patience: usize) -> PlateauConfig {
        PlateauConfig {
            factor: 0.5,
            patience,
            ..PlateauConfig::default()
        }
    }

    #[test]
    fn table() {
        let nan = f64::NAN;
        // (name, config, initial lr, metrics, expected lr after each step)
        type Row = (&'static str, PlateauConfig, f64, Vec<f64>, Vec<f64>);
        let cases: Vec<Row> = vec![
            (
                "improving never reduces",
                base(0),
                1.0,
                vec![5.0, 4.0, 3.0, 2.0],
                vec![1.0, 1.0, 1.0, 1.0],
            ),
            (
                "patience 0 reduces on the first bad epoch",
                base(0),
                1.0,
                vec![5.0, 5.0, 5.0],
                vec![1.0, 0.5, 0.25],
            ),
            (
                "patience 2 needs three bad epochs",
                base(2),
                1.0,
                vec![5.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0],
                vec![1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25],
            ),
            (
                "improvement resets the count",
                base(1),
                1.0,
                vec![5.0, 6.0, 4.0, 6.0, 6.0],
                vec![1.0, 1.0, 1.0, 1.0, 0.5],
            ),
            (
                "rel threshold: 5 * (1 - 0.1) = 4.5 is not better than 4.5",
                PlateauConfig {
                    threshold: 0.1,
                    ..base(0)
                },
                1.0,
                vec![5.0, 4.5, 4.49],
                vec![1.0, 0.5, 0.5],
            ),
            (
                "abs threshold, max mode",
                PlateauConfig {
                    mode: Mode::Max,
                    threshold_mode: ThresholdMode::Abs,
                    threshold: 0.5,
                    ..base(0)
                },
                1.0,
                vec![1.0, 1.5, 1.6, 2.2],
                vec![1.0, 0.5, 0.5, 0.5],
            ),
            (
                "cooldown 2 ignores the bad epochs after a reduction",
                PlateauConfig {
                    cooldown: 2,
                    ..base(0)
                },
                1.0,
                vec![5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
                vec![1.0, 0.5, 0.5, 0.5, 0.25, 0.25],
            ),
            (
                "min_lr clamps, then eps stops further changes",
                PlateauConfig {
                    factor: 0.1,
                    patience: 0,
                    min_lr: 0.03,
                    ..PlateauConfig::default()
                },
                1.0,
                vec![5.0, 5.0, 5.0, 5.0],
                vec![1.0, 0.1, 0.03, 0.03],
            ),
            (
                "reductions smaller than eps are skipped",
                PlateauConfig {
                    eps: 0.3,
                    ..base(0)
                },
                1.0,
                vec![5.0, 5.0, 5.0],
                vec![1.0, 0.5, 0.5],
            ),
            (
                "NaN is a bad epoch and never becomes best",
                base(1),
                1.0,
                vec![nan, nan, 3.0, nan, nan, 2.9],
                vec![1.0, 0.5, 0.5, 0.5, 0.25, 0.25],
            ),
        ];
        for (name, cfg, lr0, metrics, expected) in cases {
            assert_eq!(run(cfg, lr0, &metrics), expected, "{name}");
        }
    }

    #[test]
    fn counters_and_best() {
        let mut s = ReduceLrOnPlateau::new(PlateauConfig {
            cooldown: 1,
            ..base(1)
        });
        assert_eq!(s.best(), f64::INFINITY);
        let mut lr = 1.0;
        lr = s.step(2.0, lr);
        assert_eq!((s.best(), s.num_bad_epochs()), (2.0, 0));
        lr = s.step(2.0, lr);
        assert_eq!(s.num_bad_epochs(), 1);
        lr = s.step(2.0, lr);
        assert_eq!((lr, s.num_bad_epochs(), s.cooldown_counter()), (0.5, 0, 1));
        assert!(s.in_cooldown());
        s.step(3.0, lr);
        assert_eq!((s.num_bad_epochs(), s.cooldown_counter()), (0, 0));
        assert_eq!(s.last_epoch(), 4);
        let max = ReduceLrOnPlateau::new(PlateauConfig {
            mode: Mode::Max,
            ..PlateauConfig::default()
        });
        assert_eq!(max.best(), f64::NEG_INFINITY);
    }

    #[test]
    fn state_round_trips_through_json_including_infinite_best() {
        let mut s = ReduceLrOnPlateau::new(base(2));
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"inf\""), "{json}");
        let back: ReduceLrOnPlateau = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);

        let mut lr = 1.0;
        for m in [3.0, 3.0, 2.0, 2.5] {
            lr = s.step(m, lr);
        }
        let mut resumed: ReduceLrOnPlateau =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        let mut lr2 = lr;
        for m in [2.5, 2.5, 2.5, 1.0, 1.0, 1.0, 1.0] {
            lr = s.step(m, lr);
            lr2 = resumed.step(m, lr2);
            assert_eq!(lr, lr2);
            assert_eq!(s, resumed);
        }
        assert!(
            serde_json::from_str::<ReduceLrOnPlateau>(&json.replace("\"inf\"", "\"x\"")).is_err()
        );
    }

    #[test]
    fn config_serde_and_validation() {
        let c: PlateauConfig =
            serde_json::from_str(r#"{"mode":"max","threshold_mode":"abs","patience":3}"#).unwrap();
        assert_eq!(
            c,
            PlateauConfig {
                mode: Mode::Max,
                threshold_mode: ThresholdMode::Abs,
                patience: 3,
                ..PlateauConfig::default()
            }
        );
        let d = PlateauConfig::default();
        assert_eq!(
            (
                d.factor,
                d.patience,
                d.threshold,
                d.cooldown,
                d.min_lr,
                d.eps
            ),
            (0.1, 10, 1e-4, 0, 0.0, 1e-8)
        );
        assert!(d.validate().is_ok());
        for bad in [
            PlateauConfig {
                factor: 1.0,
                ..d.clone()
            },
            PlateauConfig {
                factor: f64::NAN,
                ..d.clone()
            },
            PlateauConfig {
                min_lr: -1.0,
                ..d.clone()
            },
            PlateauConfig {
                threshold: f64::INFINITY,
                ..d.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
