//! Property tests for the daemon's command parser (`daemon::commands::parse`),
//! the first thing that touches what anyone on the broker publishes: arbitrary
//! bytes, arbitrary JSON objects with random keys and values, huge numbers and
//! deep nesting. It never panics, every rejection carries a reason, and an
//! accepted `cmd/train` can never move a file, folder, the broker or the device.
//!
//! CI runs a short pass (proptest's default 256 cases per property, about 1,500
//! parser executions in all, printed). A longer run:
//! `PROPTEST_CASES=50000 cargo test --release --test daemon fuzz_commands -- --nocapture`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::trials::{test, Test};
use edge_trainer::config::{Override, Settings};
use edge_trainer::daemon::commands::{self, Command, ConfigBase, Rejection, MAX_COMMAND_BYTES};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);

/// Keys a command must never change: where files, models and the broker live.
const PATH_LIKE: &[&str] = &[
    "data.dir",
    "data.vocab",
    "data.format",
    "data.max_file_mb",
    "output.dir",
    "model.init",
    "mqtt.host",
    "mqtt.port",
    "mqtt.password_file",
    "mqtt.username",
    "mqtt.tls.ca",
    "mqtt.tls.client_cert",
    "mqtt.tls.client_key",
    "mqtt.topic_prefix",
    "mqtt.device_id",
    "mqtt.embedded_broker",
    "device.kind",
    "device.ordinal",
    "retrain.on_start",
];

/// The daemon's base config, as a real one: a file in a temp folder.
fn base() -> &'static (ConfigBase, Settings, PathBuf) {
    static BASE: OnceLock<(ConfigBase, Settings, PathBuf)> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("et-fuzz-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "[device]\nkind = \"cpu\"\n[mqtt]\nhost = \"127.0.0.1\"\ndevice_id = \"d1\"\n\
                 [data]\ndir = {:?}\n[output]\ndir = {:?}\n",
                dir.join("data").display().to_string(),
                dir.join("out").display().to_string()
            ),
        )
        .unwrap();
        let (b, s) = ConfigBase::load(&cfg, Vec::new()).unwrap();
        (b, s, dir)
    })
}

fn validate(ovs: &[Override]) -> Result<(), String> {
    base().0.resolve(ovs).map(|_| ()).map_err(|e| e.to_string())
}

fn sections(s: &Settings) -> Value {
    json!({
        "device": s.device,
        "mqtt": s.mqtt,
        "data": s.data,
        "output": s.output,
        "model.init": s.model.init,
    })
}

/// The properties every parse must have, whatever the input.
fn check(name: &str, payload: &[u8], retained: bool) -> Result<Option<Command>, TestCaseError> {
    EXECUTIONS.fetch_add(1, Ordering::Relaxed);
    let result = commands::parse(name, payload, retained, validate);
    match result {
        Err(Rejection {
            command, reason, ..
        }) => {
            prop_assert_eq!(command, name);
            prop_assert!(!reason.trim().is_empty(), "a rejection without a reason");
            Ok(None)
        }
        Ok(cmd) => {
            prop_assert!(!retained, "a retained command was accepted");
            prop_assert!(payload.len() <= MAX_COMMAND_BYTES);
            if let Command::Train { overrides, .. } = &cmd {
                prop_assert_eq!(name, "train");
                let resolved = base().0.resolve(overrides);
                prop_assert!(resolved.is_ok(), "accepted overrides do not resolve");
                let resolved = resolved.unwrap();
                prop_assert_eq!(sections(&resolved), sections(&base().1));
            }
            Ok(Some(cmd))
        }
    }
}

fn key_strategy() -> impl Strategy<Value = String> {
    let known: Vec<String> = PATH_LIKE
        .iter()
        .map(|s| s.to_string())
        .chain(
            [
                "train.lr",
                "train.max_epochs",
                "train.batch_size",
                "train.optimizer.kind",
                "train.early_stopping.patience",
                "model.hidden",
                "model.rename",
                "model.init_prefix",
                "model.freeze",
                "retrain.warm_start",
                "overrides",
                "request_id",
                "train",
                "model",
                "mqtt",
                "data",
                "",
                "..",
                "model..init",
                "MODEL.INIT",
                "model.init ",
                "model[init]",
                "train.optimizer.lr[0]",
            ]
            .iter()
            .map(|s| s.to_string()),
        )
        .collect();
    prop_oneof![
        3 => proptest::sample::select(known),
        1 => "[a-z_.\\[\\]0-9 ]{0,24}",
        1 => any::<String>(),
    ]
}

fn leaf_strategy() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        Just(Value::from(1e308)),
        Just(Value::from(-1e308)),
        Just(Value::from(u64::MAX)),
        Just(Value::from(i64::MIN)),
        Just(Value::from("/etc/passwd")),
        Just(Value::from("../../../../tmp/x")),
        ".{0,40}".prop_map(Value::from),
    ]
}

fn json_strategy() -> impl Strategy<Value = Value> {
    leaf_strategy().prop_recursive(10, 128, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((key_strategy(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn command_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(vec!["train".to_string(), "stop".into(), "status".into()]),
        1 => ".{0,12}",
    ]
}

fn run<S: Strategy>(what: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::default());
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{what}: {e}");
    }
}

/// All properties in one test, so the number of executions can be reported.
fn command_parser_properties() {
    run(
        "arbitrary bytes",
        (
            command_name(),
            proptest::collection::vec(any::<u8>(), 0..512),
            any::<bool>(),
        ),
        |(name, payload, retained)| check(&name, &payload, retained).map(|_| ()),
    );
    run(
        "arbitrary JSON",
        (command_name(), json_strategy()),
        |(name, v)| check(&name, v.to_string().as_bytes(), false).map(|_| ()),
    );
    run(
        "arbitrary train overrides",
        (
            proptest::collection::vec((key_strategy(), json_strategy()), 0..6),
            leaf_strategy(),
        ),
        |(overrides, request_id)| {
            let obj: Map<String, Value> = overrides.into_iter().collect();
            let payload = json!({"overrides": obj, "request_id": request_id});
            check("train", payload.to_string().as_bytes(), false).map(|_| ())
        },
    );
    run(
        "path-like keys, flat or nested",
        (
            proptest::sample::select(PATH_LIKE.to_vec()),
            leaf_strategy(),
            any::<bool>(),
        ),
        |(key, value, nested)| {
            let overrides = if nested {
                let mut v = value.clone();
                for part in key.rsplit('.') {
                    v = json!({ part: v });
                }
                v
            } else {
                json!({ key: value })
            };
            let payload = json!({"overrides": overrides, "request_id": "r"});
            EXECUTIONS.fetch_add(1, Ordering::Relaxed);
            let rej =
                match commands::parse("train", payload.to_string().as_bytes(), false, validate) {
                    Err(rej) => rej,
                    Ok(c) => return Err(TestCaseError::fail(format!("{key} accepted: {c:?}"))),
                };
            prop_assert!(
                rej.reason.contains("cannot be overridden remotely"),
                "{}",
                rej.reason
            );
            prop_assert!(rej.reason.contains(key), "{}", rej.reason);
            prop_assert_eq!(rej.request_id, Some(json!("r")));
            Ok(())
        },
    );
    run(
        "huge and deep payloads",
        (1usize..400, 0usize..(2 * MAX_COMMAND_BYTES)),
        |(depth, pad)| {
            let deep = format!("{}1{}", "{\"overrides\":".repeat(depth), "}".repeat(depth));
            check("train", deep.as_bytes(), false)?;
            let mut big = b"{\"request_id\": \"".to_vec();
            big.extend(std::iter::repeat_n(b'a', pad));
            big.extend_from_slice(b"\"}");
            let out = check("status", &big, false)?;
            if big.len() > MAX_COMMAND_BYTES {
                prop_assert!(out.is_none());
            }
            Ok(())
        },
    );
    println!(
        "fuzz_commands: {} parser executions, no panic, every rejection with a reason",
        EXECUTIONS.load(Ordering::Relaxed)
    );
}

fn every_path_like_key_is_named_in_its_rejection() {
    for key in PATH_LIKE {
        let payload = json!({"overrides": {*key: "/tmp/elsewhere"}});
        let rej = commands::parse("train", payload.to_string().as_bytes(), false, validate)
            .expect_err(key);
        assert!(
            rej.reason
                .contains(&format!("`{key}` cannot be overridden remotely")),
            "{key}: {}",
            rej.reason
        );
    }
    // An allowed key still works.
    let ok = commands::parse(
        "train",
        br#"{"overrides": {"train.lr": 0.05}}"#,
        false,
        validate,
    );
    assert!(matches!(ok, Ok(Command::Train { .. })), "{ok:?}");
}

fn oversized_payload_is_refused_before_parsing() {
    // Not JSON at all: the size check comes first, so the reason is the size.
    let big = vec![b'{'; MAX_COMMAND_BYTES + 1];
    let rej = commands::parse("train", &big, false, validate).unwrap_err();
    assert!(rej.reason.contains("exceeds the limit"), "{}", rej.reason);
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![
        test!(command_parser_properties),
        test!(every_path_like_key_is_named_in_its_rejection),
        test!(oversized_payload_is_refused_before_parsing),
    ]
}
