//! `edge-trainer bench`: trains the models of the performance comparison
//! (README "Performance") through the real engine components — [`Model`],
//! [`Batcher`], [`CrossEntropy`], [`AnyOptimizer`] and the trainer's own
//! [`train_step`] — for a fixed number of steps, and reports samples/s, the
//! time of each phase of a step, peak RSS and the time from process start to
//! the first finished step.
//!
//! Each model runs in a fresh child process of the same binary (the hidden
//! `bench --one MODEL` mode), so that its peak RSS (`VmHWM`) and its start-up
//! are its own. `--export DIR` writes each model's data, batch order, initial
//! weights and settings, so that `scripts/bench-vs-pytorch` trains exactly the
//! same thing in PyTorch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use edge_trainer::engine::data::{
    self, Batcher, DataFormat, DataSpec, Dataset, Features, Normalization,
};
use edge_trainer::engine::device::{self, DeviceKind};
use edge_trainer::engine::loss::CrossEntropy;
use edge_trainer::engine::model::mobilenet::MobileNetSpec;
use edge_trainer::engine::model::resnet::ResNetSpec;
use edge_trainer::engine::model::{
    Activation, CnnSpec, ConvBlockSpec, ForwardCtx, MlpSpec, Model, ModelSpec, TextCnnSpec,
};
use edge_trainer::engine::optim::{AnyOptimizer, OptimizerConfig, OptimizerKind};
use edge_trainer::engine::trainer::{train_step, Phase, StepError, StepObserver};

mod layers;

/// Environment variable through which the parent passes the wall-clock time
/// (Unix nanoseconds) at which it started a child; the child's time to the
/// first step counts from there.
pub const T0_ENV: &str = "EDGE_TRAINER_BENCH_T0_NS";

/// Seed of the synthetic data, the initial weights and the batch order.
const SEED: u64 = 42;

/// The models of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchModel {
    /// MLP 64-128-64-10 on the digits data, batch 64.
    MlpDigits,
    /// MLP 784-512-512-10 on synthetic data, batch 128.
    MlpWide,
    /// conv(3→32)-pool-conv(32→64)-pool-fc(4096→128)-fc(10) on 3x32x32, batch 64.
    Cnn,
    /// The seed's TextCNN (embed 300, filters 2/3/4 x 256, dropout 0.5), batch 128.
    Textcnn,
    /// torchvision's resnet18 (10 classes) on 3x112x112, batch 32.
    Resnet18,
    /// torchvision's mobilenet_v2 (width 1.0, 10 classes, dropout 0.2) on
    /// 3x112x112, batch 32.
    MobilenetV2,
    /// torchvision's mobilenet_v3_small (width 1.0, 10 classes, dropout 0.2)
    /// on 3x112x112, batch 32.
    MobilenetV3Small,
}

impl BenchModel {
    /// Every model, in table order.
    pub const ALL: [BenchModel; 7] = [
        BenchModel::MlpDigits,
        BenchModel::MlpWide,
        BenchModel::Cnn,
        BenchModel::Textcnn,
        BenchModel::Resnet18,
        BenchModel::MobilenetV2,
        BenchModel::MobilenetV3Small,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            BenchModel::MlpDigits => "mlp-digits",
            BenchModel::MlpWide => "mlp-wide",
            BenchModel::Cnn => "cnn",
            BenchModel::Textcnn => "textcnn",
            BenchModel::Resnet18 => "resnet18",
            BenchModel::MobilenetV2 => "mobilenet-v2",
            BenchModel::MobilenetV3Small => "mobilenet-v3-small",
        }
    }
}

/// Where to run the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchDevice {
    /// CUDA when built with it and a GPU is present, else CPU.
    Auto,
    Cpu,
    Cuda,
}

/// Arguments of `edge-trainer bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Timed training steps per model.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Untimed warm-up steps before the timed ones.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// A seconds-long run (1 warm-up and 2 timed steps, small data sets), e.g. for CI.
    #[arg(long)]
    pub smoke: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Models to run, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub models: Vec<BenchModel>,
    /// Folder of the digits data set (the tiny MLP's data).
    #[arg(long, value_name = "DIR", default_value = "examples/digits")]
    pub digits: PathBuf,
    /// Compute threads (sets RAYON_NUM_THREADS for the runs; default: candle's choice).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Device to train on.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: BenchDevice,
    /// Write each model's data, batch order, initial weights and settings
    /// (`MODEL.safetensors`, `MODEL.json`) to DIR and exit, for scripts/bench-vs-pytorch.
    #[arg(long, value_name = "DIR")]
    pub export: Option<PathBuf>,
    /// Time single layers instead (MobileNetV2's depthwise convolutions,
    /// forward and backward, our kernels and candle's generic ops; `--steps`
    /// repetitions each), in this process.
    #[arg(long)]
    pub layers: bool,
    /// Run one model in this process (what the parent runs in each child).
    #[arg(long, value_enum, hide = true)]
    pub one: Option<BenchModel>,
    /// Measure the image-folder pipeline alone on the images of DIR (decode,
    /// resize, augment, normalise on the data workers) instead of training.
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// --images: the square side images are resized to.
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// --images: apply torchvision's usual training augmentation (random
    /// resized crop, flip, colour jitter 0.4/0.4/0.4/0.1).
    #[arg(long)]
    pub augment: bool,
    /// --images: data workers.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// --images: epochs.
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// --images: batch size.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// --images: data.cache_mb.
    #[arg(long, default_value_t = 256)]
    pub cache_mb: u64,
}

impl BenchArgs {
    fn effective_steps(&self) -> (usize, usize) {
        if self.smoke {
            (1, 2)
        } else {
            (self.warmup, self.steps.max(1))
        }
    }

    fn model_list(&self) -> Vec<BenchModel> {
        if self.models.is_empty() {
            BenchModel::ALL.to_vec()
        } else {
            self.models.clone()
        }
    }
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Step(#[from] StepError),
    #[error("data: {0}")]
    Data(String),
    #[error("device: {0}")]
    Device(#[from] device::DeviceError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start a child process for {model}: {source}")]
    Spawn {
        model: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the run of {model} failed ({status}): {stderr}")]
    Child {
        model: &'static str,
        status: String,
        stderr: String,
    },
    #[error("the run of {model} printed no report: {reason}")]
    Report { model: &'static str, reason: String },
}

/// What one model's run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelReport {
    pub model: String,
    pub description: String,
    pub device: String,
    pub threads: usize,
    pub batch_size: usize,
    pub warmup: usize,
    pub steps: usize,
    /// Trainable scalars.
    pub params: usize,
    pub samples_per_s: f64,
    /// Mean wall time of a timed step and of its phases.
    pub ms_per_step: f64,
    pub ms_data: f64,
    pub ms_forward: f64,
    pub ms_backward: f64,
    pub ms_optimizer: f64,
    /// Peak resident set size of the process (`VmHWM`), MiB.
    pub peak_rss_mib: f64,
    /// From process start to the end of the first training step.
    pub first_step_ms: f64,
    /// The first step's own duration (included in `first_step_ms`).
    pub first_step_self_ms: f64,
    /// From process start to the start of the first step: loading or making
    /// the data, building the model, the optimiser and the batcher.
    #[serde(default)]
    pub setup_ms: f64,
    /// Loss of the first and of the last step (a cross-check with PyTorch).
    pub loss_first: f64,
    pub loss_last: f64,
    /// CPU time (user + system, all threads) per timed step: less sensitive
    /// than wall time to other load on the machine.
    #[serde(default)]
    pub cpu_ms_per_step: f64,
    /// Minor page faults per timed step (allocator churn shows here).
    #[serde(default)]
    pub page_faults_per_step: f64,
}

/// The whole benchmark's result (`--json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub allocator: String,
    pub version: String,
    pub models: Vec<ModelReport>,
}

/// A model with its data, ready to train.
struct Setup {
    model: BenchModel,
    description: String,
    spec: ModelSpec,
    data: Dataset,
    norm: Normalization,
    batch_size: usize,
    /// Sample indices of every step (warm-up first), `batch_size` per step.
    order: Vec<usize>,
}

fn adamw() -> OptimizerConfig {
    OptimizerConfig {
        kind: OptimizerKind::AdamW,
        lr: 1e-3,
        weight_decay: 0.01,
        ..OptimizerConfig::default()
    }
}

fn synthetic(
    features: Features,
    n: usize,
    sample_shape: Vec<usize>,
    classes: usize,
    rng: &mut ChaCha8Rng,
) -> Dataset {
    Dataset {
        features,
        labels: (0..n)
            .map(|_| rng.random_range(0..classes as u32))
            .collect(),
        sample_shape,
        classes: (0..classes).map(|c| c.to_string()).collect(),
        origins: (0..n as u32).map(|i| (0, i)).collect(),
        files: vec!["synthetic".into()],
        skipped: Vec::new(),
        vocab: None,
    }
}

/// `n` values uniform in [0, 1), from whole blocks of the generator's output
/// (much faster than one draw per value; start-up time is measured).
fn uniform_f32(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    let mut bytes = vec![0u8; n * 4];
    rng.fill_bytes(&mut bytes);
    bytes
        .chunks_exact(4)
        .map(|b| (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> 8) as f32 / (1u32 << 24) as f32)
        .collect()
}

fn conv_block(out_channels: usize) -> ConvBlockSpec {
    ConvBlockSpec {
        out_channels,
        kernel_size: 3,
        stride: 1,
        padding: 1,
        batch_norm: false,
        pool: 2,
    }
}

fn setup(model: BenchModel, args: &BenchArgs) -> Result<Setup, BenchError> {
    let (warmup, steps) = args.effective_steps();
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    // Synthetic sets hold a few batches (the order repeats them, reshuffled
    // every epoch): making them is the bench's own start-up, not the engine's.
    let scale = |full: usize, smoke: usize| if args.smoke { smoke } else { full };
    let (description, spec, data, norm, batch_size) = match model {
        BenchModel::MlpDigits => {
            let spec = DataSpec::new(&args.digits, DataFormat::Safetensors);
            let data = data::load_dataset(&spec).map_err(|e| {
                BenchError::Data(format!(
                    "{e} (run from the repository or pass --digits DIR)"
                ))
            })?;
            let all: Vec<usize> = (0..data.len()).collect();
            let norm = Normalization::fit(&data, &all);
            let spec = ModelSpec::Mlp(MlpSpec {
                input_dim: data.sample_len(),
                hidden: vec![128, 64],
                num_classes: data.classes.len(),
                activation: Activation::Relu,
                dropout: 0.0,
            });
            ("MLP 64-128-64-10, digits", spec, data, norm, 64)
        }
        BenchModel::MlpWide => {
            let n = scale(1024, 256);
            let x = uniform_f32(&mut rng, n * 784);
            let data = synthetic(Features::F32(x), n, vec![784], 10, &mut rng);
            let all: Vec<usize> = (0..n).collect();
            let norm = Normalization::fit(&data, &all);
            let spec = ModelSpec::Mlp(MlpSpec {
                input_dim: 784,
                hidden: vec![512, 512],
                num_classes: 10,
                activation: Activation::Relu,
                dropout: 0.0,
            });
            ("MLP 784-512-512-10, synthetic", spec, data, norm, 128)
        }
        BenchModel::Cnn => {
            let n = scale(512, 128);
            let mut x = vec![0u8; n * 3 * 32 * 32];
            rng.fill_bytes(&mut x);
            let data = synthetic(Features::U8(x), n, vec![3, 32, 32], 10, &mut rng);
            let all: Vec<usize> = (0..n).collect();
            let norm = Normalization::fit_per_channel(&data, &all);
            let spec = ModelSpec::Cnn(CnnSpec {
                in_channels: 3,
                input_size: vec![32, 32],
                blocks: vec![conv_block(32), conv_block(64)],
                num_classes: 10,
                activation: Activation::Relu,
                dropout: 0.0,
                flatten: true,
                hidden: vec![128],
            });
            (
                "CNN conv32-pool-conv64-pool-fc128-fc10, 3x32x32 synthetic",
                spec,
                data,
                norm,
                64,
            )
        }
        BenchModel::Textcnn => {
            let (n, len, vocab) = (scale(1024, 256), 32, 5000);
            let pad = vocab - 1;
            let mut x = Vec::with_capacity(n * len);
            for _ in 0..n {
                let used = rng.random_range(4..=len);
                for t in 0..len {
                    let id = if t < used {
                        rng.random_range(0..pad)
                    } else {
                        pad
                    };
                    x.push(id as f32);
                }
            }
            let data = synthetic(Features::F32(x), n, vec![len], 10, &mut rng);
            let norm = Normalization::identity(len);
            let spec = ModelSpec::TextCnn(TextCnnSpec {
                vocab_size: vocab,
                pad_index: pad,
                embed_dim: 300,
                filter_sizes: vec![2, 3, 4],
                num_filters: 256,
                seq_len: len,
                num_classes: 10,
                dropout: 0.5,
            });
            (
                "TextCNN embed 300, filters 2/3/4 x 256, 32 tokens, synthetic",
                spec,
                data,
                norm,
                128,
            )
        }
        BenchModel::Resnet18 | BenchModel::MobilenetV2 | BenchModel::MobilenetV3Small => {
            // Smoke runs use small images and batches (CI runs a debug build).
            let (n, side, batch) = if args.smoke {
                (8, 32, 4)
            } else {
                (128, 112, 32)
            };
            let mut x = vec![0u8; n * 3 * side * side];
            rng.fill_bytes(&mut x);
            let data = synthetic(Features::U8(x), n, vec![3, side, side], 10, &mut rng);
            let all: Vec<usize> = (0..n).collect();
            let norm = Normalization::fit_per_channel(&data, &all);
            if model == BenchModel::Resnet18 {
                let spec = ModelSpec::Resnet18(ResNetSpec {
                    in_channels: 3,
                    input_size: [side, side],
                    base_width: 64,
                    num_classes: 10,
                    dropout: 0.0,
                });
                (
                    "torchvision resnet18, 3x112x112 synthetic",
                    spec,
                    data,
                    norm,
                    batch,
                )
            } else {
                let mobilenet = MobileNetSpec {
                    in_channels: 3,
                    input_size: [side, side],
                    width_mult: 1.0,
                    num_classes: 10,
                    dropout: 0.2,
                };
                let (spec, what) = if model == BenchModel::MobilenetV2 {
                    (
                        ModelSpec::MobilenetV2(mobilenet),
                        "torchvision mobilenet_v2, 3x112x112 synthetic",
                    )
                } else {
                    (
                        ModelSpec::MobilenetV3Small(mobilenet),
                        "torchvision mobilenet_v3_small, 3x112x112 synthetic",
                    )
                };
                (what, spec, data, norm, batch)
            }
        }
    };
    // Epoch after epoch of the trainer's seeded shuffle, full batches only.
    let all: Vec<usize> = (0..data.len()).collect();
    let per_epoch = data.len() / batch_size * batch_size;
    if per_epoch == 0 {
        return Err(BenchError::Data(format!(
            "{} samples do not fill one batch of {batch_size}",
            data.len()
        )));
    }
    let need = (warmup + steps) * batch_size;
    let mut order = Vec::with_capacity(need + per_epoch);
    let mut epoch = 1;
    while order.len() < need {
        let o = Batcher::epoch_order(&all, SEED, epoch);
        order.extend_from_slice(&o[..per_epoch]);
        epoch += 1;
    }
    order.truncate(need);
    Ok(Setup {
        model,
        description: description.to_string(),
        spec,
        data,
        norm,
        batch_size,
        order,
    })
}

fn open_device(kind: BenchDevice) -> Result<Device, BenchError> {
    let kind = match kind {
        BenchDevice::Auto => DeviceKind::Auto,
        BenchDevice::Cpu => DeviceKind::Cpu,
        BenchDevice::Cuda => DeviceKind::Cuda,
    };
    Ok(device::select(kind, 0)?)
}

/// Peak resident set size of this process in KiB (`VmHWM`), 0 where unknown.
pub(crate) fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// When this process started (Unix nanoseconds): from the parent, else from
/// `/proc` (10 ms resolution), else now.
fn process_start_ns() -> u128 {
    if let Some(t) = std::env::var(T0_ENV).ok().and_then(|v| v.parse().ok()) {
        return t;
    }
    let from_proc = || -> Option<u128> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses; starttime is field 22.
        let rest = &stat[stat.rfind(')')? + 2..];
        let ticks: u128 = rest.split_whitespace().nth(19)?.parse().ok()?;
        let btime: u128 = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        Some(btime * 1_000_000_000 + ticks * 10_000_000)
    };
    from_proc().unwrap_or_else(unix_ns)
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// CPU time (ms, user + system) and minor page faults of this process so far.
fn usage() -> (f64, f64) {
    #[cfg(unix)]
    {
        // SAFETY: getrusage only writes into the zero-initialised struct we own.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
            let t = |tv: libc::timeval| tv.tv_sec as f64 * 1e3 + tv.tv_usec as f64 / 1e3;
            return (t(ru.ru_utime) + t(ru.ru_stime), ru.ru_minflt as f64);
        }
    }
    (0.0, 0.0)
}

/// Records when each phase of a step ends; waits for the device after the
/// backward pass and the update, so the time is spent in the phase that caused it.
struct PhaseMarks<'a> {
    device: &'a Device,
    /// End of forward, backward, update.
    at: [Instant; 3],
}

impl StepObserver for PhaseMarks<'_> {
    fn phase_done(&mut self, phase: Phase) -> candle_core::Result<()> {
        let i = match phase {
            Phase::Forward => 0,
            Phase::Backward => {
                self.device.synchronize()?;
                1
            }
            Phase::Update => {
                self.device.synchronize()?;
                2
            }
        };
        self.at[i] = Instant::now();
        Ok(())
    }
}

/// Trains one model in this process and measures it.
fn run_one(model: BenchModel, args: &BenchArgs) -> Result<ModelReport, BenchError> {
    let t_start = process_start_ns();
    let (warmup, steps) = args.effective_steps();
    let device = open_device(args.device)?;
    let s = setup(model, args)?;
    let m = Model::new(s.spec.clone(), SEED, &device)?;
    let named = m.params.trainable();
    let params: usize = named.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AnyOptimizer::new(named, &adamw())?;
    let loss_fn = CrossEntropy::new(None, 0.0, &device)?;
    let batcher = Batcher::new(&s.data, &s.norm, &device);
    let mut ctx = ForwardCtx::train(SEED);

    let mut phase = [0f64; 4];
    let mut first_step_ms = 0.0;
    let mut first_step_self_ms = 0.0;
    let setup_ms = (unix_ns().saturating_sub(t_start)) as f64 / 1e6;
    let mut losses = Vec::with_capacity(warmup + steps);
    let mut timed = std::time::Duration::ZERO;
    let mut usage_start = usage();
    for (i, chunk) in s.order.chunks(s.batch_size).enumerate() {
        if i == warmup {
            usage_start = usage();
        }
        let t0 = Instant::now();
        let batch = batcher.batch(chunk)?;
        device.synchronize()?;
        let t1 = Instant::now();
        let mut marks = PhaseMarks {
            device: &device,
            at: [t1; 3],
        };
        // The trainer's step, exactly (forward, loss, accuracy, backward, update).
        let out = train_step(&m, &batch, &loss_fn, &mut opt, &mut ctx, &mut marks)?;
        let loss = out.loss;
        let [t2, t3, t4] = marks.at;
        losses.push(loss);
        if i == 0 {
            first_step_ms = (unix_ns().saturating_sub(t_start)) as f64 / 1e6;
            first_step_self_ms = ms(t4 - t0);
        }
        if i >= warmup {
            for (p, d) in phase.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3]) {
                *p += ms(d);
            }
            timed += t4 - t0;
        }
    }
    let usage_end = usage();
    let n = steps as f64;
    let secs = timed.as_secs_f64().max(1e-9);
    Ok(ModelReport {
        model: model.name().to_string(),
        description: s.description,
        device: device::describe(&device),
        threads: candle_core::utils::get_num_threads(),
        batch_size: s.batch_size,
        warmup,
        steps,
        params,
        samples_per_s: (steps * s.batch_size) as f64 / secs,
        ms_per_step: secs * 1e3 / n,
        ms_data: phase[0] / n,
        ms_forward: phase[1] / n,
        ms_backward: phase[2] / n,
        ms_optimizer: phase[3] / n,
        peak_rss_mib: peak_rss_kib() as f64 / 1024.0,
        first_step_ms,
        first_step_self_ms,
        setup_ms,
        loss_first: losses.first().copied().unwrap_or(f64::NAN),
        loss_last: losses.last().copied().unwrap_or(f64::NAN),
        cpu_ms_per_step: (usage_end.0 - usage_start.0) / n,
        page_faults_per_step: (usage_end.1 - usage_start.1) / n,
    })
}

/// Writes one model's data, order, initial weights and settings to `dir`.
fn export_one(model: BenchModel, args: &BenchArgs, dir: &Path) -> Result<(), BenchError> {
    let (warmup, steps) = args.effective_steps();
    let s = setup(model, args)?;
    let device = Device::Cpu;
    let m = Model::new(s.spec.clone(), SEED, &device)?;
    let all: Vec<usize> = (0..s.data.len()).collect();
    let batch = Batcher::new(&s.data, &s.norm, &device).batch(&all)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert("x".into(), batch.x);
    tensors.insert("y".into(), batch.y);
    let order: Vec<u32> = s.order.iter().map(|&i| i as u32).collect();
    let len = order.len();
    tensors.insert("order".into(), Tensor::from_vec(order, len, &device)?);
    for (name, t) in m.params.state_dict() {
        tensors.insert(format!("param.{name}"), t);
    }
    let name = s.model.name();
    let st = dir.join(format!("{name}.safetensors"));
    candle_core::safetensors::save(&tensors, &st)?;
    let cfg = adamw();
    let settings = serde_json::json!({
        "model": name,
        "description": s.description,
        "batch_size": s.batch_size,
        "warmup": warmup,
        "steps": steps,
        "optimizer": {
            "kind": "adamw", "lr": cfg.lr, "betas": [cfg.betas.0, cfg.betas.1],
            "eps": cfg.eps, "weight_decay": cfg.weight_decay,
        },
        "spec": s.spec,
    });
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, settings.to_string()).map_err(|source| BenchError::Io { path, source })
}

/// Runs one model in a child process of this binary and reads its report.
fn run_child(model: BenchModel, args: &BenchArgs) -> Result<ModelReport, BenchError> {
    let name = model.name();
    let exe = std::env::current_exe().map_err(|source| BenchError::Spawn {
        model: name,
        source,
    })?;
    let mut cmd = Command::new(exe);
    cmd.arg("bench")
        .arg("--one")
        .arg(name)
        .arg("--steps")
        .arg(args.steps.to_string())
        .arg("--warmup")
        .arg(args.warmup.to_string())
        .arg("--digits")
        .arg(&args.digits)
        .arg("--device")
        .arg(match args.device {
            BenchDevice::Auto => "auto",
            BenchDevice::Cpu => "cpu",
            BenchDevice::Cuda => "cuda",
        });
    if args.smoke {
        cmd.arg("--smoke");
    }
    if let Some(t) = args.threads {
        cmd.env("RAYON_NUM_THREADS", t.to_string());
    }
    cmd.env(T0_ENV, unix_ns().to_string());
    let out = cmd.output().map_err(|source| BenchError::Spawn {
        model: name,
        source,
    })?;
    if !out.status.success() {
        return Err(BenchError::Child {
            model: name,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| BenchError::Report {
            model: name,
            reason: "no JSON line on stdout".into(),
        })?;
    serde_json::from_str(line).map_err(|e| BenchError::Report {
        model: name,
        reason: e.to_string(),
    })
}

fn print_table(report: &BenchReport) {
    let first = report.models.first();
    println!(
        "edge-trainer {} bench: {} timed steps after {} warm-up, AdamW, device {}, {} threads, allocator {}",
        report.version,
        first.map_or(0, |m| m.steps),
        first.map_or(0, |m| m.warmup),
        first.map_or("?", |m| m.device.as_str()),
        first.map_or(0, |m| m.threads),
        report.allocator
    );
    println!(
        "{:<11} {:>5} {:>10} {:>8} {:>7} {:>7} {:>7} {:>7} {:>9} {:>11} {:>9}",
        "model",
        "batch",
        "samples/s",
        "ms/step",
        "data",
        "fwd",
        "bwd",
        "optim",
        "peak MiB",
        "1st step ms",
        "loss"
    );
    for m in &report.models {
        println!(
            "{:<11} {:>5} {:>10.0} {:>8.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>9.1} {:>11.0} {:>9.4}",
            m.model,
            m.batch_size,
            m.samples_per_s,
            m.ms_per_step,
            m.ms_data,
            m.ms_forward,
            m.ms_backward,
            m.ms_optimizer,
            m.peak_rss_mib,
            m.first_step_ms,
            m.loss_last
        );
    }
}

fn run(args: &BenchArgs) -> Result<(), BenchError> {
    if args.layers {
        if let Some(t) = args.threads {
            // In this process: the pool is not built yet, so this cannot fail
            // but for a pool built already, which then keeps its size.
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build_global();
        }
        let (_, steps) = args.effective_steps();
        let reports = layers::run(steps, args.smoke)?;
        if args.json {
            for r in &reports {
                let line = serde_json::to_string(r).map_err(|e| BenchError::Report {
                    model: "layers",
                    reason: e.to_string(),
                })?;
                println!("{line}");
            }
        } else {
            layers::print(&reports);
        }
        return Ok(());
    }
    if let Some(dir) = &args.images {
        return super::bench_images::run(dir, args);
    }
    if let Some(model) = args.one {
        let report = run_one(model, args)?;
        let line = serde_json::to_string(&report).map_err(|e| BenchError::Report {
            model: model.name(),
            reason: e.to_string(),
        })?;
        println!("{line}");
        return Ok(());
    }
    if let Some(dir) = &args.export {
        std::fs::create_dir_all(dir).map_err(|source| BenchError::Io {
            path: dir.clone(),
            source,
        })?;
        for model in args.model_list() {
            export_one(model, args, dir)?;
        }
        println!("{}", dir.display());
        return Ok(());
    }
    let mut models = Vec::new();
    for model in args.model_list() {
        let r = run_child(model, args)?;
        if !args.json {
            eprintln!("{}: {:.0} samples/s", r.model, r.samples_per_s);
        }
        models.push(r);
    }
    let report = BenchReport {
        allocator: crate::runtime::allocator_name().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        models,
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                return Err(BenchError::Report {
                    model: "all",
                    reason: e.to_string(),
                })
            }
        }
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Runs `edge-trainer bench`; exit code 1 when a run fails.
pub fn main(args: &BenchArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: bench: {e}");
            ExitCode::from(1)
        }
    }
}
