//! After a restart: what a power cut, `kill -9` or a shutdown left behind.
//!
//! - Temporary files of interrupted atomic writes (`.NAME.tmp-PID`, see
//!   [`crate::engine::fsutil::atomic_write`]) in `output.dir` and its run
//!   folders are removed; the file they were to replace is intact.
//! - Runs that were interrupted (a `resume.safetensors` and no `summary.json`)
//!   or cancelled by a daemon shutdown (summary outcome `cancelled`, resume state
//!   kept) are found, to be continued. A run stopped by `cmd/stop` has its resume
//!   state removed when it ends ([`forget`]), so it is not continued.

use std::path::{Path, PathBuf};

use super::messages::ResumeCause;
use crate::config::Settings;
use crate::engine::resume::{self, ResumeMeta, RESUME_FILE};
use crate::engine::trainer::SUMMARY_FILE;

/// A run to continue, or one whose resume state cannot be used.
#[derive(Debug)]
pub struct Interrupted {
    pub run_id: String,
    pub run_dir: PathBuf,
    /// The daemon died (no summary), or a shutdown cancelled the run.
    pub cause: ResumeCause,
    /// The resume state's metadata, or why it cannot be read.
    pub meta: Result<ResumeMeta, String>,
}

impl Interrupted {
    /// The settings the run started with (its run settings, see
    /// [`crate::config::run::RUN_SETTINGS`]) on top of the daemon's own (`base`:
    /// broker, device, folders).
    pub fn settings(&self, base: &Settings) -> Result<Settings, String> {
        let meta = self.meta.as_ref().map_err(Clone::clone)?;
        let stored: Settings = serde_json::from_value(meta.config.clone()).map_err(|e| {
            format!(
                "the resume state of run {} holds settings this version cannot read: {e}",
                self.run_id
            )
        })?;
        stored.run_settings().onto(base).map_err(|e| e.to_string())
    }
}

/// Whether `name` looks like a temporary file of [`crate::engine::fsutil::atomic_write`]
/// whose writer is gone, and so can be removed.
fn is_stale_temp(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    let Some((_, pid)) = rest.rsplit_once(".tmp-") else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    pid == std::process::id() || !Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes stale temporary files in `dir` (not recursive); returns how many.
fn clean_dir(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && is_stale_temp(name) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(file = %entry.path().display(), "removed the temporary file of an interrupted write");
                    n += 1;
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove a stale temporary file")
                }
            }
        }
    }
    n
}

/// Removes temporary files of interrupted atomic writes in `output_dir` and
/// its run folders; returns how many.
pub fn clean_stale_temps(output_dir: &Path) -> usize {
    let mut n = clean_dir(output_dir);
    let runs = output_dir.join("runs");
    n += clean_dir(&runs);
    if let Ok(rd) = std::fs::read_dir(&runs) {
        for entry in rd.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                n += clean_dir(&entry.path());
            }
        }
    }
    n
}

/// The summary's outcome, if the run folder has a readable summary.
fn summary_outcome(run_dir: &Path) -> Option<String> {
    let bytes = std::fs::read(run_dir.join(SUMMARY_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(v.get("outcome")?.as_str()?.to_string())
}

/// Runs under `runs_dir` to continue, oldest first.
pub fn find_interrupted(runs_dir: &Path) -> Vec<Interrupted> {
    let Ok(rd) = std::fs::read_dir(runs_dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let run_dir = entry.path();
        if !run_dir.join(RESUME_FILE).is_file() {
            continue;
        }
        let Some(run_id) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let cause = match summary_outcome(&run_dir).as_deref() {
            None => ResumeCause::Interrupted,
            Some("cancelled") => ResumeCause::Shutdown,
            // Ended for good; the resume state is a leftover.
            Some(_) => continue,
        };
        let meta = match resume::read_meta(&run_dir) {
            Some(Ok(m)) if m.run_id == run_id => Ok(m),
            Some(Ok(m)) => Err(format!(
                "its resume state belongs to run {}, not {run_id}",
                m.run_id
            )),
            Some(Err(e)) => Err(e.to_string()),
            None => continue,
        };
        out.push(Interrupted {
            run_id,
            run_dir,
            cause,
            meta,
        });
    }
    out.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    out
}

/// Drops a run's resume state: it is not to be continued (stopped on purpose,
/// or its state is unusable).
pub fn forget(run_dir: &Path) {
    let path = run_dir.join(RESUME_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!(file = %path.display(), "resume state removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove the resume state")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temp_names() {
        assert!(is_stale_temp(".current.safetensors.tmp-999999999"));
        assert!(is_stale_temp(&format!(
            ".summary.json.tmp-{}",
            std::process::id()
        )));
        assert!(!is_stale_temp("current.safetensors"));
        assert!(!is_stale_temp(".hidden"));
        assert!(!is_stale_temp(".x.tmp-abc"));
        // A live writer (pid 1) keeps its file.
        assert!(!is_stale_temp(".x.tmp-1"));
    }

    #[test]
    fn cleans_only_stale_temps() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("runs/r1");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(d.path().join(".current.safetensors.tmp-999999999"), b"x").unwrap();
        std::fs::write(run.join(".best.safetensors.tmp-999999998"), b"x").unwrap();
        std::fs::write(run.join("best.safetensors"), b"x").unwrap();
        assert_eq!(clean_stale_temps(d.path()), 2);
        assert!(run.join("best.safetensors").is_file());
    }

    #[test]
    fn finds_only_unfinished_runs() {
        let d = tempfile::tempdir().unwrap();
        for (id, summary) in [
            ("a", None),
            ("b", Some("cancelled")),
            ("c", Some("finished")),
        ] {
            let run = d.path().join(id);
            std::fs::create_dir_all(&run).unwrap();
            std::fs::write(run.join(RESUME_FILE), b"not a resume state").unwrap();
            if let Some(o) = summary {
                std::fs::write(run.join(SUMMARY_FILE), format!(r#"{{"outcome":"{o}"}}"#)).unwrap();
            }
        }
        std::fs::create_dir_all(d.path().join("d")).unwrap();
        let found = find_interrupted(d.path());
        let ids: Vec<(&str, ResumeCause)> =
            found.iter().map(|f| (f.run_id.as_str(), f.cause)).collect();
        assert_eq!(
            ids,
            [
                ("a", ResumeCause::Interrupted),
                ("b", ResumeCause::Shutdown)
            ]
        );
        assert!(found.iter().all(|f| f.meta.is_err()));
        forget(&d.path().join("a"));
        assert!(!d.path().join("a").join(RESUME_FILE).exists());
    }
}
