//! A subscriber to `{prefix}/{device}/#` with rumqttc, as a fleet dashboard would be.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

use crate::helpers::SHORT;

/// One message the dashboard received.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub json: Value,
    pub raw: Vec<u8>,
    pub retain: bool,
}

impl Msg {
    pub fn event(&self) -> &str {
        self.json["event"].as_str().unwrap_or("")
    }
    pub fn run_id(&self) -> &str {
        self.json["run_id"].as_str().unwrap_or("")
    }
}

/// A subscriber to `{prefix}/{device}/#`, as a fleet dashboard would be.
pub struct Dashboard {
    client: Client,
    rx: mpsc::Receiver<Msg>,
    pub seen: Vec<Msg>,
    pub base: String,
}

impl Dashboard {
    /// Connects and subscribes; returns once the subscription is acknowledged.
    /// `session`: a client id for a persistent session (messages wait while it is away).
    pub fn connect(port: u16, base: &str, session: Option<&str>) -> Self {
        let id = session
            .map(str::to_string)
            .unwrap_or_else(|| format!("dash-{}", rand::random::<u32>()));
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(session.is_none());
        Self::connect_with(o, base)
    }

    /// Connects with the given options (TLS, credentials) and subscribes.
    pub fn connect_with(mut o: MqttOptions, base: &str) -> Self {
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        let (client, mut conn) = Client::new(o, 64);
        let (tx, rx) = mpsc::channel();
        let (sub_tx, sub_rx) = mpsc::channel();
        let filter = format!("{base}/#");
        let c2 = client.clone();
        std::thread::spawn(move || {
            let mut errors: u64 = 0;
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c2.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let json = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        let msg = Msg {
                            topic: p.topic.clone(),
                            json,
                            raw: p.payload.to_vec(),
                            retain: p.retain,
                        };
                        if tx.send(msg).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        errors += 1;
                        if errors.is_power_of_two() {
                            eprintln!("dashboard connection error #{errors}: {e}");
                        }
                        std::thread::sleep(Duration::from_millis(100))
                    }
                }
            }
        });
        sub_rx.recv_timeout(SHORT).expect("dashboard subscribed");
        Self {
            client,
            rx,
            seen: Vec::new(),
            base: base.to_string(),
        }
    }

    pub fn pump(&mut self, wait: Duration) {
        if let Ok(m) = self.rx.recv_timeout(wait) {
            self.seen.push(m);
            while let Ok(m) = self.rx.try_recv() {
                self.seen.push(m);
            }
        }
    }

    /// Takes in whatever has arrived, without waiting.
    pub fn pump_now(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            self.seen.push(m);
        }
    }

    /// Index of the first message at or after `from` matching `pred`, waiting up to `timeout`.
    pub fn find_from(
        &mut self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&Msg) -> bool,
    ) -> Option<usize> {
        let t0 = Instant::now();
        loop {
            if let Some(i) = self.seen.iter().skip(from).position(&pred) {
                return Some(from + i);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            self.pump(Duration::from_millis(50));
        }
    }

    pub fn topic(&self, leaf: &str) -> String {
        format!("{}/{leaf}", self.base)
    }

    /// Publishes a command (QoS 1, not retained).
    pub fn send(&self, cmd: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(
                self.topic(&format!("cmd/{cmd}")),
                QoS::AtLeastOnce,
                false,
                payload.into(),
            )
            .expect("publish command");
    }

    /// Publishes a retained command.
    pub fn send_retained(&self, cmd: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(
                self.topic(&format!("cmd/{cmd}")),
                QoS::AtLeastOnce,
                true,
                payload.into(),
            )
            .expect("publish command");
    }

    /// Everything received so far on `leaf` (`events`, `metrics`, `status`).
    pub fn on(&self, leaf: &str) -> Vec<&Msg> {
        let t = self.topic(leaf);
        self.seen.iter().filter(|m| m.topic == t).collect()
    }
}
