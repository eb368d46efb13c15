//! The `edge-trainer` command line: parses arguments, loads the config, starts
//! the chosen subcommand and maps the result to an exit code
//! (0 success, 1 run failed, 2 bad config or usage, 130 cancelled).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use edge_trainer::config::run::Starter;
use edge_trainer::config::{self, Override, Settings};
use edge_trainer::engine::data::Split;
use edge_trainer::engine::device;
use edge_trainer::engine::loss::CrossEntropy;
use edge_trainer::engine::run::{new_run_id, CancelFlag, Outcome, RunEvent};
use edge_trainer::engine::trainer;
use edge_trainer::report;

mod bench;
mod bench_images;
mod predict;
mod runtime;

/// Exit code of a run that failed.
const EXIT_FAILED: u8 = 1;
/// Exit code of a bad config or bad arguments.
const EXIT_USAGE: u8 = 2;
/// Exit code of a run cancelled by SIGINT/SIGTERM.
const EXIT_CANCELLED: u8 = 130;

#[derive(Parser)]
#[command(
    name = "edge-trainer",
    version,
    about = "Keeps a classifier current on an edge device: trains, evaluates, checkpoints and promotes models."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// The TOML config file.
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// Override a config key, e.g. `--set train.optimizer.lr=0.01` (repeatable; beats
    /// EDGE_TRAINER__SECTION__KEY variables, which beat the file).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    Train,
    Val,
    Test,
}

#[derive(Subcommand)]
enum Command {
    /// The daemon: connects to MQTT (or hosts an embedded broker), watches the data
    /// folder, trains when triggered, promotes better models; runs until SIGTERM/SIGINT.
    Run {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Draw loss, accuracy and learning-rate curves from a metrics log.
    Plot {
        /// A `metrics.jsonl` written by a run.
        #[arg(long, value_name = "FILE")]
        metrics: PathBuf,
        /// The picture to write: `.svg` or `.png`.
        #[arg(long, value_name = "FILE.png|.svg")]
        out: PathBuf,
    },
    /// One training run in the foreground, with the same pipeline and files as the daemon.
    Train {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Print plain lines even on a terminal (no progress bar).
        #[arg(long)]
        no_progress: bool,
        /// Continue an interrupted run (its folder, `{output.dir}/runs/{run_id}`)
        /// from its last resume state, with the same config it started with.
        #[arg(long, value_name = "RUN_DIR")]
        resume: Option<PathBuf>,
    },
    /// Evaluate a checkpoint: loss, accuracy, per-class P/R/F1, confusion matrix.
    Eval {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// The checkpoint (`best.safetensors`, `current.safetensors`).
        #[arg(long, value_name = "FILE")]
        checkpoint: PathBuf,
        /// Which split of the configured data to evaluate on.
        #[arg(long, value_enum, default_value = "test")]
        split: SplitArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure training speed, peak memory and start-up on this device (README "Performance").
    Bench(bench::BenchArgs),
    /// Host the embedded MQTT broker (rumqttd, no TLS, no credentials) in the
    /// foreground until SIGTERM/SIGINT: for trying the daemon out and for its tests.
    #[cfg(feature = "embedded-broker")]
    Broker {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port to listen on.
        #[arg(long, default_value_t = 1883)]
        port: u16,
    },
    /// The operator's side of a fleet: list devices, watch their runs, command a
    /// device, a group or every device, serve the web dashboard.
    Fleet {
        #[command(subcommand)]
        action: edge_trainer::fleet::Action,
    },
    /// Predict the classes of files (images, CSV rows, text lines, safetensors
    /// samples) with a checkpoint, preprocessed exactly as in training.
    Predict(PredictArgs),
    /// Export a checkpoint to ONNX (for TensorRT, onnxruntime), with `labels.txt` beside it.
    Export {
        /// The checkpoint (`best.safetensors`, `current.safetensors`).
        #[arg(long, value_name = "FILE")]
        checkpoint: PathBuf,
        /// The ONNX file to write; `labels.txt` goes in the same folder.
        #[arg(long, value_name = "FILE.onnx")]
        out: PathBuf,
        /// ONNX opset (13 for TensorRT 8.2 / JetPack 4.6, up to 17 for TensorRT 8.5).
        #[arg(long, default_value_t = edge_trainer::engine::export::DEFAULT_OPSET)]
        opset: i64,
        /// Append a Softmax: `output_0` holds probabilities instead of logits.
        #[arg(long)]
        softmax: bool,
    },
    /// Validate the config and print the effective values (secrets masked).
    CheckConfig {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

/// `predict`'s arguments.
#[derive(clap::Args)]
struct PredictArgs {
    /// The checkpoint to predict with.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "model",
        conflicts_with = "model"
    )]
    checkpoint: Option<PathBuf>,
    /// `current`: the model in service, `{output.dir}/current.safetensors` of `--config`.
    #[arg(long, value_enum, requires = "config")]
    model: Option<ModelArg>,
    /// The TOML config: its output.dir (for `--model current`), data keys
    /// (label column, delimiter, x/y keys), batch size and device.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override a config key, as for `train`.
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "config")]
    set: Vec<String>,
    /// Predict this split of the configured data (read and split as `eval` does) instead of files.
    #[arg(long, value_enum, requires = "config", conflicts_with = "inputs")]
    split: Option<SplitArg>,
    /// Classes shown per sample.
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    /// One JSON object per line, and a final `{"summary": ...}` line.
    #[arg(long)]
    json: bool,
    /// With `--json`: every class's logit and probability too.
    #[arg(long, requires = "json")]
    full: bool,
    /// Samples per forward pass (default: the config's train.batch_size, else 64).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Files to predict: images, CSV files (one sample per row), text files (one
    /// per line), safetensors files (one per row of `x`), per the checkpoint's data format.
    #[arg(value_name = "INPUT", required_unless_present = "split")]
    inputs: Vec<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModelArg {
    /// `{output.dir}/current.safetensors`.
    Current,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGE_TRAINER_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        // The embedded broker (rumqttd) logs every client disconnect as an error.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(
                "info,rumqttd=warn,rumqttd::server=off,rumqttd::router=off,rumqttd::link=off",
            )
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// Loads the layered settings; on error prints it and returns the usage exit code.
fn load_settings(args: &ConfigArgs) -> Result<Settings, ExitCode> {
    let result = (|| {
        let mut overrides = config::env_overrides(std::env::vars());
        for s in &args.set {
            overrides.push(Override::parse_set(s)?);
        }
        config::load(&args.config, &overrides)
    })();
    result.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_USAGE)
    })
}

/// Commands whose output is read by people and pipes (`predict ... | head`):
/// a closed pipe ends them quietly, as it ends `cat`, instead of a panic in
/// `println!`. The daemon, the broker and `fleet serve` keep Rust's ignored
/// SIGPIPE: a peer closing a socket must never kill them.
fn exits_quietly_on_closed_pipe(command: &Command) -> bool {
    match command {
        Command::Run { .. } => false,
        #[cfg(feature = "embedded-broker")]
        Command::Broker { .. } => false,
        Command::Fleet { action } => !action.serves(),
        _ => true,
    }
}

fn main() -> ExitCode {
    runtime::init();
    let cli = Cli::parse();
    if exits_quietly_on_closed_pipe(&cli.command) {
        // SAFETY: restores the default action of one signal before any thread
        // starts; no handler of ours is replaced.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_logging();
    match cli.command {
        Command::CheckConfig { cfg } => check_config(&cfg),
        Command::Predict(args) => predict::main(&args),
        Command::Export {
            checkpoint,
            out,
            opset,
            softmax,
        } => predict::export(&checkpoint, &out, opset, softmax),
        Command::Bench(args) => bench::main(&args),
        Command::Run { cfg } => run_daemon(&cfg),
        Command::Fleet { action } => match edge_trainer::fleet::main(action) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(if e.is_usage() {
                    EXIT_USAGE
                } else {
                    EXIT_FAILED
                })
            }
        },
        #[cfg(feature = "embedded-broker")]
        Command::Broker { host, port } => {
            match edge_trainer::daemon::broker::serve_until_signal(&host, port) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
        Command::Plot { metrics, out } => {
            match edge_trainer::plot::read_metrics(&metrics)
                .and_then(|m| edge_trainer::plot::plot(&m, &out))
            {
                Ok(()) => {
                    println!("{}", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
        Command::Train {
            cfg,
            no_progress,
            resume,
        } => match load_settings(&cfg) {
            Ok(s) => train(&s, no_progress, resume.as_deref()),
            Err(code) => code,
        },
        Command::Eval {
            cfg,
            checkpoint,
            split,
            json,
        } => match load_settings(&cfg) {
            Ok(s) => match eval(&s, &checkpoint, split, json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(EXIT_FAILED)
                }
            },
            Err(code) => code,
        },
    }
}

fn run_daemon(args: &ConfigArgs) -> ExitCode {
    let mut overrides = config::env_overrides(std::env::vars());
    for s in &args.set {
        match Override::parse_set(s) {
            Ok(o) => overrides.push(o),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    match edge_trainer::daemon::run(&args.config, overrides) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(if e.is_config() {
                EXIT_USAGE
            } else {
                EXIT_FAILED
            })
        }
    }
}

fn check_config(args: &ConfigArgs) -> ExitCode {
    let settings = match load_settings(args) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(e) = settings
        .model_template()
        .and_then(|_| settings.check_secret_files())
    {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    if let Err(e) = device::select(settings.device.kind, settings.device.ordinal) {
        eprintln!("error: device.kind: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    println!("# effective configuration of {}", args.config.display());
    if let Some(spec) = settings.sketch_model() {
        // Sizes only the data tells (CSV features, the vocabulary) count as their smallest here.
        println!(
            "# memory: a training step needs {} of the budget of {}",
            settings.estimate(&spec),
            settings.memory_budget()
        );
    }
    print!("{}", settings.masked_toml());
    ExitCode::SUCCESS
}

fn train(settings: &Settings, no_progress: bool, resume: Option<&Path>) -> ExitCode {
    let dev = match device::select(settings.device.kind, settings.device.ordinal) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: device.kind: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let warm = settings.run_settings().warm_start(Starter::TrainCommand);
    let run_id = match resume {
        Some(dir) => match dir.file_name() {
            Some(id) if dir.is_dir() => id.to_string_lossy().into_owned(),
            _ => {
                eprintln!("error: --resume {}: not a run folder", dir.display());
                return ExitCode::from(EXIT_USAGE);
            }
        },
        None => new_run_id(),
    };
    let mut req = match settings.run_request(run_id, dev, warm) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(dir) = resume {
        req.resume = true;
        req.runs_dir = dir.parent().map(Path::to_path_buf).unwrap_or_default();
    }
    // A live daemon (or another `train`) working in the same output.dir is refused.
    let out_dir = match req.runs_dir.parent() {
        Some(p) if p.as_os_str().is_empty() => PathBuf::from("."),
        Some(p) => p.to_path_buf(),
        None => settings.output.dir.clone(),
    };
    let _outdir_lock = match edge_trainer::outdir_lock::OutdirLock::acquire(&out_dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let cancel = CancelFlag::new();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while the first is being honoured ends the process at once.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, cancel.as_atomic());
        let _ = signal_hook::flag::register(sig, cancel.as_atomic());
    }
    let (tx, rx) = mpsc::channel();
    let worker = {
        let cancel = cancel.clone();
        let req = req.clone();
        std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || trainer::run(&req, &tx, &cancel))
    };
    let worker = match worker {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: cannot start the training thread: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let interactive = std::io::stdout().is_terminal() && !no_progress;
    let mut bar: Option<ProgressBar> = None;
    let mut max_epochs = 0;
    let mut summary = None;
    for ev in rx {
        match ev {
            RunEvent::Started(s) => {
                max_epochs = s.max_epochs;
                println!(
                    "Run {} on {}: {} train / {} val / {} test samples, {} classes, {} trainable parameters, from {}",
                    s.run_id,
                    s.device,
                    s.samples.train,
                    s.samples.val,
                    s.samples.test,
                    s.classes.len(),
                    s.trainable_params,
                    s.warm_start
                );
                for f in &s.skipped_files {
                    println!("Skipped data file {}: {}", f.file, f.reason);
                }
                let fc = &s.feature_cache;
                if fc.used {
                    println!(
                        "Frozen-feature cache at {}: {} samples stored, {} to compute once",
                        fc.split.as_deref().unwrap_or("?"),
                        fc.hits,
                        fc.misses
                    );
                }
            }
            RunEvent::EpochStarted { epoch, batches } => {
                if interactive {
                    if let Some(b) = bar.take() {
                        b.finish_and_clear();
                    }
                    let b =
                        ProgressBar::with_draw_target(Some(batches), ProgressDrawTarget::stdout());
                    b.set_style(
                        ProgressStyle::with_template(
                            "Epoch {prefix} [{bar:30}] {pos}/{len} batches, loss {msg} ({elapsed}, eta {eta})",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    b.set_prefix(format!("{epoch}/{max_epochs}"));
                    bar = Some(b);
                }
            }
            RunEvent::Step { loss, .. } => {
                if let Some(b) = &bar {
                    b.set_message(format!("{loss:.4}"));
                    b.inc(1);
                }
            }
            RunEvent::Evaluated(m) => {
                let line = report::metrics_line(&m);
                match &bar {
                    Some(b) => b.println(line),
                    None => println!("{line}"),
                }
            }
            RunEvent::CheckpointSaved(_) => {}
            RunEvent::EarlyStopped(e) => {
                let line = format!(
                    "No improvement for a long time, auto-stopping: {}",
                    e.reason
                );
                match &bar {
                    Some(b) => b.println(line),
                    None => println!("{line}"),
                }
            }
            RunEvent::Ended(s) => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                summary = Some(*s);
            }
        }
    }
    let summary = match (worker.join(), summary) {
        (Ok(s), _) => s,
        (Err(_), Some(s)) => s,
        (Err(_), None) => {
            eprintln!("error: the training thread panicked");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    print!("{}", report::summary_text(&summary));
    if summary.outcome == Outcome::Failed {
        eprintln!("error: run failed: {}", summary.reason);
    }
    if summary.outcome.is_success() {
        if let Some(best) = &summary.best_checkpoint {
            print_promotion(settings, best, &req.device, &cancel);
        }
    }
    let run_dir = req.runs_dir.join(&req.run_id);
    println!("{}", run_dir.display());
    match summary.outcome {
        Outcome::Finished | Outcome::EarlyStopped => ExitCode::SUCCESS,
        Outcome::Failed => ExitCode::from(EXIT_FAILED),
        Outcome::Cancelled => ExitCode::from(EXIT_CANCELLED),
    }
}

/// Promotes the run's best model as the daemon would, and says what happened.
fn print_promotion(
    settings: &Settings,
    best: &Path,
    dev: &candle_core::Device,
    cancel: &CancelFlag,
) {
    match settings.run_settings().promote(best, dev, cancel) {
        Ok(p) if p.promoted => println!("Promoted to {}: {}", p.current_path.display(), p.reason),
        Ok(p) => println!(
            "Kept the current model {}: {}",
            p.current_path.display(),
            p.reason
        ),
        Err(e) => eprintln!("error: the model was not promoted: {e}"),
    }
}

fn eval(settings: &Settings, checkpoint: &Path, split: SplitArg, json: bool) -> anyhow::Result<()> {
    let dev = device::select(settings.device.kind, settings.device.ordinal)?;
    let split = match split {
        SplitArg::Train => Split::Train,
        SplitArg::Val => Split::Val,
        SplitArg::Test => Split::Test,
    };
    let loss = CrossEntropy::new(
        settings.train.class_weights.as_deref(),
        settings.train.label_smoothing,
        &dev,
    )?;
    let (rep, meta, skipped) = edge_trainer::engine::eval::evaluate_checkpoint(
        checkpoint,
        &settings.data_spec(),
        split,
        &dev,
        settings.train.batch_size,
        &loss,
        &CancelFlag::new(),
    )
    // The message already names its cause; `{:#}` must not repeat the source chain.
    .map_err(|e| anyhow::Error::msg(e.to_string()))
    .with_context(|| format!("evaluating {}", checkpoint.display()))?;
    let split_name = format!("{split:?}").to_lowercase();
    if json {
        let out = serde_json::json!({
            "checkpoint": checkpoint,
            "run_id": meta.run_id,
            "split": split_name,
            "loss": rep.loss,
            "accuracy": rep.accuracy,
            "samples": rep.samples,
            "macro_f1": rep.macro_f1,
            "per_class": rep.per_class,
            "confusion_matrix": rep.confusion_matrix,
            "skipped_files": skipped,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "Checkpoint {} (run {}, epoch {}, step {}, {})",
            checkpoint.display(),
            meta.run_id,
            meta.epoch,
            meta.step,
            meta.model.arch_name()
        );
        for f in &skipped {
            println!("Skipped data file {}: {}", f.file, f.reason);
        }
        print!(
            "{}",
            report::eval_text(&format!("{split_name} split"), &rep)
        );
    }
    Ok(())
}
