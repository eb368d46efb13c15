//! The frozen-feature cache in the daemon (issue 14): the features a run
//! computes are kept in `output.dir/feature-cache` across runs, so the next
//! retrain on the same images with the same frozen backbone finds every
//! sample; `run_started` and `summary.json` say so.

use std::path::Path;

use crate::helpers::*;
use crate::trials::{test, Test};

/// Two classes of 12 small PNGs each in `dir`.
fn images(dir: &Path) {
    for (c, class) in ["a", "b"].iter().enumerate() {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..12u32 {
            let img = image::RgbImage::from_fn(20, 16, |x, y| {
                let v = ((x * 11 + y * 5 + i * 7) % 256) as u8;
                image::Rgb([v, (c as u8) * 200, 255 - v])
            });
            img.save(dir.join(format!("{class}/{i}.png"))).unwrap();
        }
    }
}

fn second_retrain_finds_every_feature_stored() {
    let imgs = tempfile::tempdir().unwrap();
    images(imgs.path());
    let q = toml::Value::String(imgs.path().display().to_string()).to_string();
    let extra = format!(
        r#"
[data]
dir = {q}
format = "image-folder"
image_size = [16, 16]
normalize = "imagenet"
[model]
arch = "resnet18"
base_width = 4
finetune = "head"
[train]
max_epochs = 3
batch_size = 8
"#
    );
    let mut h = Harness::start(&extra, &[]);
    let mut reports = Vec::new();
    for n in 1..=2 {
        let rid = format!("fc{n}");
        let run_id = h.train(&rid, &format!(r#"{{"request_id": "{rid}"}}"#));
        let (_, started) = h.wait_event("run_started", Some(&run_id), SHORT);
        let (_, finished) = h.wait_event("run_finished", Some(&run_id), LONG);
        assert_ne!(finished.json["outcome"], "failed", "{}", finished.json);
        let fc = started.json["feature_cache"].clone();
        assert_eq!(h.env.summary(&run_id)["feature_cache"], fc);
        reports.push(fc);
    }
    let total = reports[0]["hits"].as_u64().unwrap() + reports[0]["misses"].as_u64().unwrap();
    assert_eq!(total, 24, "{:?}", reports);
    for r in &reports {
        assert_eq!(r["used"], true, "{r}");
        assert_eq!(r["split"], "pool", "{r}");
    }
    assert_eq!(reports[0]["hits"], 0, "{}", reports[0]);
    assert_eq!(reports[1]["hits"], 24, "{}", reports[1]);
    assert_eq!(reports[1]["misses"], 0, "{}", reports[1]);
    let store = h.env.out.join("feature-cache");
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 1);
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(second_retrain_finds_every_feature_stored)]
}
