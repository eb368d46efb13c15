//! The frozen-feature cache from the command line (issue 14): `train` twice
//! with a head-only resnet18 in the same output folder; the second run finds
//! every image's features in `output.dir/feature-cache` and trains the same
//! model (same metrics); with `--set train.cache_features="off"` nothing is
//! cached and the metrics are the same again.

use std::path::Path;
use std::process::Command;

use crate::helpers::{read_json, text};
use crate::paths::{root, BIN};
use crate::trials::{test, Test};
use serde_json::Value;

/// Trains a head-only resnet18 on the digits images into `out`; returns the run folder.
fn train(out: &Path, extra: &[&str]) -> std::path::PathBuf {
    let cfg = out.join("fc.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[data]
dir = "{data}"
format = "image-folder"
image_size = [16, 16]
normalize = "imagenet"
[model]
arch = "resnet18"
base_width = 4
finetune = "head"
[train]
max_epochs = 3
batch_size = 64
seed = 3
[output]
dir = "{out}"
"#,
            data = root().join("examples/digits-png").display(),
            out = out.display(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.current_dir(root())
        .env_remove("RUST_LOG")
        .args(["train", "--no-progress", "--config"])
        .arg(&cfg);
    for e in extra {
        cmd.args(["--set", e]);
    }
    let o = cmd.output().expect("start edge-trainer");
    let stdout = text(&o.stdout);
    assert!(
        o.status.success(),
        "train failed\nstdout:\n{stdout}\nstderr:\n{}",
        text(&o.stderr)
    );
    if !extra.iter().any(|e| e.contains("cache_features")) {
        assert!(
            stdout.contains("Frozen-feature cache at pool: "),
            "{stdout}"
        );
    }
    root().join(stdout.lines().last().unwrap_or_default().trim())
}

/// The metrics lines without what differs between runs.
fn metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("elapsed_s");
            o.remove("run_id");
            v
        })
        .collect()
}

fn close(a: &[Value], b: &[Value]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        for k in ["train_loss", "val_loss", "val_acc"] {
            let (u, v) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!((u - v).abs() <= 1e-4 * (1.0 + v.abs()), "{k}: {u} vs {v}");
        }
    }
}

fn second_train_reuses_the_cached_features() {
    let out = tempfile::tempdir().unwrap();
    let first = train(out.path(), &[]);
    let second = train(out.path(), &[]);
    let (a, b) = (
        read_json(&first.join("summary.json")),
        read_json(&second.join("summary.json")),
    );
    let (fa, fb) = (&a["feature_cache"], &b["feature_cache"]);
    assert_eq!(fa["used"], true, "{fa}");
    assert_eq!(fa["split"], "pool", "{fa}");
    assert_eq!(fa["hits"], 0, "{fa}");
    let n = fa["misses"].as_u64().unwrap();
    assert!(n > 100, "{fa}");
    assert_eq!(fb["hits"].as_u64(), Some(n), "{fb}");
    assert_eq!(fb["misses"], 0, "{fb}");
    let files: Vec<_> = std::fs::read_dir(out.path().join("feature-cache"))
        .unwrap()
        .collect();
    assert_eq!(files.len(), 1);
    close(&metrics(&first), &metrics(&second));
    let off = train(out.path(), &["train.cache_features=\"off\""]);
    let c = read_json(&off.join("summary.json"));
    assert_eq!(c["feature_cache"]["used"], false);
    close(&metrics(&first), &metrics(&off));
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(second_train_reuses_the_cached_features)]
}
