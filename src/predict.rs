//! `edge-trainer predict` and `edge-trainer export`: the command-line side of
//! [`edge_trainer::engine::predict`] and [`edge_trainer::engine::export`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::Device;

use edge_trainer::config::{self, Override, Settings};
use edge_trainer::engine::data::Split;
use edge_trainer::engine::device;
use edge_trainer::engine::export::{self, ExportOptions};
use edge_trainer::engine::predict::{self, InputOptions, Prediction, Predictor, Samples};
use edge_trainer::engine::promote::CURRENT_FILE;

use super::{ModelArg, PredictArgs, SplitArg, EXIT_FAILED, EXIT_USAGE};

/// Samples per forward pass without a config.
const DEFAULT_BATCH: usize = 64;

/// Runs `predict`: 0 when every input was predicted, 1 when some could not be
/// read (each named on stderr with the reason; the others are still
/// predicted) or the model fails, 2 for bad arguments or config.
pub fn main(args: &PredictArgs) -> ExitCode {
    let settings = match &args.config {
        Some(path) => match load(path, &args.set) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        None => None,
    };
    let checkpoint = match (&args.checkpoint, args.model, &settings) {
        (Some(c), _, _) => c.clone(),
        (None, Some(ModelArg::Current), Some(s)) => s.output.dir.join(CURRENT_FILE),
        _ => {
            eprintln!("error: --checkpoint FILE or --model current with --config");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let dev = match &settings {
        Some(s) => match device::select(s.device.kind, s.device.ordinal) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("error: device.kind: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        None => Device::Cpu,
    };
    let batch = args
        .batch_size
        .or(settings.as_ref().map(|s| s.train.batch_size))
        .unwrap_or(DEFAULT_BATCH);
    match run(args, settings.as_ref(), &checkpoint, &dev, batch) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(EXIT_FAILED),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn load(path: &Path, set: &[String]) -> anyhow::Result<Settings> {
    let mut overrides = config::env_overrides(std::env::vars());
    for s in set {
        overrides.push(Override::parse_set(s)?);
    }
    Ok(config::load(path, &overrides)?)
}

/// Predicts and prints; returns the number of inputs that could not be read.
fn run(
    args: &PredictArgs,
    settings: Option<&Settings>,
    checkpoint: &Path,
    dev: &Device,
    batch: usize,
) -> anyhow::Result<usize> {
    let mut failed = 0;
    let (preds, classes) = match (args.split, settings) {
        (Some(split), Some(s)) => {
            let split = match split {
                SplitArg::Train => Split::Train,
                SplitArg::Val => Split::Val,
                SplitArg::Test => Split::Test,
            };
            let (preds, meta) =
                predict::predict_split(checkpoint, &s.data_spec(), split, dev, batch)
                    .map_err(|e| anyhow::Error::msg(e.to_string()))
                    .with_context(|| format!("predicting with {}", checkpoint.display()))?;
            for p in &preds {
                print_one(args, p, &meta.classes)?;
            }
            (preds, meta.classes)
        }
        _ => {
            let predictor =
                Predictor::open(checkpoint, dev).map_err(|e| anyhow::Error::msg(e.to_string()))?;
            let opts = settings
                .map(|s| InputOptions::of(&s.data_spec()))
                .unwrap_or_default();
            let mut parts = Vec::new();
            for input in &args.inputs {
                match predictor.read_input(input, &opts) {
                    Ok(s) => parts.push(s),
                    Err(e) => {
                        eprintln!("error: {}: {e}", input.display());
                        failed += 1;
                    }
                }
            }
            // All good inputs in one stream of batches, in the order given.
            let preds = predictor
                .predict(&Samples::concat(parts), batch)
                .map_err(|e| anyhow::Error::msg(e.to_string()))
                .with_context(|| format!("predicting with {}", checkpoint.display()))?;
            for p in &preds {
                print_one(args, p, &predictor.meta.classes)?;
            }
            (preds, predictor.meta.classes.clone())
        }
    };
    let (correct, labelled) = predict::accuracy(&preds);
    let accuracy = (labelled > 0).then(|| correct as f64 / labelled as f64);
    if args.json {
        let summary = serde_json::json!({"summary": {
            "checkpoint": checkpoint,
            "samples": preds.len(),
            "labelled": labelled,
            "correct": correct,
            "accuracy": accuracy,
            "failed_inputs": failed,
            "classes": classes.len(),
        }});
        println!("{summary}");
    } else if let Some(acc) = accuracy {
        println!("Accuracy {acc:.4} ({correct} of {labelled} labelled samples)");
    }
    Ok(failed)
}

fn class_name(classes: &[String], i: u32) -> String {
    classes
        .get(i as usize)
        .cloned()
        .unwrap_or_else(|| i.to_string())
}

fn print_one(args: &PredictArgs, p: &Prediction, classes: &[String]) -> anyhow::Result<()> {
    let top: Vec<u32> = p.ranked.iter().copied().take(args.top_k.max(1)).collect();
    if args.json {
        let mut v = serde_json::json!({
            "input": p.input,
            "class": class_name(classes, p.top()),
            "top": top.iter().map(|&i| serde_json::json!({
                "class": class_name(classes, i),
                "index": i,
                "probability": p.probs[i as usize],
            })).collect::<Vec<_>>(),
            "truth": p.truth.map(|t| class_name(classes, t)),
        });
        if args.full {
            v["logits"] = serde_json::json!(p.logits);
            v["probabilities"] = serde_json::json!(p.probs);
        }
        println!("{}", serde_json::to_string(&v)?);
    } else {
        let shown: Vec<String> = top
            .iter()
            .map(|&i| format!("{} {:.4}", class_name(classes, i), p.probs[i as usize]))
            .collect();
        let truth = match p.truth {
            Some(t) => format!(" (true: {})", class_name(classes, t)),
            None => String::new(),
        };
        println!("{}: {}{truth}", p.input, shown.join(", "));
    }
    Ok(())
}

/// Runs `export`: writes the ONNX file and `labels.txt` beside it.
pub fn export(checkpoint: &Path, out: &Path, opset: i64, softmax: bool) -> ExitCode {
    if !export::OPSETS.contains(&opset) {
        eprintln!(
            "error: --opset {opset}: this exporter writes opsets {} to {}",
            export::OPSETS.start(),
            export::OPSETS.end()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let labels: PathBuf = export::labels_path(out, false);
    let result = export::export_checkpoint(checkpoint, ExportOptions { opset, softmax })
        .and_then(|e| export::write_files(&e, out, &labels).map(|()| e));
    match result {
        Ok(e) => {
            println!(
                "Wrote {} (opset {}, {} bytes; operators: {}) and {}",
                out.display(),
                e.opset,
                e.onnx.len(),
                e.operators.join(", "),
                labels.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: exporting {}: {e}", checkpoint.display());
            ExitCode::from(EXIT_FAILED)
        }
    }
}
