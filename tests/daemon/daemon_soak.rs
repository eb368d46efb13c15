//! Soak: many short runs back to back with data arriving and commands flying
//! (status requests, malformed and forbidden commands, train requests that
//! queue and coalesce, the odd `cmd/stop`, a flood of 200 junk commands at
//! QoS 0 during every run). The daemon's resident memory
//! (VmRSS) and open file descriptors are sampled after a warm-up and at the
//! end and must stay flat: fds within +2, RSS within +25% + 16 MiB (allocator
//! and page-cache noise on a busy machine).
//!
//! CI runs 50 runs; the long form: `EDGE_TRAINER_SOAK_RUNS=300 cargo test
//! --release --test daemon daemon_soak -- --nocapture`.

use std::time::{Duration, Instant};

use crate::daemon_flood::Flooder;
use crate::helpers::*;
use crate::paths::root;
use crate::trials::{test, Test};

const SOAK: &str = r#"
[model]
hidden = [16]
[train]
max_epochs = 1
[retrain]
min_new_samples = 0
file_settle_s = 0.1
rescan_s = 0.5
"#;

/// Junk commands flooded during each run.
const FLOOD_PER_RUN: u64 = 200;
/// How long a round's `cmd/train` may go without a `run_started` before it is sent again.
const RESEND_AFTER: Duration = Duration::from_secs(10);

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn many_runs_with_data_and_commands_keep_memory_and_fds_flat() {
    let runs: usize = std::env::var("EDGE_TRAINER_SOAK_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let warm_up = (runs / 8).clamp(3, 20);
    let mut h = Harness::start(SOAK, &["digits-3.safetensors"]);
    let pid = h.daemon.child.id();
    let extra = std::fs::read(root().join("examples/digits/digits-3.safetensors")).unwrap();
    let events = h.dash.topic("events");
    let t0 = Instant::now();
    let mut warm = None;
    let (mut finished, mut cancelled) = (0usize, 0usize);
    let mut flooded = 0u64;
    for i in 0..runs {
        // Data arrives: one of three names, rewritten, so the data set stays bounded.
        std::fs::write(
            h.env.data.join(format!("new-{}.safetensors", i % 3)),
            &extra,
        )
        .unwrap();
        let rid = format!("soak-{i}");
        let from = h.dash.seen.len();
        // Every ninth run is long and gets stopped.
        let stop = i % 9 == 4;
        let overrides = if stop {
            r#""train.max_epochs": 500, "train.early_stopping.enabled": false"#
        } else {
            ""
        };
        let train = format!(r#"{{"request_id": "{rid}", "overrides": {{{overrides}}}}}"#);
        h.dash.send("train", train.clone());
        // Commands flying while it trains.
        h.dash.send("status", r#"{"request_id": "s"}"#);
        h.dash.send("train", "not json");
        h.dash.send("train", r#"{"overrides": {"data.dir": "/"}}"#);
        h.dash.send("bogus", "{}");
        h.dash.send("stop", vec![b'x'; 70_000]);
        let started_for_rid = |m: &Msg| {
            m.topic == events
                && m.event() == "run_started"
                && m.json["request_ids"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(rid.as_str())))
        };
        // The previous round's junk flood may still fill the daemon's command
        // queue, where a valid `cmd/train` is answered "busy" (rate-limited,
        // so possibly unseen): as a client that needs its run does, resend
        // when no run has started for it after a while.
        let deadline = Instant::now() + LONG;
        let started = loop {
            if let Some(i) = h.dash.find_from(from, RESEND_AFTER, started_for_rid) {
                break h.dash.seen[i].clone();
            }
            if Instant::now() > deadline {
                h.fail(&format!("run_started for {rid}"));
            }
            h.dash.send("train", train.clone());
        };
        let run_id = started.run_id().to_string();
        // A junk flood during the run: 200 commands at QoS 0 as fast as the
        // broker takes them (bounded in count and time; never blocks).
        let flood_from = h.dash.seen.len();
        let mut flood = Flooder::start(
            h.broker.port,
            &h.env.base_topic(),
            std::time::Duration::from_secs(10),
            FLOOD_PER_RUN,
            true,
        );
        let sent = flood.wait();
        flooded += sent;
        // The flood is QoS 0 and may still be on its way when the run ends: the
        // next round's `cmd/train` would then meet a queue full of junk and be
        // answered "busy" (rate-limited, so maybe not even that). Go on once the
        // dashboard, subscribed to the same broker, has seen all of it (bounded:
        // a QoS 0 message may be lost).
        let train_topic = h.dash.topic("cmd/train");
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while (h.dash.seen[flood_from..]
            .iter()
            .filter(|m| m.topic == train_topic)
            .count() as u64)
            < sent
            && Instant::now() < deadline
        {
            h.dash.pump(std::time::Duration::from_millis(50));
        }
        if stop {
            h.dash.send("stop", r#"{"request_id": "halt"}"#);
        }
        let (_, end) = h.wait_from(from, &format!("the end of {run_id}"), LONG, |m| {
            m.topic == events
                && matches!(m.event(), "run_finished" | "run_cancelled" | "run_failed")
                && m.run_id() == run_id
        });
        match end.event() {
            "run_finished" => {
                finished += 1;
                h.wait_from(from, "promotion decision", LONG, |m| {
                    m.topic == events
                        && matches!(m.event(), "model_promoted" | "model_kept")
                        && m.run_id() == run_id
                });
            }
            "run_cancelled" if stop => cancelled += 1,
            _ => h.fail(&format!("run {run_id} failed: {}", end.json)),
        }
        // Idle again before the next round (the rejected commands are answered by now).
        h.wait_from(from, "idle", LONG, |m| {
            m.topic.ends_with("/status") && m.json["state"] == "idle"
        });
        // Keep the dashboard's memory bounded too.
        if h.dash.seen.len() > 5000 {
            h.dash.seen.drain(..4000);
        }
        if i + 1 == warm_up {
            warm = Some((vm_rss_kib(pid), open_fds(pid)));
        }
    }
    let (rss0, fds0) = warm.unwrap();
    let (rss1, fds1) = (vm_rss_kib(pid), open_fds(pid));
    println!(
        "daemon_soak: {runs} runs ({finished} finished, {cancelled} cancelled, {flooded} junk commands flooded) in {:.1}s; \
         after {warm_up} runs RSS {} KiB, {fds0} fds; at the end RSS {} KiB, {fds1} fds",
        t0.elapsed().as_secs_f64(),
        rss0,
        rss1
    );
    assert!(
        fds1 <= fds0 + 2,
        "open fds grew from {fds0} to {fds1}: a leak"
    );
    assert!(
        rss1 <= rss0 + rss0 / 4 + 16 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
    h.daemon.sigterm();
    assert!(h.daemon.wait_exit(LONG).is_some_and(|s| s.success()));
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(
        many_runs_with_data_and_commands_keep_memory_and_fds_flat
    )]
}
