//! Bounds on what the daemon sends. rumqttc refuses to encode a packet over its
//! maximum size and drops the connection; the outbox would then resend the same
//! message first after every reconnect, for ever. So every message is fitted
//! here before it is queued: long lists of coalesced request ids are cut,
//! messages over [`SOFT_LIMIT`] have their long strings and lists shortened, and
//! one that still cannot fit is replaced by a short one on the same topic that
//! says so (`truncated: true`, `original_bytes`), keeping its short fields
//! (`event`, `ts`, `run_id`, ...).

use serde_json::{Map, Value};

use super::outbox::Message;

/// Longest `request_id` a command may carry (bytes); longer ones are rejected.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Most coalesced request ids listed in one event; the rest are counted in
/// `request_ids_omitted`.
pub const MAX_REQUEST_IDS: usize = 32;
/// Messages larger than this get their long strings and lists shortened.
pub const SOFT_LIMIT: usize = 16 * 1024;
/// Longest string kept whole in a shortened message (bytes).
const MAX_STRING_BYTES: usize = 1024;
/// Longest list kept whole in a shortened message.
const MAX_LIST_ITEMS: usize = 32;
/// Bytes an MQTT PUBLISH needs besides topic and payload (fixed header with a
/// four-byte remaining length, topic length, packet id), rounded up.
const PACKET_OVERHEAD: usize = 16;

/// The size of `msg` as a QoS 1 PUBLISH packet, an upper bound.
pub fn packet_size(msg: &Message) -> usize {
    msg.topic.len() + msg.payload.len() + PACKET_OVERHEAD
}

/// `s` cut to at most `max` bytes on a character boundary, with a marker
/// saying how much was cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} more bytes]", &s[..end], s.len() - end)
}

/// `msg` made to fit a packet of at most `max_packet` bytes (see the module doc).
pub fn fit(mut msg: Message, max_packet: usize) -> Message {
    let large = msg.payload.len() > SOFT_LIMIT;
    let has_ids = memchr_ids(&msg.payload);
    if !large && !has_ids {
        return msg;
    }
    let original = msg.payload.len();
    let Ok(mut value) = serde_json::from_slice::<Value>(&msg.payload) else {
        return if packet_size(&msg) > max_packet {
            replace(msg, None, original)
        } else {
            msg
        };
    };
    let mut changed = cap_request_ids(&mut value);
    if large {
        changed |= shorten(&mut value);
    }
    if changed {
        if let Value::Object(o) = &mut value {
            o.insert("truncated".into(), Value::Bool(true));
            o.insert("original_bytes".into(), Value::from(original));
        }
        msg.payload = value.to_string().into_bytes();
    }
    if packet_size(&msg) > max_packet {
        return replace(msg, Some(&value), original);
    }
    msg
}

fn memchr_ids(payload: &[u8]) -> bool {
    const KEY: &[u8] = b"\"request_ids\"";
    payload.windows(KEY.len()).any(|w| w == KEY)
}

fn cap_request_ids(v: &mut Value) -> bool {
    let Value::Object(o) = v else { return false };
    let Some(Value::Array(ids)) = o.get_mut("request_ids") else {
        return false;
    };
    let mut changed = false;
    for id in ids.iter_mut() {
        if let Value::String(s) = id {
            if s.len() > MAX_REQUEST_ID_BYTES {
                *s = truncate(s, MAX_REQUEST_ID_BYTES);
                changed = true;
            }
        }
    }
    if ids.len() > MAX_REQUEST_IDS {
        let omitted = ids.len() - MAX_REQUEST_IDS;
        ids.truncate(MAX_REQUEST_IDS);
        o.insert("request_ids_omitted".into(), Value::from(omitted));
        changed = true;
    }
    changed
}

/// Cuts long strings and lists anywhere in `v`; whether anything changed.
fn shorten(v: &mut Value) -> bool {
    match v {
        Value::String(s) if s.len() > MAX_STRING_BYTES => {
            *s = truncate(s, MAX_STRING_BYTES);
            true
        }
        Value::Array(items) => {
            let mut changed = false;
            if items.len() > MAX_LIST_ITEMS {
                let omitted = items.len() - MAX_LIST_ITEMS;
                items.truncate(MAX_LIST_ITEMS);
                items.push(Value::String(format!("… {omitted} more")));
                changed = true;
            }
            for item in items.iter_mut() {
                changed |= shorten(item);
            }
            changed
        }
        Value::Object(o) => {
            let mut changed = false;
            for (_, item) in o.iter_mut() {
                changed |= shorten(item);
            }
            changed
        }
        _ => false,
    }
}

/// The short stand-in for a message that cannot be sent: same topic, kind and
/// retain flag; the original's short top-level fields, `truncated: true` and
/// its size.
fn replace(mut msg: Message, value: Option<&Value>, original: usize) -> Message {
    let mut out = Map::new();
    if let Some(Value::Object(o)) = value {
        for (k, v) in o {
            let short = match v {
                Value::String(s) => s.len() <= 256,
                Value::Number(_) | Value::Bool(_) | Value::Null => true,
                _ => false,
            };
            if short && k.len() <= 64 && out.len() < 32 {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out.insert("truncated".into(), Value::Bool(true));
    out.insert("original_bytes".into(), Value::from(original));
    out.insert(
        "reason".into(),
        Value::String("the message was too large for MQTT and was replaced by this summary".into()),
    );
    tracing::warn!(
        topic = %msg.topic,
        bytes = original,
        "an outgoing message is too large for MQTT; sending a summary instead"
    );
    msg.payload = Value::Object(out).to_string().into_bytes();
    msg
}

#[cfg(test)]
mod tests {
    use super::super::outbox::Kind;
    use super::*;
    use serde_json::json;

    fn msg(v: Value) -> Message {
        Message {
            topic: "p/d/events".into(),
            payload: v.to_string().into_bytes(),
            retain: false,
            kind: Kind::Lifecycle,
        }
    }

    fn parsed(m: &Message) -> Value {
        serde_json::from_slice(&m.payload).unwrap()
    }

    #[test]
    fn small_messages_pass_unchanged() {
        let m = msg(json!({"event": "run_started", "run_id": "r", "request_ids": ["a", 1]}));
        assert_eq!(fit(m.clone(), 1 << 20), m);
    }

    #[test]
    fn coalesced_request_ids_are_capped_with_a_count() {
        let ids: Vec<String> = (0..20)
            .map(|i| format!("{i}{}", "x".repeat(60_000)))
            .collect();
        let m = fit(
            msg(json!({"event": "run_started", "run_id": "r", "request_ids": ids})),
            1 << 20,
        );
        assert!(packet_size(&m) < 16 * 1024, "{}", m.payload.len());
        let v = parsed(&m);
        assert_eq!(v["event"], "run_started");
        assert_eq!(v["truncated"], true);
        assert_eq!(v["request_ids"].as_array().unwrap().len(), 20);
        let many: Vec<u32> = (0..100).collect();
        let v = parsed(&fit(
            msg(json!({"event": "e", "request_ids": many})),
            1 << 20,
        ));
        assert_eq!(v["request_ids"].as_array().unwrap().len(), MAX_REQUEST_IDS);
        assert_eq!(v["request_ids_omitted"], 68);
    }

    #[test]
    fn oversized_messages_never_exceed_the_packet_limit() {
        // One 2 MB reason (a CSV field quoted in a rejection).
        let m = fit(
            msg(json!({"event": "data_rejected", "file": "a.csv", "reason": "y".repeat(2 << 20)})),
            1 << 20,
        );
        assert!(packet_size(&m) <= 1 << 20);
        let v = parsed(&m);
        assert_eq!(
            (v["event"].as_str(), v["file"].as_str()),
            (Some("data_rejected"), Some("a.csv"))
        );
        assert!(v["reason"].as_str().unwrap().contains("more bytes]"));
        // Many fields none of which is long: still replaced by a short summary.
        let wide: Map<String, Value> = (0..200_000).map(|i| (format!("k{i}"), json!(i))).collect();
        let mut big = wide.clone();
        big.insert("event".into(), json!("x"));
        let m = fit(msg(Value::Object(big)), 1 << 20);
        assert!(packet_size(&m) <= 1 << 20);
        let v = parsed(&m);
        assert_eq!(v["truncated"], true);
        assert!(v["original_bytes"].as_u64().unwrap() > 1 << 20);
        // Not JSON at all.
        let raw = Message {
            payload: vec![b'z'; 3 << 20],
            ..msg(json!({}))
        };
        let m = fit(raw, 1 << 20);
        assert!(packet_size(&m) <= 1 << 20);
        assert_eq!(parsed(&m)["truncated"], true);
    }

    #[test]
    fn truncation_keeps_utf8_and_says_how_much_was_cut() {
        let s = "é".repeat(10);
        let t = truncate(&s, 5);
        assert!(t.starts_with("éé") && t.ends_with("[16 more bytes]"), "{t}");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
