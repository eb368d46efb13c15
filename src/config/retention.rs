//! `[data.retention]` and the disk keys of `[output]` (`keep_runs`,
//! `min_free_mb`): what a device that runs for years keeps. The daemon applies
//! them (`daemon::retention`); here are the keys, their defaults and their rules.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, Settings};

/// How the data files that earlier runs trained on are kept.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RetentionPolicy {
    /// Every file stays in `data.dir` (the default: nothing of the user's is
    /// deleted unless asked for).
    #[default]
    KeepAll,
    /// A class-balanced reservoir within `max_samples` / `max_mb`: the
    /// replay set trained on together with each run's new files.
    ClassBalanced,
}

/// `[data.retention]`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSettings {
    pub policy: RetentionPolicy,
    /// Samples kept for replay (files already trained on), at most.
    pub max_samples: Option<u64>,
    /// MiB of data files kept for replay, at most.
    pub max_mb: Option<u64>,
    /// Evicted files are moved here (their path below `data.dir` kept)
    /// instead of deleted. Must be outside `data.dir`.
    pub archive_dir: Option<PathBuf>,
    /// Seed of the reservoir's priorities: which files stay is a pure
    /// function of (seed, file name) and the budget.
    pub seed: u64,
}

/// `output.min_free_mb` by default: room left free on the disk beyond what a
/// run is expected to write.
pub const DEFAULT_MIN_FREE_MB: u64 = 64;

impl Settings {
    /// `[data.retention]`, `output.keep_runs`, `output.min_free_mb`: ranges
    /// and cross-field rules.
    pub(super) fn validate_retention(&self) -> Result<(), ConfigError> {
        let r = &self.data.retention;
        match r.policy {
            RetentionPolicy::KeepAll => {
                for (key, set) in [
                    ("data.retention.max_samples", r.max_samples.is_some()),
                    ("data.retention.max_mb", r.max_mb.is_some()),
                    ("data.retention.archive_dir", r.archive_dir.is_some()),
                ] {
                    if set {
                        return Err(invalid(
                            key,
                            "has no effect with data.retention.policy = \"keep-all\"; set policy = \"class-balanced\" to bound the data kept",
                        ));
                    }
                }
            }
            RetentionPolicy::ClassBalanced => {
                if r.max_samples.is_none() && r.max_mb.is_none() {
                    return Err(invalid(
                        "data.retention.policy",
                        "\"class-balanced\" needs a budget: data.retention.max_samples and/or data.retention.max_mb",
                    ));
                }
                if r.max_samples == Some(0) {
                    return Err(invalid("data.retention.max_samples", "must be >= 1"));
                }
                if r.max_mb == Some(0) {
                    return Err(invalid("data.retention.max_mb", "must be >= 1"));
                }
            }
        }
        if let Some(a) = &r.archive_dir {
            let (archive, data) = (absolute(a), absolute(&self.data.dir));
            if a.as_os_str().is_empty() || archive.starts_with(&data) {
                return Err(invalid(
                    "data.retention.archive_dir",
                    format!(
                        "{} must be a folder outside data.dir ({}): archived files would be read as data again",
                        a.display(),
                        self.data.dir.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `path` made absolute against the working directory (no link resolution:
/// the folders may not exist yet).
fn absolute(path: &std::path::Path) -> PathBuf {
    let p = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    p.components().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_layers;

    fn load(s: &str) -> Result<Settings, ConfigError> {
        let t: toml::Table = toml::from_str(s).unwrap();
        let s = load_layers(&t, "f.toml", &[])?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn defaults_keep_everything() {
        let s = load("").unwrap();
        assert_eq!(s.data.retention.policy, RetentionPolicy::KeepAll);
        assert_eq!(s.output.keep_runs, 0);
        assert_eq!(s.output.min_free_mb, DEFAULT_MIN_FREE_MB);
    }

    #[test]
    fn a_budget_is_read_and_checked() {
        let s = load(
            "[data.retention]\npolicy = \"class-balanced\"\nmax_samples = 300\narchive_dir = \"/tmp/arch\"\n[output]\nkeep_runs = 5\n",
        )
        .unwrap();
        assert_eq!(s.data.retention.max_samples, Some(300));
        assert_eq!(s.output.keep_runs, 5);
        let err = |s: &str| load(s).unwrap_err().to_string();
        let e = err("[data.retention]\nmax_samples = 10\n");
        assert!(
            e.contains("data.retention.max_samples") && e.contains("keep-all"),
            "{e}"
        );
        let e = err("[data.retention]\npolicy = \"class-balanced\"\n");
        assert!(
            e.contains("data.retention.policy") && e.contains("budget"),
            "{e}"
        );
        let e = err("[data.retention]\npolicy = \"class-balanced\"\nmax_mb = 0\n");
        assert!(e.contains("data.retention.max_mb"), "{e}");
        let e = err(
            "[data]\ndir = \"/d\"\n[data.retention]\npolicy = \"class-balanced\"\nmax_mb = 5\narchive_dir = \"/d/old\"\n",
        );
        assert!(
            e.contains("data.retention.archive_dir") && e.contains("outside"),
            "{e}"
        );
        let e = err("[data.retention]\npolicy = \"fifo\"\n");
        assert!(e.contains("data.retention.policy"), "{e}");
        let e = err("[data.retention]\nmax_sample = 3\n");
        assert!(
            e.contains("did you mean `data.retention.max_samples`"),
            "{e}"
        );
    }
}
