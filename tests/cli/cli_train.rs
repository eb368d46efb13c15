//! End-to-end tests of `train`, `eval` and `check-config`: the real binary on the
//! bundled digits data, asserting on exit codes, stdout/stderr and files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::{read_json, text};
use crate::paths::{root, BIN};
use crate::trials::{test, Test};
use serde_json::Value;

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(root())
        .env_remove("RUST_LOG")
        .output()
        .expect("start edge-trainer")
}

/// Trains the demo into `out` with extra `--set` overrides; returns the output and run folder.
fn train_demo(out: &Path, extra: &[&str]) -> (Output, PathBuf) {
    let out_set = format!("output.dir={}", out.display());
    let mut args = vec!["train", "--config", "configs/demo.toml", "--set", &out_set];
    for e in extra {
        args.push("--set");
        args.push(e);
    }
    let o = run(&args);
    let stdout = text(&o.stdout);
    let last = stdout.lines().last().unwrap_or_default().trim().to_string();
    (o, root().join(last))
}

fn metrics_lines(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The metrics without the fields that differ between identical runs.
fn comparable(lines: &[Value]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| {
            let mut l = l.clone();
            let o = l.as_object_mut().unwrap();
            o.remove("elapsed_s");
            o.remove("run_id");
            l
        })
        .collect()
}

fn demo_trains_reproducibly_and_eval_agrees() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, run_dir) = train_demo(tmp.path(), &[]);
    let stdout = text(&o.stdout);
    assert!(
        o.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&o.stderr)
    );
    assert!(
        run_dir.starts_with(tmp.path()) || run_dir.is_dir(),
        "{}",
        run_dir.display()
    );
    for f in ["best.safetensors", "metrics.jsonl", "summary.json"] {
        assert!(
            run_dir.join(f).is_file(),
            "missing {f} in {}",
            run_dir.display()
        );
    }
    // The seed's console line, with `*` on improvements.
    assert!(
        stdout.contains("Train Loss:") && stdout.contains("Val Acc:"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("Epoch:") && l.ends_with('*')),
        "{stdout}"
    );

    let summary = read_json(&run_dir.join("summary.json"));
    let outcome = summary["outcome"].as_str().unwrap();
    assert!(
        outcome == "early_stopped" || outcome == "finished",
        "{summary}"
    );
    let acc = summary["test"]["accuracy"].as_f64().unwrap();
    assert!(acc >= 0.95, "test accuracy {acc}");
    assert_eq!(summary["test"]["per_class"].as_array().unwrap().len(), 10);
    assert_eq!(
        summary["test"]["confusion_matrix"]
            .as_array()
            .unwrap()
            .len(),
        10
    );
    assert!(summary["config"]["train"]["optimizer"]["lr"].is_number());

    let lines = metrics_lines(&run_dir);
    assert_eq!(lines.len() as u64, summary["epochs"].as_u64().unwrap());
    for key in [
        "run_id",
        "epoch",
        "step",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "lr",
        "elapsed_s",
        "improved",
        "best_val_loss",
        "best_val_acc",
    ] {
        assert!(
            lines[0].get(key).is_some(),
            "metrics line lacks {key}: {}",
            lines[0]
        );
    }
    // The best checkpoint is the evaluation with the lowest val loss.
    let best_step = summary["best"]["step"].as_u64().unwrap();
    let min = lines
        .iter()
        .min_by(|a, b| {
            a["val_loss"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["val_loss"].as_f64().unwrap())
        })
        .unwrap();
    assert_eq!(min["step"].as_u64().unwrap(), best_step);

    // Same seed, same metrics.
    let tmp2 = tempfile::tempdir().unwrap();
    let (o2, run_dir2) = train_demo(tmp2.path(), &[]);
    assert!(o2.status.success());
    assert_eq!(comparable(&lines), comparable(&metrics_lines(&run_dir2)));

    // eval on the checkpoint reproduces the summary's test accuracy.
    let ck = run_dir.join("best.safetensors");
    let e = run(&[
        "eval",
        "--config",
        "configs/demo.toml",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--json",
    ]);
    assert!(e.status.success(), "{}", text(&e.stderr));
    let ev: Value = serde_json::from_slice(&e.stdout).unwrap();
    assert_eq!(ev["accuracy"].as_f64().unwrap(), acc);
    assert_eq!(ev["confusion_matrix"], summary["test"]["confusion_matrix"]);
    let l1 = ev["loss"].as_f64().unwrap();
    let l2 = summary["test"]["loss"].as_f64().unwrap();
    assert!((l1 - l2).abs() < 1e-6, "{l1} vs {l2}");

    // The curves of the run can be drawn.
    let png = run_dir.join("curves.png");
    let p = run(&[
        "plot",
        "--metrics",
        run_dir.join("metrics.jsonl").to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(p.status.success(), "{}", text(&p.stderr));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));

    // The human-readable form names the classes and the confusion matrix.
    let e = run(&[
        "eval",
        "--config",
        "configs/demo.toml",
        "--checkpoint",
        ck.to_str().unwrap(),
    ]);
    assert!(e.status.success());
    let t = text(&e.stdout);
    assert!(
        t.contains("precision") && t.contains("confusion matrix"),
        "{t}"
    );
}

fn typo_in_config_key_exits_2_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "[train]\nmax_epoch = 5\n").unwrap();
    for cmd in ["train", "check-config"] {
        let o = run(&[cmd, "--config", cfg.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{cmd}");
        let err = text(&o.stderr);
        assert!(err.contains("train.max_epoch"), "{err}");
        assert!(err.contains("did you mean `train.max_epochs`"), "{err}");
        assert!(err.contains("bad.toml"), "{err}");
    }
    // Out of range, through --set.
    let o = run(&[
        "check-config",
        "--config",
        "configs/demo.toml",
        "--set",
        "train.optimizer.lr=-1",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("train.optimizer.lr"),
        "{}",
        text(&o.stderr)
    );
    // Wrong type, through the environment.
    let o = Command::new(BIN)
        .args(["check-config", "--config", "configs/demo.toml"])
        .current_dir(root())
        .env("EDGE_TRAINER__TRAIN__BATCH_SIZE", "lots")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("train.batch_size"),
        "{}",
        text(&o.stderr)
    );
    // A missing file.
    let o = run(&["check-config", "--config", "no/such.toml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("no/such.toml"));
}

fn check_config_prints_layered_values() {
    let o = Command::new(BIN)
        .args([
            "check-config",
            "--config",
            "configs/demo.toml",
            "--set",
            "train.lr=0.05",
        ])
        .current_dir(root())
        .env("EDGE_TRAINER__TRAIN__BATCH_SIZE", "16")
        .env("EDGE_TRAINER__TRAIN__SEED", "9")
        .env("EDGE_TRAINER__MQTT__USERNAME", "alice")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let t: toml::Table = toml::from_str(&text(&o.stdout)).unwrap();
    assert_eq!(t["train"]["batch_size"].as_integer(), Some(16));
    assert_eq!(t["train"]["seed"].as_integer(), Some(9));
    assert_eq!(t["train"]["optimizer"]["lr"].as_float(), Some(0.05));
    // From the file, untouched.
    assert_eq!(t["train"]["max_epochs"].as_integer(), Some(60));
    // Secrets masked.
    assert!(!text(&o.stdout).contains("alice"));
}

fn copy_digits(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(root().join("examples/digits")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn corrupt_data_file_is_skipped_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    copy_digits(&data);
    std::fs::write(
        data.join("broken.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",
    )
    .unwrap();
    let data_set = format!("data.dir={}", data.display());
    let (o, run_dir) = train_demo(tmp.path(), &[&data_set]);
    let stdout = text(&o.stdout);
    let stderr = text(&o.stderr);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    // The warning names the file and the reason.
    assert!(
        stderr.contains("broken.safetensors") && stderr.contains("not a valid safetensors"),
        "{stderr}"
    );
    assert!(
        stdout.contains("Skipped data file broken.safetensors"),
        "{stdout}"
    );
    let summary = read_json(&run_dir.join("summary.json"));
    let skipped = summary["skipped_files"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{summary}");
    assert_eq!(skipped[0]["file"], "broken.safetensors");
    assert!(skipped[0]["reason"]
        .as_str()
        .unwrap()
        .contains("not a valid safetensors"));
    assert!(summary["test"]["accuracy"].as_f64().unwrap() >= 0.95);
}

fn no_valid_data_fails_with_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("a.safetensors"), b"garbage").unwrap();
    let data_set = format!("data.dir={}", data.display());
    let (o, _) = train_demo(tmp.path(), &[&data_set]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains("no usable data") && err.contains("a.safetensors"),
        "{err}"
    );
}

/// Sizes only the data tells (a CSV's features) are checked again before the
/// model is built: the run fails with `bad_config`, nothing is allocated.
fn a_model_over_the_budget_for_its_data_fails_before_it_is_built() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let header: Vec<String> = (0..3000).map(|i| format!("f{i}")).collect();
    let mut csv = format!("{},label\n", header.join(","));
    for r in 0..40 {
        let row = vec!["0.5"; 3000].join(",");
        csv.push_str(&format!("{row},{}\n", r % 2));
    }
    std::fs::write(data.join("wide.csv"), csv).unwrap();
    let sets = [
        format!("data.dir={}", data.display()),
        "data.format=\"csv\"".to_string(),
        "model.hidden=[20000]".to_string(),
        "device.memory_budget_mb=100".to_string(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let (o, _) = train_demo(tmp.path(), &sets);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("memory budget of 100 MiB") && err.contains("[3000]"),
        "{err}"
    );
}

fn diverging_run_fails_with_a_clear_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, run_dir) = train_demo(
        tmp.path(),
        &[
            "train.optimizer.kind=\"sgd\"",
            "train.lr=1e30",
            "train.scheduler.kind=\"none\"",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stdout));
    let err = text(&o.stderr);
    assert!(err.contains("training loss became"), "{err}");
    let summary = read_json(&run_dir.join("summary.json"));
    assert_eq!(summary["outcome"], "failed");
    assert_eq!(summary["failure"], "diverged");
}

fn sigint_cancels_after_the_batch_and_keeps_the_best_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out_set = format!("output.dir={}", tmp.path().display());
    let child = Command::new(BIN)
        .args([
            "train",
            "--config",
            "configs/demo.toml",
            "--set",
            &out_set,
            "--set",
            "train.max_epochs=100000",
            "--set",
            "train.eval_every=5",
            "--set",
            "train.early_stopping.enabled=false",
            "--set",
            "train.scheduler.kind=\"none\"",
        ])
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first evaluation to be written.
    let runs = tmp.path().join("runs");
    let deadline = Instant::now() + Duration::from_secs(120);
    let run_dir = loop {
        assert!(Instant::now() < deadline, "no evaluation within 120 s");
        let found = std::fs::read_dir(&runs)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok());
        if let Some(e) = found {
            let m = e.path().join("metrics.jsonl");
            if std::fs::metadata(&m).map(|m| m.len() > 0).unwrap_or(false)
                && e.path().join("best.safetensors").is_file()
            {
                break e.path();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o.stderr));
    let summary = read_json(&run_dir.join("summary.json"));
    assert_eq!(summary["outcome"], "cancelled", "{summary}");
    assert!(summary["reason"].as_str().unwrap().contains("cancelled"));
    // The best checkpoint is intact and loadable.
    let ck = run_dir.join("best.safetensors");
    let e = run(&[
        "eval",
        "--config",
        "configs/demo.toml",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--json",
    ]);
    assert!(e.status.success(), "{}", text(&e.stderr));
    let stdout = text(&o.stdout);
    assert_eq!(
        stdout.lines().last().unwrap().trim(),
        run_dir
            .strip_prefix(root())
            .unwrap_or(&run_dir)
            .display()
            .to_string()
    );
}

fn corrupt_checkpoint_is_refused_by_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("best.safetensors");
    std::fs::write(&ck, b"\x00\x01\x02").unwrap();
    let e = run(&[
        "eval",
        "--config",
        "configs/demo.toml",
        "--checkpoint",
        ck.to_str().unwrap(),
    ]);
    assert_eq!(e.status.code(), Some(1));
    let err = text(&e.stderr);
    assert!(
        err.contains("best.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
}

/// Issue 18, break 1: sizes whose training cannot fit in memory passed
/// `check-config` (and aborted or OOM-killed `train`); now refused with exit 2
/// naming the key, the estimate and the budget.
fn sizes_over_the_memory_budget_are_refused_naming_the_key() {
    let cases: [(&[&str], &str); 4] = [
        (&["model.hidden=[1099511627776]"], "`model.hidden`"),
        (&["model.hidden=[100000, 100000]"], "`model.hidden`"),
        (
            &["model.arch=\"cnn1d\"", "model.padding=1000000"],
            "`model.padding`",
        ),
        (
            &[
                "data.format=\"image-folder\"",
                "model.arch=\"cnn\"",
                "data.image_size=[100000, 100000]",
            ],
            "data.image_size",
        ),
    ];
    for (sets, key) in cases {
        for cmd in ["check-config", "train"] {
            let mut args = vec![cmd, "--config", "configs/demo.toml"];
            for s in sets {
                args.extend(["--set", s]);
            }
            if cmd == "train" {
                args.push("--no-progress");
            }
            let o = run(&args);
            let err = text(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{cmd} {sets:?}: {err}");
            assert!(err.contains(key), "{cmd} {sets:?}: {err}");
        }
    }
    // The bundled example fits, and a budget too small for it is named.
    let o = run(&["check-config", "--config", "configs/demo.toml"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("memory_budget_mb = 0"),
        "{}",
        text(&o.stdout)
    );
    let o = run(&[
        "check-config",
        "--config",
        "configs/demo.toml",
        "--set",
        "device.memory_budget_mb=1",
        "--set",
        "model.hidden=[1024, 1024]",
    ]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("`model.hidden`") && err.contains("1 MiB (device.memory_budget_mb)"),
        "{err}"
    );
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![
        test!(demo_trains_reproducibly_and_eval_agrees),
        test!(typo_in_config_key_exits_2_naming_the_key),
        test!(sizes_over_the_memory_budget_are_refused_naming_the_key),
        test!(check_config_prints_layered_values),
        test!(corrupt_data_file_is_skipped_and_named),
        test!(no_valid_data_fails_with_exit_1),
        test!(a_model_over_the_budget_for_its_data_fails_before_it_is_built),
        test!(diverging_run_fails_with_a_clear_reason),
        test!(sigint_cancels_after_the_batch_and_keeps_the_best_checkpoint),
        test!(corrupt_checkpoint_is_refused_by_eval),
    ]
}
