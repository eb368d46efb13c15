//! Streamed image-folder data with augmentation (issue 14): the same seed gives
//! the same batches, another epoch another augmentation, the prefetch workers
//! the batches the training thread would make, and a run cancelled and resumed
//! sees the batches the uninterrupted run saw (same metrics, same best model).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::Device;
use edge_trainer::config;
use edge_trainer::engine::data::{self, Batcher, DataFormat, DataSpec, Normalization};
use edge_trainer::engine::run::{CancelFlag, EventSink, RunEvent, WarmStart};
use edge_trainer::engine::trainer;

/// Two classes of 12 small RGB PNGs each (10 x 8, resized to 8 x 8).
fn folder(dir: &Path) {
    for (c, class) in ["a", "b"].iter().enumerate() {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..12u32 {
            let img = image::RgbImage::from_fn(10, 8, |x, y| {
                let v = (x * 25 + y * 7 + i * 13) as u8;
                if c == 0 {
                    image::Rgb([v, 255 - v, (i * 20) as u8])
                } else {
                    image::Rgb([255 - v, v / 2, (y * 30) as u8])
                }
            });
            img.save(dir.join(format!("{class}/{i}.png"))).unwrap();
        }
    }
}

fn augmented(spec: &mut DataSpec) {
    let a = &mut spec.images.augment;
    a.random_resized_crop = true;
    a.scale = [0.5, 1.0];
    a.horizontal_flip = 0.5;
    a.brightness = 0.3;
    a.contrast = 0.3;
    a.saturation = 0.3;
    a.hue = 0.05;
}

fn values(b: &data::Batch) -> Vec<f32> {
    b.x.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn augmented_batches_repeat_with_the_seed_and_change_with_the_epoch() {
    let t = tempfile::tempdir().unwrap();
    folder(t.path());
    let mut spec = DataSpec::new(t.path(), DataFormat::ImageFolder);
    spec.image_size = [8, 8];
    augmented(&mut spec);
    let ds = data::load_dataset(&spec).unwrap();
    let all: Vec<usize> = (0..ds.len()).collect();
    let norm = Normalization::for_format(&ds, &all, DataFormat::ImageFolder);
    let b = Batcher::new(&ds, &norm, &Device::Cpu);
    let idx = [3, 17, 5, 0];
    let e1 = values(&b.train_batch(&idx, 7, 1).unwrap());
    assert_eq!(e1, values(&b.train_batch(&idx, 7, 1).unwrap()));
    assert_ne!(e1, values(&b.train_batch(&idx, 7, 2).unwrap()));
    assert_ne!(e1, values(&b.train_batch(&idx, 8, 1).unwrap()));
    // Evaluation batches are never augmented.
    let plain = values(&b.batch(&idx).unwrap());
    assert_ne!(e1, plain);
    assert_eq!(plain, values(&b.batch(&idx).unwrap()));
    // A sample's augmentation does not depend on its batch or position.
    let alone = values(&b.train_batch(&[17], 7, 1).unwrap());
    let per = alone.len();
    assert_eq!(&e1[per..2 * per], alone.as_slice());

    // The prefetch workers deliver, in order, what the training thread makes.
    let order = Batcher::epoch_order(&all, 7, 3);
    let chunks: Vec<Vec<usize>> = order.chunks(5).map(<[usize]>::to_vec).collect();
    let inline: Vec<Vec<f32>> = chunks
        .iter()
        .map(|c| values(&b.train_batch(c, 7, 3).unwrap()))
        .collect();
    let fetched: Vec<Vec<f32>> = b
        .batches(chunks.clone(), Some((7, 3)))
        .map(|r| values(&r.unwrap()))
        .collect();
    assert_eq!(fetched, inline);
    // Dropped half-way: the workers stop (the test would hang otherwise).
    let mut it = b.batches(chunks, Some((7, 3)));
    assert!(it.next().is_some());
    drop(it);
}

/// Cancels the run after `at` optimiser steps.
struct CancelAt {
    at: u64,
    steps: AtomicU64,
    flag: CancelFlag,
}

impl EventSink for CancelAt {
    fn emit(&self, ev: RunEvent) {
        if let RunEvent::Step { .. } = ev {
            if self.steps.fetch_add(1, Ordering::SeqCst) + 1 == self.at {
                self.flag.cancel();
            }
        }
    }
}

fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("elapsed_s");
            o.remove("run_id");
            v
        })
        .collect()
}

/// Settings of a small augmented cnn run on [`folder`]'s images in `root/data`.
fn settings(root: &Path, overrides: &[&str]) -> config::Settings {
    let data_dir = root.join("data");
    folder(&data_dir);
    let cfg = root.join("c.toml");
    crate::configs::load(
        &cfg,
        &format!(
            r#"
[data]
dir = "{}"
format = "image-folder"
image_size = [8, 8]
val_fraction = 0.25
test_fraction = 0.0
workers = 2
cache_mb = 1
[data.augment]
random_resized_crop = true
scale = [0.5, 1.0]
horizontal_flip = 0.5
brightness = 0.3
hue = 0.05
[model]
arch = "cnn"
conv_channels = [4]
kernel_size = 3
padding = 1
pool = 2
dropout = 0.2
[train]
max_epochs = 4
batch_size = 4
seed = 3
eval_every = 3
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

#[test]
fn augmented_run_cancelled_and_resumed_matches_the_uninterrupted_run() {
    let t = tempfile::tempdir().unwrap();
    let settings = settings(t.path(), &[]);
    let req = |id: &str| {
        settings
            .run_request(id.to_string(), Device::Cpu, WarmStart::Scratch)
            .unwrap()
    };
    let never = CancelFlag::new();
    let (tx, _rx) = std::sync::mpsc::channel();
    let whole = trainer::run(&req("whole"), &tx, &never);
    assert!(whole.outcome.is_success(), "{}", whole.reason);

    let sink = CancelAt {
        at: 7,
        steps: AtomicU64::new(0),
        flag: CancelFlag::new(),
    };
    let first = trainer::run(&req("cut"), &sink, &sink.flag);
    assert!(!first.outcome.is_success(), "{}", first.reason);
    assert!(first.reason.contains("cancelled"), "{}", first.reason);
    let mut again = req("cut");
    again.resume = true;
    let resumed = trainer::run(&again, &tx, &never);
    assert!(resumed.outcome.is_success(), "{}", resumed.reason);

    let runs = t.path().join("out/runs");
    assert_eq!(metrics(&runs.join("cut")), metrics(&runs.join("whole")));
    assert_eq!(resumed.steps, whole.steps);
    assert_eq!(
        serde_json::to_value(&resumed.best).unwrap(),
        serde_json::to_value(&whole.best).unwrap()
    );
}

#[test]
fn imagenet_normalisation_is_stored_in_the_checkpoint() {
    let t = tempfile::tempdir().unwrap();
    let s = settings(
        t.path(),
        &["data.normalize=\"imagenet\"", "train.max_epochs=1"],
    );
    let req = s
        .run_request("in".into(), Device::Cpu, WarmStart::Scratch)
        .unwrap();
    let (tx, _rx) = std::sync::mpsc::channel();
    let summary = trainer::run(&req, &tx, &CancelFlag::new());
    assert!(summary.outcome.is_success(), "{}", summary.reason);
    let best = summary.best_checkpoint.expect("a best checkpoint");
    let ck = edge_trainer::engine::checkpoint::load(&best, &Device::Cpu).unwrap();
    let n = ck.meta.input.normalization;
    assert!(n.per_channel);
    let want_mean = [0.485f32 * 255.0, 0.456 * 255.0, 0.406 * 255.0];
    let want_std = [0.229f32 * 255.0, 0.224 * 255.0, 0.225 * 255.0];
    for (got, want) in n
        .mean
        .iter()
        .zip(want_mean)
        .chain(n.std.iter().zip(want_std))
    {
        assert!((got - want).abs() < 1e-3, "{n:?}");
    }
}

#[test]
fn predict_resizes_images_as_the_checkpoint_was_trained() {
    use edge_trainer::engine::data::image_folder::{self, ResizeMode};
    use edge_trainer::engine::predict::{InputOptions, Predictor};
    let t = tempfile::tempdir().unwrap();
    let s = settings(
        t.path(),
        &["data.resize=\"center-crop\"", "train.max_epochs=1"],
    );
    let req = s
        .run_request("cc".into(), Device::Cpu, WarmStart::Scratch)
        .unwrap();
    let (tx, _rx) = std::sync::mpsc::channel();
    let summary = trainer::run(&req, &tx, &CancelFlag::new());
    let best = summary.best_checkpoint.expect("a best checkpoint");
    let p = Predictor::open(&best, &Device::Cpu).unwrap();
    assert_eq!(p.meta.input.resize, Some(ResizeMode::CenterCrop));
    // A 10 x 8 image: the central crop, not the stretched whole.
    let file = t.path().join("data/a/3.png");
    let got = p.read_input(&file, &InputOptions::default()).unwrap();
    let img = image_folder::decode(&file, 3).unwrap();
    let want =
        |mode| image_folder::hwc_to_chw(&image_folder::resize_to(&img, [8, 8], mode).unwrap());
    let data::Features::U8(v) = got.features else {
        panic!("images read as u8")
    };
    assert_eq!(v, want(ResizeMode::CenterCrop));
    assert_ne!(v, want(ResizeMode::Stretch));
}
