//! Commands from MQTT (`cmd/train`, `cmd/stop`, `cmd/status`): parsing and
//! validation of untrusted payloads. Anything malformed becomes a [`Rejection`]
//! with a reason for the sender; nothing here can panic on input.

use std::path::Path;

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::messages::Event;
use crate::config::{self, run, ConfigError, Override, Settings};

/// Largest command payload accepted, in bytes.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// Most overrides one `cmd/train` may carry.
const MAX_OVERRIDES: usize = 64;

/// Room for `cmd/stop` and `cmd/status` waiting in their own channel, apart
/// from `cmd/train`: a flood of train requests never makes them "busy".
pub const URGENT_QUEUE: usize = 16;

/// Whether a command (the last topic level) goes through the urgent channel:
/// `stop` and `status`, which are cheap and must be answered under load.
pub fn is_urgent(name: &str) -> bool {
    matches!(name, "stop" | "status")
}

/// A valid command.
#[derive(Debug, Clone)]
pub enum Command {
    /// Start a run (queued if one is running) with these overrides.
    Train {
        overrides: Vec<Override>,
        request_id: Option<Value>,
    },
    /// Cancel the running run after the current batch.
    Stop { request_id: Option<Value> },
    /// Republish `status`.
    Status { request_id: Option<Value> },
}

/// A command that cannot be honoured, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The command name (the last topic level).
    pub command: String,
    pub request_id: Option<Value>,
    pub reason: String,
}

impl Rejection {
    /// The `command_rejected` event.
    pub fn to_event(&self) -> Event {
        Event::CommandRejected {
            command: Some(self.command.clone()),
            request_id: self.request_id.clone(),
            reason: self.reason.clone(),
            suppressed: None,
        }
    }
}

/// Just the `request_id` of a payload, for answering a command that cannot be
/// handled in full (the daemon is busy): no other field is kept, no
/// validation is done. None when the payload is too big, not a JSON object,
/// or has no usable id; a long string id comes back cut.
pub fn peek_request_id(payload: &[u8]) -> Option<Value> {
    /// Every other field is skipped without being built.
    #[derive(Deserialize)]
    struct IdOnly {
        #[serde(default)]
        request_id: Option<RequestId>,
    }
    if payload.len() > MAX_COMMAND_BYTES {
        return None;
    }
    let id = serde_json::from_slice::<IdOnly>(payload)
        .ok()?
        .request_id?
        .0;
    match id {
        Value::String(s) if s.len() > super::bounded::MAX_REQUEST_ID_BYTES => Some(Value::String(
            super::bounded::truncate(&s, super::bounded::MAX_REQUEST_ID_BYTES),
        )),
        other => Some(other),
    }
}

/// A `request_id`: a JSON string or number (null counts as none).
struct RequestId(Value);

impl<'de> Deserialize<'de> for RequestId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            v @ (Value::String(_) | Value::Number(_)) => Ok(RequestId(v)),
            other => Err(serde::de::Error::custom(format!(
                "request_id must be a string or a number, got {}",
                json_kind(&other)
            ))),
        }
    }
}

/// The `cmd/train` payload.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainPayload {
    /// Checked after the retained flag, with its own message: any JSON here.
    #[serde(default)]
    overrides: Option<Value>,
    #[serde(default)]
    request_id: Option<RequestId>,
}

/// The `cmd/stop` and `cmd/status` payload.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainPayload {
    #[serde(default)]
    request_id: Option<RequestId>,
}

/// The payload's `request_id`, read before the payload's shape is checked.
fn request_id(obj: &Map<String, Value>) -> Result<Option<Value>, String> {
    match obj.get("request_id") {
        None => Ok(None),
        Some(v) => Option::<RequestId>::deserialize(v)
            .map(|r| r.map(|r| r.0))
            .map_err(|e| e.to_string()),
    }
}

/// The daemon's configuration before per-run overrides: the parsed file plus
/// the environment and `--set` overrides it was started with.
#[derive(Debug, Clone)]
pub struct ConfigBase {
    table: toml::Table,
    origin: String,
    overrides: Vec<Override>,
}

impl ConfigBase {
    /// Reads the config file once; later runs do not re-read it.
    pub fn load(path: &Path, overrides: Vec<Override>) -> Result<(Self, Settings), ConfigError> {
        let table = config::read_table(path)?;
        let base = Self {
            table,
            origin: path.display().to_string(),
            overrides,
        };
        let settings = base.resolve(&[])?;
        Ok((base, settings))
    }

    /// The settings with `extra` overrides on top, validated like a config file.
    pub fn resolve(&self, extra: &[Override]) -> Result<Settings, ConfigError> {
        let mut all = self.overrides.clone();
        all.extend_from_slice(extra);
        let s = config::load_layers(&self.table, &self.origin, &all)?;
        s.validate()?;
        s.model_template()?;
        // Keys a command sets that the run would ignore (not the daemon's own).
        run::check_command_overrides(extra.iter().map(|o| o.key.as_str()), &s)?;
        Ok(s)
    }
}

/// Parses one command. `validate` checks train overrides (normally
/// [`ConfigBase::resolve`] plus whatever is queued).
pub fn parse(
    name: &str,
    payload: &[u8],
    retained: bool,
    validate: impl Fn(&[Override]) -> Result<(), String>,
) -> Result<Command, Rejection> {
    let reject = |request_id: Option<Value>, reason: String| Rejection {
        command: name.to_string(),
        request_id,
        reason,
    };
    if payload.len() > MAX_COMMAND_BYTES {
        return Err(reject(
            None,
            format!(
                "payload of {} bytes exceeds the limit of {MAX_COMMAND_BYTES} bytes",
                payload.len()
            ),
        ));
    }
    if !matches!(name, "train" | "stop" | "status") {
        return Err(reject(
            None,
            format!("unknown command `{name}`; commands are cmd/train, cmd/stop, cmd/status"),
        ));
    }
    // An empty message (`mosquitto_pub -n`) means `{}`, except for a train request:
    // clearing a retained `cmd/train` sends an empty message, and must not train.
    let value: Value = if payload.iter().all(u8::is_ascii_whitespace) {
        if name == "train" {
            return Err(reject(
                None,
                "empty payload; send {} to train with the configured settings".into(),
            ));
        }
        Value::Object(Map::new())
    } else {
        let text = std::str::from_utf8(payload)
            .map_err(|e| reject(None, format!("payload is not UTF-8: {e}")))?;
        serde_json::from_str(text)
            .map_err(|e| reject(None, format!("payload is not valid JSON: {e}")))?
    };
    let Value::Object(obj) = value else {
        return Err(reject(
            None,
            format!("payload must be a JSON object, got {}", json_kind(&value)),
        ));
    };
    // The request id first, so that every later rejection can echo it.
    let request_id = request_id(&obj).map_err(|r| reject(None, r))?;
    if let Some(Value::String(id)) = &request_id {
        let max = super::bounded::MAX_REQUEST_ID_BYTES;
        if id.len() > max {
            return Err(reject(
                Some(Value::String(super::bounded::truncate(id, max))),
                format!("request_id has {} bytes, more than {max}", id.len()),
            ));
        }
    }
    // Then the payload's shape: unknown fields are refused.
    let payload = Value::Object(obj);
    let shape = |e: serde_json::Error| reject(request_id.clone(), format!("cmd/{name}: {e}"));
    let (overrides, request_id) = if name == "train" {
        let p = TrainPayload::deserialize(&payload).map_err(shape)?;
        (p.overrides, p.request_id)
    } else {
        let p = PlainPayload::deserialize(&payload).map_err(shape)?;
        (None, p.request_id)
    };
    let request_id = request_id.map(|r| r.0);
    if retained {
        return Err(reject(
            request_id,
            "retained commands are ignored: publish commands without the retain flag".into(),
        ));
    }
    match name {
        "train" => {
            let overrides = match overrides {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Object(o)) => {
                    parse_overrides(&o).map_err(|r| reject(request_id.clone(), r))?
                }
                Some(other) => {
                    return Err(reject(
                        request_id,
                        format!(
                            "overrides must be an object of config keys, e.g. {{\"train.lr\": 0.001}}, got {}",
                            json_kind(&other)
                        ),
                    ))
                }
            };
            validate(&overrides).map_err(|r| reject(request_id.clone(), r))?;
            Ok(Command::Train {
                overrides,
                request_id,
            })
        }
        "stop" => Ok(Command::Stop { request_id }),
        _ => Ok(Command::Status { request_id }),
    }
}

/// Flattens `{"train": {"lr": 1}}` and `{"train.lr": 1}` alike into overrides,
/// keeping only keys a command may change.
fn parse_overrides(obj: &Map<String, Value>) -> Result<Vec<Override>, String> {
    let mut flat = Vec::new();
    flatten("", obj, &mut flat, 0)?;
    if flat.len() > MAX_OVERRIDES {
        return Err(format!(
            "too many overrides ({}; at most {MAX_OVERRIDES})",
            flat.len()
        ));
    }
    let mut out = Vec::with_capacity(flat.len());
    for (key, value) in flat {
        if !run::remote_overridable(&key) {
            return Err(format!(
                "`{key}` cannot be overridden remotely: a command may change {}; files, folders, the broker and the device come from the config file only",
                run::remote_description()
            ));
        }
        let ov = Override::from_json(&key, &value, &format!("cmd/train override `{key}`"))
            .map_err(|e| e.to_string())?;
        out.push(ov);
    }
    Ok(out)
}

fn flatten(
    prefix: &str,
    obj: &Map<String, Value>,
    out: &mut Vec<(String, Value)>,
    depth: usize,
) -> Result<(), String> {
    if depth > 8 {
        return Err("overrides are nested too deeply".into());
    }
    for (k, v) in obj {
        if k.is_empty() {
            return Err("empty override key".into());
        }
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Object(inner) => flatten(&key, inner, out, depth + 1)?,
            other => out.push((key, other.clone())),
        }
    }
    Ok(())
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: &[Override]) -> Result<(), String> {
        Ok(())
    }

    fn base() -> ConfigBase {
        ConfigBase {
            table: toml::Table::new(),
            origin: "test.toml".into(),
            overrides: Vec::new(),
        }
    }

    fn validate_with_base(ovs: &[Override]) -> Result<(), String> {
        base().resolve(ovs).map(|_| ()).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_payload_is_an_empty_object() {
        assert!(matches!(
            parse("status", b"", false, ok),
            Ok(Command::Status { request_id: None })
        ));
        assert!(matches!(
            parse("train", b" {} ", false, ok),
            Ok(Command::Train { .. })
        ));
        assert!(parse("train", b"", false, ok)
            .unwrap_err()
            .reason
            .contains("empty payload"));
    }

    #[test]
    fn long_request_ids_are_rejected_and_echoed_cut() {
        let payload = format!(r#"{{"request_id": "{}"}}"#, "r".repeat(60_000));
        let r = parse("train", payload.as_bytes(), false, ok).unwrap_err();
        assert!(r.reason.contains("more than 128"), "{}", r.reason);
        let Some(Value::String(echo)) = &r.request_id else {
            panic!("{:?}", r.request_id)
        };
        assert!(echo.len() < 200, "{}", echo.len());
        let payload = format!(r#"{{"request_id": "{}"}}"#, "r".repeat(128));
        assert!(parse("status", payload.as_bytes(), false, ok).is_ok());
    }

    #[test]
    fn request_id_is_peeked_without_the_rest() {
        let p = br#"{"overrides": {"train.lr": [1, {"x": 2}]}, "request_id": "r9"}"#;
        assert_eq!(peek_request_id(p), Some(Value::from("r9")));
        assert_eq!(
            peek_request_id(br#"{"request_id": 4}"#),
            Some(Value::from(4))
        );
        assert_eq!(peek_request_id(br#"{"request_id": true}"#), None);
        assert_eq!(peek_request_id(b"junk"), None);
        assert_eq!(peek_request_id(b""), None);
        let long = format!(r#"{{"request_id": "{}"}}"#, "r".repeat(60_000));
        let Some(Value::String(cut)) = peek_request_id(long.as_bytes()) else {
            panic!()
        };
        assert!(cut.len() < 200);
    }

    #[test]
    fn request_id_is_echoed_even_when_rejected() {
        let r = parse("stop", br#"{"request_id": "a1", "x": 1}"#, false, ok).unwrap_err();
        assert_eq!(r.request_id, Some(Value::String("a1".into())));
        assert_eq!(
            r.reason,
            "cmd/stop: unknown field `x`, expected `request_id`"
        );
        let r = parse("train", br#"{"x": 1, "request_id": 2}"#, false, ok).unwrap_err();
        assert_eq!(r.request_id, Some(Value::from(2)));
        assert!(r.reason.contains("unknown field `x`"), "{}", r.reason);
        // A bad request id is reported first, without an id to echo.
        let r = parse("train", br#"{"x": 1, "request_id": true}"#, false, ok).unwrap_err();
        assert_eq!(r.request_id, None);
        assert!(r.reason.contains("request_id must be"), "{}", r.reason);
        // A null request id is no request id.
        assert!(matches!(
            parse("status", br#"{"request_id": null}"#, false, ok),
            Ok(Command::Status { request_id: None })
        ));
        // A retained command is refused before its overrides are read.
        let r = parse("train", br#"{"overrides": 5}"#, true, ok).unwrap_err();
        assert!(r.reason.contains("retained"), "{}", r.reason);
    }

    #[test]
    fn malformed_payloads_are_rejected_with_reasons() {
        for (name, payload, needle) in [
            ("train", &b"not json"[..], "not valid JSON"),
            ("train", b"[1,2]", "JSON object"),
            ("train", b"\xff\xfe", "UTF-8"),
            (
                "train",
                br#"{"overrides": 5}"#,
                "overrides must be an object",
            ),
            ("train", br#"{"request_id": [1]}"#, "request_id must be"),
            ("reboot", b"{}", "unknown command"),
        ] {
            let r = parse(name, payload, false, ok).unwrap_err();
            assert!(
                r.reason.contains(needle),
                "{name} {payload:?}: {}",
                r.reason
            );
        }
        let huge = vec![b' '; MAX_COMMAND_BYTES + 1];
        assert!(parse("status", &huge, false, ok)
            .unwrap_err()
            .reason
            .contains("exceeds"));
        assert!(parse("train", b"{}", true, ok)
            .unwrap_err()
            .reason
            .contains("retained"));
    }

    #[test]
    fn overrides_are_validated_like_config_keys() {
        let good =
            br#"{"overrides": {"train.lr": 0.01, "train": {"max_epochs": 3}}, "request_id": 7}"#;
        match parse("train", good, false, validate_with_base).unwrap() {
            Command::Train {
                overrides,
                request_id,
            } => {
                assert_eq!(overrides.len(), 2);
                assert_eq!(request_id, Some(Value::from(7)));
                let s = base().resolve(&overrides).unwrap();
                assert_eq!(s.train.optimizer.lr, 0.01);
                assert_eq!(s.train.max_epochs, 3);
            }
            other => panic!("{other:?}"),
        }
        for (payload, needle) in [
            (
                &br#"{"overrides": {"train.max_epoch": 3}}"#[..],
                "did you mean",
            ),
            (
                br#"{"overrides": {"train.lr": "fast"}}"#,
                "train.optimizer.lr",
            ),
            (br#"{"overrides": {"train.lr": -1}}"#, "train.optimizer.lr"),
            (
                br#"{"overrides": {"train.batch_size": 0}}"#,
                "train.batch_size",
            ),
            (br#"{"overrides": {"train.lr": null}}"#, "null"),
            (
                br#"{"overrides": {"output.dir": "/tmp"}}"#,
                "cannot be overridden remotely",
            ),
            (
                br#"{"overrides": {"model.init": "/etc/passwd"}}"#,
                "cannot be overridden remotely",
            ),
        ] {
            let r = parse("train", payload, false, validate_with_base).unwrap_err();
            assert!(
                r.reason.contains(needle),
                "{}: {}",
                String::from_utf8_lossy(payload),
                r.reason
            );
        }
    }
}
