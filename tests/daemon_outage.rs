//! The broker goes away mid-run and comes back: training goes on meanwhile, and
//! after the reconnect a dashboard receives every `metrics` message of the run,
//! in order (none lost; duplicates, if any, removed by step).

mod common;

use std::collections::BTreeSet;

use common::*;

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

#[test]
fn broker_outage_mid_run_loses_no_metrics() {
    // The dashboard keeps a persistent session, so the broker holds messages for
    // it from the moment it is back, whoever reconnects first.
    let session = format!("dash-outage-{}", rand::random::<u32>());
    let Some(mut h) = Harness::start_with(MEDIUM, &[], &[], Some(&session)) else {
        return;
    };
    let run_id = h.train("o", r#"{"request_id": "o"}"#);
    let metrics = h.dash.topic("metrics");
    h.wait("two evaluations before the outage", LONG, |m| {
        m.topic == metrics && m.json["epoch"] == 2
    });

    let broker = h.broker.as_mut().unwrap();
    broker.stop();
    assert!(
        broker.saved_sessions(),
        "mosquitto must keep the dashboard's session"
    );
    let before = h.env.metrics_lines(&run_id).len();
    // Training goes on without the broker.
    let went_on = eventually(LONG, || {
        let n = h.env.metrics_lines(&run_id).len();
        n >= before + 3 || h.env.run_dir(&run_id).join("summary.json").exists()
    });
    assert!(went_on, "training stalled while the broker was down");
    let during = h.env.metrics_lines(&run_id).len();
    assert!(during > before, "no evaluation while the broker was down");
    h.broker.as_mut().unwrap().restart();

    h.wait_event("run_finished", Some(&run_id), LONG);
    h.wait_event("model_promoted", Some(&run_id), LONG);
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
    assert_eq!(
        got, want,
        "every metrics message, in order, after dedup by step"
    );
    let status = h.dash.topic("status");
    let (_, last) = h.wait("idle", LONG, |m| {
        m.topic == status && m.json["state"] == "idle"
    });
    assert_eq!(last.json["dropped_messages"], 0);
    assert!(h.daemon.log_text().contains("lost the MQTT broker"));
}
