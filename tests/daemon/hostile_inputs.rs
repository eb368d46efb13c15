//! Hostile inputs end to end (issue 18): two processes on one `output.dir`,
//! configurations that cannot work, and inputs that would make an outgoing
//! message too large for MQTT. Each test reproduces a break found by a hostile
//! test run and fails on the code before the fix.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::helpers::*;
use crate::paths::BIN;
use crate::trials::{test, Test};

fn lock_pid(out: &Path) -> Option<u32> {
    std::fs::read_to_string(out.join(".lock"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Break 8: a second daemon on a live daemon's `output.dir` "resumed" its run;
/// `train --resume` on it trained the same run twice. Both are refused now,
/// with exit code 2 and a message naming the folder and the holder's pid.
fn a_second_daemon_and_a_resume_on_a_live_output_dir_are_refused() {
    // No broker: the daemon keeps trying to connect, holding its folder.
    let env = Env::new(free_port(), "", &[]);
    let mut first = Daemon::start(&env, &[]);
    let pid = first.child.id();
    assert!(
        eventually(SHORT, || lock_pid(&env.out) == Some(pid)),
        "the daemon did not lock output.dir\n{}",
        first.log_text()
    );

    let second = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&env.config)
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&env.out.display().to_string()), "{err}");
    assert!(err.contains(&format!("pid {pid}")), "{err}");

    let run_dir = env.out.join("runs/20261201T000000Z-dead");
    std::fs::create_dir_all(&run_dir).unwrap();
    let out = Command::new(BIN)
        .args(["train", "--no-progress", "--config"])
        .arg(&env.config)
        .arg("--resume")
        .arg(&run_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("in use") && err.contains(&format!("pid {pid}")),
        "{err}"
    );

    // The first daemon is untouched and shuts down cleanly.
    first.sigterm();
    let status = first.wait_exit(SHORT).expect("the daemon exits on SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", first.log_text());
}

/// Break 7 and the config checks: `output.dir = data.dir` (or one inside the
/// other), port 0, `$SYS` as prefix, a 70,000-byte device id and a keep-alive
/// that does not fit MQTT's u16 all passed `check-config`.
fn check_config_refuses_configurations_that_cannot_work() {
    let env = Env::new(free_port(), "", &[]);
    let ok = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&env.config)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let long_id = format!("mqtt.device_id={}", "d".repeat(70_000));
    let cases: Vec<(String, &str)> = vec![
        (format!("output.dir={}", env.data.display()), "data.dir"),
        (
            format!("output.dir={}/models", env.data.display()),
            "data.dir",
        ),
        (format!("data.dir={}/runs", env.out.display()), "data.dir"),
        ("mqtt.port=0".into(), "mqtt.port"),
        ("mqtt.topic_prefix=$SYS".into(), "mqtt.topic_prefix"),
        ("mqtt.keep_alive_s=65536".into(), "mqtt.keep_alive_s"),
        (long_id, "mqtt.device_id"),
    ];
    for (set, key) in cases {
        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&env.config)
            .arg("--set")
            .arg(&set)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}: {err}",
            &set[..set.len().min(60)]
        );
        assert!(err.contains(key), "{}: {err}", &set[..set.len().min(60)]);
        assert!(err.len() < 2_000, "the message quotes the whole value");
    }
}

/// A safetensors file without `x`/`y` and with 1,500 tensors of 1,000-character
/// names: its rejection reason listed every name (1.5 MB), rumqttc refused the
/// `data_rejected` event, and the outbox resent it after every reconnect, so
/// nothing was ever delivered again.
fn many_names_shard(path: &Path) {
    let mut header = serde_json::Map::new();
    for i in 0..1_500 {
        let name = format!("{i:04}{}", "n".repeat(996));
        header.insert(
            name,
            serde_json::json!({"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]}),
        );
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(h.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, 1_500));
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn oversized_events_and_request_ids_never_wedge_mqtt() {
    let mut h = Harness::start("", &[]);
    let events = h.dash.topic("events");
    let status = h.dash.topic("status");
    many_names_shard(&h.env.data.join("names.safetensors"));
    let (_, m) = h.wait_from(0, "data_rejected for names.safetensors", LONG, |m| {
        m.topic == events && m.event() == "data_rejected"
    });
    assert_eq!(m.json["file"], "names.safetensors");
    assert_eq!(m.json["truncated"], true, "{}", m.json);
    assert!(m.raw.len() < 64 * 1024, "{} bytes", m.raw.len());

    // 20 commands with 60 KB request ids: each rejected, its id echoed cut.
    // One at a time: the embedded broker keeps only 128 KiB per topic, so a
    // burst of 1.2 MB would be cut by the broker before the daemon saw it.
    for i in 0..20 {
        let id = format!("{i:02}{}", "r".repeat(60_000));
        h.dash.send("train", format!(r#"{{"request_id":"{id}"}}"#));
        let prefix = format!("{i:02}rrr");
        h.wait_from(0, &format!("command_rejected {i}"), LONG, |m| {
            m.topic == events
                && m.event() == "command_rejected"
                && m.json["request_id"]
                    .as_str()
                    .is_some_and(|r| r.starts_with(&prefix) && r.len() < 300)
        });
    }
    // The link still works: a status request is answered promptly.
    h.dash.pump_now();
    let from = h.dash.seen.len();
    h.dash.send("status", r#"{"request_id":"after"}"#);
    h.wait_from(from, "a status answer", SHORT, |m| m.topic == status);
}

/// A CSV with one 2 MB field: rejected with a short reason, delivered.
fn a_csv_with_a_2mb_field_is_rejected_with_a_short_reason() {
    let mut h = Harness::start("[data]\nformat = \"csv\"\n", &[]);
    let events = h.dash.topic("events");
    let tmp = h.env.dir.path().join("wide.csv");
    std::fs::write(&tmp, format!("a,label\n1,0\n{},1\n", "7x".repeat(1 << 20))).unwrap();
    std::fs::rename(&tmp, h.env.data.join("wide.csv")).unwrap();
    let (_, m) = h.wait_from(0, "data_rejected for wide.csv", LONG, |m| {
        m.topic == events && m.event() == "data_rejected"
    });
    let reason = m.json["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("not a number") && reason.len() < 500,
        "{reason}"
    );
}

/// Recovery: a corrupt `current.safetensors` made every warm-started run fail;
/// a run killed between its `summary.json` and its promotion lost the promotion
/// for good. Now the previous model is put back (announced by `model_recovered`)
/// and the finished run's promotion is decided after the restart.
fn a_corrupt_current_model_heals_and_an_unpromoted_run_is_promoted_after_restart() {
    let port = free_port();
    let env = Env::new(port, "", &[]);
    // A finished run, promoted by `train`: current.safetensors is its model.
    let out = Command::new(BIN)
        .args(["train", "--no-progress", "--config"])
        .arg(&env.config)
        .args(["--set", "train.max_steps=20"])
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let run_dir = std::path::PathBuf::from(stdout.lines().last().unwrap().trim());
    let run_id = run_dir.file_name().unwrap().to_string_lossy().to_string();
    let current = env.out.join("current.safetensors");
    let previous = env.out.join("previous.safetensors");
    std::fs::copy(&current, &previous).unwrap();
    std::fs::write(&current, b"not a model: bit rot").unwrap();

    let mut h = Harness::start_in(env, port, &[], None);
    let (_, m) = h.wait_event("model_recovered", None, LONG);
    assert_eq!(m.json["restored_from"], "previous", "{}", m.json);
    let status = h.dash.topic("status");
    let rid = run_id.clone();
    h.wait("status naming the restored model", SHORT, |m| {
        m.topic == status && m.json["current_model"].as_str() == Some(rid.as_str())
    });
    assert!(h.env.out.join("current.safetensors.corrupt").is_file());

    // Killed before promotion: no current model, the run's summary is there.
    h.daemon.sigterm();
    h.daemon.wait_exit(SHORT).expect("the daemon exits");
    std::fs::remove_file(h.env.out.join("current.safetensors")).unwrap();
    std::fs::remove_file(h.env.out.join("previous.safetensors")).unwrap();
    h.dash.pump_now();
    let from = h.dash.seen.len();
    h.daemon = Daemon::start(&h.env, &[]);
    let events = h.dash.topic("events");
    let (_, m) = h.wait_from(from, "model_promoted after the restart", LONG, |m| {
        m.topic == events && m.event() == "model_promoted"
    });
    assert_eq!(m.run_id(), run_id);
    assert!(h.env.out.join("current.safetensors").is_file());
    assert!(run_dir.join("promotion.json").is_file());
}

/// Command latency: without `TCP_NODELAY` the daemon's answer waited for the
/// broker's delayed ACK (a 40-90 ms floor). With a broker and a client that set
/// `TCP_NODELAY` themselves (so that only the daemon's socket is measured), 30
/// `cmd/status` → `status` round trips: prints the median and the worst; the
/// median must stay under 30 ms and every answer come within a second.
fn commands_are_answered_without_a_nagle_floor() {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let bin = mosquitto().expect("mosquitto on PATH (the test needs it)");
    let port = free_port();
    let env = Env::new(port, "", &[]);
    let conf = env.dir.path().join("fast-mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"),
    )
    .unwrap();
    let mut broker = Command::new(&bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(eventually(SHORT, || std::net::TcpStream::connect((
        "127.0.0.1",
        port
    ))
    .is_ok()));
    let daemon = Daemon::start(&env, &[]);

    let mut o = MqttOptions::new("latency-probe", "127.0.0.1", port);
    o.set_keep_alive(std::time::Duration::from_secs(5));
    let (client, mut conn) = Client::new(o, 16);
    let mut net = conn.eventloop.network_options();
    net.set_tcp_nodelay(true);
    conn.eventloop.set_network_options(net);
    let status = format!("{}/status", env.base_topic());
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let (sub, c2) = (status.clone(), client.clone());
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c2.try_subscribe(sub.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v = serde_json::from_slice(&p.payload).unwrap_or_default();
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
    });
    let first = rx.recv_timeout(LONG).expect("the daemon's status");
    assert!(first["state"].is_string(), "{first}");
    let cmd = format!("{}/cmd/status", env.base_topic());
    let mut times = Vec::new();
    for i in 0..30 {
        while rx.try_recv().is_ok() {}
        let t0 = std::time::Instant::now();
        client
            .publish(
                cmd.clone(),
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"request_id":"{i}"}}"#),
            )
            .unwrap();
        rx.recv_timeout(SHORT).expect("a status answer");
        times.push(t0.elapsed());
    }
    times.sort();
    let (median, worst) = (times[times.len() / 2], times[times.len() - 1]);
    eprintln!("cmd/status round trip: median {median:?}, worst {worst:?}");
    drop(daemon);
    let _ = broker.kill();
    let _ = broker.wait();
    assert!(worst < std::time::Duration::from_secs(1), "{times:?}");
    assert!(median < std::time::Duration::from_millis(30), "{times:?}");
}

/// Break 1: a 103-byte `cmd/train` with `model.hidden = [1099511627776]`
/// aborted the daemon (a failed allocation) before any event; `[100000,
/// 100000]` the same; a `cnn1d` with `padding = 1000000` grew to 24 GB until
/// the OOM killer. Each is now answered with `command_rejected` naming the
/// key, the estimate and the budget; `model.*` overrides that a warm start
/// from the current model would ignore are refused too; the daemon goes on.
fn absurd_model_sizes_in_a_command_are_rejected_and_the_daemon_lives() {
    let mut h = Harness::start("", &[]);
    let events = h.dash.topic("events");
    let status = h.dash.topic("status");
    let boom = r#"{"request_id":"boom","overrides":{"model.hidden":[1099511627776],"retrain.warm_start":"scratch"}}"#;
    assert!(
        boom.len() <= 103,
        "the issue's command, 103 bytes with spaces"
    );
    let cases = [
        (boom.to_string(), "boom", "`model.hidden`"),
        (
            r#"{"request_id":"wide","overrides":{"model.hidden":[100000,100000],"retrain.warm_start":"scratch"}}"#.into(),
            "wide",
            "`model.hidden`",
        ),
        (
            r#"{"request_id":"pad","overrides":{"model.arch":"cnn1d","model.padding":1000000,"retrain.warm_start":"scratch"}}"#.into(),
            "pad",
            "`model.padding`",
        ),
        (
            r#"{"request_id":"ignored","overrides":{"model.hidden":[32]}}"#.into(),
            "ignored",
            "retrain.warm_start",
        ),
    ];
    for (payload, id, needle) in &cases {
        let from = h.dash.seen.len();
        h.dash.send("train", payload.clone());
        let (_, m) = h.wait_from(from, &format!("command_rejected {id}"), LONG, |m| {
            m.topic == events && m.event() == "command_rejected" && m.json["request_id"] == *id
        });
        let reason = m.json["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(needle), "{id}: {reason}");
        if *id != "ignored" {
            assert!(
                reason.contains("memory budget") && reason.contains("MiB"),
                "{id}: {reason}"
            );
        }
    }
    // Alive and answering, no run started.
    h.dash.pump_now();
    let from = h.dash.seen.len();
    h.dash.send("status", r#"{"request_id":"after"}"#);
    h.wait_from(from, "a status answer", SHORT, |m| m.topic == status);
    assert!(
        !h.dash.seen.iter().any(|m| m.event() == "run_started"),
        "a run started"
    );
    assert!(
        h.daemon.child.try_wait().unwrap().is_none(),
        "the daemon exited"
    );
}

/// Break 5, the reference: on a fresh device (no model, no class file) a CSV
/// row labelled `cat` among digit data was accepted, and the next run from
/// scratch inferred the classes as `["cat"]`. The watcher now checks new files
/// against the classes of the data already there: the row is refused, named,
/// with the reason; a file with a known label is still accepted.
fn a_stray_class_on_a_fresh_device_is_refused_before_any_model() {
    let port = free_port();
    let env = Env::new(port, "[data]\nformat = \"csv\"\n", &[]);
    let mut rows = String::from("a,b,c,label\n");
    for i in 0..200 {
        rows.push_str(&format!("{},{},{},{}\n", i % 7, i % 5, i % 3, i % 10));
    }
    std::fs::write(env.data.join("digits.csv"), rows).unwrap();
    let mut h = Harness::start_in(env, port, &[], None);
    let events = h.dash.topic("events");
    for (name, body) in [("cat.csv", "1,2,3,cat\n"), ("seven.csv", "1,2,3,7\n")] {
        let tmp = h.env.dir.path().join(name);
        std::fs::write(&tmp, format!("a,b,c,label\n{body}")).unwrap();
        std::fs::rename(&tmp, h.env.data.join(name)).unwrap();
    }
    let (_, m) = h.wait("data_rejected for cat.csv", LONG, |m| {
        m.topic == events && m.event() == "data_rejected" && m.json["file"] == "cat.csv"
    });
    let reason = m.json["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("\"cat\"") && reason.contains("10 classes"),
        "{reason}"
    );
    h.wait("data_accepted for seven.csv", LONG, |m| {
        m.topic == events && m.event() == "data_accepted" && m.json["file"] == "seven.csv"
    });
    assert!(h.env.data.join("rejected/cat.csv").is_file());
}

/// Break 5: five samples of 3e38 (finite f32, accepted under a raised
/// `data.max_abs_value`) made every warm-started run fail with "the learning
/// rate may be too high", naming no file. The failure names the file now.
fn a_run_made_non_finite_by_a_data_file_names_the_file() {
    let port = free_port();
    let extra = "[data]\nformat = \"csv\"\nmax_abs_value = 3.4e38\n[model]\nhidden = [16]\n[train]\nmax_epochs = 5\n[train.optimizer]\nlr = 0.5\n";
    let env = Env::new(port, extra, &[]);
    for f in 0..3 {
        let mut rows = String::from("a,b,c,label\n");
        for i in 0..100u32 {
            let l = i % 3;
            let jitter = ((i * 37 + f * 11) % 100) as f32 / 100.0;
            rows.push_str(&format!(
                "{},{jitter},{},{l}\n",
                l as f32 + jitter,
                jitter - l as f32
            ));
        }
        std::fs::write(env.data.join(format!("part{f}.csv")), rows).unwrap();
    }
    let mut h = Harness::start_in(env, port, &[], None);
    let events = h.dash.topic("events");
    let first = h.train("clean", r#"{"request_id":"clean"}"#);
    let (_, m) = h.wait("the first promotion", LONG, |m| {
        m.topic == events && m.event().starts_with("model_") && m.run_id() == first
    });
    assert_eq!(m.event(), "model_promoted", "{}", m.json);

    let tmp = h.env.dir.path().join("big.csv");
    let big: String = (0..5)
        .map(|i| format!("3e38,1,-2e38,{}\n", i % 3))
        .collect();
    std::fs::write(&tmp, format!("a,b,c,label\n{big}")).unwrap();
    std::fs::rename(&tmp, h.env.data.join("big.csv")).unwrap();
    h.wait("data_accepted for big.csv", LONG, |m| {
        m.topic == events && m.event() == "data_accepted" && m.json["file"] == "big.csv"
    });
    h.dash.send("train", r#"{"request_id":"warm"}"#);
    let (_, m) = h.wait("run_failed for warm", LONG, |m| {
        m.topic == events
            && m.event() == "run_failed"
            && m.json["request_ids"]
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == "warm"))
    });
    assert_eq!(m.json["kind"], "diverged", "{}", m.json);
    let reason = m.json["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("big.csv (values up to 3e38)") && !reason.contains("part0.csv"),
        "{reason}"
    );
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![
        test!(a_second_daemon_and_a_resume_on_a_live_output_dir_are_refused),
        test!(check_config_refuses_configurations_that_cannot_work),
        test!(oversized_events_and_request_ids_never_wedge_mqtt),
        test!(a_csv_with_a_2mb_field_is_rejected_with_a_short_reason),
        test!(absurd_model_sizes_in_a_command_are_rejected_and_the_daemon_lives),
        test!(a_corrupt_current_model_heals_and_an_unpromoted_run_is_promoted_after_restart),
        test!(a_stray_class_on_a_fresh_device_is_refused_before_any_model),
        test!(a_run_made_non_finite_by_a_data_file_names_the_file),
        // Its own Mosquitto with `set_tcp_nodelay`, so that only the daemon's socket is measured.
        test!(commands_are_answered_without_a_nagle_floor).needs(MOSQUITTO),
    ]
}
