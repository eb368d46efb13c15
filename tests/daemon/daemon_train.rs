//! `cmd/train` end to end: the events and metrics a dashboard sees, in order; the
//! files on disk; promotion of a better model and keeping the current one when a
//! candidate is worse; train requests during a run coalescing into one.

use crate::helpers::*;
use crate::trials::{test, Test};
use serde_json::Value;

fn cmd_train_reports_every_evaluation_and_promotes() {
    let mut h = Harness::start("", &[]);
    let (_, first) = h.wait("status", SHORT, |m| m.topic.ends_with("/status"));
    assert_eq!(first.json["state"], "idle");
    assert_eq!(first.json["version"], env!("CARGO_PKG_VERSION"));
    // A dashboard that comes later gets the status at once: it is retained.
    let port = h.broker.port;
    let mut late = Dashboard::connect(port, &h.env.base_topic(), None);
    let i = late.find_from(0, SHORT, |m| m.topic.ends_with("/status"));
    let late_status = &late.seen[i.expect("retained status for a late subscriber")];
    assert!(late_status.retain && late_status.json["state"] == "idle");

    let run_id = h.train(
        "r1",
        r#"{"request_id": "r1", "overrides": {"train.max_epochs": 60}}"#,
    );
    let (i_started, _) = h.wait_event("run_started", Some(&run_id), SHORT);
    let (i_stopped, stopped) = h.wait_event("early_stopped", Some(&run_id), LONG);
    let (i_finished, finished) = h.wait_event("run_finished", Some(&run_id), LONG);
    let (i_promoted, promoted) = h.wait_event("model_promoted", Some(&run_id), LONG);
    let status_topic = h.dash.topic("status");
    let (i_idle, idle) = h.wait_from(i_promoted, "status idle after promotion", LONG, |m| {
        m.topic == status_topic && m.json["state"] == "idle"
    });
    assert!(
        i_started < i_stopped
            && i_stopped < i_finished
            && i_finished < i_promoted
            && i_promoted < i_idle
    );
    assert_eq!(finished.json["outcome"], "early_stopped");
    assert_eq!(stopped.json["monitor"], "val_loss");
    assert_eq!(idle.json["current_model"], run_id.as_str());
    assert!(idle.json.get("run_id").is_none());

    // One metrics message per evaluation, in order, the same as metrics.jsonl.
    let metrics: Vec<Msg> = h.dash.on("metrics").into_iter().cloned().collect();
    let lines = h.env.metrics_lines(&run_id);
    assert!(lines.len() >= 4, "{} evaluations", lines.len());
    assert_eq!(
        metrics.len(),
        lines.len(),
        "one metrics message per evaluation"
    );
    for (i, (m, line)) in metrics.iter().zip(&lines).enumerate() {
        assert_ts(m);
        assert_eq!(m.json["epoch"], i as u64 + 1, "evaluations in order");
        let mut without_ts = m.json.clone();
        without_ts.as_object_mut().unwrap().remove("ts");
        assert_eq!(
            &without_ts, line,
            "metrics message {i} differs from metrics.jsonl"
        );
    }
    let first_metrics = h
        .dash
        .seen
        .iter()
        .position(|m| m.topic.ends_with("/metrics"))
        .unwrap();
    let last_metrics = h
        .dash
        .seen
        .iter()
        .rposition(|m| m.topic.ends_with("/metrics"))
        .unwrap();
    assert!(i_started < first_metrics && last_metrics < i_finished);

    // A checkpoint event for every improvement, before the run ended.
    let saved: Vec<Msg> = h
        .dash
        .on("events")
        .into_iter()
        .filter(|m| m.event() == "checkpoint_saved")
        .cloned()
        .collect();
    let improved = lines.iter().filter(|l| l["improved"] == true).count();
    assert_eq!(saved.len(), improved);
    let best_step = finished.json["best"]["step"].clone();
    assert_eq!(saved.last().unwrap().json["step"], best_step);

    // Every message carries ts; run messages carry run_id.
    for m in h.dash.seen.iter().filter(|m| !m.topic.contains("/cmd/")) {
        assert_ts(m);
        if m.topic.ends_with("/events") || m.topic.ends_with("/metrics") {
            assert_eq!(m.run_id(), run_id, "{}", m.json);
        }
    }

    // Files as INTERFACE.md says.
    let run_dir = h.env.run_dir(&run_id);
    let summary = h.env.summary(&run_id);
    assert_eq!(summary["outcome"], "early_stopped");
    assert_eq!(summary["best"]["step"], best_step);
    let best = std::fs::read(run_dir.join("best.safetensors")).unwrap();
    let current = std::fs::read(h.env.out.join("current.safetensors")).unwrap();
    assert_eq!(best, current, "the promoted model is the run's best");
    assert!(!h.env.out.join("previous.safetensors").exists());
    assert_eq!(promoted.json["current"], Value::Null);
    assert!(promoted.json["candidate"]["accuracy"].as_f64().unwrap() > 0.9);
    assert_eq!(promoted.json["metric"], "accuracy");
}

fn worse_candidate_is_kept_and_current_stays_byte_identical() {
    let mut h = Harness::start("[retrain]\non_start = true\n", &[]);
    let (_, first) = h.wait_event("model_promoted", None, LONG);
    let first_run = first.run_id().to_string();
    let status_topic = h.dash.topic("status");
    h.wait("idle after the first run", LONG, |m| {
        m.topic == status_topic
            && m.json["state"] == "idle"
            && m.json["current_model"] == first_run.as_str()
    });
    let current = h.env.out.join("current.safetensors");
    let before = std::fs::read(&current).unwrap();

    // From scratch, one step at a tiny learning rate: much worse.
    let run_id = h.train(
        "worse",
        r#"{"request_id": "worse", "overrides": {"retrain.warm_start": "scratch", "train.max_steps": 1, "train.lr": 1e-6}}"#,
    );
    let (_, kept) = h.wait_event("model_kept", Some(&run_id), LONG);
    let cand = kept.json["candidate"]["accuracy"].as_f64().unwrap();
    let cur = kept.json["current"]["accuracy"].as_f64().unwrap();
    assert!(cand < cur, "candidate {cand} vs current {cur}");
    assert_eq!(kept.json["current"]["run_id"], first_run.as_str());
    assert_eq!(kept.json["split"], "test");
    assert!(kept.json["reason"].as_str().unwrap().contains("worse"));
    assert!(h
        .dash
        .on("events")
        .iter()
        .all(|m| !(m.event() == "model_promoted" && m.run_id() == run_id)));
    assert_eq!(
        std::fs::read(&current).unwrap(),
        before,
        "current.safetensors must not change"
    );
    assert!(!h.env.out.join("previous.safetensors").exists());
    h.wait("idle after the kept run", LONG, |m| {
        m.topic == status_topic
            && m.json["state"] == "idle"
            && m.json["current_model"] == first_run.as_str()
    });

    // A run at least as good (fine-tuning the current model) is promoted, and the
    // old model becomes previous.safetensors.
    let better = h.train(
        "again",
        r#"{"request_id": "again", "overrides": {"train.lr": 1e-9, "train.max_steps": 1}}"#,
    );
    let (_, p) = h.wait_event("model_promoted", Some(&better), LONG);
    assert_eq!(p.json["current"]["run_id"], first_run.as_str());
    assert_eq!(
        std::fs::read(h.env.out.join("previous.safetensors")).unwrap(),
        before
    );
}

fn train_requests_during_a_run_are_queued_and_coalesce() {
    let mut h = Harness::start("[model]\nhidden = [256, 256]\n", &[]);
    let long = r#""overrides": {"train.max_epochs": 400, "train.early_stopping.enabled": false}"#;
    let first = h.train("a", &format!(r#"{{"request_id": "a", {long}}}"#));
    h.dash.send(
        "train",
        r#"{"request_id": "b", "overrides": {"train.max_epochs": 2}}"#,
    );
    h.dash.send(
        "train",
        r#"{"request_id": "c", "overrides": {"train.max_epochs": 3}}"#,
    );
    let (_, qb) = h.wait("run_queued b", SHORT, |m| {
        m.event() == "run_queued" && m.json["request_id"] == "b"
    });
    let (_, qc) = h.wait("run_queued c", SHORT, |m| {
        m.event() == "run_queued" && m.json["request_id"] == "c"
    });
    assert_eq!(qb.json["coalesced"], false);
    assert_eq!(qc.json["coalesced"], true);
    assert_eq!(qc.json["behind_run_id"], first.as_str());
    let status_topic = h.dash.topic("status");
    h.wait("status with a queued request", SHORT, |m| {
        m.topic == status_topic && m.json["queued"] == 1
    });
    h.dash.send("stop", r#"{"request_id": "stop-a"}"#);
    h.wait_event("run_cancelled", Some(&first), LONG);

    // One more run for b and c together; the later override (c) wins.
    let (_, second) = h.wait("the coalesced run", LONG, |m| {
        m.event() == "run_started" && m.json["request_ids"] == serde_json::json!(["b", "c"])
    });
    let second_id = second.run_id().to_string();
    assert_ne!(second_id, first);
    assert_eq!(second.json["max_epochs"], 3);
    let (i_fin, _) = h.wait_event("run_finished", Some(&second_id), LONG);
    let (i_idle, idle) = h.wait_from(i_fin, "idle after the coalesced run", LONG, |m| {
        m.topic == status_topic && m.json["state"] == "idle"
    });
    assert_eq!(idle.json["queued"], 0);
    let started = h.dash.seen[..i_idle]
        .iter()
        .filter(|m| m.event() == "run_started")
        .count();
    assert_eq!(started, 2, "three requests, two runs");
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![
        test!(cmd_train_reports_every_evaluation_and_promotes),
        test!(worse_candidate_is_kept_and_current_stays_byte_identical),
        test!(train_requests_during_a_run_are_queued_and_coalesce),
    ]
}
