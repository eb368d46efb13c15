//! SIGTERM mid-run, as systemd stops the service: `STOPPING=1`, the run is
//! cancelled after its batch with its best checkpoint intact, the final events
//! and the `offline` status go out, and the process exits 0. Along the way the
//! daemon speaks systemd's notify protocol: `READY=1`, `STATUS=` lines and
//! `WATCHDOG=1` pings at half of `WATCHDOG_USEC`.

use std::time::Duration;

use crate::helpers::*;
use crate::trials::{test, Test};
use edge_trainer::engine::checkpoint;

const SLOW: &str = r#"
[model]
hidden = [1024, 1024]
[train]
max_epochs = 100
eval_every = 1
[train.early_stopping]
enabled = false
[train.scheduler]
kind = "none"
"#;

fn sigterm_mid_run_cancels_publishes_offline_and_exits_zero() {
    let sock_dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::bind(sock_dir.path());
    let vars = [
        ("NOTIFY_SOCKET", notify.path.display().to_string()),
        ("WATCHDOG_USEC", "1000000".to_string()),
    ];
    let mut h = Harness::start_with(SLOW, &[], &vars, None);
    assert!(
        notify.wait(SHORT, |l| l == "READY=1"),
        "READY=1: {:?}",
        notify.lines
    );

    let run_id = h.train("t", r#"{"request_id": "t"}"#);
    h.wait_event("checkpoint_saved", Some(&run_id), LONG);
    assert!(
        notify.wait(SHORT, |l| l.starts_with("STATUS=training")
            && l.contains("broker connected")),
        "STATUS while training: {:?}",
        notify.lines
    );
    assert!(
        notify.wait(SHORT, |l| l == "WATCHDOG=1"),
        "WATCHDOG=1: {:?}",
        notify.lines
    );
    h.daemon.sigterm();
    let status = h.daemon.wait_exit(Duration::from_secs(60));
    let Some(status) = status else {
        h.fail("the daemon to exit after SIGTERM")
    };
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status:?}\n{}",
        h.daemon.log_text()
    );

    let (i_c, c) = h.wait_event("run_cancelled", Some(&run_id), SHORT);
    assert_eq!(c.json["stopped_by"], "shutdown");
    let topic = h.dash.topic("status");
    let (_, off) = h.wait_from(i_c, "offline status", SHORT, |m| {
        m.topic == topic && m.json["state"] == "offline"
    });
    assert_ts(&off);
    // The retained status a dashboard finds later says offline too.
    let port = h.broker.port;
    let mut late = Dashboard::connect(port, &h.env.base_topic(), None);
    let i = late
        .find_from(0, SHORT, |m| m.topic.ends_with("/status"))
        .expect("retained status");
    assert_eq!(late.seen[i].json["state"], "offline");

    let best = h.env.run_dir(&run_id).join("best.safetensors");
    checkpoint::load(&best, &candle_core::Device::Cpu).expect("best checkpoint intact");
    assert_eq!(h.env.summary(&run_id)["outcome"], "cancelled");

    notify.wait(Duration::from_millis(500), |_| false);
    let pings = notify.lines.iter().filter(|l| *l == "WATCHDOG=1").count();
    assert!(pings >= 1, "WATCHDOG=1 pings: {:?}", notify.lines);
    assert!(
        notify.lines.iter().any(|l| l == "STOPPING=1"),
        "{:?}",
        notify.lines
    );
    let ready = notify.lines.iter().position(|l| l == "READY=1").unwrap();
    let stopping = notify.lines.iter().position(|l| l == "STOPPING=1").unwrap();
    assert!(ready < stopping);
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(
        sigterm_mid_run_cancels_publishes_offline_and_exits_zero
    )]
}
