//! `export` and `predict` (issue 15), with the real binary: each architecture
//! (mlp, cnn, cnn1d, textcnn) is trained briefly on a bundled example,
//! exported to ONNX and run with tract, a Rust ONNX runtime; its outputs must
//! match `predict`'s on the same input files within 1e-4. `predict` on the
//! test split reproduces `eval`'s accuracy exactly, both through `--split test`
//! and through the files of a fixed test split (CSV rows, text lines, an
//! image folder's `test/`); bad inputs are named with the reason while the
//! others are still predicted.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;
use edge_trainer::engine::data::Features;
use edge_trainer::engine::predict::{InputOptions, Predictor};
use serde_json::Value;
use tract_onnx::prelude::*;

use crate::helpers::text;
use crate::paths::{root, BIN};
use crate::trials::{test, Test};

/// Largest difference allowed between tract's and `predict`'s probabilities.
const TOLERANCE: f32 = 1e-4;

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(root())
        .env_remove("RUST_LOG")
        .args(args)
        .output()
        .expect("start edge-trainer")
}

fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// Trains `config` briefly into `out` with `extra` overrides; the best checkpoint.
fn train(config: &str, out: &Path, extra: &[&str]) -> PathBuf {
    let mut args = vec![
        "train".to_string(),
        "--config".into(),
        config.into(),
        "--no-progress".into(),
        "--set".into(),
        format!("output.dir={}", out.display()),
    ];
    for e in extra {
        args.push("--set".into());
        args.push(e.to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let stdout = ok(&run(&refs), &format!("train {config}"));
    let dir = stdout.lines().last().unwrap_or_default().trim().to_string();
    let best = root().join(dir).join("best.safetensors");
    assert!(best.is_file(), "no {}", best.display());
    best
}

/// `predict --json --full` lines (without the summary) and the summary.
fn predict_json(args: &[&str]) -> (Vec<Value>, Value) {
    let mut all = vec!["predict", "--json", "--full"];
    all.extend_from_slice(args);
    let stdout = ok(&run(&all), "predict");
    let mut lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let summary = lines.pop().expect("a summary line");
    (lines, summary["summary"].clone())
}

fn eval_accuracy(config: &str, checkpoint: &Path, extra: &[&str]) -> f64 {
    let mut args = vec![
        "eval".to_string(),
        "--config".into(),
        config.into(),
        "--checkpoint".into(),
        checkpoint.display().to_string(),
        "--split".into(),
        "test".into(),
        "--json".into(),
    ];
    for e in extra {
        args.push("--set".into());
        args.push(e.to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let v: Value = serde_json::from_str(&ok(&run(&refs), "eval")).unwrap();
    v["accuracy"].as_f64().unwrap()
}

/// The raw values of every sample of `inputs`, read by the engine's reader
/// for this checkpoint, as one `[N, ...sample_shape]` batch.
fn raw_batch(checkpoint: &Path, inputs: &[PathBuf]) -> (Vec<usize>, Vec<f32>) {
    let p = Predictor::open(checkpoint, &Device::Cpu).unwrap();
    let mut values = Vec::new();
    let mut n = 0;
    for i in inputs {
        let s = p.read_input(i, &InputOptions::default()).unwrap();
        n += s.truth.len();
        match s.features {
            Features::F32(v) => values.extend(v),
            Features::U8(v) => values.extend(v.into_iter().map(f32::from)),
            Features::Images(_) => panic!("predict's readers never stream"),
        }
    }
    let mut shape = vec![n];
    shape.extend_from_slice(&p.meta.input.sample_shape);
    (shape, values)
}

/// Runs the ONNX file with tract on `values` `[shape]`: `[N, classes]`.
fn run_onnx(onnx: &Path, shape: &[usize], values: &[f32]) -> Vec<Vec<f32>> {
    let model = tract_onnx::onnx()
        .model_for_path(onnx)
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let input = Tensor::from_shape(shape, values).unwrap();
    let out = model.run(tvec!(input.into())).unwrap();
    let view = out[0].to_plain_array_view::<f32>().unwrap();
    let dims = view.shape().to_vec();
    assert_eq!(dims[0], shape[0], "batch dim");
    view.as_slice()
        .expect("contiguous output")
        .chunks(dims[1])
        .map(<[f32]>::to_vec)
        .collect()
}

/// Exports `checkpoint` (with `--softmax`), checks the file's interface and
/// labels, runs it on `inputs` with tract in one batch and in batches of one,
/// and compares with `predict` on the same files. Returns the operators used.
fn export_and_compare(checkpoint: &Path, inputs: &[PathBuf], opset: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let onnx = dir.path().join("model.onnx");
    let stdout = ok(
        &run(&[
            "export",
            "--checkpoint",
            &checkpoint.display().to_string(),
            "--out",
            &onnx.display().to_string(),
            "--opset",
            opset,
            "--softmax",
        ]),
        "export",
    );
    assert!(stdout.contains(&format!("opset {opset}")), "{stdout}");
    // labels.txt: the class names, one per line, in output order.
    let p = Predictor::open(checkpoint, &Device::Cpu).unwrap();
    let labels = std::fs::read_to_string(dir.path().join("labels.txt")).unwrap();
    assert_eq!(labels.lines().collect::<Vec<_>>(), p.meta.classes);
    // The interface TensorRT's tools expect: input_0, output_0, dynamic batch.
    let model = tract_onnx::onnx()
        .model_for_path(&onnx)
        .unwrap()
        .into_typed()
        .unwrap();
    assert_eq!(model.node(model.inputs[0].node).name, "input_0");
    assert_eq!(model.outlet_label(model.outputs[0]), Some("output_0"));
    let fact = model.input_fact(0).unwrap();
    assert!(
        fact.shape.as_concrete().is_none(),
        "the batch dim is symbolic: {fact:?}"
    );

    let names: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
    let mut args = vec!["--checkpoint".to_string(), checkpoint.display().to_string()];
    args.extend(names);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (lines, summary) = predict_json(&refs);
    let (shape, values) = raw_batch(checkpoint, inputs);
    assert_eq!(lines.len(), shape[0], "{summary}");
    let onnx_probs = run_onnx(&onnx, &shape, &values);
    // The batch dim is dynamic: one sample at a time gives the same.
    let per: usize = shape[1..].iter().product();
    let mut one_shape = shape.clone();
    one_shape[0] = 1;
    let first = run_onnx(&onnx, &one_shape, &values[..per]);
    let mut max_diff = 0f32;
    for (line, row) in lines.iter().zip(&onnx_probs) {
        let probs: Vec<f32> = line["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(probs.len(), row.len());
        for (a, b) in probs.iter().zip(row) {
            max_diff = max_diff.max((a - b).abs());
        }
    }
    for (a, b) in first[0].iter().zip(&onnx_probs[0]) {
        max_diff = max_diff.max((a - b).abs());
    }
    assert!(
        max_diff <= TOLERANCE,
        "{}: ONNX and predict differ by {max_diff}",
        checkpoint.display()
    );
    eprintln!(
        "{}: {} samples, max |ONNX - predict| = {max_diff:e}",
        checkpoint.display(),
        lines.len()
    );
    stdout
}

fn files(dir: &str, names: &[&str]) -> Vec<PathBuf> {
    names.iter().map(|n| root().join(dir).join(n)).collect()
}

/// `predict ... | head -1`: the reader goes away after one line; the command
/// ends as `cat` would (SIGPIPE), without a panic on stderr.
fn closed_pipe_ends_quietly(args: &[&str]) {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(BIN)
        .current_dir(root())
        .env_remove("RUST_LOG")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start edge-trainer");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with('{'), "{first}");
    // The reader (and the pipe) is gone here; the output left is > 64 KiB.
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}

/// mlp on the digits (safetensors): ONNX = predict; `--split test` = eval.
fn mlp_export_matches_predict_and_eval() {
    let out = tempfile::tempdir().unwrap();
    let cfg = "configs/demo.toml";
    let best = train(cfg, out.path(), &["train.max_epochs=2", "device.kind=cpu"]);
    let ops = export_and_compare(
        &best,
        &files("examples/digits", &["digits-0.safetensors"]),
        "13",
    );
    assert!(ops.contains("Gemm") && ops.contains("Relu"), "{ops}");
    let (_, s) = predict_json(&[
        "--checkpoint",
        &best.display().to_string(),
        "--config",
        cfg,
        "--set",
        "device.kind=cpu",
        "--split",
        "test",
    ]);
    let eval = eval_accuracy(cfg, &best, &["device.kind=cpu"]);
    assert_eq!(s["accuracy"].as_f64().unwrap(), eval, "{s}");
    assert!(s["labelled"].as_u64().unwrap() > 0);
    closed_pipe_ends_quietly(&[
        "predict",
        "--json",
        "--full",
        "--checkpoint",
        &best.display().to_string(),
        "--config",
        cfg,
        "--set",
        "device.kind=cpu",
        "--split",
        "test",
    ]);
    // `--model current`: the promoted model of the config's output.dir.
    let (lines, _) = predict_json(&[
        "--model",
        "current",
        "--config",
        cfg,
        "--set",
        &format!("output.dir={}", out.path().display()),
        "--set",
        "device.kind=cpu",
        &root()
            .join("examples/digits/digits-1.safetensors")
            .display()
            .to_string(),
    ]);
    assert!(!lines.is_empty());
    assert!(lines[0]["top"][0]["probability"].as_f64().unwrap() > 0.0);
}

/// cnn on the PNG digits (batch-norm, max-pool, global average pool), at
/// opsets 13 and 17; predicting the files of `test/` reproduces eval.
fn cnn_export_matches_predict_and_eval() {
    let out = tempfile::tempdir().unwrap();
    let cfg = "configs/digits-png.toml";
    let best = train(cfg, out.path(), &["train.max_epochs=2", "device.kind=cpu"]);
    let inputs = files(
        "examples/digits-png",
        &["3/0003.png", "3/0013.png", "0/0000.png", "7/0007.png"],
    );
    let inputs: Vec<PathBuf> = inputs.into_iter().filter(|p| p.is_file()).collect();
    assert!(inputs.len() >= 2, "{inputs:?}");
    let ops = export_and_compare(&best, &inputs, "13");
    assert!(
        ops.contains("Conv") && ops.contains("BatchNormalization") && ops.contains("MaxPool"),
        "{ops}"
    );
    export_and_compare(&best, &inputs, "17");

    // An image folder with a fixed test split: predict its files = eval.
    let data = tempfile::tempdir().unwrap();
    let src = root().join("examples/digits-png");
    for class in ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"] {
        let mut names: Vec<_> = std::fs::read_dir(src.join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for (i, p) in names.iter().take(8).enumerate() {
            let split = if i < 5 { "train" } else { "test" };
            let d = data.path().join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::copy(p, d.join(p.file_name().unwrap())).unwrap();
        }
    }
    let data_set = format!("data.dir={}", data.path().display());
    let eval = eval_accuracy(cfg, &best, &[&data_set, "device.kind=cpu"]);
    let mut tests: Vec<String> = Vec::new();
    for class in std::fs::read_dir(data.path().join("test")).unwrap() {
        for f in std::fs::read_dir(class.unwrap().path()).unwrap() {
            tests.push(f.unwrap().path().display().to_string());
        }
    }
    tests.sort();
    // With the config: its batch size, so the batches are eval's.
    let mut args = vec![
        "--checkpoint".to_string(),
        best.display().to_string(),
        "--config".into(),
        cfg.into(),
        "--set".into(),
        "device.kind=cpu".into(),
    ];
    args.extend(tests);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_, s) = predict_json(&refs);
    assert_eq!(s["labelled"], 30, "{s}");
    assert_eq!(s["accuracy"].as_f64().unwrap(), eval, "{s}");
}

/// cnn1d on the IMU signals (1-D conv, batch-norm, max-pool).
fn cnn1d_export_matches_predict() {
    let out = tempfile::tempdir().unwrap();
    let best = train(
        "configs/signals.toml",
        out.path(),
        &["train.max_epochs=2", "device.kind=cpu"],
    );
    let ops = export_and_compare(
        &best,
        &files("examples/signals", &["imu-0.safetensors"]),
        "13",
    );
    assert!(
        ops.contains("Conv") && ops.contains("GlobalAveragePool"),
        "{ops}"
    );
}

/// textcnn on the news headlines (embedding as Gather, convolutions over
/// time); predicting `test.txt` line by line reproduces eval exactly.
fn textcnn_export_matches_predict_and_eval() {
    let out = tempfile::tempdir().unwrap();
    let cfg = "configs/news-zh.toml";
    let small = [
        "train.max_epochs=2",
        "device.kind=cpu",
        "model.embed_dim=16",
        "model.num_filters=8",
    ];
    let best = train(cfg, out.path(), &small);
    let test_txt = root().join("examples/news-zh/test.txt");
    let ops = export_and_compare(&best, std::slice::from_ref(&test_txt), "13");
    assert!(
        ops.contains("Gather") && ops.contains("GlobalMaxPool"),
        "{ops}"
    );
    let (_, s) = predict_json(&[
        "--checkpoint",
        &best.display().to_string(),
        "--config",
        cfg,
        "--set",
        "device.kind=cpu",
        &test_txt.display().to_string(),
    ]);
    let eval = eval_accuracy(cfg, &best, &["device.kind=cpu"]);
    assert_eq!(s["labelled"], 160, "{s}");
    assert_eq!(s["accuracy"].as_f64().unwrap(), eval, "{s}");
}

/// resnet18 (base width 4) and mobilenet_v2 (width 0.25), trained one epoch
/// on a few 32x32 digit images: the export (residual `Add`, depthwise `Conv`,
/// `Clip` for ReLU6, `GlobalAveragePool`) run in tract equals `predict`.
fn backbone_exports_match_predict() {
    let data = tempfile::tempdir().unwrap();
    let src = root().join("examples/digits-png");
    let mut inputs = Vec::new();
    for class in ["0", "1", "2"] {
        let mut names: Vec<_> = std::fs::read_dir(src.join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        let d = data.path().join(class);
        std::fs::create_dir_all(&d).unwrap();
        for (i, p) in names.iter().take(10).enumerate() {
            let to = d.join(p.file_name().unwrap());
            std::fs::copy(p, &to).unwrap();
            if i == 0 {
                inputs.push(to);
            }
        }
    }
    for (arch, size) in [
        ("resnet18", "base_width = 4"),
        ("mobilenet_v2", "width_mult = 0.25"),
        ("mobilenet_v3_small", "width_mult = 0.25"),
    ] {
        let out = tempfile::tempdir().unwrap();
        let cfg = out.path().join("backbone.toml");
        std::fs::write(
            &cfg,
            format!(
                "[data]\ndir = \"{}\"\nformat = \"image-folder\"\nimage_size = [32, 32]\n\
                 channels = 1\nval_fraction = 0.2\ntest_fraction = 0.2\n\
                 [model]\narch = \"{arch}\"\n{size}\n\
                 [train]\nmax_epochs = 1\nbatch_size = 8\n",
                data.path().display()
            ),
        )
        .unwrap();
        let best = train(&cfg.display().to_string(), out.path(), &["device.kind=cpu"]);
        let ops = export_and_compare(&best, &inputs, "13");
        assert!(
            ops.contains("Add") && ops.contains("GlobalAveragePool") && ops.contains("Conv"),
            "{arch}: {ops}"
        );
        if arch == "mobilenet_v2" {
            assert!(ops.contains("Clip"), "{arch}: {ops}");
        } else if arch == "mobilenet_v3_small" {
            // Hard swish as Mul(x, HardSigmoid(x)) (HardSwish needs opset 14).
            assert!(
                ops.contains("HardSigmoid") && ops.contains("Mul") && !ops.contains("HardSwish"),
                "{arch}: {ops}"
            );
        } else {
            assert!(
                ops.contains("MaxPool") && ops.contains("Relu"),
                "{arch}: {ops}"
            );
        }
    }
}

/// CSV rows (mlp): a fixed `test.csv` predicted row by row reproduces eval;
/// rows without the label column are predicted too; bad inputs are named
/// with the reason (exit 1) and the good ones still predicted.
fn csv_rows_and_bad_inputs() {
    let data = tempfile::tempdir().unwrap();
    let mut rng = 7u64;
    let mut next = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((rng >> 33) as f32) / (1u64 << 31) as f32
    };
    let mut write = |name: &str, rows: usize| {
        let mut s = String::from("a,b,c,label\n");
        for i in 0..rows {
            let class = i % 3;
            let a = class as f32 + next() * 0.8;
            s.push_str(&format!(
                "{a},{},{},{}\n",
                next() * 2.0,
                a * 3.0 - next(),
                ["x", "y", "z"][class]
            ));
        }
        std::fs::write(data.path().join(name), s).unwrap();
    };
    write("train.csv", 120);
    write("test.csv", 45);
    let out = tempfile::tempdir().unwrap();
    let cfg_path = out.path().join("csv.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[device]\nkind = \"cpu\"\n[data]\ndir = {:?}\nformat = \"csv\"\n[model]\narch = \"mlp\"\nhidden = [16]\n[train]\nmax_epochs = 3\nbatch_size = 16\n[output]\ndir = {:?}\n",
            data.path().display().to_string(),
            out.path().join("o").display().to_string()
        ),
    )
    .unwrap();
    let cfg = cfg_path.display().to_string();
    let best = train(&cfg, &out.path().join("o"), &[]);
    let test_csv = data.path().join("test.csv");
    let eval = eval_accuracy(&cfg, &best, &[]);
    let (lines, s) = predict_json(&[
        "--checkpoint",
        &best.display().to_string(),
        "--config",
        &cfg,
        &test_csv.display().to_string(),
    ]);
    assert_eq!(lines.len(), 45);
    assert_eq!(s["accuracy"].as_f64().unwrap(), eval, "{s}");
    assert_eq!(lines[0]["input"], format!("{}:1", test_csv.display()));
    export_and_compare(&best, std::slice::from_ref(&test_csv), "13");

    // Without a label column: predicted, no truth; bad files named, exit 1.
    let unlabelled = data.path().join("new.csv");
    std::fs::write(&unlabelled, "a,b,c\n0.1,0.5,0.2\n2.2,1.0,6.1\n").unwrap();
    let wrong_width = data.path().join("wide.csv");
    std::fs::write(&wrong_width, "a,b,c,d\n1,2,3,4\n").unwrap();
    let garbage = data.path().join("garbage.csv");
    std::fs::write(&garbage, "a,b,c\n1,zebra,3\n").unwrap();
    let missing = data.path().join("missing.csv");
    let o = run(&[
        "predict",
        "--checkpoint",
        &best.display().to_string(),
        &unlabelled.display().to_string(),
        &wrong_width.display().to_string(),
        &garbage.display().to_string(),
        &missing.display().to_string(),
    ]);
    let (stdout, stderr) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("new.csv:1: ") && stdout.contains("new.csv:2: "),
        "{stdout}"
    );
    assert!(!stdout.contains("(true:"), "{stdout}");
    assert!(
        stderr.contains("wide.csv: samples of shape [4], but the model takes [3]"),
        "{stderr}"
    );
    assert!(
        stderr.contains("garbage.csv: line 2, column \"b\": \"zebra\" is not a number"),
        "{stderr}"
    );
    assert!(stderr.contains("missing.csv: cannot read"), "{stderr}");

    // A file over data.max_file_mb is refused unread, the others predicted.
    let big = data.path().join("big.csv");
    let mut rows = String::from("a,b,c\n");
    while rows.len() <= 1_200_000 {
        rows.push_str("0.25,0.5,0.75\n");
    }
    std::fs::write(&big, &rows).unwrap();
    let o = run(&[
        "predict",
        "--checkpoint",
        &best.display().to_string(),
        "--config",
        &cfg,
        "--set",
        "data.max_file_mb=1",
        &unlabelled.display().to_string(),
        &big.display().to_string(),
    ]);
    let (stdout, stderr) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("new.csv:2: "), "{stdout}");
    assert!(
        stderr.contains(&format!(
            "big.csv: the file has {} bytes, more than the limit of 1048576 (data.max_file_mb)",
            rows.len()
        )),
        "{stderr}"
    );
}

/// `export` refuses what it cannot write, naming it.
fn export_refuses_bad_opsets_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let not_ck = dir.path().join("x.safetensors");
    std::fs::write(&not_ck, b"nope").unwrap();
    let out = dir.path().join("m.onnx").display().to_string();
    let o = run(&[
        "export",
        "--checkpoint",
        &not_ck.display().to_string(),
        "--out",
        &out,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("x.safetensors"),
        "{}",
        text(&o.stderr)
    );
    let o = run(&[
        "export",
        "--checkpoint",
        &not_ck.display().to_string(),
        "--out",
        &out,
        "--opset",
        "7",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("--opset 7"), "{}", text(&o.stderr));
    assert!(!dir.path().join("m.onnx").exists());
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![
        test!(mlp_export_matches_predict_and_eval),
        test!(cnn_export_matches_predict_and_eval),
        test!(cnn1d_export_matches_predict),
        test!(textcnn_export_matches_predict_and_eval),
        test!(backbone_exports_match_predict),
        test!(csv_rows_and_bad_inputs),
        test!(export_refuses_bad_opsets_and_files),
    ]
}
