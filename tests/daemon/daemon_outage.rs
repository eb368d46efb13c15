//! The broker goes away mid-run and comes back: training goes on meanwhile, and
//! after the reconnect a dashboard receives every `metrics` message of the run,
//! in order (none lost; duplicates, if any, removed by step).
//!
//! "Every message" needs the dashboard's persistent session to survive the
//! broker's restart, which only Mosquitto does (rumqttd keeps sessions in
//! memory). On the embedded broker the test checks the rest: training goes on,
//! the run finishes and promotes, what the dashboard gets is in order, nothing
//! is dropped by the daemon.

use std::collections::BTreeSet;

use crate::helpers::*;
use crate::trials::{test, Test};

const MEDIUM: &str = r#"
[model]
hidden = [512, 512]
[train]
max_epochs = 40
[train.early_stopping]
enabled = false
[train.scheduler]
kind = "none"
"#;

fn broker_outage_mid_run_loses_no_metrics() {
    // The dashboard keeps a persistent session, so the broker holds messages for
    // it from the moment it is back, whoever reconnects first.
    let session = format!("dash-outage-{}", rand::random::<u32>());
    let mut h = Harness::start_with(MEDIUM, &[], &[], Some(&session));
    let run_id = h.train("o", r#"{"request_id": "o"}"#);
    let metrics = h.dash.topic("metrics");
    h.wait("two evaluations before the outage", LONG, |m| {
        m.topic == metrics && m.json["epoch"] == 2
    });

    let broker = &mut h.broker;
    broker.stop();
    if broker.keeps_sessions() {
        assert!(
            broker.saved_sessions(),
            "mosquitto must keep the dashboard's session"
        );
    }
    let before = h.env.metrics_lines(&run_id).len();
    // Training goes on without the broker.
    let went_on = eventually(LONG, || {
        let n = h.env.metrics_lines(&run_id).len();
        n >= before + 3 || h.env.run_dir(&run_id).join("summary.json").exists()
    });
    assert!(went_on, "training stalled while the broker was down");
    let during = h.env.metrics_lines(&run_id).len();
    assert!(during > before, "no evaluation while the broker was down");
    h.broker.restart();

    let keeps_sessions = h.broker.keeps_sessions();
    if keeps_sessions {
        h.wait_event("run_finished", Some(&run_id), LONG);
        h.wait_event("model_promoted", Some(&run_id), LONG);
    } else {
        // Events published before the dashboard subscribed again are not kept for it.
        let done = eventually(LONG, || {
            h.env.run_dir(&run_id).join("summary.json").exists()
                && h.env.out.join("current.safetensors").exists()
        });
        assert!(done, "the run did not finish and promote after the outage");
    }
    let lines = h.env.metrics_lines(&run_id);
    assert_eq!(lines.len(), 40, "one evaluation per epoch");
    let want: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    let mut got = Vec::new();
    let mut seen = BTreeSet::new();
    for m in h.dash.on("metrics") {
        assert_eq!(m.run_id(), run_id);
        let step = m.json["step"].as_u64().unwrap();
        if seen.insert(step) {
            got.push(step);
        }
    }
    if keeps_sessions {
        assert_eq!(
            got, want,
            "every metrics message, in order, after dedup by step"
        );
    } else {
        assert!(!got.is_empty(), "no metrics message at all");
        let mut rest = want.iter();
        assert!(
            got.iter().all(|s| rest.any(|w| w == s)),
            "metrics messages out of order or unknown: got {got:?}, run has {want:?}"
        );
    }
    let status = h.dash.topic("status");
    let (_, last) = h.wait("idle", LONG, |m| {
        m.topic == status && m.json["state"] == "idle"
    });
    assert_eq!(last.json["dropped_messages"], 0);
    assert!(h.daemon.log_text().contains("lost the MQTT broker"));
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(broker_outage_mid_run_loses_no_metrics)]
}
