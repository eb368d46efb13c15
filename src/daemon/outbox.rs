//! The daemon's own outbox. rumqttc forgets what it had queued when a clean
//! session breaks, so every message waits here until the broker acknowledges it
//! (PUBACK) and is sent again, in order, after a reconnect. Bounded: when full,
//! the oldest `metrics` go first, then the oldest informational events; lifecycle
//! events and the latest status are never dropped. Pure data structure: the MQTT
//! driver and the publisher task drive it under one lock.

use std::collections::VecDeque;

/// What a message is, for the drop policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The retained `status`: a newer one supersedes any not yet sent.
    Status,
    /// Answers to commands (`command_rejected`, `run_queued`): dropped before
    /// anything else, and never make room for themselves by evicting another kind,
    /// so a flood of junk commands cannot push out a run's metrics.
    Reply,
    /// The answer to a `cmd/status` (a status with its `request_id`): dropped
    /// only to make room for metrics and events or another answer, never for
    /// a [`Kind::Reply`], so a flood of train requests cannot drop it.
    Answer,
    /// One evaluation; dropped first when the outbox is full.
    Metrics,
    /// `data_*` and other informational events; dropped after metrics.
    Info,
    /// Run and model lifecycle events; never dropped.
    Lifecycle,
}

impl Kind {
    fn droppable(self) -> bool {
        matches!(
            self,
            Kind::Reply | Kind::Answer | Kind::Metrics | Kind::Info
        )
    }

    /// The kinds a message of this kind may evict to make room, in eviction order.
    fn evicts(self) -> &'static [Kind] {
        match self {
            Kind::Reply => &[Kind::Reply],
            Kind::Answer => &[Kind::Reply, Kind::Answer],
            Kind::Metrics => &[Kind::Reply, Kind::Answer, Kind::Metrics],
            Kind::Info | Kind::Lifecycle | Kind::Status => {
                &[Kind::Reply, Kind::Answer, Kind::Metrics, Kind::Info]
            }
        }
    }
}

/// One message for the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting to be handed to the client.
    Queued,
    /// Handed to the client; its packet id is not known yet.
    Submitted,
    /// Written to the network with this packet id; waiting for PUBACK.
    InFlight(u16),
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    msg: Message,
    state: State,
}

/// Messages not yet acknowledged by the broker, oldest first.
#[derive(Debug)]
pub struct Outbox {
    entries: VecDeque<Entry>,
    capacity: usize,
    window: usize,
    next_seq: u64,
    dropped: u64,
    /// Sequence numbers handed to the client, in hand-over order.
    submitted: VecDeque<u64>,
    connected: bool,
    over_capacity_warned: bool,
}

impl Outbox {
    /// An outbox holding about `capacity` messages, with at most `window`
    /// unacknowledged at the client at once.
    pub fn new(capacity: usize, window: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            capacity: capacity.max(1),
            window: window.max(1),
            next_seq: 0,
            dropped: 0,
            submitted: VecDeque::new(),
            connected: false,
            over_capacity_warned: false,
        }
    }

    /// Messages waiting (queued or in flight).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether every message was acknowledged.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Messages dropped because the outbox was full, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Whether the link to the broker is up (set by the MQTT driver).
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    fn in_flight(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.state != State::Queued)
            .count()
    }

    /// Appends a message, applying the drop policy when full.
    pub fn push(&mut self, msg: Message) {
        self.push_at(msg, false);
    }

    /// Puts a message before every queued one (the status sent on connect).
    pub fn push_front(&mut self, msg: Message) {
        self.push_at(msg, true);
    }

    fn push_at(&mut self, msg: Message, front: bool) {
        // Never hold a message the client would refuse (and resend for ever).
        let msg = super::bounded::fit(msg, super::mqtt::MAX_PACKET_BYTES);
        if msg.kind == Kind::Status {
            // Only the newest status matters; one not yet handed over is replaced.
            self.entries
                .retain(|e| !(e.msg.kind == Kind::Status && e.state == State::Queued));
        }
        if self.entries.len() >= self.capacity && !self.make_room(msg.kind) {
            if msg.kind.droppable() {
                self.dropped += 1;
                return;
            }
            if !self.over_capacity_warned {
                self.over_capacity_warned = true;
                tracing::warn!(
                    capacity = self.capacity,
                    "the outbox is full of lifecycle events; holding them anyway"
                );
            }
        }
        let entry = Entry {
            seq: self.next_seq,
            msg,
            state: State::Queued,
        };
        self.next_seq += 1;
        if front {
            // In front of every queued entry, behind those already handed over.
            let pos = self
                .entries
                .iter()
                .position(|e| e.state == State::Queued)
                .unwrap_or(self.entries.len());
            self.entries.insert(pos, entry);
        } else {
            self.entries.push_back(entry);
        }
    }

    /// Drops the oldest queued command answer, else the oldest queued metrics
    /// message, else the oldest queued info event, as far as `incoming` may
    /// evict them. Returns whether one was dropped.
    fn make_room(&mut self, incoming: Kind) -> bool {
        for &kind in incoming.evicts() {
            if let Some(pos) = self
                .entries
                .iter()
                .position(|e| e.msg.kind == kind && e.state == State::Queued)
            {
                self.entries.remove(pos);
                self.dropped += 1;
                return true;
            }
        }
        false
    }

    /// The next message to hand to the client, if connected and the window allows;
    /// it is marked as handed over.
    pub fn next_to_send(&mut self) -> Option<Message> {
        if !self.connected || self.in_flight() >= self.window {
            return None;
        }
        let entry = self.entries.iter_mut().find(|e| e.state == State::Queued)?;
        entry.state = State::Submitted;
        self.submitted.push_back(entry.seq);
        Some(entry.msg.clone())
    }

    /// Un-hands the last message handed over (the client refused it).
    pub fn unsubmit_last(&mut self) {
        if let Some(seq) = self.submitted.pop_back() {
            if let Some(e) = self.entries.iter_mut().find(|e| e.seq == seq) {
                e.state = State::Queued;
            }
        }
    }

    /// The client wrote a publish with packet id `pkid`: it is the oldest handed-over one.
    pub fn on_outgoing(&mut self, pkid: u16) {
        let Some(seq) = self.submitted.pop_front() else {
            tracing::debug!(pkid, "outgoing publish not from the outbox");
            return;
        };
        if let Some(e) = self.entries.iter_mut().find(|e| e.seq == seq) {
            e.state = State::InFlight(pkid);
        }
    }

    /// The broker acknowledged `pkid`; returns whether a message was released.
    pub fn on_ack(&mut self, pkid: u16) -> bool {
        match self
            .entries
            .iter()
            .position(|e| e.state == State::InFlight(pkid))
        {
            Some(pos) => {
                self.entries.remove(pos);
                true
            }
            None => false,
        }
    }

    /// The link came up: sending may start.
    pub fn on_connect(&mut self) {
        self.connected = true;
        self.reset_in_flight();
    }

    /// The link broke: everything not acknowledged is queued again, in order.
    pub fn on_disconnect(&mut self) {
        self.connected = false;
        self.reset_in_flight();
    }

    fn reset_in_flight(&mut self) {
        self.submitted.clear();
        for e in &mut self.entries {
            e.state = State::Queued;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kind: Kind, n: u32) -> Message {
        Message {
            topic: format!("t/{n}"),
            payload: n.to_string().into_bytes(),
            retain: false,
            kind,
        }
    }

    fn drain(o: &mut Outbox) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(msg) = o.next_to_send() {
            out.push(msg.topic);
        }
        out
    }

    #[test]
    fn an_oversized_message_is_queued_as_a_summary_that_fits_a_packet() {
        let mut o = Outbox::new(10, 5);
        let big = format!(
            r#"{{"event":"data_rejected","reason":"{}"}}"#,
            "x".repeat(3 << 20)
        );
        o.push(Message {
            topic: "t/e".into(),
            payload: big.into_bytes(),
            retain: false,
            kind: Kind::Info,
        });
        o.on_connect();
        let sent = o.next_to_send().unwrap();
        assert!(sent.payload.len() < crate::daemon::mqtt::MAX_PACKET_BYTES);
        let v: serde_json::Value = serde_json::from_slice(&sent.payload).unwrap();
        assert_eq!(v["truncated"], true);
        assert_eq!(v["event"], "data_rejected");
    }

    #[test]
    fn nothing_leaves_while_disconnected() {
        let mut o = Outbox::new(10, 5);
        o.push(m(Kind::Metrics, 1));
        assert!(o.next_to_send().is_none());
        o.on_connect();
        assert_eq!(o.next_to_send().map(|x| x.topic), Some("t/1".into()));
    }

    #[test]
    fn unacked_messages_are_resent_in_order_after_reconnect() {
        let mut o = Outbox::new(100, 10);
        o.on_connect();
        for i in 1..=4 {
            o.push(m(Kind::Metrics, i));
        }
        assert_eq!(drain(&mut o), ["t/1", "t/2", "t/3", "t/4"]);
        o.on_outgoing(7);
        o.on_outgoing(8);
        assert!(o.on_ack(7));
        o.on_disconnect();
        o.push(m(Kind::Lifecycle, 5));
        assert!(o.next_to_send().is_none());
        o.on_connect();
        assert_eq!(drain(&mut o), ["t/2", "t/3", "t/4", "t/5"]);
        assert_eq!(o.len(), 4);
        for (pkid, _) in (1..=4).zip(0..) {
            o.on_outgoing(pkid);
        }
        for pkid in 1..=4 {
            assert!(o.on_ack(pkid));
        }
        assert!(o.is_empty());
        assert!(!o.on_ack(9));
    }

    #[test]
    fn window_limits_what_is_handed_over() {
        let mut o = Outbox::new(100, 2);
        o.on_connect();
        for i in 0..5 {
            o.push(m(Kind::Metrics, i));
        }
        assert_eq!(drain(&mut o).len(), 2);
        o.on_outgoing(1);
        o.on_ack(1);
        assert_eq!(drain(&mut o), ["t/2"]);
    }

    #[test]
    fn full_outbox_drops_oldest_metrics_then_info_never_lifecycle() {
        let mut o = Outbox::new(4, 10);
        o.push(m(Kind::Lifecycle, 0));
        o.push(m(Kind::Metrics, 1));
        o.push(m(Kind::Info, 2));
        o.push(m(Kind::Metrics, 3));
        o.push(m(Kind::Lifecycle, 4)); // drops metrics 1
        o.push(m(Kind::Lifecycle, 5)); // drops metrics 3
        o.push(m(Kind::Lifecycle, 6)); // drops info 2
        assert_eq!(o.dropped(), 3);
        o.push(m(Kind::Metrics, 7)); // nothing droppable queued: the new one goes
        assert_eq!(o.dropped(), 4);
        o.push(m(Kind::Lifecycle, 8)); // held over capacity
        o.on_connect();
        assert_eq!(drain(&mut o), ["t/0", "t/4", "t/5", "t/6", "t/8"]);
    }

    #[test]
    fn command_answers_go_first_and_never_evict_metrics() {
        let mut o = Outbox::new(4, 10);
        o.push(m(Kind::Metrics, 0));
        o.push(m(Kind::Reply, 1));
        o.push(m(Kind::Metrics, 2));
        o.push(m(Kind::Info, 3));
        o.push(m(Kind::Metrics, 4)); // drops reply 1, not metrics 0
        assert_eq!(o.dropped(), 1);
        for i in 5..500 {
            o.push(m(Kind::Reply, i)); // a junk flood: each answer is dropped itself
        }
        assert_eq!(o.dropped(), 496);
        o.on_connect();
        assert_eq!(drain(&mut o), ["t/0", "t/2", "t/3", "t/4"]);
    }

    #[test]
    fn status_answers_survive_a_reply_flood_but_never_evict_metrics() {
        let mut o = Outbox::new(3, 10);
        o.push(m(Kind::Reply, 0));
        o.push(m(Kind::Answer, 1));
        o.push(m(Kind::Metrics, 2));
        for i in 3..100 {
            o.push(m(Kind::Reply, i)); // the flood: reply 0 goes, then each new one
        }
        o.push(m(Kind::Answer, 100)); // room from the last reply
        o.push(m(Kind::Metrics, 101)); // evicts answer 1, the oldest answer
        o.push(m(Kind::Answer, 102)); // evicts answer 100, never metrics
        o.on_connect();
        assert_eq!(drain(&mut o), ["t/2", "t/101", "t/102"]);
    }

    proptest::proptest! {
        /// Floods of any mix (issue 18), the broker taking some messages as
        /// they come: a message only ever evicts the kinds it may
        /// ([`Kind::evicts`]; a status its queued predecessor), droppable
        /// messages never exceed the capacity, and every lifecycle event is
        /// delivered once, in order.
        #[test]
        fn floods_of_any_mix_keep_the_drop_policy(
            ops in proptest::collection::vec((0usize..7, proptest::bool::ANY), 1..300),
            cap in 1usize..10,
        ) {
            const KINDS: [Kind; 7] = [
                Kind::Reply, Kind::Reply, Kind::Answer, Kind::Metrics,
                Kind::Info, Kind::Lifecycle, Kind::Status,
            ];
            let mut o = Outbox::new(cap, 3);
            o.on_connect();
            let (mut pkid, mut delivered, mut lifecycle) = (0u16, Vec::new(), Vec::new());
            for (i, (k, ack)) in ops.iter().enumerate() {
                let kind = KINDS[*k];
                let before: Vec<(u64, Kind)> =
                    o.entries.iter().map(|e| (e.seq, e.msg.kind)).collect();
                o.push(m(kind, i as u32));
                if kind == Kind::Lifecycle {
                    lifecycle.push(format!("t/{i}"));
                }
                for (seq, gone) in before {
                    if o.entries.iter().all(|e| e.seq != seq) {
                        let replaced = kind == Kind::Status && gone == Kind::Status;
                        proptest::prop_assert!(
                            replaced || kind.evicts().contains(&gone),
                            "{kind:?} evicted {gone:?}"
                        );
                    }
                }
                let droppable = o.entries.iter().filter(|e| e.msg.kind.droppable()).count();
                proptest::prop_assert!(droppable <= cap, "{droppable} droppable, capacity {cap}");
                if *ack {
                    if let Some(msg) = o.next_to_send() {
                        pkid = pkid.wrapping_add(1).max(1);
                        o.on_outgoing(pkid);
                        o.on_ack(pkid);
                        delivered.push(msg.topic);
                    }
                }
            }
            while let Some(msg) = o.next_to_send() {
                pkid = pkid.wrapping_add(1).max(1);
                o.on_outgoing(pkid);
                o.on_ack(pkid);
                delivered.push(msg.topic);
            }
            proptest::prop_assert!(o.is_empty());
            let got: Vec<&String> = delivered.iter().filter(|t| lifecycle.contains(t)).collect();
            proptest::prop_assert_eq!(got, lifecycle.iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn newer_status_replaces_queued_one_and_front_goes_first() {
        let mut o = Outbox::new(10, 10);
        o.push(m(Kind::Metrics, 1));
        o.push(m(Kind::Status, 2));
        o.push_front(m(Kind::Status, 3));
        o.on_connect();
        assert_eq!(drain(&mut o), ["t/3", "t/1"]);
    }

    #[test]
    fn refused_hand_over_is_retried() {
        let mut o = Outbox::new(10, 10);
        o.on_connect();
        o.push(m(Kind::Metrics, 1));
        assert!(o.next_to_send().is_some());
        o.unsubmit_last();
        assert_eq!(drain(&mut o), ["t/1"]);
    }
}
