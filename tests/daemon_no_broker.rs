//! The daemon starts, says READY=1 and trains with no broker reachable at all;
//! when a broker appears, everything it had to say is delivered, in order.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn trains_without_a_broker_and_delivers_everything_once_one_appears() {
    let Some(bin) = mosquitto() else { return };
    let port = free_port();
    let env = Env::new(port, "[retrain]\non_start = true\n", &[]);
    // A dashboard with a persistent session on the broker-to-be, which then goes away.
    let session = format!("dash-nobroker-{}", rand::random::<u32>());
    let mut broker = Mosquitto::start(&bin, &env.dir.path().join("broker"), port);
    let mut dash = Dashboard::connect(port, &env.base_topic(), Some(&session));
    broker.stop();
    assert!(
        broker.saved_sessions(),
        "mosquitto must keep the dashboard's session"
    );

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
