//! `edge-trainer bench --images DIR`: the image-folder pipeline alone (header
//! listing, then decode + resize + augment + normalise on the prefetch
//! workers, batches assembled as the trainer asks for them), epoch after
//! epoch, with samples/s per epoch and peak RSS; `scripts/bench-image-pipeline`
//! runs torchvision's `DataLoader` with the same transforms beside it.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;

use edge_trainer::engine::data::{self, Batcher, DataFormat, DataSpec, Normalization};

use super::bench::{BenchArgs, BenchError};

/// Runs the pipeline benchmark on `dir` and prints one JSON object.
pub fn run(dir: &Path, args: &BenchArgs) -> Result<(), BenchError> {
    let t0 = Instant::now();
    let mut spec = DataSpec::new(dir, DataFormat::ImageFolder);
    spec.image_size = [args.image_size, args.image_size];
    spec.val_fraction = 0.0;
    spec.test_fraction = 0.0;
    spec.images.workers = args.workers;
    spec.images.cache_bytes = args.cache_mb << 20;
    spec.images.normalize = data::NormalizeKind::Imagenet;
    if args.augment {
        // torchvision's usual training transform.
        spec.images.augment.random_resized_crop = true;
        spec.images.augment.horizontal_flip = 0.5;
        spec.images.augment.brightness = 0.4;
        spec.images.augment.contrast = 0.4;
        spec.images.augment.saturation = 0.4;
        spec.images.augment.hue = 0.1;
    }
    let ds = data::load_dataset(&spec).map_err(|e| BenchError::Data(e.to_string()))?;
    let listed_s = t0.elapsed().as_secs_f64();
    let all: Vec<usize> = (0..ds.len()).collect();
    let norm = Normalization::for_format(&ds, &all, DataFormat::ImageFolder);
    let batcher = Batcher::new(&ds, &norm, &Device::Cpu);
    let mut epochs = Vec::new();
    let mut first_batch_s = None;
    for epoch in 1..=args.epochs.max(1) as u64 {
        let order = Batcher::epoch_order(&all, 1, epoch);
        let chunks = order.chunks(args.batch).map(<[usize]>::to_vec).collect();
        let t = Instant::now();
        let mut n = 0usize;
        for b in batcher.batches(chunks, Some((1, epoch))) {
            let b = b?;
            n += b.len();
            first_batch_s.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        }
        let s = t.elapsed().as_secs_f64();
        epochs.push(serde_json::json!({
            "epoch": epoch,
            "samples": n,
            "seconds": s,
            "samples_per_s": n as f64 / s.max(1e-9),
        }));
    }
    let cached_mib = ds.features.images().map_or(0, |s| s.cached_bytes() >> 20);
    let report = serde_json::json!({
        "images": ds.len(),
        "skipped": ds.skipped.len(),
        "image_size": args.image_size,
        "augment": args.augment,
        "workers": args.workers,
        "batch": args.batch,
        "list_and_header_check_s": listed_s,
        "first_batch_s": first_batch_s,
        "epochs": epochs,
        "cache_mib": cached_mib,
        "peak_rss_mib": super::bench::peak_rss_kib() as f64 / 1024.0,
    });
    println!("{report}");
    Ok(())
}
