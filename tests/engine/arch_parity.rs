//! Architecture parity with PyTorch: replays the fixtures made by
//! `scripts/make_arch_fixtures.py` (the twins in `scripts/pytorch_twins.py`).
//!
//! Per architecture and per compute path (our CPU kernels, and candle's
//! generic ops with the kernels switched off: the path CUDA takes): the
//! PyTorch `state_dict` loads strictly; eval-mode logits
//! match within 1e-4; training-mode logits, loss, the gradient of every
//! parameter (within 1e-3) and the batch-norm running statistics after the pass
//! match. The reverse direction: after one SGD step the model is saved as an
//! edge-trainer checkpoint whose tensor names and shapes are exactly PyTorch's
//! `state_dict` (what `load_state_dict(strict=True)` checks), and which reloads
//! to the same logits. The checkpoints and their logits are left in
//! `$CARGO_TARGET_TMPDIR/arch-export` (or `$EDGE_TRAINER_ARCH_EXPORT`) for
//! `scripts/make_arch_fixtures.py --verify DIR`, which loads them into the
//! PyTorch twins.

use crate::tensors::max_abs_diff;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use edge_trainer::engine::checkpoint::{self, CheckpointMeta, CheckpointMetrics, InputSpec};
use edge_trainer::engine::data::{DataFormat, Normalization};
use edge_trainer::engine::model::{ForwardCtx, KernelPolicy, Model, ModelSpec};
use serde::Deserialize;

const LOGIT_TOL: f32 = 1e-4;
const GRAD_TOL: f32 = 1e-3;
/// The compute paths every case runs on.
const PATHS: [KernelPolicy; 2] = [KernelPolicy::Ours, KernelPolicy::Generic];

#[derive(Deserialize)]
struct Fixture {
    cases: BTreeMap<String, Case>,
}

#[derive(Deserialize)]
struct Case {
    spec: ModelSpec,
    grads: Vec<String>,
    buffers: Vec<String>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arch")
}

fn export_dir() -> PathBuf {
    std::env::var_os("EDGE_TRAINER_ARCH_EXPORT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("arch-export"))
}

struct Loaded {
    state: HashMap<String, Tensor>,
    all: HashMap<String, Tensor>,
}

fn load_case(name: &str) -> Loaded {
    let (all, _) = checkpoint::read_tensors(
        &fixture_dir().join(format!("{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let state = all
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("state.").map(|n| (n.to_string(), v.clone())))
        .collect();
    Loaded { state, all }
}

fn model_with(spec: ModelSpec, state: &HashMap<String, Tensor>) -> Model {
    let m = Model::new(spec, 0, &Device::Cpu).unwrap();
    m.params.load(state).unwrap();
    m
}

fn meta(spec: &ModelSpec, sample_shape: &[usize]) -> CheckpointMeta {
    CheckpointMeta {
        model: spec.clone(),
        classes: (0..spec.num_classes()).map(|i| format!("c{i}")).collect(),
        input: InputSpec {
            format: DataFormat::Safetensors,
            sample_shape: sample_shape.to_vec(),
            normalization: Normalization::identity(sample_shape.iter().product()),
            text: None,
            resize: None,
        },
        run_id: "arch-parity".into(),
        epoch: 1,
        step: 1,
        metrics: CheckpointMetrics::default(),
        version: env!("CARGO_PKG_VERSION").into(),
        created: "2026-01-01T00:00:00Z".into(),
    }
}

#[test]
fn architectures_match_pytorch() {
    let fixture: Fixture =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap())
            .unwrap();
    assert!(fixture.cases.len() >= 4);
    let out_dir = export_dir();
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut report = Vec::new();
    // Gradient mismatches of every case and path, reported together at the end.
    let mut bad = Vec::new();
    for ((name, case), path) in fixture
        .cases
        .iter()
        .flat_map(|c| PATHS.iter().map(move |p| (c, *p)))
    {
        let f = load_case(name);
        let x = &f.all["x"];
        let y = f.all["y"].to_dtype(DType::U32).unwrap();

        // Forward, eval mode.
        let model = model_with(case.spec.clone(), &f.state);
        let logits = model
            .forward(x, &mut ForwardCtx::eval().with_kernels(path))
            .unwrap();
        let d_eval = max_abs_diff(&logits, &f.all["logits_eval"]);
        assert!(
            d_eval < LOGIT_TOL,
            "{name} ({path:?}): eval logits differ by {d_eval}"
        );

        // Training mode (dropout off): logits, loss, gradients, running statistics.
        let model = model_with(case.spec.without_dropout(), &f.state);
        let logits = model
            .forward(x, &mut ForwardCtx::train(0).with_kernels(path))
            .unwrap();
        let d_train = max_abs_diff(&logits, &f.all["logits_train"]);
        assert!(
            d_train < LOGIT_TOL,
            "{name} ({path:?}): train logits differ by {d_train}"
        );
        let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
        let torch_loss = f.all["loss_train"].to_vec1::<f32>().unwrap()[0];
        assert!((loss.to_scalar::<f32>().unwrap() - torch_loss).abs() < LOGIT_TOL);
        // As the trainer runs it: the fused kernels hand parameter gradients over directly.
        let grads = edge_trainer::engine::kernels::direct_grads::backward(&loss).unwrap();
        let vars: HashMap<String, candle_core::Var> =
            model.params.trainable().into_iter().collect();
        assert_eq!(
            {
                let mut v: Vec<&String> = vars.keys().collect();
                v.sort();
                v
            },
            {
                let mut v: Vec<&String> = case.grads.iter().collect();
                v.sort();
                v
            },
            "{name}: trainable parameters differ from torch's named_parameters()"
        );
        let mut d_grad = 0f32;
        for p in &case.grads {
            let g = grads
                .get(vars[p].as_tensor())
                .unwrap_or_else(|| panic!("{name} ({path:?}): no gradient for {p}"));
            let d = max_abs_diff(g, &f.all[&format!("grad.{p}")]);
            if d >= GRAD_TOL {
                bad.push(format!("{name} ({path:?}): gradient of {p} differs by {d}"));
            }
            d_grad = d_grad.max(d);
        }
        let sd: HashMap<String, Tensor> = model.params.state_dict().into_iter().collect();
        for b in &case.buffers {
            let want = f.all[&format!("after.{b}")].to_dtype(DType::F32).unwrap();
            // Relative to the statistic's size (a variance of 200 carries
            // f32 rounding of 1e-5).
            let scale = 1.0 + max_abs_diff(&want, &want.zeros_like().unwrap());
            let d = max_abs_diff(&sd[b], &want);
            if d >= 1e-5 * scale {
                bad.push(format!(
                    "{name} ({path:?}): buffer {b} after a training pass differs by {d} (of {scale})"
                ));
            }
        }

        report.push(format!(
            "{name} ({path:?}): eval logits {d_eval:.1e}, train logits {d_train:.1e}, grads {d_grad:.1e}"
        ));
        if path != KernelPolicy::Ours {
            continue;
        }
        // Reverse direction: one SGD step, save, check the layout, reload.
        for (_, v) in model.params.trainable() {
            if let Some(g) = grads.get(v.as_tensor()) {
                v.set(&(v.as_tensor() - (g * 0.1).unwrap()).unwrap())
                    .unwrap();
            }
        }
        let sample_shape = x.dims()[1..].to_vec();
        let file = out_dir.join(format!("{name}.safetensors"));
        checkpoint::save(
            &file,
            &model.params.snapshot().unwrap(),
            &meta(&case.spec, &sample_shape),
        )
        .unwrap();
        let ck = checkpoint::load(&file, &Device::Cpu).unwrap();
        let mut saved: Vec<(String, Vec<usize>)> = ck
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        let mut torch: Vec<(String, Vec<usize>)> = f
            .state
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        saved.sort();
        torch.sort();
        assert_eq!(
            saved, torch,
            "{name}: checkpoint layout differs from torch's state_dict"
        );
        let trained = Model::new(ck.meta.model.clone(), 9, &Device::Cpu).unwrap();
        trained.params.load(&ck.tensors).unwrap();
        let mine = model
            .forward(x, &mut ForwardCtx::eval().with_kernels(path))
            .unwrap();
        let again = trained.forward(x, &mut ForwardCtx::eval()).unwrap();
        assert_eq!(
            mine.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            again.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name}: reloaded checkpoint gives other logits"
        );
        let bytes = checkpoint::to_safetensors_bytes(
            &[("x".to_string(), x.clone()), ("logits".to_string(), mine)],
            None,
        )
        .unwrap();
        std::fs::write(out_dir.join(format!("{name}.logits.safetensors")), bytes).unwrap();
    }
    println!("{}", report.join("\n"));
    println!("exported checkpoints to {}", out_dir.display());
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
