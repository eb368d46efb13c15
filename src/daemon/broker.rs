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

    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: super::mqtt::MAX_PACKET_BYTES,
        max_inflight_count: 100,
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
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
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
