//! Which settings belong to a run, as opposed to the device (broker, folders,
//! the accelerator): declared once, in [`RUN_SETTINGS`], and used by the
//! daemon's commands (what `cmd/train` may override), its recovery (what a
//! resumed run takes from its resume state) and the resume check (what must not
//! have changed since the run started). Also the two run decisions `train` and
//! the daemon share: where a run's weights start from ([`RunSettings::warm_start`])
//! and the promotion of its best model ([`RunSettings::promote`]).

use std::path::Path;

use candle_core::Device;
use serde_json::Value;

use super::{ConfigError, Settings, WarmStartFrom};
use crate::engine::promote::{self, PromoteError, PromoteRequest, Promotion, CURRENT_FILE};
use crate::engine::run::WarmStart;
use crate::engine::run::{key_pointer, CancelFlag};

/// One entry of [`RUN_SETTINGS`]: a config section (`train`: every key under
/// it) or a single key (`retrain.warm_start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSetting {
    /// A section name, or a dotted key.
    pub key: &'static str,
    /// A `cmd/train` may override it (except the [`LOCAL_ONLY`] keys under it).
    pub remote: bool,
    /// A resumed run must find it as it started: a change means the run cannot
    /// be continued. The others (how to start, what to promote on) are simply
    /// taken from the resume state.
    pub fixed_on_resume: bool,
}

impl RunSetting {
    /// Whether this is a whole section rather than one key.
    pub fn is_section(&self) -> bool {
        !self.key.contains('.')
    }

    /// Whether the dotted config key `key` falls under this entry.
    pub fn covers(&self, key: &str) -> bool {
        if self.is_section() {
            key.strip_prefix(self.key)
                .is_some_and(|rest| rest.starts_with('.'))
        } else {
            key == self.key
        }
    }
}

/// The settings that belong to a run. Everything else (`device`, `mqtt`,
/// `output`, the rest of `retrain`) belongs to the device and comes from the
/// daemon's own configuration, whatever a command or a resume state says.
pub const RUN_SETTINGS: &[RunSetting] = &[
    RunSetting {
        key: "train",
        remote: true,
        fixed_on_resume: true,
    },
    RunSetting {
        key: "model",
        remote: true,
        fixed_on_resume: true,
    },
    RunSetting {
        key: "data",
        remote: false,
        fixed_on_resume: true,
    },
    RunSetting {
        key: "retrain.warm_start",
        remote: true,
        fixed_on_resume: false,
    },
    RunSetting {
        key: "retrain.promote_metric",
        remote: true,
        fixed_on_resume: false,
    },
];

/// Keys inside remote run settings that name files: never from a command.
pub const LOCAL_ONLY: &[&str] = &["model.init"];

/// Whether a `cmd/train` may override the dotted config key `key`.
pub fn remote_overridable(key: &str) -> bool {
    !LOCAL_ONLY.contains(&key) && RUN_SETTINGS.iter().any(|s| s.remote && s.covers(key))
}

/// `model.*` keys that a run warm-started from the current model does not
/// use: the checkpoint's architecture and sizes win. (`model.freeze` and
/// `model.finetune` apply to any run.)
pub fn unused_when_warm_starting(key: &str) -> bool {
    key.starts_with("model.") && key != "model.freeze" && key != "model.finetune"
}

/// Refuses command overrides that the run would silently ignore: `model.*`
/// keys (but `model.freeze`) when the resolved `retrain.warm_start` is
/// `"current"`, whether or not a current model exists yet (one may be
/// promoted before the run starts). The error names the keys.
pub fn check_command_overrides<'a>(
    keys: impl IntoIterator<Item = &'a str>,
    settings: &Settings,
) -> Result<(), ConfigError> {
    if settings.retrain.warm_start != WarmStartFrom::Current {
        return Ok(());
    }
    let mut ignored: Vec<&str> = keys
        .into_iter()
        .filter(|k| unused_when_warm_starting(k))
        .collect();
    if ignored.is_empty() {
        return Ok(());
    }
    ignored.sort_unstable();
    ignored.dedup();
    Err(ConfigError::Invalid {
        key: ignored.join("`, `"),
        reason: "retrain.warm_start = \"current\" continues the current model, whose architecture and sizes win, so model.* overrides (but model.freeze and model.finetune) would be ignored; add \"retrain.warm_start\": \"scratch\" (or \"init\") to train a new model with them".into(),
    })
}

/// What a command may override, for messages:
/// `train.*, model.* except model.init, retrain.warm_start, ...`.
pub fn remote_description() -> String {
    RUN_SETTINGS
        .iter()
        .filter(|s| s.remote)
        .map(|s| {
            if !s.is_section() {
                return s.key.to_string();
            }
            let except: Vec<&str> = LOCAL_ONLY.iter().copied().filter(|k| s.covers(k)).collect();
            if except.is_empty() {
                format!("{}.*", s.key)
            } else {
                format!("{}.* except {}", s.key, except.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The run settings a resumed run must find unchanged (`data`, `model`, `train`).
/// They are config sections: the resume check compares the recorded
/// configuration (`RunRequest::config`, JSON) section by section.
pub fn fixed_on_resume() -> impl Iterator<Item = &'static str> {
    RUN_SETTINGS
        .iter()
        .filter(|s| s.fixed_on_resume)
        .map(|s| s.key)
}

/// Who picks a run's warm start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Starter {
    /// The daemon follows `retrain.warm_start`: the promoted model when there is
    /// one, else `model.init`, else scratch.
    Daemon,
    /// `edge-trainer train` leaves `retrain.*` to the daemon (README: "used by
    /// the daemon"): `model.init`, else scratch.
    TrainCommand,
}

/// A view of the settings that belong to one run.
#[derive(Debug, Clone, Copy)]
pub struct RunSettings<'a> {
    settings: &'a Settings,
}

impl Settings {
    /// The part of these settings that belongs to a run.
    pub fn run_settings(&self) -> RunSettings<'_> {
        RunSettings { settings: self }
    }
}

impl RunSettings<'_> {
    /// `base` (the device's settings) with this run's settings on top: what a
    /// resumed run trains with.
    pub fn onto(&self, base: &Settings) -> Result<Settings, ConfigError> {
        let json =
            |s: &Settings| serde_json::to_value(s).map_err(|e| ConfigError::Other(e.to_string()));
        let from = json(self.settings)?;
        let mut out = json(base)?;
        for s in RUN_SETTINGS {
            let p = key_pointer(s.key);
            let value = from.pointer(&p).cloned().unwrap_or(Value::Null);
            match out.pointer_mut(&p) {
                Some(slot) => *slot = value,
                None => {
                    return Err(ConfigError::Other(format!(
                        "run setting `{}` is not a config key",
                        s.key
                    )))
                }
            }
        }
        serde_json::from_value(out).map_err(|e| ConfigError::Other(e.to_string()))
    }

    /// Where the run's weights start from.
    pub fn warm_start(&self, starter: Starter) -> WarmStart {
        let s = self.settings;
        let init = || match &s.model.init {
            Some(p) => WarmStart::StateDict(p.clone()),
            None => WarmStart::Scratch,
        };
        match (starter, s.retrain.warm_start) {
            (Starter::TrainCommand, _) => init(),
            (Starter::Daemon, WarmStartFrom::Current) => {
                let current = s.output.dir.join(CURRENT_FILE);
                if current.is_file() {
                    WarmStart::Checkpoint(current)
                } else {
                    init()
                }
            }
            (Starter::Daemon, WarmStartFrom::Init) => init(),
            (Starter::Daemon, WarmStartFrom::Scratch) => WarmStart::Scratch,
        }
    }

    /// Promotes the run's best model (`best`) if it is at least as good as the
    /// one in service, scored on this run's data with `retrain.promote_metric`.
    /// A set `cancel` stops the scoring between batches and keeps the current model.
    pub fn promote(
        &self,
        best: &Path,
        device: &Device,
        cancel: &CancelFlag,
    ) -> Result<Promotion, PromoteError> {
        let s = self.settings;
        let data = s.data_spec();
        promote::promote(
            &PromoteRequest {
                candidate: best,
                output_dir: &s.output.dir,
                data: &data,
                device,
                batch_size: s.train.batch_size,
                metric: s.retrain.promote_metric,
                export_onnx: s.output.export_onnx,
            },
            cancel,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PromoteMetric;
    use std::path::PathBuf;

    #[test]
    fn every_run_setting_is_a_config_key() {
        let v = serde_json::to_value(Settings::default()).unwrap();
        for s in RUN_SETTINGS {
            assert!(v.pointer(&key_pointer(s.key)).is_some(), "{}", s.key);
        }
        for k in LOCAL_ONLY {
            assert!(v.pointer(&key_pointer(k)).is_some(), "{k}");
            assert!(RUN_SETTINGS.iter().any(|s| s.remote && s.covers(k)), "{k}");
        }
    }

    #[test]
    fn what_a_command_may_override() {
        for key in [
            "train.lr",
            "train.optimizer.lr",
            "model.hidden",
            "model.init_prefix",
            "retrain.warm_start",
            "retrain.promote_metric",
        ] {
            assert!(remote_overridable(key), "{key}");
        }
        for key in [
            "train",
            "model",
            "model.init",
            "trainer.lr",
            "data.dir",
            "output.dir",
            "mqtt.host",
            "device.kind",
            "retrain.on_start",
            "retrain.warm_start.x",
            "",
        ] {
            assert!(!remote_overridable(key), "{key}");
        }
        assert_eq!(
            remote_description(),
            "train.*, model.* except model.init, retrain.warm_start, retrain.promote_metric"
        );
        assert_eq!(
            fixed_on_resume().collect::<Vec<_>>(),
            ["train", "model", "data"]
        );
    }

    #[test]
    fn model_overrides_under_warm_start_current_are_refused() {
        let mut s = Settings::default();
        let keys = ["model.hidden", "train.lr", "model.freeze", "model.dropout"];
        let e = check_command_overrides(keys, &s).unwrap_err().to_string();
        assert!(
            e.contains("`model.dropout`, `model.hidden`") && e.contains("ignored"),
            "{e}"
        );
        assert!(!e.contains("model.freeze`"), "{e}");
        assert!(check_command_overrides(["train.lr", "model.freeze"], &s).is_ok());
        for w in [WarmStartFrom::Scratch, WarmStartFrom::Init] {
            s.retrain.warm_start = w;
            assert!(check_command_overrides(keys, &s).is_ok());
        }
    }

    #[test]
    fn a_resumed_run_keeps_its_settings_and_the_device_keeps_its_own() {
        let mut base = Settings::default();
        base.mqtt.host = "broker".into();
        base.output.dir = PathBuf::from("/out");
        base.retrain.min_new_samples = 7;
        let mut run = Settings::default();
        run.mqtt.host = "elsewhere".into();
        run.output.dir = PathBuf::from("/elsewhere");
        run.data.dir = PathBuf::from("/data-of-the-run");
        run.train.max_epochs = 3;
        run.model.archs.mlp.hidden = vec![5];
        run.retrain.warm_start = WarmStartFrom::Scratch;
        run.retrain.promote_metric = PromoteMetric::Loss;
        run.retrain.min_new_samples = 99;
        let s = run.run_settings().onto(&base).unwrap();
        assert_eq!(s.mqtt, base.mqtt);
        assert_eq!(s.output, base.output);
        assert_eq!(s.device, base.device);
        assert_eq!(s.retrain.min_new_samples, 7);
        assert_eq!(s.data, run.data);
        assert_eq!(s.model, run.model);
        assert_eq!(s.train, run.train);
        assert_eq!(s.retrain.warm_start, WarmStartFrom::Scratch);
        assert_eq!(s.retrain.promote_metric, PromoteMetric::Loss);
    }

    #[test]
    fn warm_start_choices() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Settings::default();
        s.output.dir = dir.path().to_path_buf();
        let current = dir.path().join(CURRENT_FILE);
        let ws = |s: &Settings, by| s.run_settings().warm_start(by);
        // Nothing to start from.
        assert_eq!(ws(&s, Starter::Daemon), WarmStart::Scratch);
        assert_eq!(ws(&s, Starter::TrainCommand), WarmStart::Scratch);
        s.model.init = Some(PathBuf::from("/init.safetensors"));
        let init = WarmStart::StateDict(PathBuf::from("/init.safetensors"));
        assert_eq!(ws(&s, Starter::Daemon), init);
        std::fs::write(&current, b"x").unwrap();
        assert_eq!(
            ws(&s, Starter::Daemon),
            WarmStart::Checkpoint(current.clone())
        );
        // `train` leaves retrain.warm_start to the daemon.
        assert_eq!(ws(&s, Starter::TrainCommand), init);
        s.retrain.warm_start = WarmStartFrom::Init;
        assert_eq!(ws(&s, Starter::Daemon), init);
        s.retrain.warm_start = WarmStartFrom::Scratch;
        assert_eq!(ws(&s, Starter::Daemon), WarmStart::Scratch);
        assert_eq!(ws(&s, Starter::TrainCommand), init);
    }
}
