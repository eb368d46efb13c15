//! Crash safety of the daemon: `kill -9` at many random moments (training,
//! checkpoint and resume-state writes, promotion, data intake), a restart each
//! time. After every kill the files on disk are checked: every model at an
//! expected name loads (`current.safetensors` also with `edge-trainer eval`),
//! every summary and metrics line parses, every data file the test dropped is
//! still there; after every restart the interrupted run is continued
//! (`run_resumed`), and in the end a run finishes and a model is promoted, with
//! continuous metrics (no repeated or skipped evaluation steps).
//!
//! `EDGE_TRAINER_CRASH_KILLS=100` raises the number of kill points (default 22).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::paths::{root, BIN};
use crate::trials::{test, Test};
use edge_trainer::engine::{checkpoint, resume};
use rand::Rng;

const CRASH: &str = r#"
[model]
hidden = [256, 256]
[train]
max_epochs = 200
[train.early_stopping]
enabled = false
[train.scheduler]
kind = "none"
"#;

/// A long run: an evaluation (and so a resume state and often a checkpoint)
/// every 4 steps.
const TRAIN: &str =
    r#"{"request_id": "crash", "overrides": {"train.max_epochs": 12, "train.eval_every": 4}}"#;

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                all_files(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

/// Every file at an expected name under `out` is complete.
fn check_output(out: &Path, bin_config: &Path, last_current: &mut Option<Vec<u8>>) {
    let mut files = Vec::new();
    all_files(out, &mut files);
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue; // a temporary file of an interrupted write
        }
        if name == "resume.safetensors" {
            resume::load(f, &candle_core::Device::Cpu)
                .unwrap_or_else(|e| panic!("half-written resume state {}: {e}", f.display()));
        } else if name.ends_with(".safetensors") {
            checkpoint::load(f, &candle_core::Device::Cpu)
                .unwrap_or_else(|e| panic!("half-written model {}: {e}", f.display()));
        } else if name == "summary.json" {
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(f).unwrap())
                .unwrap_or_else(|e| panic!("half-written {}: {e}", f.display()));
        } else if name == "metrics.jsonl" {
            for (i, line) in std::fs::read_to_string(f).unwrap().lines().enumerate() {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|e| panic!("{} line {}: {e}: {line}", f.display(), i + 1));
            }
        }
    }
    // The model in service: loads in-process each time, and with `edge-trainer eval`
    // whenever it changed.
    let current = out.join("current.safetensors");
    if let Ok(bytes) = std::fs::read(&current) {
        if last_current.as_ref() != Some(&bytes) {
            let st = Command::new(BIN)
                .args(["eval", "--config"])
                .arg(bin_config)
                .arg("--checkpoint")
                .arg(&current)
                .arg("--json")
                .output()
                .unwrap();
            assert!(
                st.status.success(),
                "edge-trainer eval on current.safetensors: {}",
                String::from_utf8_lossy(&st.stderr)
            );
            *last_current = Some(bytes);
        }
    }
}

/// A run that a restart will continue: resume state and no finished summary.
fn pending_run(out: &Path) -> Option<String> {
    let rd = std::fs::read_dir(out.join("runs")).ok()?;
    rd.flatten()
        .filter(|e| e.path().join("resume.safetensors").is_file())
        .filter(|e| {
            std::fs::read(e.path().join("summary.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_none_or(|v| v["outcome"] == "cancelled")
        })
        .map(|e| e.file_name().to_string_lossy().to_string())
        .max()
}

fn kill9(d: &mut Daemon) {
    signal(d.child.id(), "KILL");
    assert!(d.wait_exit(SHORT).is_some(), "the daemon did not die");
}

/// Waits until the restarted daemon answers `cmd/status` (two live statuses
/// after `from`: the one it publishes on connecting, then an answer).
fn wait_commandable(h: &mut Harness, from: usize) {
    let t0 = Instant::now();
    loop {
        h.dash.send("status", "{}");
        let live = |m: &Msg| m.topic.ends_with("/status") && m.json["state"] != "offline";
        h.dash
            .find_from(from, Duration::from_millis(500), |_| false);
        if h.dash.seen[from.min(h.dash.seen.len())..]
            .iter()
            .filter(|m| live(m))
            .count()
            >= 2
        {
            return;
        }
        if t0.elapsed() > LONG {
            h.fail("the restarted daemon answering cmd/status");
        }
    }
}

fn sigkill_at_random_moments_loses_nothing_and_the_run_finishes() {
    let mut h = Harness::start(CRASH, &["digits-3.safetensors"]);
    let target: usize = std::env::var("EDGE_TRAINER_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(22);
    let t0 = Instant::now();
    let mut rng = rand::rng();
    let extra = std::fs::read(root().join("examples/digits/digits-3.safetensors")).unwrap();
    let mut dropped: BTreeMap<PathBuf, usize> = BTreeMap::new();
    let mut last_current = None;
    let events = h.dash.topic("events");

    h.train("crash", TRAIN);
    let mut kills = 0usize;
    let mut trains_sent = 1usize;
    let mut resumed_seen = 0usize;
    let mut from = h.dash.seen.len();
    while kills < target {
        // Let it work for a random while; sometimes drop a data file just before.
        let wait = Duration::from_millis(rng.random_range(150..2500));
        if rng.random_bool(0.4) {
            std::thread::sleep(wait / 2);
            let name = h.env.data.join(format!("new-{kills}.safetensors"));
            // Written in place (not renamed): the watcher waits for it to settle.
            std::fs::write(&name, &extra).unwrap();
            dropped.insert(name, extra.len());
            std::thread::sleep(Duration::from_millis(rng.random_range(0..400)));
        } else {
            std::thread::sleep(wait);
        }
        kill9(&mut h.daemon);
        kills += 1;

        check_output(&h.env.out, &h.env.config, &mut last_current);
        for (f, len) in &dropped {
            let m = std::fs::metadata(f)
                .unwrap_or_else(|e| panic!("data file {} lost: {e}", f.display()));
            assert!(m.len() as usize <= *len);
        }

        let pending = pending_run(&h.env.out);
        // The broker's last will for the killed daemon: what it published is in.
        let status = h.dash.topic("status");
        let here = h.dash.seen.len();
        h.dash.find_from(here, Duration::from_secs(3), |m| {
            m.topic == status && m.json["state"] == "offline"
        });
        from = from.max(h.dash.seen.len());
        h.daemon = Daemon::start(&h.env, &[]);
        match pending {
            Some(run_id) => {
                let (i, _) = h.wait_from(from, "run_resumed after the restart", LONG, |m| {
                    m.topic == events && m.event() == "run_resumed" && m.run_id() == run_id
                });
                resumed_seen += 1;
                from = i + 1;
            }
            None => {
                // Killed before the run's first evaluation, or between runs: ask again,
                // once the new daemon answers commands (its session is clean).
                wait_commandable(&mut h, from);
                h.dash.send("train", TRAIN);
                trains_sent += 1;
                from = h.dash.seen.len();
            }
        }
    }
    let kill_phase = t0.elapsed();

    // No more kills: the run in progress (or a last one) finishes and is promoted or kept.
    let finished = h.wait_from(from, "run_finished after the last restart", LONG, |m| {
        m.topic == events && m.event() == "run_finished"
    });
    let run_id = finished.1.run_id().to_string();
    h.wait_from(from, "model_promoted/model_kept", LONG, |m| {
        m.topic == events
            && matches!(m.event(), "model_promoted" | "model_kept")
            && m.run_id() == run_id
    });
    h.dash.pump_now();
    assert!(
        h.dash
            .on("events")
            .iter()
            .any(|m| m.event() == "model_promoted"),
        "no model was ever promoted"
    );
    assert!(resumed_seen > 0, "no restart continued a run");
    check_output(&h.env.out, &h.env.config, &mut last_current);
    assert!(last_current.is_some(), "no current.safetensors at the end");

    // Continuous metrics: each evaluation step once, in order.
    let steps: Vec<u64> = h
        .env
        .metrics_lines(&run_id)
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "metrics of {run_id} repeat or go back: {steps:?}"
    );
    // Every data file dropped is still there, complete.
    for (f, len) in &dropped {
        assert_eq!(std::fs::metadata(f).unwrap().len() as usize, *len);
    }
    // No temporary files of killed writers are left.
    let mut files = Vec::new();
    all_files(&h.env.out, &mut files);
    let own = format!(".tmp-{}", h.daemon.child.id());
    let stale: Vec<_> = files
        .iter()
        .filter(|f| {
            let n = f.file_name().unwrap().to_string_lossy();
            n.starts_with('.') && n.contains(".tmp-") && !n.ends_with(&own)
        })
        .collect();
    assert!(stale.is_empty(), "stale temporary files: {stale:?}");
    println!(
        "daemon_crash: {kills} kill points survived in {:.1}s ({resumed_seen} restarts continued a run, {} train requests, {} data files dropped while killing); run {run_id} finished with {} evaluations",
        kill_phase.as_secs_f64(),
        trains_sent,
        dropped.len(),
        steps.len()
    );
}

/// A run cancelled by a shutdown (SIGTERM) is continued after the restart; a run
/// stopped with `cmd/stop` is not (its resume state is gone).
fn sigterm_run_is_resumed_but_cmd_stop_run_is_not() {
    let mut h = Harness::start(CRASH, &[]);
    let events = h.dash.topic("events");
    let run_id = h.train("crash", TRAIN);
    h.wait_event("checkpoint_saved", Some(&run_id), LONG);
    h.daemon.sigterm();
    assert!(h.daemon.wait_exit(LONG).is_some_and(|s| s.success()));
    assert_eq!(h.env.summary(&run_id)["outcome"], "cancelled");
    assert!(h.env.run_dir(&run_id).join("resume.safetensors").is_file());

    let from = h.dash.seen.len();
    h.daemon = Daemon::start(&h.env, &[]);
    let (_, resumed) = h.wait_from(from, "run_resumed after SIGTERM", LONG, |m| {
        m.topic == events && m.event() == "run_resumed"
    });
    assert_eq!(resumed.run_id(), run_id);
    assert_eq!(resumed.json["cause"], "shutdown");
    assert!(resumed.json["step"].as_u64().unwrap() > 0);
    h.wait_from(from, "the resumed run_started", LONG, |m| {
        m.topic == events && m.event() == "run_started" && m.run_id() == run_id
    });

    h.dash.send("stop", r#"{"request_id": "halt"}"#);
    let (i, _) = h.wait_from(from, "run_cancelled by cmd/stop", LONG, |m| {
        m.topic == events
            && m.event() == "run_cancelled"
            && m.run_id() == run_id
            && m.json["stopped_by"] == "cmd/stop"
    });
    h.wait_from(i, "idle", LONG, |m| {
        m.topic.ends_with("/status") && m.json["state"] == "idle"
    });
    assert!(!h.env.run_dir(&run_id).join("resume.safetensors").exists());
    h.daemon.sigterm();
    assert!(h.daemon.wait_exit(LONG).is_some_and(|s| s.success()));
    let status = h.dash.topic("status");
    h.wait_from(i, "offline", LONG, |m| {
        m.topic == status && m.json["state"] == "offline"
    });

    let from = h.dash.seen.len();
    h.daemon = Daemon::start(&h.env, &[]);
    wait_commandable(&mut h, from);
    h.dash.pump_now();
    assert!(
        !h.dash.seen[from..]
            .iter()
            .any(|m| m.event() == "run_resumed" || m.event() == "run_started"),
        "a run stopped with cmd/stop was continued"
    );
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![
        test!(sigkill_at_random_moments_loses_nothing_and_the_run_finishes),
        test!(sigterm_run_is_resumed_but_cmd_stop_run_is_not),
    ]
}
