//! The MQTT driver: the only task that polls rumqttc's event loop. It tracks the
//! connection (feeding the outbox's acknowledgements), resubscribes and
//! republishes the status on every connect, forwards commands, and reconnects
//! with capped exponential backoff and jitter. Publishing is the publisher's job.

use std::time::{Duration, Instant};

use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
    StateError, TlsConfiguration, Transport,
};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::commands;
use super::messages;
use super::publisher::Publisher;
use super::DaemonError;
use crate::config::MqttSettings;

/// Largest MQTT packet the client reads or writes. Commands above
/// [`super::commands::MAX_COMMAND_BYTES`] are rejected politely; packets above
/// this make rumqttc drop the connection (answered with `command_rejected` too).
pub const MAX_PACKET_BYTES: usize = 1024 * 1024;

/// First reconnection delay.
const BACKOFF_MIN: Duration = Duration::from_millis(500);

/// A command as it arrived: the last topic level and the raw payload.
#[derive(Debug, Clone)]
pub struct RawCommand {
    pub name: String,
    pub payload: Vec<u8>,
    pub retained: bool,
}

/// Where and how to connect.
pub struct Connection {
    pub options: MqttOptions,
    /// `host:port` for logs.
    pub address: String,
}

/// Builds the client options: client id, keep-alive, last will (`offline`,
/// retained), credentials from `password_file`, TLS from PEM files. Reads the
/// secret files now so that a mistake is reported at start, and never logs them.
pub fn connection(
    settings: &MqttSettings,
    device_id: &str,
    status_topic: &str,
    connect_host: &str,
) -> Result<Connection, DaemonError> {
    let client_id = settings
        .client_id
        .clone()
        .unwrap_or_else(|| format!("edge-trainer-{device_id}"));
    let mut o = MqttOptions::new(client_id, connect_host, settings.port);
    o.set_keep_alive(Duration::from_secs(settings.keep_alive_s.max(5)));
    o.set_clean_session(true);
    o.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    o.set_inflight(100);
    o.set_last_will(LastWill::new(
        status_topic,
        messages::last_will_payload(device_id),
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(user) = &settings.username {
        let password = match &settings.password_file {
            Some(path) => read_password(path)?,
            None => String::new(),
        };
        o.set_credentials(user.clone(), password);
    }
    if let Some(ca_path) = &settings.tls.ca {
        let read = |key: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| {
                DaemonError::Config(format!("{key}: cannot read {}: {e}", p.display()))
            })
        };
        let ca = read("mqtt.tls.ca", ca_path)?;
        let client_auth = match (&settings.tls.client_cert, &settings.tls.client_key) {
            (Some(c), Some(k)) => Some((
                read("mqtt.tls.client_cert", c)?,
                read("mqtt.tls.client_key", k)?,
            )),
            _ => None,
        };
        // rumqttc builds its rustls config with the process-wide crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        o.set_transport(Transport::Tls(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        }));
    }
    Ok(Connection {
        options: o,
        address: format!("{connect_host}:{}", settings.port),
    })
}

fn read_password(path: &std::path::Path) -> Result<String, DaemonError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        DaemonError::Config(format!(
            "mqtt.password_file: cannot read {}: {e}",
            path.display()
        ))
    })?;
    // The first line, without its line ending: `echo secret > file` works.
    Ok(text.lines().next().unwrap_or_default().to_string())
}

/// Exponential backoff with jitter: each delay is drawn from [d/2, d], where d
/// doubles from [`BACKOFF_MIN`] up to the cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Backoff capped at `max`.
    pub fn new(max: Duration) -> Self {
        let max = max.max(BACKOFF_MIN);
        Self {
            next: BACKOFF_MIN,
            max,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let lo = d.as_secs_f64() / 2.0;
        Duration::from_secs_f64(rand::rng().random_range(lo..=d.as_secs_f64()))
    }

    /// Back to the shortest delay (after a successful connection).
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Everything the driver talks to.
pub struct Driver {
    pub eventloop: EventLoop,
    pub client: AsyncClient,
    pub publisher: Publisher,
    pub commands: mpsc::Sender<RawCommand>,
    /// `cmd/stop` and `cmd/status` ([`commands::is_urgent`]), apart from the
    /// train requests so that a flood of those never makes them "busy".
    pub urgent: mpsc::Sender<RawCommand>,
    pub broker_up: watch::Sender<bool>,
    /// Fires when the daemon is done publishing; the driver then ends once the
    /// publisher disconnected (or at once if the broker is down).
    pub finish: CancellationToken,
    pub reconnect_max: Duration,
    pub address: String,
}

impl Driver {
    /// Polls the event loop until the clean disconnect at shutdown.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(self.reconnect_max);
        let mut connected = false;
        let mut down_since = Instant::now();
        let mut failures: u64 = 0;
        let topics = self.publisher.topics().clone();
        // Commands and acknowledgements are small: do not wait for Nagle's timer.
        let mut net = self.eventloop.network_options();
        net.set_tcp_nodelay(true);
        self.eventloop.set_network_options(net);
        loop {
            let polled = if connected {
                // Never cancelled while connected: a half-written packet would be lost.
                self.eventloop.poll().await
            } else {
                tokio::select! {
                    r = self.eventloop.poll() => r,
                    _ = self.finish.cancelled() => break,
                }
            };
            match polled {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    backoff.reset();
                    tracing::info!(
                        broker = %self.address,
                        after_s = format!("{:.1}", down_since.elapsed().as_secs_f64()),
                        "connected to the MQTT broker"
                    );
                    failures = 0;
                    let status = self.publisher.status_message();
                    self.publisher.with_outbox(|o| {
                        o.on_connect();
                        o.push_front(status);
                    });
                    if let Err(e) = self
                        .client
                        .try_subscribe(topics.commands_filter(), QoS::AtLeastOnce)
                    {
                        tracing::error!(error = %e, "cannot subscribe to commands");
                    }
                    // Fleet-wide and group commands (`mqtt.groups`), in one SUBSCRIBE.
                    let fleet = topics
                        .fleet_filters()
                        .into_iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
                    if let Err(e) = self.client.try_subscribe_many(fleet) {
                        tracing::error!(error = %e, "cannot subscribe to fleet commands");
                    }
                    self.broker_up.send_replace(true);
                    self.publisher.wake();
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if self.publisher.with_outbox(|o| o.on_ack(ack.pkid)) {
                        self.publisher.wake();
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    self.publisher.with_outbox(|o| o.on_outgoing(pkid));
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    tracing::info!("disconnected from the MQTT broker");
                    break;
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        tracing::error!(filter = %topics.commands_filter(), "the broker refused the command subscription");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if self.finish.is_cancelled() {
                        continue;
                    }
                    let Some(name) = topics.command_of(&p.topic) else {
                        continue;
                    };
                    let cmd = RawCommand {
                        name: name.to_string(),
                        payload: p.payload.to_vec(),
                        retained: p.retain,
                    };
                    let queue = if commands::is_urgent(&cmd.name) {
                        &self.urgent
                    } else {
                        &self.commands
                    };
                    if let Err(e) = queue.try_send(cmd) {
                        let (cmd, reason) = match e {
                            TrySendError::Full(c) => (
                                c,
                                "the daemon is busy: too many commands are waiting; send it again later",
                            ),
                            TrySendError::Closed(c) => (c, "the daemon is shutting down"),
                        };
                        // Answered with its request id, read cheaply (nothing else is parsed).
                        self.publisher.event(messages::Event::CommandRejected {
                            command: Some(cmd.name),
                            request_id: commands::peek_request_id(&cmd.payload),
                            reason: reason.into(),
                            suppressed: None,
                        });
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.publisher.with_outbox(|o| o.on_disconnect());
                    // Requests handed over after rumqttc's own cleanup would otherwise
                    // be sent after the reconnect, twice; the outbox resends them.
                    self.eventloop.clean();
                    self.broker_up.send_replace(false);
                    if connected {
                        down_since = Instant::now();
                        tracing::warn!(broker = %self.address, error = %e, "lost the MQTT broker; training goes on, messages are kept");
                    } else if failures == 0 || failures.is_power_of_two() {
                        tracing::warn!(broker = %self.address, error = %e, attempts = failures + 1, "cannot reach the MQTT broker; retrying");
                    }
                    connected = false;
                    failures += 1;
                    if let ConnectionError::MqttState(StateError::Deserialization(
                        rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n),
                    )) = &e
                    {
                        self.publisher.event(messages::Event::CommandRejected {
                            command: None,
                            request_id: None,
                            reason: format!("a message of {n} bytes exceeds the {MAX_PACKET_BYTES}-byte packet limit; it was dropped"),
                            suppressed: None,
                        });
                    }
                    if self.finish.is_cancelled() {
                        break;
                    }
                    let delay = backoff.next_delay();
                    tracing::debug!(
                        delay_ms = delay.as_millis() as u64,
                        "reconnecting after a pause"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.finish.cancelled() => break,
                    }
                }
            }
        }
        self.broker_up.send_replace(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(4));
        let mut caps = Vec::new();
        for _ in 0..6 {
            let d = b.next_delay();
            caps.push(d);
        }
        assert!(caps[0] >= Duration::from_millis(250) && caps[0] <= BACKOFF_MIN);
        assert!(caps[1] >= Duration::from_millis(500) && caps[1] <= Duration::from_secs(1));
        for d in &caps[3..] {
            assert!(
                *d >= Duration::from_secs(2) && *d <= Duration::from_secs(4),
                "{d:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= BACKOFF_MIN);
    }
}
