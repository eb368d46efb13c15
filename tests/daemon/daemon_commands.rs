//! Malformed, unknown, out-of-range and oversized commands are answered with
//! `command_rejected` (reason + request_id); the daemon goes on answering.

use crate::helpers::*;
use crate::trials::{test, Test};

fn malformed_commands_are_rejected_and_the_daemon_keeps_answering() {
    let mut h = Harness::start("", &[]);
    let events = h.dash.topic("events");

    // (command, payload, request_id expected back, words the reason must contain)
    let big_pad = "x".repeat(100 * 1024);
    let big = format!(r#"{{"request_id": "big", "overrides": {{}}, "pad": "{big_pad}"}}"#);
    let cases: Vec<(&str, String, Option<&str>, &str)> = vec![
        ("train", "not json".into(), None, "not valid JSON"),
        ("train", "[1, 2]".into(), None, "JSON object"),
        (
            "train",
            r#"{"request_id": "t1", "overrides": 5}"#.into(),
            Some("t1"),
            "overrides must be an object",
        ),
        (
            "train",
            r#"{"request_id": "t2", "overrides": {"train.lr": "fast"}}"#.into(),
            Some("t2"),
            "train.optimizer.lr",
        ),
        (
            "train",
            r#"{"request_id": "t3", "overrides": {"train.nope": 1}}"#.into(),
            Some("t3"),
            "unknown config key `train.nope`",
        ),
        (
            "train",
            r#"{"request_id": "t4", "overrides": {"train.lr": -1}}"#.into(),
            Some("t4"),
            "outside",
        ),
        (
            "train",
            r#"{"request_id": "t5", "overrides": {"train.batch_size": 0}}"#.into(),
            Some("t5"),
            "train.batch_size",
        ),
        (
            "train",
            r#"{"request_id": "t6", "overrides": {"output.dir": "/etc"}}"#.into(),
            Some("t6"),
            "cannot be overridden remotely",
        ),
        (
            "train",
            r#"{"request_id": "t7", "force": true}"#.into(),
            Some("t7"),
            "unknown field `force`",
        ),
        (
            "stop",
            r#"{"request_id": "s1"}"#.into(),
            Some("s1"),
            "no run in progress",
        ),
        (
            "stop",
            r#"{"request_id": 5, "now": 1}"#.into(),
            None,
            "unknown field `now`",
        ),
        (
            "status",
            r#"{"request_id": {"a": 1}}"#.into(),
            None,
            "request_id must be",
        ),
        ("reboot", "{}".into(), None, "unknown command"),
        ("train", big, None, "exceeds the limit"),
    ];
    for (cmd, payload, _, _) in &cases {
        h.dash.send(cmd, payload.clone());
    }
    for (i, (cmd, _, rid, needle)) in cases.iter().enumerate() {
        let (_, m) = h.wait(
            &format!("rejection of case {i} ({cmd}: {needle})"),
            SHORT,
            |m| {
                m.topic == events
                    && m.event() == "command_rejected"
                    && m.json["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains(needle))
                    && rid.is_none_or(|r| m.json["request_id"] == r)
            },
        );
        assert_ts(&m);
        assert_eq!(m.json["command"], *cmd, "case {i}");
        match rid {
            Some(r) => assert_eq!(m.json["request_id"], *r, "case {i}"),
            None => assert!(
                m.json["request_id"].is_null() || *cmd == "stop",
                "case {i}: {}",
                m.json
            ),
        }
    }
    // The numeric request id comes back as a number even when the command is rejected.
    h.wait("numeric request id", SHORT, |m| {
        m.event() == "command_rejected" && m.json["request_id"] == 5
    });

    // An empty cmd/train (what clearing a retained one sends) does not train.
    h.dash.send("train", "");
    h.wait("empty-payload rejection", SHORT, |m| {
        m.event() == "command_rejected"
            && m.json["reason"]
                .as_str()
                .unwrap_or("")
                .contains("empty payload")
    });

    // A retained command reaches the daemon live first (and is obeyed: cmd/status
    // here), but it is not obeyed again when the broker hands it out as retained at
    // the next connect.
    h.dash.send_retained("status", r#"{"request_id": "ret"}"#);

    // A packet over the client's limit costs the connection, not the daemon.
    // Mosquitto only: the embedded broker refuses packets over the same 1 MiB
    // itself (and drops the sender), so the daemon never sees one and does not
    // reconnect to be handed the retained command.
    if h.broker.is_mosquitto() {
        h.dash.send("train", vec![b'{'; 2 * 1024 * 1024]);
        h.wait("packet-limit rejection", LONG, |m| {
            m.event() == "command_rejected"
                && m.json["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("packet limit")
        });
        h.wait("retained rejection after the reconnect", LONG, |m| {
            m.event() == "command_rejected"
                && m.json["request_id"] == "ret"
                && m.json["reason"].as_str().unwrap_or("").contains("retained")
        });
    }
    h.dash.send_retained("status", "");

    // Still alive and answering.
    let mark = h.dash.seen.len();
    h.dash.send("status", r#"{"request_id": "st"}"#);
    let status = h.dash.topic("status");
    let (_, s) = h.wait_from(mark, "status answer", LONG, |m| m.topic == status);
    assert_eq!(s.json["state"], "idle");
    assert!(
        h.dash.seen.iter().all(|m| m.event() != "run_started"),
        "no rejected command may start a run"
    );
    assert!(
        h.daemon.child.try_wait().unwrap().is_none(),
        "the daemon is running"
    );
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(
        malformed_commands_are_rejected_and_the_daemon_keeps_answering
    )]
}
