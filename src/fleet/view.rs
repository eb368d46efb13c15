//! The fleet as its messages describe it: one [`Device`] per device id seen on
//! `{prefix}/+/status|metrics|events`, with its retained status, the curves of
//! its current and previous run, and a bounded feed of events. Pure data:
//! `fleet ls`, `fleet watch` and the dashboard all fold messages into it.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;
use serde_json::Value;

use super::client::TopicKind;

/// Points kept per run (older ones are thinned out beyond this).
pub const MAX_POINTS: usize = 2000;
/// Events kept in the feed.
pub const MAX_FEED: usize = 300;

/// One evaluation of a run (a `metrics` message).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    pub epoch: u64,
    pub step: u64,
    pub train_loss: f64,
    pub val_loss: f64,
    pub train_acc: f64,
    pub val_acc: f64,
    pub lr: f64,
}

impl Point {
    fn of(v: &Value) -> Option<Self> {
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        let u = |k: &str| v.get(k).and_then(Value::as_u64);
        Some(Self {
            epoch: u("epoch")?,
            step: u("step")?,
            train_loss: f("train_loss").unwrap_or(f64::NAN),
            val_loss: f("val_loss").unwrap_or(f64::NAN),
            train_acc: f("train_acc").unwrap_or(f64::NAN),
            val_acc: f("val_acc").unwrap_or(f64::NAN),
            lr: f("lr").unwrap_or(f64::NAN),
        })
    }
}

/// A run as seen from its messages.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunView {
    pub run_id: String,
    pub max_epochs: Option<u64>,
    pub points: Vec<Point>,
    pub checkpoints: u64,
    pub early_stopped: bool,
    /// `finished`, `early_stopped`, `failed`, `cancelled` once over.
    pub outcome: Option<String>,
    /// `promoted` or `kept` once decided.
    pub decision: Option<String>,
}

impl RunView {
    fn new(run_id: &str) -> Self {
        Self {
            run_id: run_id.to_string(),
            ..Self::default()
        }
    }

    fn push(&mut self, p: Point) {
        if self.points.len() >= MAX_POINTS {
            // Keep the shape: drop every other point of the older half.
            let half = self.points.len() / 2;
            let mut i = 0;
            self.points.retain(|_| {
                i += 1;
                i > half || i % 2 == 0
            });
        }
        self.points.push(p);
    }
}

/// One device.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Device {
    pub id: String,
    /// The last `status` as published (retained), if any arrived.
    pub status: Option<Value>,
    pub run: Option<RunView>,
    pub previous: Option<RunView>,
    /// Messages received from it.
    pub messages: u64,
}

impl Device {
    fn str_field(&self, key: &str) -> Option<&str> {
        self.status.as_ref()?.get(key)?.as_str()
    }

    /// `idle`, `training`, `offline`, or `unknown` before any status.
    pub fn state(&self) -> &str {
        self.str_field("state").unwrap_or("unknown")
    }

    /// Whether its last status says it is connected.
    pub fn online(&self) -> bool {
        matches!(self.state(), "idle" | "training")
    }

    /// `mqtt.groups` of the device.
    pub fn groups(&self) -> Vec<String> {
        self.status
            .as_ref()
            .and_then(|s| s.get("groups"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|g| g.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The daemon's version.
    pub fn version(&self) -> Option<&str> {
        self.str_field("version")
    }

    /// Run id of the model in service.
    pub fn current_model(&self) -> Option<&str> {
        self.str_field("current_model")
    }

    /// Accuracy of the model in service, when the status carries it.
    pub fn accuracy(&self) -> Option<f64> {
        self.status
            .as_ref()?
            .get("current_score")?
            .get("accuracy")?
            .as_f64()
    }

    /// How the last run ended: `finished, promoted`, `failed`, ...
    pub fn last_run(&self) -> Option<String> {
        let l = self.status.as_ref()?.get("last_run")?;
        let outcome = l.get("outcome")?.as_str()?;
        Some(match l.get("promoted").and_then(Value::as_bool) {
            Some(true) => format!("{outcome}, promoted"),
            Some(false) => format!("{outcome}, kept"),
            None => outcome.to_string(),
        })
    }

    /// The `fleet ls --json` row.
    pub fn summary(&self) -> Value {
        serde_json::json!({
            "device_id": self.id,
            "online": self.online(),
            "state": self.state(),
            "groups": self.groups(),
            "run_id": self.str_field("run_id"),
            "current_model": self.current_model(),
            "accuracy": self.accuracy(),
            "last_run": self.status.as_ref().and_then(|s| s.get("last_run")).cloned(),
            "version": self.version(),
        })
    }

    fn run_mut(&mut self, run_id: &str) -> &mut RunView {
        if self.run.as_ref().is_none_or(|r| r.run_id != run_id) {
            if self.previous.as_ref().is_some_and(|r| r.run_id == run_id) {
                // A late message of the previous run.
                return self.previous.get_or_insert_with(|| RunView::new(run_id));
            }
            self.previous = self.run.take();
            self.run = Some(RunView::new(run_id));
        }
        self.run.get_or_insert_with(|| RunView::new(run_id))
    }
}

/// One line of the event feed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeedItem {
    pub device: String,
    pub event: String,
    pub ts: Option<String>,
    pub run_id: Option<String>,
    pub request_id: Option<Value>,
    /// A short human description.
    pub text: String,
}

/// What one message changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Status(String),
    Metrics(String, Point, String),
    Event(FeedItem),
}

/// Every device seen, by id, and the recent events.
#[derive(Debug, Default)]
pub struct Fleet {
    pub devices: BTreeMap<String, Device>,
    pub feed: VecDeque<FeedItem>,
    /// Messages that were not JSON objects (ignored).
    pub malformed: u64,
}

impl Fleet {
    /// Folds one message in; None when it was ignored.
    pub fn apply(&mut self, device: &str, kind: TopicKind, payload: &[u8]) -> Option<Change> {
        let v: Value = match serde_json::from_slice(payload) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                // An empty retained status is a deleted device.
                if kind == TopicKind::Status && payload.is_empty() {
                    self.devices.remove(device);
                    return Some(Change::Status(device.to_string()));
                }
                self.malformed += 1;
                return None;
            }
        };
        let d = self
            .devices
            .entry(device.to_string())
            .or_insert_with(|| Device {
                id: device.to_string(),
                ..Device::default()
            });
        d.messages += 1;
        let run_id = v.get("run_id").and_then(Value::as_str).map(str::to_string);
        match kind {
            TopicKind::Status => {
                d.status = Some(v);
                Some(Change::Status(device.to_string()))
            }
            TopicKind::Metrics => {
                let (run_id, p) = (run_id?, Point::of(&v)?);
                d.run_mut(&run_id).push(p.clone());
                Some(Change::Metrics(device.to_string(), p, run_id))
            }
            TopicKind::Events => {
                let event = v.get("event").and_then(Value::as_str)?.to_string();
                if let Some(id) = &run_id {
                    let r = d.run_mut(id);
                    match event.as_str() {
                        "run_started" => r.max_epochs = v.get("max_epochs").and_then(Value::as_u64),
                        "checkpoint_saved" => r.checkpoints += 1,
                        "early_stopped" => r.early_stopped = true,
                        "run_finished" | "run_failed" | "run_cancelled" => {
                            r.outcome = v.get("outcome").and_then(Value::as_str).map(Into::into)
                        }
                        "model_promoted" => r.decision = Some("promoted".into()),
                        "model_kept" => r.decision = Some("kept".into()),
                        _ => {}
                    }
                }
                let item = FeedItem {
                    device: device.to_string(),
                    text: describe(&event, &v),
                    event,
                    ts: v.get("ts").and_then(Value::as_str).map(Into::into),
                    run_id,
                    request_id: v.get("request_id").filter(|r| !r.is_null()).cloned(),
                };
                if self.feed.len() >= MAX_FEED {
                    self.feed.pop_front();
                }
                self.feed.push_back(item.clone());
                Some(Change::Event(item))
            }
        }
    }

    /// Everything, for a new dashboard client.
    pub fn snapshot(&self) -> Value {
        serde_json::json!({
            "devices": self.devices.values().map(|d| serde_json::json!({
                "summary": d.summary(),
                "run": d.run,
                "previous": d.previous,
            })).collect::<Vec<_>>(),
            "feed": self.feed,
        })
    }
}

fn num(v: &Value, key: &str) -> String {
    match v.get(key).and_then(Value::as_f64) {
        Some(x) => format!("{x:.4}"),
        None => "-".into(),
    }
}

/// A one-line description of an event.
pub fn describe(event: &str, v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    match event {
        "run_started" => format!(
            "run {} started ({} epochs max)",
            s("run_id"),
            v.get("max_epochs").and_then(Value::as_u64).unwrap_or(0)
        ),
        "checkpoint_saved" => format!(
            "checkpoint at epoch {}: val_loss {} val_acc {}",
            v.get("epoch").and_then(Value::as_u64).unwrap_or(0),
            num(v, "val_loss"),
            num(v, "val_acc")
        ),
        "early_stopped" => format!("early stop: {}", s("reason")),
        "run_finished" | "run_failed" | "run_cancelled" => {
            format!("{}: {}", s("outcome"), s("reason"))
        }
        "model_promoted" | "model_kept" => {
            let acc = v
                .get("candidate")
                .map(|c| num(c, "accuracy"))
                .unwrap_or_else(|| "-".into());
            format!("{} (candidate accuracy {acc}): {}", event, s("reason"))
        }
        "command_rejected" => format!("{} rejected: {}", s("command"), s("reason")),
        "run_queued" => format!("queued behind {}", s("behind_run_id")),
        "status_reported" => format!("status: {}", s("state")),
        "data_accepted" => format!("data accepted: {}", s("file")),
        "data_rejected" => format!("data rejected: {}: {}", s("file"), s("reason")),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(f: &mut Fleet, dev: &str, kind: TopicKind, json: &str) -> Option<Change> {
        f.apply(dev, kind, json.as_bytes())
    }

    #[test]
    fn messages_fold_into_devices_runs_and_the_feed() {
        let mut f = Fleet::default();
        apply(
            &mut f,
            "a",
            TopicKind::Status,
            r#"{"state": "idle", "groups": ["g1"], "version": "0.1.0",
                "current_model": "r0", "current_score": {"accuracy": 0.5},
                "last_run": {"outcome": "finished", "promoted": true}}"#,
        );
        let d = &f.devices["a"];
        assert!(d.online());
        assert_eq!(d.groups(), ["g1"]);
        assert_eq!(d.accuracy(), Some(0.5));
        assert_eq!(d.last_run().as_deref(), Some("finished, promoted"));
        apply(
            &mut f,
            "a",
            TopicKind::Events,
            r#"{"event": "run_started", "run_id": "r1", "max_epochs": 3}"#,
        );
        for step in 1..=3 {
            let m = format!(
                r#"{{"run_id": "r1", "epoch": {step}, "step": {step}, "train_loss": 1, "val_loss": 1, "train_acc": 0.5, "val_acc": 0.5, "lr": 0.1}}"#
            );
            assert!(matches!(
                apply(&mut f, "a", TopicKind::Metrics, &m),
                Some(Change::Metrics(..))
            ));
        }
        apply(
            &mut f,
            "a",
            TopicKind::Events,
            r#"{"event": "run_finished", "run_id": "r1", "outcome": "finished", "reason": "max_epochs"}"#,
        );
        apply(
            &mut f,
            "a",
            TopicKind::Events,
            r#"{"event": "model_promoted", "run_id": "r1", "reason": "first"}"#,
        );
        let r = f.devices["a"].run.as_ref().unwrap();
        assert_eq!((r.points.len(), r.max_epochs), (3, Some(3)));
        assert_eq!(r.decision.as_deref(), Some("promoted"));
        // A new run moves the last one to `previous`.
        apply(
            &mut f,
            "a",
            TopicKind::Metrics,
            r#"{"run_id": "r2", "epoch": 1, "step": 1}"#,
        );
        assert_eq!(f.devices["a"].previous.as_ref().unwrap().run_id, "r1");
        assert_eq!(f.feed.len(), 3);
        // Junk is counted, not kept; an empty retained status forgets the device.
        assert!(apply(&mut f, "a", TopicKind::Events, "[1]").is_none());
        assert_eq!(f.malformed, 1);
        apply(&mut f, "a", TopicKind::Status, "");
        assert!(f.devices.is_empty());
    }

    #[test]
    fn long_runs_are_thinned_not_truncated() {
        let mut r = RunView::new("r");
        for i in 0..(MAX_POINTS as u64 * 3) {
            r.push(Point {
                epoch: i,
                step: i,
                train_loss: 0.0,
                val_loss: 0.0,
                train_acc: 0.0,
                val_acc: 0.0,
                lr: 0.0,
            });
        }
        assert!(r.points.len() <= MAX_POINTS);
        // The start of the run is still there, thinned; order is kept.
        assert!(r.points[0].step < 16, "{}", r.points[0].step);
        assert!(r.points.windows(2).all(|w| w[0].step < w[1].step));
        assert_eq!(r.points.last().unwrap().step, MAX_POINTS as u64 * 3 - 1);
    }
}
