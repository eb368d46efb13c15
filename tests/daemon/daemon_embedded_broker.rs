//! `mqtt.embedded_broker = true`: the daemon hosts its own broker, which an
//! outside client (a dashboard, `mosquitto_sub`) can use. Needs no Mosquitto.

use std::time::Duration;

use crate::helpers::*;
use crate::trials::{test, Test};

fn embedded_broker_serves_external_clients() {
    let port = free_port();
    let env = Env::new(port, "[mqtt]\nembedded_broker = true\n", &[]);
    let mut daemon = Daemon::start(&env, &[]);
    let mut dash = Dashboard::connect(port, &env.base_topic(), None);
    let status = dash.topic("status");
    let Some(i) = dash.find_from(0, SHORT, |m| m.topic == status) else {
        panic!("no status from the embedded broker\n{}", daemon.log_text())
    };
    assert_eq!(dash.seen[i].json["state"], "idle");

    dash.send("train", r#"{"request_id": "emb"}"#);
    let events = dash.topic("events");
    let promoted = dash.find_from(0, LONG, |m| {
        m.topic == events && m.event() == "model_promoted"
    });
    let Some(p) = promoted else {
        panic!(
            "no model_promoted over the embedded broker\n{}",
            daemon.log_text()
        )
    };
    let run_id = dash.seen[p].run_id().to_string();
    assert!(!dash.on("metrics").is_empty());
    assert!(dash
        .find_from(p, SHORT, |m| m.topic == status && m.json["state"] == "idle")
        .is_some());
    assert!(env.run_dir(&run_id).join("best.safetensors").is_file());

    // A client that connects later gets the retained status.
    let mut late = Dashboard::connect(port, &env.base_topic(), None);
    let j = late
        .find_from(0, SHORT, |m| m.topic == status)
        .expect("retained status");
    assert!(late.seen[j].retain);

    daemon.sigterm();
    let code = daemon.wait_exit(Duration::from_secs(30)).map(|s| s.code());
    assert_eq!(code, Some(Some(0)), "{}", daemon.log_text());
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(embedded_broker_serves_external_clients)]
}
