//! Property tests that feed hostile bytes to every reader of outside input:
//! data files of each format, checkpoints, resume states and config files.
//! None may panic; each answers with an error that says what is wrong.
//!
//! CI runs a short pass (proptest's default 256 cases per property). A longer
//! run: `PROPTEST_CASES=20000 cargo test --test engine fuzz_inputs`.

use std::path::Path;

use candle_core::Device;
use edge_trainer::config;
use edge_trainer::engine::checkpoint;
use edge_trainer::engine::data::{read_file, DataFormat, DataSpec};
use edge_trainer::engine::resume;
use proptest::prelude::*;

use crate::paths::{root, BIN};

fn sample(rel: &str) -> Vec<u8> {
    std::fs::read(root().join(rel)).unwrap()
}

/// A checkpoint written by the engine, as bytes (made once per test process).
fn checkpoint_bytes() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(BIN)
            .args([
                "train",
                "--config",
                "configs/demo.toml",
                "--set",
                &format!("output.dir={}", dir.path().display()),
                "--set",
                "train.max_epochs=1",
            ])
            .current_dir(root())
            .output()
            .unwrap();
        assert!(out.status.success());
        let last = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .to_string();
        std::fs::read(Path::new(&last).join("best.safetensors")).unwrap()
    })
}

/// Applies byte edits (position, value) and a truncation to `base`.
fn mutate(base: &[u8], edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut b = base.to_vec();
    for &(pos, v) in edits {
        if !b.is_empty() {
            let i = pos % b.len();
            b[i] = v;
        }
    }
    if let Some(c) = cut {
        let keep = c % (b.len() + 1);
        b.truncate(keep);
    }
    b
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>()), 0..12)
}

/// Writes bytes as a data file of `format` and reads it like the engine does.
fn read_as(format: DataFormat, name: &str, bytes: &[u8]) -> Result<usize, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    let spec = DataSpec::new(dir.path(), format);
    read_file(&path, &spec)
        .map(|s| s.len())
        .map_err(|e| e.to_string())
}

proptest! {
    #[test]
    fn safetensors_shards_never_panic(edits in edits(), cut in prop::option::of(any::<usize>())) {
        let bytes = mutate(&sample("examples/digits/digits-0.safetensors"), &edits, cut);
        let r = read_as(DataFormat::Safetensors, "x.safetensors", &bytes);
        if let Err(e) = r {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn random_bytes_as_safetensors(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = read_as(DataFormat::Safetensors, "x.safetensors", &bytes);
    }

    #[test]
    fn csv_files_never_panic(text in "[0-9a-z,.;\"\\-\\n eE+]{0,300}") {
        let text = format!("a,b,label\n{text}");
        let _ = read_as(DataFormat::Csv, "x.csv", text.as_bytes());
    }

    #[test]
    fn text_tsv_files_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = read_as(DataFormat::TextTsv, "train.txt", &bytes);
    }

    #[test]
    fn png_images_never_panic(edits in edits(), cut in prop::option::of(any::<usize>())) {
        let dir = root().join("examples/digits-png/3");
        let first = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).min().unwrap();
        let bytes = mutate(&std::fs::read(first).unwrap(), &edits, cut);
        let tmp = tempfile::tempdir().unwrap();
        let class_dir = tmp.path().join("3");
        std::fs::create_dir_all(&class_dir).unwrap();
        let path = class_dir.join("x.png");
        std::fs::write(&path, &bytes).unwrap();
        let spec = DataSpec::new(tmp.path(), DataFormat::ImageFolder);
        let _ = read_file(&path, &spec);
    }

    #[test]
    fn checkpoints_never_panic(edits in edits(), cut in prop::option::of(any::<usize>())) {
        let bytes = mutate(checkpoint_bytes(), &edits, cut);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        if let Err(e) = checkpoint::load(&p, &Device::Cpu) {
            prop_assert!(e.to_string().contains("c.safetensors"));
        }
        let _ = resume::load(&p, &Device::Cpu);
    }

    #[test]
    fn config_files_never_panic(text in "(\\[[a-z._]{1,20}\\]\n)?([a-z_]{1,16} = (-?[0-9]{1,6}(\\.[0-9]{1,3})?|\"[a-z]{0,8}\"|true|\\[1, 2\\])\n){0,6}") {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, &text).unwrap();
        let _ = config::load(&p, &[]);
    }

    #[test]
    fn overrides_never_panic(key in "[a-z_.]{0,30}", value in "[ -~]{0,20}") {
        if let Ok(ov) = config::Override::parse_set(&format!("{key}={value}")) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("c.toml");
            std::fs::write(&p, "").unwrap();
            let _ = config::load(&p, &[ov]);
        }
    }
}
