//! The publishing side of MQTT: a cloneable [`Publisher`] handle that every part of
//! the daemon uses to queue `status`, `metrics` and `events` messages into the
//! [`Outbox`], and the publisher task, the only task that hands messages to the
//! MQTT client. It never blocks: a full client queue just waits for the next wake.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::messages::{self, Event};
pub use super::messages::{State, StatusInfo};
use super::outbox::{Kind, Message, Outbox};
use crate::engine::run::Metrics;

/// The daemon's topics: `{topic_prefix}/{device_id}/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    base: String,
}

impl Topics {
    /// Topics under `{prefix}/{device_id}`.
    pub fn new(prefix: &str, device_id: &str) -> Self {
        Self {
            base: format!("{}/{device_id}", prefix.trim_end_matches('/')),
        }
    }

    /// `…/status` (retained).
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }

    /// `…/metrics`.
    pub fn metrics(&self) -> String {
        format!("{}/metrics", self.base)
    }

    /// `…/events`.
    pub fn events(&self) -> String {
        format!("{}/events", self.base)
    }

    /// The subscription filter for commands: `…/cmd/+`.
    pub fn commands_filter(&self) -> String {
        format!("{}/cmd/+", self.base)
    }

    /// The command name of a topic under `…/cmd/`, if it is one.
    pub fn command_of<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic
            .strip_prefix(self.base.as_str())
            .and_then(|rest| rest.strip_prefix("/cmd/"))
    }
}

struct Shared {
    outbox: Mutex<Outbox>,
    status: Mutex<StatusInfo>,
    wake: Notify,
    topics: Topics,
    device_id: String,
}

/// Queues messages for the broker; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

/// Messages a client may hand to rumqttc before the first is acknowledged.
pub const WINDOW: usize = 32;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Publisher {
    /// A publisher for `topics` whose outbox holds about `capacity` messages.
    pub fn new(topics: Topics, device_id: &str, capacity: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                outbox: Mutex::new(Outbox::new(capacity, WINDOW)),
                status: Mutex::new(StatusInfo::default()),
                wake: Notify::new(),
                topics,
                device_id: device_id.to_string(),
            }),
        }
    }

    /// The daemon's topics.
    pub fn topics(&self) -> &Topics {
        &self.shared.topics
    }

    /// Runs `f` on the outbox under its lock.
    pub fn with_outbox<R>(&self, f: impl FnOnce(&mut Outbox) -> R) -> R {
        f(&mut lock(&self.shared.outbox))
    }

    /// Wakes the publisher task.
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// Waits until a message was queued since the last wait (tests stand in
    /// for the publisher task, which is the only other waiter).
    #[cfg(test)]
    pub(crate) async fn pushed(&self) {
        self.shared.wake.notified().await;
    }

    fn push(&self, msg: Message) {
        self.with_outbox(|o| o.push(msg));
        self.wake();
    }

    /// Queues an `events` message (its payload is built by [`Event::payload`]).
    pub fn event(&self, event: Event) {
        tracing::debug!(event = event.name(), "queued event");
        self.push(Message {
            topic: self.shared.topics.events(),
            payload: event.payload(),
            retain: false,
            kind: event.kind(),
        });
    }

    /// Queues a `metrics` message.
    pub fn metrics(&self, m: &Metrics) {
        self.push(Message {
            topic: self.shared.topics.metrics(),
            payload: messages::metrics_payload(m),
            retain: false,
            kind: Kind::Metrics,
        });
    }

    /// A copy of the current status.
    pub fn status_info(&self) -> StatusInfo {
        lock(&self.shared.status).clone()
    }

    /// Changes the status and publishes it.
    pub fn update_status(&self, f: impl FnOnce(&mut StatusInfo)) {
        f(&mut lock(&self.shared.status));
        self.publish_status();
    }

    /// Publishes the status as it is now (retained).
    pub fn publish_status(&self) {
        let msg = self.status_message();
        self.push(msg);
    }

    /// The retained status message as it is now.
    pub fn status_message(&self) -> Message {
        let info = self.status_info();
        let dropped = self.with_outbox(|o| o.dropped());
        Message {
            topic: self.shared.topics.status(),
            payload: messages::status_payload(&info, &self.shared.device_id, dropped),
            retain: true,
            kind: Kind::Status,
        }
    }

    /// Hands every message the outbox allows to the client.
    fn pump(&self, client: &AsyncClient) {
        let mut outbox = lock(&self.shared.outbox);
        while let Some(msg) = outbox.next_to_send() {
            if let Err(e) = client.try_publish(msg.topic, QoS::AtLeastOnce, msg.retain, msg.payload)
            {
                tracing::debug!(error = %e, "the MQTT client queue is full; retrying later");
                outbox.unsubmit_last();
                break;
            }
        }
    }
}

/// The publisher task: hands queued messages to the client whenever woken. Once
/// `finish` fires it drains the outbox (up to `drain_timeout`, and only while
/// the broker is reachable), then disconnects cleanly.
pub async fn run(
    publisher: Publisher,
    client: AsyncClient,
    finish: CancellationToken,
    drain_timeout: Duration,
) {
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        publisher.pump(&client);
        if finish.is_cancelled() {
            let now = tokio::time::Instant::now();
            let until = *deadline.get_or_insert(now + drain_timeout);
            let (empty, connected, left) =
                publisher.with_outbox(|o| (o.is_empty(), o.is_connected(), o.len()));
            if empty || !connected || now >= until {
                if !empty {
                    tracing::warn!(
                        unsent = left,
                        connected,
                        "shutting down with messages the broker has not acknowledged"
                    );
                }
                if connected {
                    if let Err(e) = client.try_disconnect() {
                        tracing::debug!(error = %e, "cannot queue the MQTT disconnect");
                    }
                }
                return;
            }
        }
        let sleep_until =
            deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = publisher.shared.wake.notified() => {}
            _ = finish.cancelled(), if deadline.is_none() => {}
            _ = tokio::time::sleep_until(sleep_until), if deadline.is_some() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn topics_and_command_names() {
        let t = Topics::new("edge-trainer", "dev1");
        assert_eq!(t.status(), "edge-trainer/dev1/status");
        assert_eq!(t.commands_filter(), "edge-trainer/dev1/cmd/+");
        assert_eq!(t.command_of("edge-trainer/dev1/cmd/train"), Some("train"));
        assert_eq!(t.command_of("edge-trainer/dev2/cmd/train"), None);
        assert_eq!(t.command_of("edge-trainer/dev1/status"), None);
    }

    #[test]
    fn status_payload_has_version_and_state() {
        let p = Publisher::new(Topics::new("p", "d"), "d", 10);
        p.update_status(|s| {
            s.state = State::Training;
            s.run_id = Some("r1".into());
        });
        let msg = p.status_message();
        assert!(msg.retain);
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(v["state"], "training");
        assert_eq!(v["run_id"], "r1");
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        assert!(v.get("current_model").is_none());
    }
}
