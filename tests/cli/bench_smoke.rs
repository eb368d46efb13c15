//! `edge-trainer bench --smoke` runs every model of the comparison through the
//! real engine and reports each (no timing assertions: CI machines vary).

use crate::paths::BIN;
use crate::trials::{test, Test};
use std::process::Command;

const MODELS: [&str; 7] = [
    "mlp-digits",
    "mlp-wide",
    "cnn",
    "textcnn",
    "resnet18",
    "mobilenet-v2",
    "mobilenet-v3-small",
];

fn bench(extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["bench", "--smoke"])
        .args(extra)
        .output()
        .expect("run edge-trainer bench")
}

fn smoke_prints_every_model() {
    let out = bench(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    for m in MODELS {
        assert!(
            stdout.lines().any(|l| l.starts_with(m)),
            "no line for {m}:\n{stdout}"
        );
    }
    assert!(stdout.contains("samples/s"), "{stdout}");
}

fn smoke_json_reports_every_model() {
    let out = bench(&["--json", "--models", "mlp-digits,cnn"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let models = v["models"].as_array().expect("models");
    let names: Vec<&str> = models.iter().filter_map(|m| m["model"].as_str()).collect();
    assert_eq!(names, ["mlp-digits", "cnn"]);
    for m in models {
        assert!(m["samples_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{m}");
        assert!(m["peak_rss_mib"].as_f64().unwrap_or(0.0) > 0.0, "{m}");
        assert!(m["loss_first"].as_f64().is_some_and(f64::is_finite), "{m}");
        assert_eq!(m["steps"], 2);
    }
}

fn export_writes_data_weights_and_settings() {
    let dir = tempfile::tempdir().unwrap();
    let out = bench(&["--models", "cnn", "--export", dir.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let settings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("cnn.json")).unwrap()).unwrap();
    assert_eq!(settings["batch_size"], 64);
    assert_eq!(settings["spec"]["flatten"], true);
    let tensors = candle_core::safetensors::load(
        dir.path().join("cnn.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(tensors["order"].dims(), &[3 * 64]);
    assert_eq!(tensors["param.fc.0.weight"].dims(), &[128, 4096]);
    assert_eq!(tensors["x"].dims()[1..], [3, 32, 32]);
}

/// `bench --layers` times the depthwise convolutions on both paths.
fn layers_report_both_paths() {
    let out = bench(&["--layers", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert!(lines.len() >= 2 && lines.len() % 2 == 0, "{lines:?}");
    for pair in lines.chunks(2) {
        assert_eq!(pair[0]["path"], "ours");
        assert_eq!(pair[1]["path"], "generic");
        assert_eq!(pair[0]["case"], pair[1]["case"]);
        assert!(pair[0]["forward_ms"].as_f64().is_some_and(|v| v >= 0.0));
    }
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![
        test!(smoke_prints_every_model),
        test!(smoke_json_reports_every_model),
        test!(export_writes_data_weights_and_settings),
        test!(layers_report_both_paths),
    ]
}
