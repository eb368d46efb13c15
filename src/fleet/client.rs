//! Connecting to the fleet's broker with the daemon's `[mqtt]` settings (host,
//! port, TLS, credentials; the password and keys are read the daemon's way),
//! and the fleet's topics.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter};

use super::FleetError;
use crate::config::MqttSettings;
use crate::daemon::mqtt;

/// What a device topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    Status,
    Metrics,
    Events,
}

/// The fleet's topics under `{topic_prefix}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetTopics {
    prefix: String,
}

/// Which devices a command goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Device(String),
    Group(String),
    All,
}

impl Target {
    /// Checks a device id or group name the way the daemon's config does.
    pub fn validate(&self) -> Result<(), FleetError> {
        let (what, name) = match self {
            Target::Device(d) => ("--device", d),
            Target::Group(g) => ("--group", g),
            Target::All => return Ok(()),
        };
        if name.is_empty()
            || name.contains(['#', '+', '/'])
            || name.chars().any(char::is_control)
            || name.len() > crate::config::checks::MAX_TOPIC_LEVEL_BYTES
        {
            return Err(FleetError::Usage(format!(
                "{what} {name:?}: must be one topic level (1 to {} bytes, no '/', '#', '+' or control characters)",
                crate::config::checks::MAX_TOPIC_LEVEL_BYTES
            )));
        }
        Ok(())
    }

    /// How the target reads in messages: `device cam-1`, `group line-2`, `all devices`.
    pub fn describe(&self) -> String {
        match self {
            Target::Device(d) => format!("device {d}"),
            Target::Group(g) => format!("group {g}"),
            Target::All => "all devices".into(),
        }
    }
}

impl FleetTopics {
    /// The topics under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// Every device's status, metrics and events.
    pub fn filters(&self) -> Vec<String> {
        ["status", "metrics", "events"]
            .iter()
            .map(|k| format!("{}/+/{k}", self.prefix))
            .collect()
    }

    /// The device and kind of a device topic.
    pub fn parse<'a>(&self, topic: &'a str) -> Option<(&'a str, TopicKind)> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')?;
        let (device, kind) = rest.split_once('/')?;
        let kind = match kind {
            "status" => TopicKind::Status,
            "metrics" => TopicKind::Metrics,
            "events" => TopicKind::Events,
            _ => return None,
        };
        (!device.is_empty()).then_some((device, kind))
    }

    /// The command topic for `target`: the device's own, its group's, or the fleet's.
    pub fn command(&self, target: &Target, name: &str) -> String {
        match target {
            Target::Device(d) => format!("{}/{d}/cmd/{name}", self.prefix),
            Target::Group(g) => format!("{}/group/{g}/cmd/{name}", self.prefix),
            Target::All => format!("{}/fleet/cmd/{name}", self.prefix),
        }
    }
}

/// A connected fleet client: the handle and the event loop to poll.
pub struct Connection {
    pub client: AsyncClient,
    pub eventloop: EventLoop,
    pub topics: FleetTopics,
    /// `host:port` for messages.
    pub address: String,
}

/// Connects with `settings` (a client id of its own, no last will) and
/// subscribes to every device's status, metrics and events. Fails when the
/// broker does not accept the connection within `timeout`.
pub async fn connect(settings: &MqttSettings, timeout: Duration) -> Result<Connection, FleetError> {
    // TLS and credentials exactly as the daemon reads them.
    let daemon = mqtt::connection(settings, "fleet", "unused", &settings.host)
        .map_err(|e| FleetError::Usage(e.to_string()))?;
    let client_id = format!(
        "edge-trainer-fleet-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let mut o = MqttOptions::new(client_id, settings.host.clone(), settings.port);
    o.set_keep_alive(Duration::from_secs(settings.keep_alive_s.max(5)));
    o.set_clean_session(true);
    o.set_max_packet_size(mqtt::MAX_PACKET_BYTES, mqtt::MAX_PACKET_BYTES);
    o.set_transport(daemon.options.transport());
    if let Some(login) = daemon.options.credentials() {
        o.set_credentials(login.username, login.password);
    }
    let (client, mut eventloop) = AsyncClient::new(o, 1024);
    let address = daemon.address;
    let broker_error = |reason: String| FleetError::Broker {
        address: address.clone(),
        reason,
    };
    let connected = tokio::time::timeout(timeout, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| broker_error(format!("no answer within {:.0} s", timeout.as_secs_f64())))?;
    connected.map_err(broker_error)?;
    let topics = FleetTopics::new(&settings.topic_prefix);
    let filters = topics
        .filters()
        .into_iter()
        .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce));
    client
        .try_subscribe_many(filters)
        .map_err(|e| broker_error(e.to_string()))?;
    Ok(Connection {
        client,
        eventloop,
        topics,
        address,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_parse_and_address() {
        let t = FleetTopics::new("site/et/");
        assert_eq!(
            t.filters(),
            ["site/et/+/status", "site/et/+/metrics", "site/et/+/events"]
        );
        assert_eq!(
            t.parse("site/et/cam-1/metrics"),
            Some(("cam-1", TopicKind::Metrics))
        );
        assert_eq!(t.parse("site/et/cam-1/cmd/train"), None);
        assert_eq!(t.parse("site/other/cam-1/status"), None);
        assert_eq!(t.parse("site/et//status"), None);
        assert_eq!(
            t.command(&Target::Device("d".into()), "train"),
            "site/et/d/cmd/train"
        );
        assert_eq!(
            t.command(&Target::Group("g".into()), "stop"),
            "site/et/group/g/cmd/stop"
        );
        assert_eq!(
            t.command(&Target::All, "status"),
            "site/et/fleet/cmd/status"
        );
    }

    #[test]
    fn targets_are_single_topic_levels() {
        assert!(Target::Device("cam-1".into()).validate().is_ok());
        for bad in ["", "a/b", "a+", "#", "a\u{1}"] {
            let e = Target::Group(bad.into()).validate().unwrap_err();
            assert!(e.to_string().contains("--group"), "{e}");
        }
    }
}
