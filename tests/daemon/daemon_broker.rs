//! `edge-trainer broker`, the embedded broker as its own process (what the
//! daemon tests use where Mosquitto is not installed): it serves MQTT clients,
//! exits 0 on SIGTERM, frees its port, and starts again on the same port.
//! Runs everywhere (it needs no Mosquitto), so CI covers it too.

use crate::helpers::*;
use crate::trials::{test, Test};

fn broker_command_serves_stops_on_sigterm_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut broker = Broker::start_embedded(&dir.path().join("broker"), port);
    assert_eq!(broker.name(), "embedded");
    assert!(!broker.keeps_sessions());
    let mut dash = Dashboard::connect(port, "et/broker-test", None);
    let echo = dash.topic("cmd/ping");

    dash.send("ping", "1");
    assert!(
        dash.find_from(0, SHORT, |m| m.topic == echo && m.raw == b"1")
            .is_some(),
        "no message through the broker"
    );

    let status = broker.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "`edge-trainer broker` did not exit 0 on SIGTERM: {status:?}"
    );
    assert!(
        eventually(SHORT, || std::net::TcpStream::connect(("127.0.0.1", port))
            .is_err()),
        "the port is still open after the broker stopped"
    );

    broker.restart();
    // The dashboard reconnects and subscribes again by itself.
    let from = dash.seen.len();
    let got = eventually(SHORT, || {
        dash.send("ping", "2");
        dash.find_from(from, std::time::Duration::from_millis(300), |m| {
            m.topic == echo && m.raw == b"2"
        })
        .is_some()
    });
    assert!(got, "no message through the restarted broker");
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(broker_command_serves_stops_on_sigterm_and_restarts)]
}
