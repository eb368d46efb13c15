//! The publishing side of MQTT: a cloneable [`Publisher`] handle that every part of
//! the daemon uses to queue `status`, `metrics` and `events` messages into the
//! [`Outbox`], and the publisher task, the only task that hands messages to the
//! MQTT client. It never blocks: a full client queue just waits for the next wake.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use serde_json::Value;
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
    /// `{prefix}`, for the fleet's broadcast and group commands.
    prefix: String,
    /// `mqtt.groups`.
    groups: Vec<String>,
}

impl Topics {
    /// Topics under `{prefix}/{device_id}`.
    pub fn new(prefix: &str, device_id: &str) -> Self {
        let prefix = prefix.trim_end_matches('/');
        Self {
            base: format!("{prefix}/{device_id}"),
            prefix: prefix.to_string(),
            groups: Vec::new(),
        }
    }

    /// The same topics, also obeying the commands of these fleet groups.
    pub fn with_groups(mut self, groups: &[String]) -> Self {
        self.groups = groups.to_vec();
        self
    }

    /// The fleet's command filters besides the device's own:
    /// `{prefix}/fleet/cmd/+` and `{prefix}/group/{name}/cmd/+` for each group.
    pub fn fleet_filters(&self) -> Vec<String> {
        let mut out = vec![format!("{}/fleet/cmd/+", self.prefix)];
        for g in &self.groups {
            out.push(format!("{}/group/{g}/cmd/+", self.prefix));
        }
        out
    }

    /// The command name of a fleet-wide or group command topic addressed to
    /// this device (one of [`Topics::fleet_filters`]).
    fn fleet_command_of<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')?;
        if let Some(name) = rest.strip_prefix("fleet/cmd/") {
            return Some(name);
        }
        let (group, name) = rest.strip_prefix("group/")?.split_once("/cmd/")?;
        self.groups.iter().any(|g| g == group).then_some(name)
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
    /// Fleet-wide and group commands count as the device's own.
    pub fn command_of<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic
            .strip_prefix(self.base.as_str())
            .and_then(|rest| rest.strip_prefix("/cmd/"))
            .or_else(|| self.fleet_command_of(topic))
    }
}

/// Most `command_rejected` events published one by one in a second; the rest
/// of that second's rejections are summed up in one `command_rejected` with
/// `suppressed` once the second is over.
pub const REJECTIONS_PER_SECOND: u32 = 20;

const REJECTION_WINDOW: Duration = Duration::from_secs(1);

/// Counts `command_rejected` events per one-second window.
#[derive(Debug, Default)]
struct RejectionLimit {
    window_start: Option<tokio::time::Instant>,
    sent: u32,
    suppressed: u64,
}

impl RejectionLimit {
    /// The summary of the window that ended, if it suppressed any.
    fn close_if_over(&mut self, now: tokio::time::Instant) -> Option<Event> {
        let over = self
            .window_start
            .is_none_or(|start| now >= start + REJECTION_WINDOW);
        if !over {
            return None;
        }
        self.window_start = None;
        self.sent = 0;
        let n = std::mem::take(&mut self.suppressed);
        (n > 0).then(|| Event::CommandRejected {
            command: None,
            request_id: None,
            reason: format!(
                "{n} more commands were rejected within one second; a flood is not answered one by one (at most {REJECTIONS_PER_SECOND} a second)"
            ),
            suppressed: Some(n),
        })
    }

    /// Whether one more rejection may be published now, plus the summary of
    /// the window before, if one is due.
    fn admit(&mut self, now: tokio::time::Instant) -> (bool, Option<Event>) {
        let summary = self.close_if_over(now);
        self.window_start.get_or_insert(now);
        if self.sent < REJECTIONS_PER_SECOND {
            self.sent += 1;
            (true, summary)
        } else {
            self.suppressed += 1;
            (false, summary)
        }
    }

    /// When the pending summary is due, if one is pending.
    fn due(&self) -> Option<tokio::time::Instant> {
        match (self.window_start, self.suppressed) {
            (Some(start), n) if n > 0 => Some(start + REJECTION_WINDOW),
            _ => None,
        }
    }
}

struct Shared {
    rejections: Mutex<RejectionLimit>,
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
                rejections: Mutex::new(RejectionLimit::default()),
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
    /// `command_rejected` events are rate-limited ([`REJECTIONS_PER_SECOND`]).
    pub fn event(&self, event: Event) {
        if matches!(event, Event::CommandRejected { .. }) {
            let now = tokio::time::Instant::now();
            let (admit, summary) = lock(&self.shared.rejections).admit(now);
            if let Some(s) = summary {
                self.push_event(s);
            }
            if !admit {
                tracing::debug!("command_rejected suppressed: too many this second");
                return;
            }
        }
        self.push_event(event);
    }

    /// Publishes the summary of suppressed rejections once its second is over.
    pub fn flush_rejections(&self) {
        let now = tokio::time::Instant::now();
        let summary = lock(&self.shared.rejections).close_if_over(now);
        if let Some(s) = summary {
            self.push_event(s);
        }
    }

    /// When [`Publisher::flush_rejections`] has a summary to publish.
    fn rejections_due(&self) -> Option<tokio::time::Instant> {
        lock(&self.shared.rejections).due()
    }

    fn push_event(&self, event: Event) {
        tracing::debug!(event = event.name(), "queued event");
        if let Some(n) = super::fleet_status::note(&event) {
            // Published with the next status change (every run end has one).
            let mut s = lock(&self.shared.status);
            if let Some(last) = n.last_run {
                s.last_run = Some(last);
            }
            if let (Some((run_id, promoted)), Some(last)) = (n.promoted, s.last_run.as_mut()) {
                if last.run_id == run_id {
                    last.promoted = Some(promoted);
                }
            }
            if let Some(score) = n.score {
                s.current_score = Some(score);
            }
        }
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

    /// Answers a `cmd/status`: the status as it is now; with the command's
    /// `request_id` when it had one, as a message of its own (not retained,
    /// [`Kind::Answer`]: a newer status does not replace it, nor a flood of
    /// command answers push it out), else republished (retained).
    pub fn answer_status(&self, request_id: Option<Value>) {
        let Some(id) = request_id else {
            return self.publish_status();
        };
        let info = self.status_info();
        let dropped = self.with_outbox(|o| o.dropped());
        self.push(Message {
            topic: self.shared.topics.status(),
            payload: messages::status_answer_payload(&info, &self.shared.device_id, dropped, &id),
            retain: false,
            kind: Kind::Answer,
        });
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
        publisher.flush_rejections();
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
        let summary_at = publisher.rejections_due();
        tokio::select! {
            _ = publisher.shared.wake.notified() => {}
            _ = finish.cancelled(), if deadline.is_none() => {}
            _ = tokio::time::sleep_until(sleep_until), if deadline.is_some() => {}
            _ = tokio::time::sleep_until(summary_at.unwrap_or(sleep_until)), if summary_at.is_some() => {}
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
        // Fleet-wide commands always; group commands only for its groups.
        assert_eq!(t.command_of("edge-trainer/fleet/cmd/stop"), Some("stop"));
        assert_eq!(t.command_of("edge-trainer/group/a/cmd/train"), None);
        let t = t.with_groups(&["a".into(), "line-2".into()]);
        assert_eq!(
            t.fleet_filters(),
            [
                "edge-trainer/fleet/cmd/+",
                "edge-trainer/group/a/cmd/+",
                "edge-trainer/group/line-2/cmd/+"
            ]
        );
        assert_eq!(
            t.command_of("edge-trainer/group/a/cmd/train"),
            Some("train")
        );
        assert_eq!(
            t.command_of("edge-trainer/group/line-2/cmd/status"),
            Some("status")
        );
        assert_eq!(t.command_of("edge-trainer/group/b/cmd/train"), None);
        assert_eq!(t.command_of("other/fleet/cmd/train"), None);
        assert_eq!(t.command_of("edge-trainer/group/a/status"), None);
    }

    fn events_of(p: &Publisher) -> Vec<Value> {
        p.with_outbox(|o| {
            o.on_connect();
            let mut out = Vec::new();
            while let Some(m) = o.next_to_send() {
                o.on_outgoing(1);
                o.on_ack(1);
                out.push(serde_json::from_slice(&m.payload).unwrap());
            }
            out
        })
    }

    fn rejection(id: u64) -> Event {
        Event::CommandRejected {
            command: Some("train".into()),
            request_id: Some(Value::from(id)),
            reason: "junk".into(),
            suppressed: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejection_flood_is_summed_up_once_a_second() {
        let p = Publisher::new(Topics::new("p", "d"), "d", 10_000);
        for i in 0..1000 {
            p.event(rejection(i));
        }
        let first = events_of(&p);
        assert_eq!(first.len(), REJECTIONS_PER_SECOND as usize);
        assert_eq!(first[0]["request_id"], 0);
        // Nothing more until the second is over; then one summary.
        p.flush_rejections();
        assert!(events_of(&p).is_empty());
        tokio::time::advance(Duration::from_millis(1001)).await;
        p.flush_rejections();
        let summary = events_of(&p);
        assert_eq!(summary.len(), 1, "{summary:?}");
        let n = 1000 - REJECTIONS_PER_SECOND as u64;
        assert_eq!(summary[0]["suppressed"], n);
        assert_eq!(summary[0]["event"], "command_rejected");
        assert!(summary[0]["reason"]
            .as_str()
            .unwrap()
            .contains(&n.to_string()));
        // A new second answers one by one again.
        p.event(rejection(5000));
        assert_eq!(events_of(&p)[0]["request_id"], 5000);
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
