//! A fleet command followed to each device's answer. The command goes out once
//! (to a device, a group or everyone) with one `request_id`; every device
//! answers on its own `events` topic with that id, and a [`Tracker`] folds those
//! events into one terminal [`Answer`] per device: promoted / kept / finished
//! for a train, cancelled for a stop, reported for a status; rejected, failed,
//! offline or no answer otherwise.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::view::Device;
use super::FleetError;

/// The command sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Train,
    Stop,
    Status,
}

impl Verb {
    /// The command topic's last level.
    pub fn name(self) -> &'static str {
        match self {
            Verb::Train => "train",
            Verb::Stop => "stop",
            Verb::Status => "status",
        }
    }
}

/// How a device ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// Train: the run's model replaced the current one.
    Promoted,
    /// Train: the run ended well but its model was not better.
    Kept,
    /// Train: the run ended well without a model to promote.
    Finished,
    /// Train: the run failed.
    Failed,
    /// Train: the run was stopped; stop: the run was stopped (success).
    Cancelled,
    /// The device refused the command (`command_rejected`).
    Rejected,
    /// Status: the device answered.
    Reported,
    /// Its retained status says it is not connected: not reached.
    Offline,
    /// Nothing terminal before the timeout.
    NoAnswer,
}

/// One device's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceResult {
    pub device: String,
    pub answer: Answer,
    /// Whether this answer means the command did its job.
    pub ok: bool,
    pub run_id: Option<String>,
    pub detail: String,
}

#[derive(Debug, Default)]
struct Pending {
    run_id: Option<String>,
    /// The run ended well with a model: promotion decision expected.
    awaiting_decision: bool,
    detail: String,
}

/// Follows one command's answers.
#[derive(Debug)]
pub struct Tracker {
    verb: Verb,
    request_id: Value,
    pending: BTreeMap<String, Pending>,
    done: BTreeMap<String, DeviceResult>,
    /// Devices not addressed at the start may still answer (a group or the
    /// whole fleet: their status had not arrived).
    accept_others: bool,
}

fn is_ok(verb: Verb, a: Answer) -> bool {
    match verb {
        Verb::Train => matches!(a, Answer::Promoted | Answer::Kept | Answer::Finished),
        Verb::Stop => a == Answer::Cancelled,
        Verb::Status => a == Answer::Reported,
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

impl Tracker {
    /// A tracker for `verb` with `request_id`, addressed to `devices` (those
    /// already known offline are settled at once).
    pub fn new<'a>(
        verb: Verb,
        request_id: Value,
        devices: impl IntoIterator<Item = &'a Device>,
        accept_others: bool,
    ) -> Self {
        let mut t = Self {
            verb,
            request_id,
            pending: BTreeMap::new(),
            done: BTreeMap::new(),
            accept_others,
        };
        for d in devices {
            if d.status.is_some() && !d.online() {
                t.settle(&d.id, Answer::Offline, None, "offline: not reached".into());
            } else {
                t.pending.insert(d.id.clone(), Pending::default());
            }
        }
        t
    }

    /// Adds a device expected to answer (a `--device` whose status is unknown).
    pub fn expect(&mut self, device: &str) {
        if !self.done.contains_key(device) {
            self.pending.entry(device.to_string()).or_default();
        }
    }

    fn settle(&mut self, device: &str, answer: Answer, run_id: Option<String>, detail: String) {
        self.pending.remove(device);
        self.done.insert(
            device.to_string(),
            DeviceResult {
                device: device.to_string(),
                answer,
                ok: is_ok(self.verb, answer),
                run_id,
                detail,
            },
        );
    }

    fn ours(&self, v: &Value) -> bool {
        v.get("request_id") == Some(&self.request_id)
    }

    fn ours_in(&self, v: &Value, key: &str) -> bool {
        v.get(key)
            .and_then(Value::as_array)
            .is_some_and(|ids| ids.contains(&self.request_id))
    }

    /// Folds in one event from `device`; whether it settled the device.
    pub fn on_event(&mut self, device: &str, v: &Value) -> bool {
        if self.done.contains_key(device) {
            return false;
        }
        let event = str_of(v, "event");
        let run_id = v.get("run_id").and_then(Value::as_str).map(str::to_string);
        let mentions_us = self.ours(v)
            || self.ours_in(v, "request_ids")
            || v.get("stop_request_id") == Some(&self.request_id);
        if !self.pending.contains_key(device) {
            if !(self.accept_others && mentions_us) {
                return false;
            }
            self.pending.insert(device.to_string(), Pending::default());
        }
        let reason = str_of(v, "reason").to_string();
        let verb = self.verb;
        let ours = self.ours(v);
        let in_run = self.ours_in(v, "request_ids");
        let stops_it = v.get("stop_request_id") == Some(&self.request_id);
        let Some(p) = self.pending.get_mut(device) else {
            return false;
        };
        match event {
            "command_rejected" if ours => {
                self.settle(device, Answer::Rejected, None, reason);
            }
            "status_reported" if ours && verb == Verb::Status => {
                let detail = format!("state {}", str_of(v, "state"));
                self.settle(device, Answer::Reported, None, detail);
            }
            "run_queued" if ours => {
                p.detail = format!("queued behind {}", str_of(v, "behind_run_id"));
            }
            "run_started" if in_run => {
                p.run_id = run_id;
            }
            "run_finished" | "run_failed" | "run_cancelled" => {
                let for_train = verb == Verb::Train && in_run;
                let for_stop = verb == Verb::Stop && stops_it;
                if !(for_train || for_stop) {
                    return false;
                }
                match event {
                    "run_failed" => self.settle(device, Answer::Failed, run_id, reason),
                    "run_cancelled" => self.settle(device, Answer::Cancelled, run_id, reason),
                    _ if v.get("best_checkpoint").is_none_or(Value::is_null) => {
                        self.settle(device, Answer::Finished, run_id, reason)
                    }
                    _ => {
                        p.run_id = run_id;
                        p.awaiting_decision = true;
                        p.detail = reason;
                    }
                }
            }
            "model_promoted" | "model_kept"
                if p.awaiting_decision && p.run_id.is_some() && p.run_id == run_id =>
            {
                let acc = |k: &str| {
                    v.get(k)
                        .and_then(|s| s.get("accuracy"))
                        .and_then(Value::as_f64)
                        .map(|a| format!("{a:.4}"))
                        .unwrap_or_else(|| "-".into())
                };
                let detail = format!(
                    "{} accuracy {} (current {}): {reason}",
                    str_of(v, "split"),
                    acc("candidate"),
                    acc("current")
                );
                let answer = if event == "model_promoted" {
                    Answer::Promoted
                } else {
                    Answer::Kept
                };
                self.settle(device, answer, run_id, detail);
            }
            _ => return false,
        }
        self.done.contains_key(device)
    }

    /// Whether every addressed device has answered for good.
    pub fn is_done(&self) -> bool {
        self.pending.is_empty()
    }

    /// Devices still waited for.
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }

    /// The results, by device id; those still pending did not answer in time.
    pub fn finish(mut self) -> Vec<DeviceResult> {
        let pending = std::mem::take(&mut self.pending);
        for (device, p) in pending {
            let detail = if p.detail.is_empty() {
                "no terminal answer before the timeout".to_string()
            } else {
                format!("no terminal answer before the timeout (last: {})", p.detail)
            };
            self.settle(&device, Answer::NoAnswer, p.run_id, detail);
        }
        self.done.into_values().collect()
    }
}

/// The `cmd/*` payload: the request id and, for a train, the overrides given
/// as `KEY=VALUE` (VALUE read as JSON when it is JSON, else as a string).
pub fn payload(verb: Verb, request_id: &Value, sets: &[String]) -> Result<Vec<u8>, FleetError> {
    let mut obj = Map::new();
    obj.insert("request_id".into(), request_id.clone());
    if !sets.is_empty() {
        if verb != Verb::Train {
            return Err(FleetError::Usage(format!(
                "--set applies to `fleet train` only, not `fleet {}`",
                verb.name()
            )));
        }
        let mut overrides = Map::new();
        for s in sets {
            let Some((k, val)) = s.split_once('=') else {
                return Err(FleetError::Usage(format!(
                    "--set {s:?}: expected KEY=VALUE, e.g. train.optimizer.lr=0.001"
                )));
            };
            let k = k.trim();
            if k.is_empty() {
                return Err(FleetError::Usage(format!("--set {s:?}: empty key")));
            }
            let value =
                serde_json::from_str(val.trim()).unwrap_or_else(|_| Value::String(val.to_string()));
            overrides.insert(k.to_string(), value);
        }
        obj.insert("overrides".into(), Value::Object(overrides));
    }
    serde_json::to_vec(&Value::Object(obj)).map_err(|e| FleetError::Usage(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dev(id: &str, state: &str) -> Device {
        Device {
            id: id.into(),
            status: Some(json!({"state": state})),
            ..Device::default()
        }
    }

    #[test]
    fn a_train_is_followed_to_its_promotion_decision() {
        let devs = [dev("a", "idle"), dev("b", "training"), dev("c", "offline")];
        let rid = json!("q1");
        let mut t = Tracker::new(Verb::Train, rid.clone(), &devs, true);
        assert_eq!(t.waiting(), 2);
        // Someone else's run is ignored; ours is followed.
        assert!(!t.on_event("a", &json!({"event": "run_finished", "run_id": "x", "request_ids": ["other"], "best_checkpoint": "/b"})));
        t.on_event(
            "a",
            &json!({"event": "run_started", "run_id": "r1", "request_ids": ["q1"]}),
        );
        t.on_event("a", &json!({"event": "run_finished", "run_id": "r1", "request_ids": ["q1"], "best_checkpoint": "/b", "reason": "max_epochs"}));
        assert!(!t.is_done());
        assert!(t.on_event(
            "a",
            &json!({"event": "model_promoted", "run_id": "r1", "split": "test",
            "candidate": {"accuracy": 0.9}, "current": null, "reason": "first model"})
        ));
        t.on_event(
            "b",
            &json!({"event": "run_queued", "request_id": "q1", "behind_run_id": "r0"}),
        );
        // A device that was not known but answers with our id is counted.
        t.on_event(
            "d",
            &json!({"event": "command_rejected", "request_id": "q1", "reason": "bad"}),
        );
        let r = t.finish();
        let by: BTreeMap<_, _> = r.iter().map(|r| (r.device.as_str(), r)).collect();
        assert_eq!(by["a"].answer, Answer::Promoted);
        assert!(by["a"].ok && by["a"].detail.contains("0.9000"));
        assert_eq!(by["b"].answer, Answer::NoAnswer);
        assert!(by["b"].detail.contains("queued behind r0"));
        assert_eq!(by["c"].answer, Answer::Offline);
        assert_eq!(by["d"].answer, Answer::Rejected);
        assert!(!by["d"].ok);
    }

    #[test]
    fn stop_and_status_answers() {
        let devs = [dev("a", "training"), dev("b", "idle")];
        let mut t = Tracker::new(Verb::Stop, json!(7), &devs, false);
        t.on_event(
            "a",
            &json!({"event": "run_cancelled", "run_id": "r", "stop_request_id": 7}),
        );
        t.on_event(
            "b",
            &json!({"event": "command_rejected", "request_id": 7, "reason": "no run in progress"}),
        );
        // Not addressed, not accepted.
        assert!(!t.on_event("z", &json!({"event": "command_rejected", "request_id": 7})));
        assert!(t.is_done());
        let r = t.finish();
        assert_eq!((r[0].answer, r[0].ok), (Answer::Cancelled, true));
        assert_eq!((r[1].answer, r[1].ok), (Answer::Rejected, false));
        let mut t = Tracker::new(Verb::Status, json!("s"), &devs[..1], false);
        t.on_event(
            "a",
            &json!({"event": "status_reported", "request_id": "s", "state": "training"}),
        );
        assert_eq!(t.finish()[0].answer, Answer::Reported);
    }

    #[test]
    fn payloads_carry_the_id_and_typed_overrides() {
        let p = payload(
            Verb::Train,
            &json!("r"),
            &["train.lr=0.5".into(), "data.tokenizer=word".into()],
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(
            v,
            json!({"request_id": "r", "overrides": {"train.lr": 0.5, "data.tokenizer": "word"}})
        );
        assert!(payload(Verb::Stop, &json!("r"), &["a=1".into()]).is_err());
        assert!(payload(Verb::Train, &json!("r"), &["novalue".into()]).is_err());
    }
}
