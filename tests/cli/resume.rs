//! Crash and resume: a run killed with SIGKILL (or stopped with SIGINT) and
//! continued with `train --resume` ends with exactly the metrics of the same run
//! left alone: no repeated or skipped steps, the same best model.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::read_json;
use crate::paths::{root, BIN};
use crate::trials::{test, Test};
use serde_json::Value;

/// A run long enough to be interrupted: no early stop, frequent evaluations, dropout on.
fn args(out: &Path) -> Vec<String> {
    [
        "train",
        "--config",
        "configs/demo.toml",
        "--no-progress",
        "--set",
        &format!("output.dir={}", out.display()),
        "--set",
        "train.max_epochs=12",
        "--set",
        "train.eval_every=7",
        "--set",
        "train.early_stopping.enabled=false",
        "--set",
        "train.scheduler.patience=2",
        "--set",
        "model.hidden=[256, 256]",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("elapsed_s");
            o.remove("run_id");
            v
        })
        .collect()
}

fn summary(run_dir: &Path) -> Value {
    read_json(&run_dir.join("summary.json"))
}

fn only_run(runs: &Path) -> Option<PathBuf> {
    std::fs::read_dir(runs)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .next()
}

fn reference() -> (Vec<Value>, Value) {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args(args(tmp.path()))
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = only_run(&tmp.path().join("runs")).unwrap();
    assert!(
        !dir.join("resume.safetensors").exists(),
        "a finished run keeps no resume state"
    );
    (metrics(&dir), summary(&dir))
}

/// Starts the run, interrupts it with `signal` once `lines` evaluations are written,
/// then resumes it; returns the resumed run's folder.
fn interrupted(tmp: &Path, signal: &str, lines: usize) -> PathBuf {
    let mut child = Command::new(BIN)
        .args(args(tmp))
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let dir = loop {
        assert!(Instant::now() < deadline, "no progress within 120 s");
        if let Some(d) = only_run(&tmp.join("runs")) {
            let n = std::fs::read_to_string(d.join("metrics.jsonl"))
                .map(|t| t.lines().count())
                .unwrap_or(0);
            if n >= lines {
                break d;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(
        !dir.join("summary.json").exists() || signal == "-INT",
        "the run finished before it could be killed; make it longer"
    );
    if signal == "-KILL" {
        assert_eq!(status.code(), None, "killed by a signal");
    } else {
        assert_eq!(status.code(), Some(130));
        assert_eq!(summary(&dir)["outcome"], "cancelled");
    }
    assert!(dir.join("resume.safetensors").is_file());

    let o = Command::new(BIN)
        .args(args(tmp))
        .args(["--resume", dir.to_str().unwrap()])
        .current_dir(root())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("resuming run"), "{stderr}");
    assert!(!dir.join("resume.safetensors").exists());
    dir
}

fn assert_same(dir: &Path, reference: &(Vec<Value>, Value)) {
    let got = metrics(dir);
    let steps: Vec<u64> = got.iter().map(|m| m["step"].as_u64().unwrap()).collect();
    let mut sorted = steps.clone();
    sorted.dedup();
    assert_eq!(
        steps, sorted,
        "repeated or unordered steps in metrics.jsonl"
    );
    assert_eq!(got.len(), reference.0.len(), "evaluation count differs");
    assert_eq!(
        got, reference.0,
        "metrics differ from the uninterrupted run"
    );
    let s = summary(dir);
    assert_eq!(s["best"], reference.1["best"]);
    assert_eq!(s["test"]["accuracy"], reference.1["test"]["accuracy"]);
    assert_eq!(s["steps"], reference.1["steps"]);
}

fn sigkill_then_resume_matches_an_uninterrupted_run() {
    let reference = reference();
    for lines in [3, 11] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = interrupted(tmp.path(), "-KILL", lines);
        assert_same(&dir, &reference);
    }
}

fn sigint_then_resume_matches_an_uninterrupted_run() {
    let reference = reference();
    let tmp = tempfile::tempdir().unwrap();
    let dir = interrupted(tmp.path(), "-INT", 5);
    assert_same(&dir, &reference);
}

fn resume_with_a_different_config_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    // Make a real resume state by interrupting a run.
    let dir2 = {
        let mut child = Command::new(BIN)
            .args(args(tmp.path()))
            .current_dir(root())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let d = loop {
            assert!(Instant::now() < deadline);
            let found = std::fs::read_dir(&runs)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.join("resume.safetensors").is_file());
            if let Some(d) = found {
                break d;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let _ = child.kill();
        let _ = child.wait();
        d
    };
    let o = Command::new(BIN)
        .args(args(tmp.path()))
        .args([
            "--set",
            "train.batch_size=32",
            "--resume",
            dir2.to_str().unwrap(),
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("[train] settings differ"), "{err}");
    // The resume state is left for a retry with the right config.
    assert!(dir2.join("resume.safetensors").is_file());
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![
        test!(sigkill_then_resume_matches_an_uninterrupted_run),
        test!(sigint_then_resume_matches_an_uninterrupted_run),
        test!(resume_with_a_different_config_is_refused),
    ]
}
