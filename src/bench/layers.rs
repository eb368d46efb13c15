//! `edge-trainer bench --layers`: single layers of the models, timed forward
//! and backward on our CPU kernels and on candle's generic ops (the path CUDA
//! takes), for the shapes `scripts/bench-vs-pytorch --layers` also times in
//! PyTorch. Today: MobileNetV2's depthwise 3x3 convolutions at 112x112 input,
//! batch 32.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use edge_trainer::engine::model::layers::{conv, ConvConfig};
use edge_trainer::engine::model::{ForwardCtx, KernelPolicy, ParamStore};

use super::BenchError;

/// One layer shape of the comparison.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LayerCase {
    pub name: &'static str,
    pub batch: usize,
    pub channels: usize,
    /// Input height = width.
    pub size: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

/// MobileNetV2's depthwise convolutions at 112x112 input (batch 32): the
/// first of each resolution, stride 1 and stride 2.
pub const CASES: [LayerCase; 6] = [
    dw("dw32-56-s1", 32, 56, 1),
    dw("dw96-56-s2", 96, 56, 2),
    dw("dw144-28-s1", 144, 28, 1),
    dw("dw144-28-s2", 144, 28, 2),
    dw("dw384-7-s1", 384, 7, 1),
    dw("dw960-4-s1", 960, 4, 1),
];

const fn dw(name: &'static str, channels: usize, size: usize, stride: usize) -> LayerCase {
    LayerCase {
        name,
        batch: 32,
        channels,
        size,
        kernel: 3,
        stride,
        padding: 1,
    }
}

/// What one case measured on one path (mean ms over the timed repetitions).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerReport {
    pub case: String,
    pub batch: usize,
    pub channels: usize,
    pub size: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    /// `ours` or `generic`.
    pub path: String,
    pub forward_ms: f64,
    pub backward_ms: f64,
}

fn time_case(
    case: &LayerCase,
    policy: KernelPolicy,
    reps: usize,
) -> Result<LayerReport, BenchError> {
    let dev = Device::Cpu;
    let store = ParamStore::new(42, &dev);
    let cfg = ConvConfig {
        stride: case.stride,
        padding: case.padding,
        dilation: 1,
        groups: case.channels,
    };
    let c = case.channels;
    let layer = conv(2, (c, c), case.kernel, cfg, false, store.var_builder())?;
    let x = Var::from_tensor(&Tensor::rand(
        -1f32,
        1f32,
        (case.batch, c, case.size, case.size),
        &dev,
    )?)?;
    let ctx = ForwardCtx::train(0).with_kernels(policy);
    let (mut fwd, mut bwd) = (0.0, 0.0);
    for i in 0..reps + 2 {
        let t0 = Instant::now();
        let y = layer.forward(&x, &ctx)?;
        let t1 = Instant::now();
        // Seeds the output's gradient with ones, as PyTorch's side does.
        let grads = y.backward()?;
        let t2 = Instant::now();
        drop(grads);
        if i >= 2 {
            fwd += (t1 - t0).as_secs_f64() * 1e3;
            bwd += (t2 - t1).as_secs_f64() * 1e3;
        }
    }
    let n = reps.max(1) as f64;
    Ok(LayerReport {
        case: case.name.to_string(),
        batch: case.batch,
        channels: case.channels,
        size: case.size,
        kernel: case.kernel,
        stride: case.stride,
        padding: case.padding,
        path: match policy {
            KernelPolicy::Ours => "ours",
            KernelPolicy::Generic => "generic",
        }
        .to_string(),
        forward_ms: fwd / n,
        backward_ms: bwd / n,
    })
}

/// Times every case on both paths (`reps` timed repetitions after 2 warm-up
/// ones); `smoke` shrinks the batch to 2.
pub fn run(reps: usize, smoke: bool) -> Result<Vec<LayerReport>, BenchError> {
    let mut out = Vec::new();
    for case in &CASES {
        let mut case = *case;
        if smoke {
            case.batch = 2;
        }
        out.push(time_case(&case, KernelPolicy::Ours, reps)?);
        out.push(time_case(&case, KernelPolicy::Generic, reps)?);
    }
    Ok(out)
}

/// Prints the reports as a table.
pub fn print(reports: &[LayerReport]) {
    println!(
        "{:<13} {:<8} {:>10} {:>11}",
        "layer", "path", "fwd ms", "bwd ms"
    );
    for r in reports {
        println!(
            "{:<13} {:<8} {:>10.3} {:>11.3}",
            r.case, r.path, r.forward_ms, r.backward_ms
        );
    }
}
