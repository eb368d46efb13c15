//! Figures for the documentation, not a pass/fail test (ignored by default):
//! idle RSS and CPU of the daemon over a minute, and the time from `cmd/train`
//! to the first `metrics` message on the demo data. Run with
//!   cargo test --release --test daemon daemon_measure -- --ignored --nocapture
//! (`EDGE_TRAINER_IDLE_S` shortens the idle minute).

use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::trials::{test, Test};

fn proc_stat(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    (rss_kb, ticks)
}

fn clk_tck() -> f64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100.0)
}

fn idle(pid: u32, label: &str, secs: u64) {
    let (rss0, t0) = proc_stat(pid);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let (rss1, t1) = proc_stat(pid);
    let cpu = (t1 - t0) as f64 / clk_tck() / start.elapsed().as_secs_f64() * 100.0;
    println!(
        "MEASURE idle {label}: RSS {:.1} MiB -> {:.1} MiB, CPU {cpu:.3}% of one core over {secs} s ({} ticks)",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        t1 - t0
    );
}

fn measure_idle_resources_and_train_to_metrics_latency() {
    let secs: u64 = std::env::var("EDGE_TRAINER_IDLE_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    // The demo's model, training and timer settings (configs/demo-daemon.toml),
    // with an external broker.
    let demo = r#"
[model]
hidden = [128, 64]
dropout = 0.1
[train.optimizer]
lr = 0.001
[train.early_stopping]
patience = 6
[train.scheduler]
patience = 3
[retrain]
rescan_s = 30.0
[mqtt]
keep_alive_s = 30
"#;
    let mut h = Harness::start(demo, &[]);
    let pid = h.daemon.child.id();
    std::thread::sleep(Duration::from_secs(3));
    idle(pid, "before any run", secs);

    let mut latencies = Vec::new();
    for i in 0..5 {
        let metrics = h.dash.topic("metrics");
        let mark = h.dash.seen.len();
        let t0 = Instant::now();
        h.dash.send("train", format!(r#"{{"request_id": "m{i}"}}"#));
        let (_, first) = h.wait_from(mark, "first metrics", LONG, |m| m.topic == metrics);
        latencies.push(t0.elapsed());
        let run_id = first.run_id().to_string();
        h.wait_event("run_finished", Some(&run_id), LONG);
        let status = h.dash.topic("status");
        h.wait_from(mark, "idle", LONG, |m| {
            m.topic == status && m.json["state"] == "idle"
        });
    }
    let ms: Vec<String> = latencies
        .iter()
        .map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0))
        .collect();
    let mut sorted = latencies.clone();
    sorted.sort();
    println!(
        "MEASURE cmd/train -> first metrics: median {:.1} ms (runs: {} ms)",
        sorted[sorted.len() / 2].as_secs_f64() * 1000.0,
        ms.join(", ")
    );
    std::thread::sleep(Duration::from_secs(3));
    idle(pid, "after 5 runs", secs);
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(
        measure_idle_resources_and_train_to_metrics_latency,
        ignored
    )]
}
