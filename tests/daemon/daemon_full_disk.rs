//! A full disk under the daemon: `output.dir` is a tiny tmpfs (mounted in a
//! private mount namespace with `unshare -rm`, the daemon exec'd inside it),
//! with room for the run's best checkpoint but not for its resume state. The
//! run fails with `run_failed` naming the error, `current.safetensors` stays
//! byte-identical, and the daemon goes on answering commands.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::helpers::*;
use crate::paths::BIN;
use crate::trials::{test, Test, UNSHARE};

fn enospc_in_the_daemon_fails_the_run_keeps_the_model_and_serves_commands() {
    // Needs `unshare -rm` with a tmpfs mount: see `tests()`.
    let port = free_port();
    // A model of ~80 KB: its resume state (model, two Adam moments, best) is ~320 KB.
    let env = Env::new(
        port,
        // The disk guard would refuse the run up front (daemon_retention tests
        // that); this is a disk that fills during the run.
        "[model]\nhidden = [256]\n[retrain]\nwarm_start = \"current\"\n[output]\ndisk_guard = false\n",
        &[],
    );
    let _broker = Broker::start(&env.dir.path().join("broker"), port);
    let mut dash = Dashboard::connect(port, &env.base_topic(), None);

    // A model in service, made beforehand by a foreground run.
    let staging = env.dir.path().join("staging");
    let o = Command::new(BIN)
        .args(["train", "--no-progress", "--config"])
        .arg(&env.config)
        .arg("--set")
        .arg(format!("output.dir={}", staging.display()))
        .args(["--set", "train.max_epochs=2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    let model = std::fs::read(PathBuf::from(run).join("best.safetensors")).unwrap();
    let current_src = env.dir.path().join("current.safetensors");
    std::fs::write(&current_src, &model).unwrap();

    // Room for current and the best checkpoint, not for the resume state.
    let size_k = model.len() / 1024 + 4 + 150;
    let log = env.dir.path().join("daemon.log");
    let script = format!(
        r#"set -eu
mkdir -p "{out}"
mount -t tmpfs -o size={size_k}k tmpfs "{out}"
cp "{cur}" "{out}/current.safetensors"
exec "{bin}" run --config "{cfg}""#,
        out = env.out.display(),
        cur = current_src.display(),
        bin = BIN,
        cfg = env.config.display(),
    );
    let child = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .current_dir(env.dir.path())
        .env("EDGE_TRAINER_LOG", "info,edge_trainer=debug")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = Daemon { child, log };
    let pid = daemon.child.id();
    // The daemon's view of its output folder.
    let inside = |name: &str| {
        PathBuf::from(format!("/proc/{pid}/root"))
            .join(env.out.strip_prefix("/").unwrap())
            .join(name)
    };
    let status = dash.topic("status");
    let events = dash.topic("events");
    let fail = |dash: &Dashboard, d: &Daemon, what: &str| -> ! {
        let seen: Vec<String> = dash
            .seen
            .iter()
            .map(|m| format!("  {} {}", m.topic, String::from_utf8_lossy(&m.raw)))
            .collect();
        panic!(
            "timed out waiting for {what}\n{}\n--- daemon log:\n{}",
            seen.join("\n"),
            d.log_text()
        )
    };
    if dash
        .find_from(0, SHORT, |m| m.topic == status && m.json["state"] == "idle")
        .is_none()
    {
        fail(&dash, &daemon, "the daemon's idle status");
    }

    dash.send("train", r#"{"request_id": "full"}"#);
    let Some(i) = dash.find_from(0, LONG, |m| {
        m.topic == events && matches!(m.event(), "run_failed" | "run_finished")
    }) else {
        fail(&dash, &daemon, "the run's end");
    };
    let ended = dash.seen[i].clone();
    assert_eq!(ended.event(), "run_failed", "{}", ended.json);
    let reason = ended.json["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("No space left on device"),
        "the reason names the error: {reason}"
    );
    // The model in service is untouched, and nothing half-written lies next to it.
    assert_eq!(std::fs::read(inside("current.safetensors")).unwrap(), model);
    let leftovers: Vec<String> = std::fs::read_dir(inside(""))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(
        !dash.seen.iter().any(|m| m.event() == "model_promoted"),
        "nothing may be promoted"
    );

    // Still serving: a status request is answered, a bad command is rejected.
    let from = dash.seen.len();
    dash.send("status", r#"{"request_id": "after"}"#);
    if dash
        .find_from(from, SHORT, |m| {
            m.topic == status && m.json["state"] == "idle"
        })
        .is_none()
    {
        fail(&dash, &daemon, "a status answer after the failed run");
    }
    dash.send("train", r#"{"overrides": {"output.dir": "/tmp"}}"#);
    if dash
        .find_from(from, SHORT, |m| {
            m.topic == events
                && m.event() == "command_rejected"
                && m.json["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("`output.dir` cannot be overridden remotely"))
        })
        .is_none()
    {
        fail(&dash, &daemon, "command_rejected for output.dir");
    }
    daemon.sigterm();
    assert!(daemon.wait_exit(SHORT).is_some_and(|s| s.success()));
    println!("daemon_full_disk: run_failed with \"{reason}\"; current.safetensors unchanged; commands still served");
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![
        test!(enospc_in_the_daemon_fails_the_run_keeps_the_model_and_serves_commands)
            .needs(UNSHARE),
    ]
}
