//! The embedded broker (`mqtt.embedded_broker = true`): rumqttd hosted in-process on
//! `mqtt.host:mqtt.port`, so a device without a broker, or a newcomer, still gets
//! an MQTT endpoint to watch with `mosquitto_sub`. Its threads live as long as the
//! process; the daemon connects to it like to any other broker.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::DaemonError;

/// Where a client on this machine reaches a broker listening on `listen`.
pub fn local_address(listen: SocketAddr) -> SocketAddr {
    let mut a = listen;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    a
}

/// Clients (MQTT-connected) the broker serves at once: far more than a device
/// needs (the daemon and a few operators), so that a crowd of idle clients does
/// not lock an operator out, and few enough that the process keeps file
/// descriptors to spare under the usual limit of 1024.
pub const MAX_CONNECTIONS: usize = 256;
/// A TCP connection must send its MQTT CONNECT within this time, or it is closed
/// (half-open connections do not pile up).
pub const CONNECT_TIMEOUT_MS: u16 = 5_000;
/// Unacknowledged QoS 1 messages per client.
pub const MAX_INFLIGHT: usize = 64;
/// Messages waiting to be written to one client.
pub const MAX_OUTGOING_PER_CLIENT: u64 = 100;
/// Each topic keeps at most this many segments of recent messages in memory…
pub const SEGMENTS_PER_TOPIC: usize = 2;
/// …of about this size each (a segment is closed once it reaches it), so a
/// topic holds at most 2 × (64 KiB + one message) whatever is published to it.
pub const SEGMENT_BYTES: usize = 64 * 1024;

/// The broker's settings: limits above, payloads up to the daemon's own largest
/// packet ([`super::mqtt::MAX_PACKET_BYTES`]).
pub fn config(listen: SocketAddr, credentials: Option<(String, String)>) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: CONNECT_TIMEOUT_MS,
        max_payload_size: super::mqtt::MAX_PACKET_BYTES,
        max_inflight_count: MAX_INFLIGHT,
        auth: credentials.map(|(u, p)| HashMap::from([(u, p)])),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "embedded-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: MAX_CONNECTIONS,
            max_outgoing_packet_count: MAX_OUTGOING_PER_CLIENT,
            max_segment_size: SEGMENT_BYTES,
            max_segment_count: SEGMENTS_PER_TOPIC,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

/// Starts the broker on `host:port` and waits until it accepts connections.
/// `credentials`: clients must log in with this user and password.
pub fn start(
    host: &str,
    port: u16,
    credentials: Option<(String, String)>,
) -> Result<SocketAddr, DaemonError> {
    let listen = (host, port)
        .to_socket_addrs()
        .map_err(|e| DaemonError::Broker(format!("cannot resolve mqtt.host {host:?}: {e}")))?
        .next()
        .ok_or_else(|| DaemonError::Broker(format!("mqtt.host {host:?} resolves to no address")))?;
    // rumqttd only logs a failed bind from its own thread: check it here first.
    TcpListener::bind(listen).map_err(|e| {
        DaemonError::Broker(format!("cannot host the embedded broker on {listen}: {e}"))
    })?;

    let config = config(listen, credentials);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the embedded MQTT broker stopped");
            }
        })
        .map_err(|e| {
            DaemonError::Broker(format!("cannot start the embedded broker thread: {e}"))
        })?;

    let target = local_address(listen);
    let t0 = Instant::now();
    while TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(DaemonError::Broker(format!(
                "the embedded broker does not accept connections on {listen}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(%listen, "embedded MQTT broker listening");
    Ok(listen)
}

/// `edge-trainer broker`: hosts the broker on `host:port` (no credentials) in the
/// foreground until SIGTERM or SIGINT, then returns (the process exit ends it).
/// The tests use it as a broker they can stop and restart.
pub fn serve_until_signal(host: &str, port: u16) -> Result<(), DaemonError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    // Installed before the broker starts, so that an early signal is not lost.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| DaemonError::Broker(format!("cannot install signal handlers: {e}")))?;
    let listen = start(host, port, None)?;
    println!("{}", local_address(listen));
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "stopping the broker");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_leave_room_for_operators() {
        let c = config("127.0.0.1:1883".parse().unwrap(), None);
        assert!(c.router.max_connections >= 4 * 64);
        assert!(c.router.max_segment_size * c.router.max_segment_count <= 256 * 1024);
        let server = &c.v4.as_ref().unwrap()["1"];
        assert_eq!(
            server.connections.max_payload_size,
            super::super::mqtt::MAX_PACKET_BYTES
        );
        assert!(server.connections.connection_timeout_ms <= 10_000);
    }

    /// 80 idle MQTT clients (the issue locked operators out with 64) and 50
    /// half-open TCP connections: an operator still connects.
    #[test]
    fn an_operator_connects_past_a_crowd_of_idle_clients() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = start("127.0.0.1", port, None).unwrap();
        let half_open: Vec<TcpStream> = (0..50)
            .map(|_| TcpStream::connect(local_address(addr)).unwrap())
            .collect();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let connect = |id: String| async move {
                let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
                o.set_keep_alive(Duration::from_secs(60));
                let (client, mut ev) = rumqttc::AsyncClient::new(o, 10);
                let acked = tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        match ev.poll().await {
                            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                                return true
                            }
                            Ok(_) => {}
                            Err(_) => return false,
                        }
                    }
                })
                .await
                .unwrap_or(false);
                // Keep the connection alive in the background.
                tokio::spawn(async move { while ev.poll().await.is_ok() {} });
                (client, acked)
            };
            let mut idle = Vec::new();
            for i in 0..80 {
                let (c, ok) = connect(format!("idle-{i}")).await;
                assert!(ok, "idle client {i} could not connect");
                idle.push(c);
            }
            let (_op, ok) = connect("operator".into()).await;
            assert!(ok, "the operator is locked out");
        });
        drop(half_open);
    }
}
