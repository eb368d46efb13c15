//! torchvision backbones end to end (issue 13): the real binary fine-tunes a
//! resnet18, a mobilenet_v2 and a mobilenet_v3_small from PyTorch-made weights in torchvision's
//! layout (the parity fixtures' `state.*` tensors, at reduced width) with the
//! classifier re-initialised for 10 classes, under `model.finetune`; the
//! checkpoint keeps torchvision's names and shapes (so it loads with
//! `load_state_dict(strict=True)`), and what the mode froze is bit-identical
//! afterwards, batch-norm running statistics included.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use crate::helpers::text;
use crate::paths::{root, BIN};
use crate::trials::{test, Test};
use candle_core::{Device, Tensor};
use edge_trainer::engine::checkpoint;

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    checkpoint::read_tensors(path, &Device::Cpu).unwrap().0
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// What a fine-tuning run printed and wrote.
struct Finetuned {
    stdout: String,
    /// The run's `summary.json`.
    summary: serde_json::Value,
    /// The init tensors, prefix removed.
    init: HashMap<String, Tensor>,
    /// The best checkpoint's tensors.
    best: HashMap<String, Tensor>,
}

/// Trains `[model]` lines `model` on the digits images (RGB, 32x32) for one
/// epoch from the fixture `fixture`.
fn finetune(fixture: &str, model: &str) -> Finetuned {
    let out = tempfile::tempdir().unwrap();
    let init = root().join(format!("tests/fixtures/arch/{fixture}.safetensors"));
    let cfg = out.path().join("backbone.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[data]
dir = "{data}"
format = "image-folder"
image_size = [32, 32]
channels = 3
[model]
{model}
init = "{init}"
init_prefix = "state."
[train]
max_epochs = 1
batch_size = 64
seed = 3
[output]
dir = "{out}"
"#,
            data = root().join("examples/digits-png").display(),
            init = init.display(),
            out = out.path().display(),
        ),
    )
    .unwrap();
    let o = Command::new(BIN)
        .current_dir(root())
        .env_remove("RUST_LOG")
        .args(["train", "--no-progress", "--config"])
        .arg(&cfg)
        .output()
        .expect("start edge-trainer");
    let stdout = text(&o.stdout);
    assert!(
        o.status.success(),
        "train failed\nstdout:\n{stdout}\nstderr:\n{}",
        text(&o.stderr)
    );
    let run_dir = root().join(stdout.lines().last().unwrap_or_default().trim());
    let best = tensors(&run_dir.join("best.safetensors"));
    let summary = std::fs::read_to_string(run_dir.join("summary.json")).unwrap();
    let summary = serde_json::from_str(&summary).unwrap();
    let init: HashMap<String, Tensor> = tensors(&init)
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("state.")?.to_string(), v)))
        .collect();
    Finetuned {
        stdout,
        summary,
        init,
        best,
    }
}

/// The checkpoint has exactly the init's names and shapes (torchvision's
/// `state_dict`), but the re-initialised classifier's 10 classes.
fn same_layout(init: &HashMap<String, Tensor>, best: &HashMap<String, Tensor>, head: &str) {
    let mut a: Vec<&String> = init.keys().collect();
    let mut b: Vec<&String> = best.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(
        a, b,
        "checkpoint names differ from the torchvision state_dict"
    );
    for (name, t) in best {
        if !name.starts_with(head) {
            assert_eq!(t.dims(), init[name].dims(), "{name}");
        }
    }
}

/// resnet18, `finetune = "last:1"`: layer4 and fc train; conv1, bn1 and
/// layer1..3 (weights and batch-norm statistics) stay bit-identical.
fn resnet18_last_stage_from_torchvision_weights() {
    let Finetuned {
        stdout, init, best, ..
    } = finetune(
        "resnet18",
        "arch = \"resnet18\"\nbase_width = 8\nreinit = [\"fc.*\"]\nfinetune = \"last:1\"",
    );
    assert!(
        stdout.contains("re-initialised (fc.bias, fc.weight)"),
        "{stdout}"
    );
    same_layout(&init, &best, "fc.");
    assert_eq!(best["fc.weight"].dims(), &[10, 64]);
    let (mut kept, mut trained) = (0, 0);
    for (name, t) in &best {
        let same = bits(t) == bits(&init[name]);
        if name.starts_with("layer4.") && name.ends_with("conv1.weight") {
            assert!(!same, "{name} did not train");
            trained += 1;
        } else if !name.starts_with("layer4.") && !name.starts_with("fc.") {
            assert!(same, "{name} changed though frozen");
            kept += 1;
        }
    }
    // conv1, bn1 (5) and layer1..3: 3 blocks of 2 convs + 2 batch-norms
    // (12 tensors) each, plus 2 downsamples (conv + batch-norm, 6 tensors).
    assert_eq!(kept, 6 + 3 * 2 * 12 + 2 * 6, "frozen tensors");
    assert_eq!(trained, 2);
}

/// mobilenet_v2, `finetune = "bias"`: batch-norm affine parameters and the
/// classifier train (batch-norm statistics move), every conv weight stays.
fn mobilenet_v2_bias_mode_from_torchvision_weights() {
    let Finetuned {
        stdout, init, best, ..
    } = finetune(
        "mobilenet_v2",
        "arch = \"mobilenet_v2\"\nwidth_mult = 0.25\nreinit = [\"classifier.1.*\"]\nfinetune = \"bias\"",
    );
    assert!(
        stdout.contains("re-initialised (classifier.1.bias, classifier.1.weight)"),
        "{stdout}"
    );
    same_layout(&init, &best, "classifier.");
    let bn_weight = |n: &str| {
        n.strip_suffix(".weight")
            .is_some_and(|p| init.contains_key(&format!("{p}.running_mean")))
    };
    for (name, t) in &best {
        let same = bits(t) == bits(&init[name]);
        if name.ends_with(".weight") && !bn_weight(name) && !name.starts_with("classifier.") {
            assert!(same, "conv weight {name} changed in bias mode");
        }
    }
    for name in [
        "features.0.1.weight",
        "features.18.1.bias",
        "features.5.conv.1.1.running_mean",
    ] {
        assert_ne!(
            bits(&best[name]),
            bits(&init[name]),
            "{name} did not change"
        );
    }
}

/// mobilenet_v3_small, `finetune = "head"`, only `classifier.3` re-initialised
/// (as torchvision users replace `classifier[3]`): `classifier.0` and
/// `classifier.3` train on features cached at `pool`; every `features.*`
/// tensor, batch-norm statistics included, stays bit-identical.
fn mobilenet_v3_small_head_from_torchvision_weights() {
    let Finetuned {
        stdout: out,
        summary,
        init,
        best,
    } = finetune(
        "mobilenet_v3_small",
        "arch = \"mobilenet_v3_small\"\nwidth_mult = 0.25\nreinit = [\"classifier.3.*\"]\nfinetune = \"head\"",
    );
    assert!(
        out.contains("re-initialised (classifier.3.bias, classifier.3.weight)"),
        "{out}"
    );
    same_layout(&init, &best, "classifier.3.");
    assert_eq!(best["classifier.3.weight"].dims(), &[10, 256]);
    let cache = &summary["feature_cache"];
    assert_eq!(cache["used"], true, "{cache}");
    assert_eq!(cache["split"], "pool", "{cache}");
    let mut kept = 0;
    for (name, t) in &best {
        let same = bits(t) == bits(&init[name]);
        if name.starts_with("features.") {
            assert!(same, "{name} changed though frozen");
            kept += 1;
        } else if name.ends_with(".weight") {
            assert!(!same, "{name} did not train");
        }
    }
    assert_eq!(kept, init.len() - 4, "frozen tensors");
}

pub fn tests() -> Vec<Test> {
    vec![
        test!(resnet18_last_stage_from_torchvision_weights),
        test!(mobilenet_v2_bias_mode_from_torchvision_weights),
        test!(mobilenet_v3_small_head_from_torchvision_weights),
    ]
}
