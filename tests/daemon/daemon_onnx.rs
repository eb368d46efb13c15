//! `output.export_onnx` end to end (issue 15): a promotion writes
//! `current.onnx` and `current.labels.txt` beside `current.safetensors`, and
//! `model_promoted` names both with their SHA-256; the file runs in tract and
//! agrees with the promoted model.

use crate::helpers::*;
use crate::trials::{test, Test};
use sha2::Digest;
use tract_onnx::prelude::*;

fn sha256(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn promotion_writes_current_onnx_and_names_it() {
    let mut h = Harness::start(
        "[retrain]\non_start = true\n[output]\nexport_onnx = true\n",
        &[],
    );
    let (_, p) = h.wait_event("model_promoted", None, LONG);
    let out = h.env.out.clone();
    let onnx_path = out.join("current.onnx");
    let labels_path = out.join("current.labels.txt");
    let onnx = std::fs::read(&onnx_path).expect("current.onnx");
    let labels = std::fs::read(&labels_path).expect("current.labels.txt");
    let f = &p.json["onnx"];
    assert_eq!(f["path"], onnx_path.display().to_string(), "{}", p.json);
    assert_eq!(f["labels_path"], labels_path.display().to_string());
    assert_eq!(f["sha256"], sha256(&onnx));
    assert_eq!(f["labels_sha256"], sha256(&labels));
    assert!(p.json.get("onnx_error").is_none(), "{}", p.json);
    // The digits' classes, one per line, in output order.
    let classes = std::fs::read_to_string(out.join("../data/class.txt")).unwrap();
    let want: Vec<&str> = classes.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        String::from_utf8(labels)
            .unwrap()
            .lines()
            .collect::<Vec<_>>(),
        want
    );
    // Nothing of the promoted files is left half-written beside them. Only
    // their own temporaries are looked for: the daemon may be writing other
    // files (the retention ledger, its status) at the moment the event lands.
    for e in std::fs::read_dir(&out).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            !(name.starts_with(".current.") && name.contains(".tmp")),
            "{name} left in {}",
            out.display()
        );
    }
    // It runs: a batch of two 8x8 digits gives two rows of 10 logits.
    let model = tract_onnx::onnx()
        .model_for_path(&onnx_path)
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let x = Tensor::from_shape(&[2, 8, 8], &[8f32; 128]).unwrap();
    let y = model.run(tvec!(x.into())).unwrap();
    assert_eq!(y[0].shape(), &[2, want.len()]);
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(promotion_writes_current_onnx_and_names_it)]
}
