//! The daemon starts, says READY=1 and trains with no broker reachable at all;
//! when a broker appears, everything it had to say is delivered, in order.
//!
//! "Everything" is checked on Mosquitto, which keeps the dashboard's persistent
//! session across its restart; rumqttd forgets it, so on the embedded broker the
//! dashboard may miss what the daemon delivers before it subscribed again, and
//! the test checks that what arrives is in order and that the status comes back.

use std::time::Duration;

use crate::helpers::*;
use crate::trials::{test, Test};

fn trains_without_a_broker_and_delivers_everything_once_one_appears() {
    let port = free_port();
    let env = Env::new(port, "[retrain]\non_start = true\n", &[]);
    // A dashboard with a persistent session on the broker-to-be, which then goes away.
    let session = format!("dash-nobroker-{}", rand::random::<u32>());
    let mut broker = Broker::start(&env.dir.path().join("broker"), port);
    let mut dash = Dashboard::connect(port, &env.base_topic(), Some(&session));
    broker.stop();
    if broker.keeps_sessions() {
        assert!(
            broker.saved_sessions(),
            "mosquitto must keep the dashboard's session"
        );
    }

    let sock_dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::bind(sock_dir.path());
    let mut daemon = Daemon::start(
        &env,
        &[("NOTIFY_SOCKET", notify.path.display().to_string())],
    );
    assert!(
        notify.wait(SHORT, |l| l == "READY=1"),
        "READY=1 without a broker: {:?}",
        notify.lines
    );
    let current = env.out.join("current.safetensors");
    assert!(
        eventually(LONG, || current.exists()),
        "no model trained and promoted without a broker\n{}",
        daemon.log_text()
    );
    assert!(
        notify.wait(SHORT, |l| l.starts_with("STATUS=idle")
            && l.ends_with("broker down")),
        "{:?}",
        notify.lines
    );

    broker.restart();
    let events = dash.topic("events");
    if !broker.keeps_sessions() {
        embedded_broker_delivers_in_order(&mut dash, &env, &mut daemon);
        return;
    }
    let i = dash.find_from(0, LONG, |m| {
        m.topic == events && m.event() == "model_promoted"
    });
    let Some(i_promoted) = i else {
        panic!("model_promoted never delivered\n{}", daemon.log_text())
    };
    let names: Vec<&str> = dash.seen[..=i_promoted]
        .iter()
        .filter(|m| m.topic == events)
        .map(|m| m.event())
        .filter(|e| *e != "checkpoint_saved")
        .collect();
    assert_eq!(
        names,
        [
            "run_started",
            "early_stopped",
            "run_finished",
            "model_promoted"
        ]
    );
    let run_id = dash.seen[i_promoted].run_id().to_string();
    let lines = env.metrics_lines(&run_id);
    let got: Vec<&serde_json::Value> = dash.on("metrics").iter().map(|m| &m.json["step"]).collect();
    let want: Vec<&serde_json::Value> = lines.iter().map(|l| &l["step"]).collect();
    assert_eq!(got, want, "every evaluation, in order");
    let status = dash.topic("status");
    assert!(dash
        .find_from(0, SHORT, |m| m.topic == status && m.json["state"] == "idle")
        .is_some());

    daemon.sigterm();
    let code = daemon.wait_exit(Duration::from_secs(30)).map(|s| s.code());
    assert_eq!(code, Some(Some(0)), "{}", daemon.log_text());
}

/// After the embedded broker's restart: the retained `idle` status arrives, and
/// the events and metrics that do arrive are in the run's order.
fn embedded_broker_delivers_in_order(dash: &mut Dashboard, env: &Env, daemon: &mut Daemon) {
    let status = dash.topic("status");
    assert!(
        dash.find_from(0, LONG, |m| m.topic == status && m.json["state"] == "idle")
            .is_some(),
        "no idle status after the broker came back\n{}",
        daemon.log_text()
    );
    let events = dash.topic("events");
    let names: Vec<&str> = dash
        .seen
        .iter()
        .filter(|m| m.topic == events)
        .map(|m| m.event())
        .filter(|e| *e != "checkpoint_saved")
        .collect();
    let mut order = [
        "run_started",
        "early_stopped",
        "run_finished",
        "model_promoted",
    ]
    .iter();
    assert!(
        names.iter().all(|n| order.any(|o| o == n)),
        "events out of order: {names:?}"
    );
    let run_ids: Vec<&str> = dash.on("metrics").iter().map(|m| m.run_id()).collect();
    if let Some(run_id) = run_ids.first() {
        let want: Vec<serde_json::Value> = env
            .metrics_lines(run_id)
            .iter()
            .map(|l| l["step"].clone())
            .collect();
        let mut rest = want.iter();
        assert!(
            dash.on("metrics")
                .iter()
                .all(|m| rest.any(|w| *w == m.json["step"])),
            "metrics out of order"
        );
    }
    daemon.sigterm();
    let code = daemon.wait_exit(Duration::from_secs(30)).map(|s| s.code());
    assert_eq!(code, Some(Some(0)), "{}", daemon.log_text());
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(
        trains_without_a_broker_and_delivers_everything_once_one_appears
    )]
}
