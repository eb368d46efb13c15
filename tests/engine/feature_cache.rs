//! The frozen-feature cache (`train.cache_features`, issue 14): a run whose
//! frozen prefix is cached gives the uncached run's metrics and best epoch;
//! a second run finds every sample stored; changing a frozen weight, the
//! image size or a data file invalidates what it should (misses counted); a
//! corrupt cache file is rebuilt; augmentation and `finetune = "full"` turn
//! the cache off and say why.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use edge_trainer::config;
use edge_trainer::engine::model::{Model, ModelSpec, ResNetSpec};
use edge_trainer::engine::run::{FeatureCacheReport, RunSummary, WarmStart};
use edge_trainer::engine::trainer;

/// Two classes of 10 small RGB PNGs each (20 x 16), told apart by colour.
fn folder(dir: &Path) {
    for (c, class) in ["a", "b"].iter().enumerate() {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..10u32 {
            write_image(dir, class, i, c as u32 * 90 + i * 3);
        }
    }
}

fn write_image(dir: &Path, class: &str, i: u32, tint: u32) {
    let img = image::RgbImage::from_fn(20, 16, |x, y| {
        let v = ((x * 11 + y * 5 + tint) % 256) as u8;
        image::Rgb([v, (tint % 256) as u8, 255 - v])
    });
    img.save(dir.join(format!("{class}/{i}.png"))).unwrap();
}

/// Settings of a small run on [`folder`]'s images in `root/data`, with
/// `model` lines in `[model]` and `overrides` on top.
fn settings(root: &Path, model: &str, overrides: &[&str]) -> config::Settings {
    let data_dir = root.join("data");
    if !data_dir.exists() {
        folder(&data_dir);
    }
    let cfg = root.join("c.toml");
    crate::configs::load(
        &cfg,
        &format!(
            r#"
[data]
dir = "{}"
format = "image-folder"
image_size = [16, 16]
val_fraction = 0.25
test_fraction = 0.2
normalize = "imagenet"
[model]
{model}
[train]
max_epochs = 4
batch_size = 4
seed = 5
[train.optimizer]
lr = 0.01
[train.early_stopping]
enabled = false
[output]
dir = "{}"
"#,
            data_dir.display(),
            root.join("out").display()
        ),
        overrides,
    )
}

const RESNET_HEAD: &str = "arch = \"resnet18\"\nbase_width = 4\nfinetune = \"head\"";

fn run(s: &config::Settings, id: &str, warm: WarmStart) -> RunSummary {
    let req = s.run_request(id.into(), Device::Cpu, warm).unwrap();
    let (tx, _rx) = std::sync::mpsc::channel();
    let out = trainer::run(&req, &tx, &edge_trainer::engine::run::CancelFlag::new());
    assert!(out.outcome.is_success(), "{id}: {}", out.reason);
    out
}

fn cache(s: &RunSummary) -> FeatureCacheReport {
    s.feature_cache.clone().expect("a feature_cache report")
}

fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Cached and uncached runs of `model` agree: losses and accuracies within
/// float summation order, the same best epoch and test accuracy.
fn agree(model: &str, split: &str, extra: &[&str]) {
    let t = tempfile::tempdir().unwrap();
    let on = settings(t.path(), model, extra);
    let mut off_ovs = extra.to_vec();
    off_ovs.push("train.cache_features=\"off\"");
    let off = settings(t.path(), model, &off_ovs);
    let cached = run(&on, "cached", WarmStart::Scratch);
    let plain = run(&off, "plain", WarmStart::Scratch);
    let c = cache(&cached);
    assert!(c.used, "{model}: {c:?}");
    assert_eq!(c.split.as_deref(), Some(split), "{model}");
    assert_eq!(c.hits + c.misses, 20, "{c:?}");
    let p = cache(&plain);
    assert!(!p.used);
    assert!(p.reason.unwrap().contains("off"));
    let runs = t.path().join("out/runs");
    let (a, b) = (metrics(&runs.join("cached")), metrics(&runs.join("plain")));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for k in ["train_loss", "val_loss", "train_acc", "val_acc"] {
            let (u, v) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!(
                (u - v).abs() <= 1e-4 * (1.0 + v.abs()),
                "{model} {k}: cached {u} vs uncached {v}"
            );
        }
    }
    assert_eq!(
        cached.best.as_ref().map(|b| b.epoch),
        plain.best.as_ref().map(|b| b.epoch)
    );
    assert_eq!(
        cached.test.map(|t| t.accuracy),
        plain.test.map(|t| t.accuracy),
        "{model}"
    );
}

#[test]
fn cached_and_uncached_runs_agree_for_every_architecture_with_a_frozen_prefix() {
    agree(RESNET_HEAD, "pool", &[]);
    agree(
        "arch = \"resnet18\"\nbase_width = 4\nfinetune = \"last:1\"",
        "layer3",
        &[],
    );
    agree(
        "arch = \"mobilenet_v2\"\nwidth_mult = 0.1\nfinetune = \"head\"",
        "pool",
        &[],
    );
    agree(
        "arch = \"cnn\"\nconv_channels = [4, 6]\nkernel_size = 3\npadding = 1\npool = 2\ndropout = 0.3\nfreeze = [\"features.*\"]",
        "pooled",
        &[],
    );
}

/// A state dict of the run's resnet18 for `model.init`, with `conv1.weight` scaled by `scale`.
fn init_file(dir: &Path, scale: f64) -> PathBuf {
    let spec = ModelSpec::Resnet18(ResNetSpec {
        in_channels: 3,
        input_size: [16, 16],
        base_width: 4,
        num_classes: 2,
        dropout: 0.0,
    });
    let m = Model::new(spec, 11, &Device::Cpu).unwrap();
    let mut sd: HashMap<String, Tensor> = m.params.state_dict().into_iter().collect();
    let w = sd["conv1.weight"].affine(scale, 0.0).unwrap();
    sd.insert("conv1.weight".into(), w);
    let path = dir.join(format!("init-{scale}.safetensors"));
    candle_core::safetensors::save(&sd, &path).unwrap();
    path
}

#[test]
fn stored_features_are_reused_and_invalidated_by_weights_size_and_files() {
    let t = tempfile::tempdir().unwrap();
    let s = settings(t.path(), RESNET_HEAD, &[]);
    let init = init_file(t.path(), 1.0);
    let warm = || WarmStart::StateDict(init.clone());
    let first = cache(&run(&s, "r1", warm()));
    assert!(first.used);
    assert_eq!((first.hits, first.misses), (0, 20));
    let store = t.path().join("out/feature-cache");
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 1);
    // The same weights, images and preprocessing: every sample found.
    let again = cache(&run(&s, "r2", warm()));
    assert_eq!((again.hits, again.misses), (20, 0));
    assert_eq!(again.bytes, first.bytes);

    // One image rewritten: only it is computed again.
    write_image(&t.path().join("data"), "a", 3, 200);
    let one = cache(&run(&s, "r3", warm()));
    assert_eq!((one.hits, one.misses), (19, 1));

    // One frozen weight changed: nothing matches.
    let other = init_file(t.path(), 1.01);
    let w = cache(&run(&s, "r4", WarmStart::StateDict(other)));
    assert_eq!((w.hits, w.misses), (0, 20));

    // Another image size: nothing matches.
    let bigger = settings(t.path(), RESNET_HEAD, &["data.image_size=[20, 20]"]);
    let sz = cache(&run(&bigger, "r5", warm()));
    assert_eq!((sz.hits, sz.misses), (0, 20));

    // A corrupt file is ignored, rebuilt, and found again afterwards.
    let back = cache(&run(&s, "r6", warm()));
    assert_eq!((back.hits, back.misses), (20, 0));
    for f in std::fs::read_dir(&store).unwrap() {
        std::fs::write(
            f.unwrap().path(),
            b"ETFEAT01 garbage that is not a cache file",
        )
        .unwrap();
    }
    let rebuilt = cache(&run(&s, "r7", warm()));
    assert_eq!((rebuilt.hits, rebuilt.misses), (0, 20));
    let after = cache(&run(&s, "r8", warm()));
    assert_eq!((after.hits, after.misses), (20, 0));
}

#[test]
fn other_weights_get_their_own_file_and_oversized_features_are_not_cached() {
    let t = tempfile::tempdir().unwrap();
    // Features of 20 samples at `pool`: 20 * 32 * 4 bytes, far below 1 MiB.
    let s = settings(t.path(), RESNET_HEAD, &["train.cache_features_mb=1"]);
    assert!(cache(&run(&s, "a", WarmStart::Scratch)).used);
    let s2 = settings(
        t.path(),
        RESNET_HEAD,
        &["train.cache_features_mb=1", "train.seed=6"],
    );
    assert!(cache(&run(&s2, "b", WarmStart::Scratch)).used);
    let store = t.path().join("out/feature-cache");
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 2);
    // Features that cannot fit are not cached, and the run says so.
    let tight = settings(
        t.path(),
        "arch = \"resnet18\"\nbase_width = 4\nfinetune = \"last:3\"",
        &["train.cache_features_mb=0"],
    );
    let r = cache(&run(&tight, "c", WarmStart::Scratch));
    assert!(!r.used);
    assert!(r.reason.unwrap().contains("train.cache_features_mb"));
}

#[test]
fn augmentation_and_full_finetuning_turn_the_cache_off_with_a_reason() {
    let t = tempfile::tempdir().unwrap();
    let aug = settings(
        t.path(),
        RESNET_HEAD,
        &["data.augment.horizontal_flip=0.5", "train.max_epochs=1"],
    );
    let r = cache(&run(&aug, "aug", WarmStart::Scratch));
    assert!(!r.used);
    assert!(
        r.reason.as_deref().unwrap().contains("[data.augment]"),
        "{r:?}"
    );
    let full = settings(
        t.path(),
        "arch = \"resnet18\"\nbase_width = 4",
        &["train.max_epochs=1"],
    );
    let r = cache(&run(&full, "full", WarmStart::Scratch));
    assert!(!r.used);
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains("model.finetune = \"full\""),
        "{r:?}"
    );
    // The summary file says it too.
    let summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(t.path().join("out/runs/full/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["feature_cache"]["used"], false);
    assert!(!t.path().join("out/feature-cache").exists());
}

/// Settings of a small textcnn run on 40 short texts in `root/text` with
/// `model` lines in `[model]`.
fn text_settings(root: &Path, model: &str, overrides: &[&str]) -> config::Settings {
    let dir = root.join("text");
    if !dir.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let mut lines = String::new();
        for i in 0..40u32 {
            let (word, label) = if i % 2 == 0 {
                ("sunny warm", "pos")
            } else {
                ("rain cold", "neg")
            };
            lines.push_str(&format!("{word} day {i}\t{label}\n"));
        }
        std::fs::write(dir.join("data.txt"), lines).unwrap();
    }
    let cfg = root.join("t.toml");
    crate::configs::load(
        &cfg,
        &format!(
            r#"
[data]
dir = "{}"
format = "text-tsv"
max_len = 16
val_fraction = 0.25
test_fraction = 0.0
[model]
arch = "textcnn"
embed_dim = 8
filter_sizes = [2, 3]
num_filters = 4
{model}
[train]
max_epochs = 3
batch_size = 8
seed = 2
[train.early_stopping]
enabled = false
[output]
dir = "{}"
"#,
            dir.display(),
            root.join("out").display()
        ),
        overrides,
    )
}

#[test]
fn textcnn_with_a_frozen_embedding_trains_on_cached_embeddings() {
    for (model, split) in [
        ("freeze = [\"embedding.*\"]", "embedding"),
        ("finetune = \"head\"", "pooled"),
    ] {
        let t = tempfile::tempdir().unwrap();
        let cached = run(
            &text_settings(t.path(), model, &[]),
            "c",
            WarmStart::Scratch,
        );
        let off = text_settings(t.path(), model, &["train.cache_features=\"off\""]);
        let plain = run(&off, "p", WarmStart::Scratch);
        assert!(!cache(&plain).used);
        let c = cache(&cached);
        assert!(c.used, "{c:?}");
        assert_eq!(c.split.as_deref(), Some(split));
        let runs = t.path().join("out/runs");
        let (a, b) = (metrics(&runs.join("c")), metrics(&runs.join("p")));
        assert_eq!(a.len(), 3);
        for (x, y) in a.iter().zip(&b) {
            let (u, v) = (
                x["val_loss"].as_f64().unwrap(),
                y["val_loss"].as_f64().unwrap(),
            );
            assert!(
                (u - v).abs() <= 1e-4 * (1.0 + v.abs()),
                "{split}: {u} vs {v}"
            );
        }
        // In-memory samples are found by their values: a second run finds all.
        let again = cache(&run(
            &text_settings(t.path(), model, &[]),
            "c2",
            WarmStart::Scratch,
        ));
        assert_eq!((again.hits, again.misses), (c.hits + c.misses, 0));
    }
}

/// Cancels the run after `at` optimiser steps.
struct CancelAt {
    at: u64,
    steps: std::sync::atomic::AtomicU64,
    flag: edge_trainer::engine::run::CancelFlag,
}

impl edge_trainer::engine::run::EventSink for CancelAt {
    fn emit(&self, ev: edge_trainer::engine::run::RunEvent) {
        use std::sync::atomic::Ordering;
        if let edge_trainer::engine::run::RunEvent::Step { .. } = ev {
            if self.steps.fetch_add(1, Ordering::SeqCst) + 1 == self.at {
                self.flag.cancel();
            }
        }
    }
}

#[test]
fn a_cached_run_cancelled_in_its_first_epoch_resumes_to_the_uncached_runs_metrics() {
    let t = tempfile::tempdir().unwrap();
    // Dropout in the rest: its masks must follow the same RNG positions.
    let s = settings(
        t.path(),
        "arch = \"mobilenet_v2\"\nwidth_mult = 0.1\nfinetune = \"last:2\"\ndropout = 0.3",
        &[],
    );
    let sink = CancelAt {
        at: 2,
        steps: std::sync::atomic::AtomicU64::new(0),
        flag: edge_trainer::engine::run::CancelFlag::new(),
    };
    let req = s
        .run_request("cut".into(), Device::Cpu, WarmStart::Scratch)
        .unwrap();
    let first = trainer::run(&req, &sink, &sink.flag);
    assert!(first.reason.contains("cancelled"), "{}", first.reason);
    let mut again = req.clone();
    again.resume = true;
    let (tx, _rx) = std::sync::mpsc::channel();
    let resumed = trainer::run(&again, &tx, &edge_trainer::engine::run::CancelFlag::new());
    assert!(resumed.outcome.is_success(), "{}", resumed.reason);
    let c = cache(&resumed);
    // The cancelled run stored the features of the 2 batches it trained.
    assert!(c.used && c.hits >= 8 && c.misses > 0, "{c:?}");
    // The uninterrupted run, uncached.
    let off = settings(
        t.path(),
        "arch = \"mobilenet_v2\"\nwidth_mult = 0.1\nfinetune = \"last:2\"\ndropout = 0.3",
        &["train.cache_features=\"off\""],
    );
    let whole = run(&off, "whole", WarmStart::Scratch);
    let strip = |v: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        v.into_iter()
            .map(|mut m| {
                let o = m.as_object_mut().unwrap();
                o.remove("elapsed_s");
                o.remove("run_id");
                m
            })
            .collect()
    };
    let runs = t.path().join("out/runs");
    let (a, b) = (
        strip(metrics(&runs.join("cut"))),
        strip(metrics(&runs.join("whole"))),
    );
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for k in ["train_loss", "val_loss", "val_acc", "epoch", "step"] {
            let (u, v) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
            // Up to float summation order: the CPU conv kernel puts several
            // samples side by side in one product, so a sample's features
            // depend (in the last bits) on the batch that computed them.
            assert!(
                (u - v).abs() <= 1e-4 * (1.0 + v.abs()),
                "{k}: resumed {u} vs whole {v}"
            );
        }
    }
    assert_eq!(resumed.best.map(|b| b.epoch), whole.best.map(|b| b.epoch));
}

#[test]
fn a_cache_folder_that_cannot_be_written_never_fails_the_run() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("out")).unwrap();
    // A file where the cache folder should be: nothing can be stored.
    std::fs::write(t.path().join("out/feature-cache"), b"in the way").unwrap();
    let s = settings(t.path(), RESNET_HEAD, &["train.max_epochs=2"]);
    let first = cache(&run(&s, "a", WarmStart::Scratch));
    assert!(first.used && first.misses == 20, "{first:?}");
    // Still nothing stored: the next run computes everything again.
    let second = cache(&run(&s, "b", WarmStart::Scratch));
    assert_eq!((second.hits, second.misses), (0, 20));
}
