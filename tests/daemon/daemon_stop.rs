//! `cmd/stop` mid-run: the run is cancelled within a few batches, its best
//! checkpoint stays intact, nothing is promoted, and the daemon goes back to idle.

use std::time::Instant;

use crate::helpers::*;
use crate::trials::{test, Test};
use edge_trainer::engine::checkpoint;

/// Slow enough batches (a wide MLP) and an evaluation after every step.
pub const SLOW: &str = r#"
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

fn cmd_stop_cancels_within_a_few_batches_and_keeps_the_best_checkpoint() {
    let mut h = Harness::start(SLOW, &[]);
    let run_id = h.train("long", r#"{"request_id": "long"}"#);
    let metrics = h.dash.topic("metrics");
    let (i3, _) = h.wait("three evaluations", LONG, |m| {
        m.topic == metrics && m.json["step"] == 3
    });
    let (_, ck) = h.wait_event("checkpoint_saved", Some(&run_id), LONG);
    let _ = (i3, ck);
    h.dash.pump_now();
    let last_seen = h
        .dash
        .on("metrics")
        .iter()
        .filter_map(|m| m.json["step"].as_u64())
        .max()
        .unwrap();

    let t0 = Instant::now();
    h.dash.send("stop", r#"{"request_id": "halt"}"#);
    let (i_c, c) = h.wait_event("run_cancelled", Some(&run_id), SHORT);
    let waited = t0.elapsed();
    let steps = c.json["steps"].as_u64().unwrap();
    eprintln!(
        "cancelled at step {steps}, {} steps after the last evaluation seen before the stop, {waited:?} after it was sent",
        steps - last_seen
    );
    assert!(
        steps <= last_seen + 40,
        "cancelled at step {steps}, last evaluation seen before the stop at {last_seen}"
    );
    assert!(steps < 100 * 20, "the run must not have run to its end");
    assert!(waited.as_secs() < 20, "cancel took {waited:?}");
    assert_eq!(c.json["outcome"], "cancelled");
    assert_eq!(c.json["stopped_by"], "cmd/stop");
    assert_eq!(c.json["stop_request_id"], "halt");
    assert!(c.json["reason"].as_str().unwrap().contains("cmd/stop"));

    // The best checkpoint is intact and is the last one announced.
    let saved: Vec<Msg> = h
        .dash
        .on("events")
        .into_iter()
        .filter(|m| m.event() == "checkpoint_saved")
        .cloned()
        .collect();
    let last_saved = saved.last().unwrap();
    let best = h.env.run_dir(&run_id).join("best.safetensors");
    let ck = checkpoint::load(&best, &candle_core::Device::Cpu).expect("best checkpoint loads");
    assert_eq!(ck.meta.run_id, run_id);
    assert_eq!(serde_json::json!(ck.meta.step), last_saved.json["step"]);
    let summary = h.env.summary(&run_id);
    assert_eq!(summary["outcome"], "cancelled");
    assert_eq!(summary["best"]["step"], last_saved.json["step"]);

    // Not promoted; idle again.
    let status = h.dash.topic("status");
    let (_, idle) = h.wait_from(i_c, "idle after the stop", SHORT, |m| {
        m.topic == status && m.json["state"] == "idle"
    });
    assert!(idle.json.get("current_model").is_none());
    assert!(!h.env.out.join("current.safetensors").exists());
    assert!(h
        .dash
        .seen
        .iter()
        .all(|m| m.event() != "model_promoted" && m.event() != "model_kept"));
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(
        cmd_stop_cancels_within_a_few_batches_and_keeps_the_best_checkpoint
    )]
}
