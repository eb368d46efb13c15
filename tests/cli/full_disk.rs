//! A full disk: the run's output folder is a tiny tmpfs (mounted in a private
//! mount namespace with `unshare`), so a checkpoint or resume-state write fails
//! with ENOSPC. The run must fail with a reason naming the file and the error,
//! and leave the files written before intact and loadable.

use std::process::Command;

use crate::paths::{root, BIN};
use crate::trials::{test, Test, UNSHARE};

fn enospc_fails_the_run_and_keeps_earlier_files() {
    // Needs `unshare -rm` with a tmpfs mount: see `tests()`.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    // 200 KiB holds the best checkpoint (~70 KB) but not the resume state
    // (model + two Adam moments + best, ~280 KB) written after it.
    let script = format!(
        r#"set -u
mount -t tmpfs -o size=200k tmpfs "{out}"
"{bin}" train --config configs/demo.toml --no-progress --set output.dir="{out}"
echo "TRAIN_EXIT=$?"
run=$(ls -d "{out}"/runs/*)
ls -la "$run"
echo "SUMMARY:"; cat "$run/summary.json"; echo
"{bin}" eval --config configs/demo.toml --checkpoint "$run/best.safetensors" --json
echo "EVAL_EXIT=$?"
ls -a "$run"
"#,
        out = out.display(),
        bin = BIN
    );
    let o = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .current_dir(root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let all = format!("{stdout}\n{stderr}");
    assert!(stdout.contains("TRAIN_EXIT=1"), "{all}");
    assert!(
        stderr.contains("resume.safetensors") && stderr.contains("No space left on device"),
        "the reason names the file and the error: {all}"
    );
    assert!(stdout.contains("\"outcome\": \"failed\""), "{all}");
    assert!(stdout.contains("\"failure\": \"disk_full\""), "{all}");
    // The best checkpoint written before the failure still loads and evaluates.
    assert!(stdout.contains("EVAL_EXIT=0"), "{all}");
    assert!(stdout.contains("\"accuracy\""), "{all}");
    // No temporary file is left behind.
    assert!(!stdout.contains(".tmp-"), "{all}");
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(enospc_fails_the_run_and_keeps_earlier_files).needs(UNSHARE)]
}
