//! Replays the PyTorch optimiser fixtures (made by
//! `scripts/make_torch_fixtures.py`) with our optimisers and checks every
//! parameter after the last step against torch's.

use crate::tensors::max_abs_diff;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use edge_trainer::engine::optim::*;
use serde::Deserialize;

/// Max abs difference allowed after the last step.
const TOLERANCE: f32 = 1e-5;

#[derive(Deserialize)]
struct Fixture {
    problem: Problem,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Problem {
    steps: usize,
    scale_from_step: usize,
    params: Vec<String>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    config: OptimizerConfig,
    lrs: Vec<f64>,
    losses: Vec<f64>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optim")
}

/// The fixture's loss: mean cross-entropy of `x @ weight.T + bias`, times
/// `scale` from `scale_from_step` on.
fn loss(
    params: &HashMap<String, Var>,
    x: &Tensor,
    targets: &Tensor,
    step: usize,
    scale_from_step: usize,
) -> Tensor {
    let w = params["weight"].as_tensor();
    let b = params["bias"].as_tensor();
    let mut logits = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap();
    if step >= scale_from_step {
        logits = logits.broadcast_mul(params["scale"].as_tensor()).unwrap();
    }
    candle_nn::loss::cross_entropy(&logits, targets).unwrap()
}

#[test]
fn optimizers_match_torch() {
    let dir = fixture_dir();
    let fixture: Fixture =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let problem =
        candle_core::safetensors::load(dir.join("problem.safetensors"), &Device::Cpu).unwrap();
    let x = &problem["x"];
    let targets = problem["targets"].to_dtype(DType::U32).unwrap();
    let p = &fixture.problem;
    assert!(p.steps >= 2 && !fixture.cases.is_empty());

    let mut failures = Vec::new();
    for case in &fixture.cases {
        assert_eq!(case.lrs.len(), p.steps, "{}", case.name);
        let expected = candle_core::safetensors::load(
            dir.join(format!("{}.safetensors", case.name)),
            &Device::Cpu,
        )
        .unwrap();
        let params: HashMap<String, Var> = p
            .params
            .iter()
            .map(|n| {
                let init = &problem[&format!("init.{n}")];
                (n.clone(), Var::from_tensor(init).unwrap())
            })
            .collect();
        let named = p
            .params
            .iter()
            .map(|n| (n.clone(), params[n].clone()))
            .collect();
        let mut opt = AnyOptimizer::new(named, &case.config).unwrap();

        let mut loss_diff = 0f64;
        let mut step1_diff = 0f32;
        for step in 1..=p.steps {
            opt.set_learning_rate(case.lrs[step - 1]);
            let l = loss(&params, x, &targets, step, p.scale_from_step);
            let lv = f64::from(l.to_scalar::<f32>().unwrap());
            loss_diff = loss_diff.max((lv - case.losses[step - 1]).abs());
            opt.backward_step(&l).unwrap();
            if step == 1 {
                for n in &p.params {
                    let want = &expected[&format!("step1.{n}")];
                    step1_diff = step1_diff.max(max_abs_diff(params[n].as_tensor(), want));
                }
            }
        }

        let mut final_diff = 0f32;
        let mut worst = String::new();
        for n in &p.params {
            let want = &expected[&format!("step{}.{n}", p.steps)];
            let d = max_abs_diff(params[n].as_tensor(), want);
            if d >= final_diff {
                final_diff = d;
                worst = n.clone();
            }
        }
        println!(
            "{:<28} max |diff| after step 1: {step1_diff:.3e}, after step {}: {final_diff:.3e} \
             (worst: {worst}); max loss diff {loss_diff:.3e}",
            case.name, p.steps
        );

        if final_diff.is_nan() || final_diff > TOLERANCE {
            failures.push(format!("{}: {final_diff:e} ({worst})", case.name));
        }
        // Per-parameter step counts: frozen never steps, scale starts late.
        let steps = opt.state_meta().steps;
        let want_steps = [
            ("weight", p.steps),
            ("bias", p.steps),
            ("scale", p.steps + 1 - p.scale_from_step),
            ("frozen", 0),
        ];
        for (n, want) in want_steps {
            if steps.get(n) != Some(&(want as u64)) {
                failures.push(format!(
                    "{}: step count of {n} is {:?}, expected {want}",
                    case.name,
                    steps.get(n)
                ));
            }
        }
        if max_abs_diff(params["frozen"].as_tensor(), &problem["init.frozen"]) != 0.0 {
            failures.push(format!("{}: frozen parameter changed", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "failures (tolerance {TOLERANCE:e}): {failures:#?}"
    );
}
