//! End-to-end tests of the data formats and architectures of issue 3: the real
//! binary trains on the bundled examples (image-folder + cnn, safetensors
//! signals + cnn1d, CSV signals + cnn1d, text-tsv + textcnn), early-stops and
//! reaches a stated test accuracy; `eval` reproduces it from the checkpoint
//! alone (the vocabulary travels in its metadata); fine-tuning a PyTorch-made
//! model with a different class count keeps the frozen tensors bit-identical;
//! init mismatches and bad files are reported, every one of them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::helpers::{read_json, text};
use crate::paths::{root, BIN};
use crate::trials::{test, Test};
use candle_core::{Device, Tensor};
use edge_trainer::engine::checkpoint;
use serde_json::Value;

/// `edge-trainer train --config CONFIG --set output.dir=OUT --set EXTRA...`.
fn train(config: &Path, out: &Path, extra: &[&str]) -> (Output, Option<PathBuf>) {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(root())
        .env_remove("RUST_LOG")
        .arg("train")
        .arg("--config")
        .arg(config)
        .arg("--no-progress")
        .arg("--set")
        .arg(format!("output.dir={}", out.display()));
    for e in extra {
        cmd.arg("--set").arg(e);
    }
    let o = cmd.output().expect("start edge-trainer");
    let stdout = text(&o.stdout);
    let last = stdout.lines().last().unwrap_or_default().trim().to_string();
    let dir = (!last.is_empty()).then(|| root().join(last));
    (o, dir)
}

fn summary(run_dir: &Path) -> Value {
    read_json(&run_dir.join("summary.json"))
}

fn check_run(o: &Output, dir: &Option<PathBuf>, what: &str) -> (PathBuf, Value) {
    assert!(
        o.status.success(),
        "{what}: train failed\nstdout:\n{}\nstderr:\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    let dir = dir.clone().expect("run folder on the last line");
    let s = summary(&dir);
    (dir, s)
}

fn test_accuracy(s: &Value) -> f64 {
    s["test"]["accuracy"].as_f64().expect("test accuracy")
}

fn eval_json(config: &Path, checkpoint: &Path, extra_env: &[(&str, &str)]) -> Value {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(root())
        .env_remove("RUST_LOG")
        .args(["eval", "--config"])
        .arg(config)
        .arg("--checkpoint")
        .arg(checkpoint)
        .args(["--split", "test", "--json"]);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let o = cmd.output().expect("start edge-trainer");
    assert!(
        o.status.success(),
        "eval failed\nstdout:\n{}\nstderr:\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("eval --json prints JSON")
}

fn tensors(path: &Path) -> (HashMap<String, Tensor>, HashMap<String, String>) {
    checkpoint::read_tensors(path, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Image folder of PNG digits, `cnn` from scratch: stated accuracy 0.90.
fn image_folder_cnn_learns_digits() {
    let out = tempfile::tempdir().unwrap();
    let cfg = root().join("configs/digits-png.toml");
    let (o, dir) = train(&cfg, out.path(), &[]);
    let (dir, s) = check_run(&o, &dir, "digits-png");
    assert_eq!(s["outcome"], "early_stopped", "{s:#}");
    let acc = test_accuracy(&s);
    assert!(acc >= 0.90, "test accuracy {acc}");
    assert_eq!(s["classes"].as_array().unwrap().len(), 10);
    // The checkpoint alone rebuilds the model: same accuracy through `eval`.
    let e = eval_json(&cfg, &dir.join("best.safetensors"), &[]);
    assert!(
        (e["accuracy"].as_f64().unwrap() - acc).abs() < 1e-9,
        "{e:#}"
    );
    // Images are normalised per channel, and the checkpoint says so.
    let (_, meta) = tensors(&dir.join("best.safetensors"));
    let input: Value = serde_json::from_str(&meta["input"]).unwrap();
    assert_eq!(input["sample_shape"], serde_json::json!([1, 16, 16]));
    assert_eq!(input["normalization"]["per_channel"], true);
    assert_eq!(input["normalization"]["mean"].as_array().unwrap().len(), 1);
}

/// Safetensors signals `[N, 3, 64]`, `cnn1d`: stated accuracy 0.90.
fn safetensors_signals_cnn1d() {
    let out = tempfile::tempdir().unwrap();
    let (o, dir) = train(&root().join("configs/signals.toml"), out.path(), &[]);
    let (_, s) = check_run(&o, &dir, "signals");
    assert_eq!(s["outcome"], "early_stopped", "{s:#}");
    let acc = test_accuracy(&s);
    assert!(acc >= 0.90, "test accuracy {acc}");
    assert_eq!(
        s["classes"],
        serde_json::json!(["idle", "walk", "run", "shake"])
    );
}

/// CSV rows of 48 values (one channel), `cnn1d` over `[L]`: stated accuracy 0.90.
fn csv_signals_cnn1d() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // Three classes of noisy waves: slow sine, fast sine, square; seeded LCG noise.
    let mut state: u64 = 12345;
    let mut noise = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5
    };
    for file in 0..3 {
        let mut csv = String::new();
        let header: Vec<String> = (0..48).map(|i| format!("t{i}")).collect();
        csv.push_str(&format!("{},label\n", header.join(",")));
        for row in 0..120 {
            let class = row % 3;
            let phase = noise() * 6.0;
            let freq = match class {
                0 => 1.0 + noise() * 0.4,
                _ => 3.0 + noise() * 0.8,
            };
            let vals: Vec<String> = (0..48)
                .map(|t| {
                    let a = 2.0 * std::f64::consts::PI * freq * t as f64 / 48.0 + phase;
                    let v = if class == 2 {
                        a.sin().signum()
                    } else {
                        a.sin()
                    };
                    format!("{:.4}", v + 0.3 * noise())
                })
                .collect();
            let label = ["slow", "fast", "square"][class];
            csv.push_str(&format!("{},{label}\n", vals.join(",")));
        }
        std::fs::write(data.join(format!("waves-{file}.csv")), csv).unwrap();
    }
    let cfg = dir.path().join("waves.toml");
    std::fs::write(
        &cfg,
        format!(
            "[data]\ndir = {:?}\nformat = \"csv\"\nval_fraction = 0.2\ntest_fraction = 0.2\n\
             [model]\narch = \"cnn1d\"\nconv_channels = [8, 16]\nkernel_size = 5\npool = 2\n\
             [train]\nmax_epochs = 80\nbatch_size = 32\n[train.optimizer]\nlr = 0.01\n\
             [train.early_stopping]\npatience = 4\nmin_delta = 0.001\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let (o, run) = train(&cfg, &dir.path().join("out"), &[]);
    let (_, s) = check_run(&o, &run, "csv waves");
    assert_eq!(s["outcome"], "early_stopped", "{s:#}");
    let acc = test_accuracy(&s);
    assert!(acc >= 0.90, "test accuracy {acc}");
    assert_eq!(s["classes"], serde_json::json!(["fast", "slow", "square"]));
}

/// THUCNews-style Chinese headlines, the seed's TextCNN (smaller embedding and
/// filter count than the seed's 300/256 to keep CI fast): stated accuracy 0.85.
fn text_tsv_textcnn_with_vocabulary_in_the_checkpoint() {
    let out = tempfile::tempdir().unwrap();
    let cfg = root().join("configs/news-zh.toml");
    let (o, dir) = train(
        &cfg,
        out.path(),
        &["model.embed_dim=64", "model.num_filters=64"],
    );
    let (dir, s) = check_run(&o, &dir, "news-zh");
    assert_eq!(s["outcome"], "early_stopped", "{s:#}");
    let acc = test_accuracy(&s);
    assert!(acc >= 0.85, "test accuracy {acc}");
    // train.txt / dev.txt / test.txt fixed the split.
    assert_eq!(
        s["samples"],
        serde_json::json!({"train": 800, "val": 160, "test": 160})
    );
    assert_eq!(
        s["classes"],
        serde_json::json!(["sports", "finance", "technology", "entertainment"])
    );
    // The checkpoint carries the vocabulary, built from train.txt as the seed does.
    let best = dir.join("best.safetensors");
    let (t, meta) = tensors(&best);
    let input: Value = serde_json::from_str(&meta["input"]).unwrap();
    let vocab = input["text"]["vocab"]["tokens"].as_array().unwrap();
    let n = vocab.len();
    assert_eq!(vocab[n - 2], "<UNK>");
    assert_eq!(vocab[n - 1], "<PAD>");
    assert_eq!(input["text"]["vocab"]["pad"], n - 1);
    assert_eq!(input["text"]["max_len"], 32);
    assert_eq!(t["embedding.weight"].dims(), &[n, 64]);
    assert_eq!(
        input["normalization"]["mean"],
        serde_json::json!(vec![0.0; 32])
    );
    // `eval` tokenises with the checkpoint's vocabulary, not one built anew:
    // with train.txt replaced by other text the result is the same.
    let copy = tempfile::tempdir().unwrap();
    for f in ["dev.txt", "test.txt", "class.txt"] {
        std::fs::copy(root().join("examples/news-zh").join(f), copy.path().join(f)).unwrap();
    }
    std::fs::write(
        copy.path().join("train.txt"),
        "完全不同的文字\t0\n另一行\t1\n",
    )
    .unwrap();
    let dir_env = copy.path().display().to_string();
    let e = eval_json(&cfg, &best, &[("EDGE_TRAINER__DATA__DIR", &dir_env)]);
    assert!(
        (e["accuracy"].as_f64().unwrap() - acc).abs() < 1e-9,
        "{e:#}"
    );
}

/// Names of an init file mapped as `configs/finetune-digits.toml` maps them.
fn mapped_init(path: &Path) -> HashMap<String, Tensor> {
    let (t, _) = tensors(path);
    t.into_iter()
        .filter_map(|(k, v)| {
            let k = k.strip_prefix("model.")?.to_string();
            let k = match k.strip_prefix("classifier.") {
                Some(rest) => format!("head.{rest}"),
                None => k,
            };
            Some((k, v))
        })
        .collect()
}

/// A PyTorch-made cnn for 5 classes, fine-tuned on 10: features frozen
/// (bit-identical afterwards, batch-norm statistics included), head re-initialised.
fn finetune_pytorch_model_with_frozen_features() {
    let out = tempfile::tempdir().unwrap();
    let cfg = root().join("configs/finetune-digits.toml");
    let (o, dir) = train(&cfg, out.path(), &[]);
    let (dir, s) = check_run(&o, &dir, "finetune-digits");
    assert!(
        matches!(s["outcome"].as_str(), Some("early_stopped")),
        "{s:#}"
    );
    let acc = test_accuracy(&s);
    assert!(acc >= 0.80, "test accuracy {acc}");
    let stdout = text(&o.stdout);
    assert!(
        stdout.contains("re-initialised (head.bias, head.weight)"),
        "{stdout}"
    );
    let init = mapped_init(&root().join("examples/pretrained/digits0-4-cnn.safetensors"));
    let (best, _) = tensors(&dir.join("best.safetensors"));
    let mut frozen = 0;
    for (name, t) in &best {
        if name.starts_with("features.") {
            assert_eq!(values(t), values(&init[name]), "{name} changed");
            frozen += 1;
        }
    }
    assert_eq!(
        frozen, 12,
        "conv weights, batch-norm parameters and buffers"
    );
    assert_eq!(best["head.weight"].dims(), &[10, 32]);
    assert_eq!(init["head.weight"].dims(), &[5, 32]);
}

/// Without `reinit` the head does not fit: one error lists every problem and
/// says what to do; a wrong prefix is named as well.
fn init_mismatch_lists_every_problem() {
    let out = tempfile::tempdir().unwrap();
    let cfg = root().join("configs/finetune-digits.toml");
    let (o, _) = train(&cfg, out.path(), &["model.reinit=[]"]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    for want in [
        "`head.weight` (file tensor `classifier.weight`) has shape [5, 32], the model needs [10, 32]",
        "`head.bias` (file tensor `classifier.bias`) has shape [5], the model needs [10]",
        "model.reinit = [\"head.*\"]",
    ] {
        assert!(err.contains(want), "{want:?} not in:\n{err}");
    }
    let (o, _) = train(&cfg, out.path(), &["model.init_prefix=net."]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("model.init_prefix \"net.\" matches no tensor"),
        "{err}"
    );
    assert!(
        err.contains("model.rename \"classifier.*\" = \"head.*\" matches no tensor"),
        "{err}"
    );
}

/// Bad files are skipped and named; the rest trains.
fn bad_image_and_text_files_are_skipped_and_named() {
    let dir = tempfile::tempdir().unwrap();
    // Images: two classes copied from the example, plus a corrupt PNG and a stray file.
    let imgs = dir.path().join("imgs");
    for class in ["0", "1"] {
        let to = imgs.join(class);
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(root().join("examples/digits-png").join(class)).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(imgs.join("1/broken.png"), b"\x89PNG but not really").unwrap();
    std::fs::write(imgs.join("loose.png"), b"not in a class folder").unwrap();
    let out = dir.path().join("out");
    let (o, run) = train(
        &root().join("configs/digits-png.toml"),
        &out,
        &[
            &format!("data.dir={}", imgs.display()),
            "train.max_epochs=1",
        ],
    );
    let (_, s) = check_run(&o, &run, "images with bad files");
    let skipped: Vec<String> = s["skipped_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{}: {}",
                f["file"].as_str().unwrap(),
                f["reason"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(
        skipped[0].starts_with("1/broken.png: cannot decode"),
        "{skipped:?}"
    );
    assert!(skipped[1].starts_with("loose.png: "), "{skipped:?}");
    assert_eq!(s["classes"], serde_json::json!(["0", "1"]));

    // Text: a file without TABs and one with a label outside class.txt.
    let txt = dir.path().join("txt");
    std::fs::create_dir(&txt).unwrap();
    for f in ["train.txt", "dev.txt", "test.txt", "class.txt"] {
        std::fs::copy(root().join("examples/news-zh").join(f), txt.join(f)).unwrap();
    }
    std::fs::write(txt.join("notes.txt"), "just a note\n").unwrap();
    std::fs::write(txt.join("extra.txt"), "新闻一\t0\n新闻二\t7\n").unwrap();
    let (o, run) = train(
        &root().join("configs/news-zh.toml"),
        &dir.path().join("out2"),
        &[
            &format!("data.dir={}", txt.display()),
            "train.max_epochs=1",
            "model.embed_dim=16",
            "model.num_filters=8",
        ],
    );
    let (_, s) = check_run(&o, &run, "text with bad files");
    let skipped = s["skipped_files"].as_array().unwrap();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0]["file"], "extra.txt");
    assert!(skipped[0]["reason"].as_str().unwrap().contains("label 7"));
    assert_eq!(skipped[1]["file"], "notes.txt");
    assert!(skipped[1]["reason"]
        .as_str()
        .unwrap()
        .contains("line 1: no TAB"));
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![
        test!(image_folder_cnn_learns_digits),
        test!(safetensors_signals_cnn1d),
        test!(csv_signals_cnn1d),
        test!(text_tsv_textcnn_with_vocabulary_in_the_checkpoint),
        test!(finetune_pytorch_model_with_frozen_features),
        test!(init_mismatch_lists_every_problem),
        test!(bad_image_and_text_files_are_skipped_and_named),
    ]
}
