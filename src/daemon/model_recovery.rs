//! After a restart, the model side of recovery:
//!
//! - A corrupt `current.safetensors` (bit rot, a foreign write) would make
//!   every warm-started run fail. It is moved aside to `current.safetensors.corrupt`
//!   and `previous.safetensors` takes its place when that one loads; otherwise
//!   there is no current model and runs start from `model.init` or scratch.
//! - A run that finished (its `summary.json` written) but was killed before its
//!   promotion was decided is promoted (or kept) now. Every decision is recorded
//!   as `promotion.json` in the run folder, so a decided run is never redone.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::messages::Event;
use crate::engine::checkpoint;
use crate::engine::fsutil::atomic_write;
use serde_json::json;

use crate::engine::promote::{Promotion, CURRENT_FILE, PREVIOUS_FILE};
use crate::engine::run::CancelFlag;
use crate::engine::trainer::SUMMARY_FILE;

/// The record of a run's promotion decision, in its run folder.
pub const PROMOTION_FILE: &str = "promotion.json";
/// Where a corrupt current model is moved, under `output.dir`.
pub const CORRUPT_FILE: &str = "current.safetensors.corrupt";

/// What [`repair_current`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Repair {
    /// Why the current model was unusable.
    pub reason: String,
    /// Where it was moved.
    pub moved_to: Option<PathBuf>,
    /// `Some("previous")` when `previous.safetensors` is in service now; `None`
    /// when there is no current model (runs start from `model.init` or scratch).
    pub restored_from: Option<&'static str>,
}

/// Checks that `output_dir/current.safetensors`, if there is one, loads; if it
/// does not, moves it aside and restores `previous.safetensors` when that loads.
/// `None` when there was nothing to repair.
pub fn repair_current(output_dir: &Path) -> Option<Repair> {
    let current = output_dir.join(CURRENT_FILE);
    if !current.exists() {
        return None;
    }
    let reason = match checkpoint::load(&current, &Device::Cpu) {
        Ok(_) => return None,
        Err(e) => e.to_string(),
    };
    let corrupt = output_dir.join(CORRUPT_FILE);
    let moved_to = match std::fs::rename(&current, &corrupt) {
        Ok(()) => Some(corrupt),
        Err(e) => {
            tracing::error!(error = %e, "cannot move the corrupt current model aside");
            if let Err(e) = std::fs::remove_file(&current) {
                tracing::error!(error = %e, "cannot remove the corrupt current model");
                return Some(Repair {
                    reason,
                    moved_to: None,
                    restored_from: None,
                });
            }
            None
        }
    };
    let previous = output_dir.join(PREVIOUS_FILE);
    let mut restored_from = None;
    if checkpoint::load(&previous, &Device::Cpu).is_ok() {
        match std::fs::read(&previous).and_then(|b| atomic_write(&current, &b)) {
            Ok(()) => restored_from = Some("previous"),
            Err(e) => tracing::error!(error = %e, "cannot restore previous.safetensors"),
        }
    }
    tracing::warn!(
        %reason,
        restored_from = restored_from.unwrap_or("none"),
        "the current model was unreadable and was moved aside"
    );
    Some(Repair {
        reason,
        moved_to,
        restored_from,
    })
}

/// Records a run's promotion decision so that a restart does not redo it.
pub fn record_decision(run_dir: &Path, promoted: bool, reason: &str) {
    let body = json!({
        "promoted": promoted,
        "reason": reason,
        "decided": crate::engine::run::now_rfc3339(),
    });
    if let Err(e) = atomic_write(&run_dir.join(PROMOTION_FILE), body.to_string().as_bytes()) {
        tracing::warn!(error = %e, run_dir = %run_dir.display(), "cannot record the promotion decision");
    }
}

/// A finished run whose promotion was never decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Undecided {
    pub run_id: String,
    pub run_dir: PathBuf,
    /// Its best checkpoint, the candidate.
    pub best: PathBuf,
}

/// The newest run under `runs_dir`, if it finished with a best checkpoint and
/// no promotion decision was recorded, and it is not already the model in
/// service (`current_run_id`). Only the newest run is looked at: older runs
/// were overtaken by it.
pub fn find_undecided(runs_dir: &Path, current_run_id: Option<&str>) -> Option<Undecided> {
    let newest = std::fs::read_dir(runs_dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.as_bytes().first().is_some_and(u8::is_ascii_digit))
        .max()?;
    let run_dir = runs_dir.join(&newest);
    if run_dir.join(PROMOTION_FILE).exists() || current_run_id == Some(newest.as_str()) {
        return None;
    }
    let bytes = std::fs::read(run_dir.join(SUMMARY_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    if !matches!(v["outcome"].as_str(), Some("finished" | "early_stopped")) {
        return None;
    }
    let best = PathBuf::from(v["best_checkpoint"].as_str()?);
    let best = if best.is_absolute() || best.exists() {
        best
    } else {
        run_dir.join(best.file_name()?)
    };
    if !best.is_file() {
        return None;
    }
    Some(Undecided {
        run_id: newest,
        run_dir,
        best,
    })
}

/// Decides the promotion of an undecided run now (as the run would have), and
/// records the decision.
pub fn promote_undecided(
    settings: &crate::config::Settings,
    device: &Device,
    u: &Undecided,
    cancel: &CancelFlag,
) -> Result<Promotion, String> {
    let pr = settings
        .run_settings()
        .promote(&u.best, device, cancel)
        .map_err(|e| e.to_string())?;
    record_decision(&u.run_dir, pr.promoted, &pr.reason);
    Ok(pr)
}

/// The `model_recovered` event for a repair.
pub fn event(r: &Repair) -> Event {
    Event::ModelRecovered {
        reason: r.reason.clone(),
        moved_to: r.moved_to.clone(),
        restored_from: r.restored_from,
        action: match r.restored_from {
            Some(_) => "the previous model is in service again",
            None => "no model in service: the next run starts from model.init or scratch",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_current_model_gives_way_to_previous_or_to_none() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path();
        assert_eq!(repair_current(out), None);
        std::fs::write(out.join(CURRENT_FILE), b"garbage, not safetensors").unwrap();
        let r = repair_current(out).unwrap();
        assert_eq!(r.restored_from, None);
        assert!(!out.join(CURRENT_FILE).exists());
        assert!(out.join(CORRUPT_FILE).is_file());
        assert!(!r.reason.is_empty());
        // An unreadable previous model is not restored either.
        std::fs::write(out.join(CURRENT_FILE), b"junk").unwrap();
        std::fs::write(out.join(PREVIOUS_FILE), b"junk too").unwrap();
        assert_eq!(repair_current(out).unwrap().restored_from, None);
    }

    #[test]
    fn only_the_newest_finished_undecided_run_is_found() {
        let t = tempfile::tempdir().unwrap();
        let runs = t.path();
        let mk = |id: &str, outcome: &str| {
            let d = runs.join(id);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("best.safetensors"), b"x").unwrap();
            let s = json!({"outcome": outcome, "best_checkpoint": d.join("best.safetensors")});
            std::fs::write(d.join(SUMMARY_FILE), s.to_string()).unwrap();
            d
        };
        assert_eq!(find_undecided(runs, None), None);
        mk("20261201T000000Z-aaaa", "finished");
        let newest = mk("20261201T000100Z-bbbb", "early_stopped");
        let u = find_undecided(runs, None).unwrap();
        assert_eq!(u.run_id, "20261201T000100Z-bbbb");
        assert_eq!(u.best, newest.join("best.safetensors"));
        assert_eq!(find_undecided(runs, Some("20261201T000100Z-bbbb")), None);
        record_decision(&newest, false, "worse");
        assert_eq!(find_undecided(runs, None), None);
        mk("20261201T000200Z-cccc", "failed");
        assert_eq!(find_undecided(runs, None), None);
    }
}
