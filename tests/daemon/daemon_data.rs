//! New data dropped into `data.dir`: each file is validated once complete; good
//! ones are announced and counted, bad ones quarantined in `rejected/` with a
//! `.reason` file; `retrain.min_new_samples` new samples start a run by itself.

use std::path::Path;

use crate::helpers::*;
use crate::paths::root;
use crate::trials::{test, Test};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A digits-like shard: `n` samples of `side`×`side` u8 pixels with `label` for all.
fn shard(path: &Path, n: usize, side: usize, label: i64) {
    let x = vec![7u8; n * side * side];
    let y: Vec<u8> = std::iter::repeat_n(label, n)
        .flat_map(|l| l.to_le_bytes())
        .collect();
    let views = vec![
        (
            "x".to_string(),
            TensorView::new(Dtype::U8, vec![n, side, side], &x).unwrap(),
        ),
        (
            "y".to_string(),
            TensorView::new(Dtype::I64, vec![n], &y).unwrap(),
        ),
    ];
    std::fs::write(path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

fn new_files_are_validated_quarantined_and_trigger_a_run() {
    // digits-3 (449 samples) is held back and dropped in later as new data.
    let mut h = Harness::start(
        "[retrain]\nmin_new_samples = 400\n",
        &["digits-3.safetensors"],
    );
    let data = h.env.data.clone();
    let events = h.dash.topic("events");

    // Corrupt, written in place (taken once it stopped changing).
    std::fs::write(
        data.join("broken.safetensors"),
        b"this is not a safetensors file",
    )
    .unwrap();
    // Wrong sample shape and a label outside the 10 classes, renamed into place.
    shard(&data.join(".tmp-shape"), 5, 4, 1);
    std::fs::rename(
        data.join(".tmp-shape"),
        data.join("wrong-shape.safetensors"),
    )
    .unwrap();
    shard(&data.join(".tmp-label"), 5, 8, 12);
    std::fs::rename(data.join(".tmp-label"), data.join("bad-label.safetensors")).unwrap();

    for (file, needle) in [
        ("broken.safetensors", "safetensors"),
        ("wrong-shape.safetensors", "sample shape"),
        ("bad-label.safetensors", "label 12"),
    ] {
        let (_, m) = h.wait(&format!("data_rejected {file}"), SHORT, |m| {
            m.topic == events && m.event() == "data_rejected" && m.json["file"] == file
        });
        assert_ts(&m);
        let reason = m.json["reason"].as_str().unwrap().to_string();
        assert!(reason.contains(needle), "{file}: {reason}");
        assert_eq!(m.json["moved_to"], format!("rejected/{file}"));
        assert!(
            !data.join(file).exists(),
            "{file} must leave the data folder"
        );
        assert!(data.join("rejected").join(file).is_file());
        let why =
            std::fs::read_to_string(data.join("rejected").join(format!("{file}.reason"))).unwrap();
        assert!(why.starts_with(&reason), "{why}");
    }
    assert!(
        h.dash.seen.iter().all(|m| m.event() != "run_started"),
        "rejected data counts for nothing"
    );

    // A good file: copied under a temporary hidden name, then renamed into place.
    std::fs::copy(
        root().join("examples/digits/digits-3.safetensors"),
        data.join(".incoming"),
    )
    .unwrap();
    std::fs::rename(data.join(".incoming"), data.join("new-batch.safetensors")).unwrap();
    let (i_acc, acc) = h.wait("data_accepted", SHORT, |m| m.event() == "data_accepted");
    assert_eq!(acc.json["file"], "new-batch.safetensors");
    assert_eq!(acc.json["samples"], 449);
    assert!(data.join("new-batch.safetensors").is_file());

    // 449 >= 400 new samples: a run starts by itself, and trains on the new file.
    let (i_started, started) = h.wait_event("run_started", None, LONG);
    assert!(i_acc < i_started);
    assert_eq!(started.json["triggers"], serde_json::json!(["new_data"]));
    let total = &started.json["samples"];
    let n = total["train"].as_u64().unwrap()
        + total["val"].as_u64().unwrap()
        + total["test"].as_u64().unwrap();
    assert_eq!(n, 1797, "all four digits shards, nothing from rejected/");
    let run_id = started.run_id().to_string();
    h.wait_event("run_finished", Some(&run_id), LONG);
    h.wait_event("model_promoted", Some(&run_id), LONG);
}

fn a_file_still_being_written_is_not_taken_early() {
    let mut h = Harness::start(
        "[retrain]\nfile_settle_s = 3.0\n",
        &["digits-3.safetensors"],
    );
    let full = std::fs::read(root().join("examples/digits/digits-3.safetensors")).unwrap();
    let path = h.env.data.join("slow.safetensors");
    // Half now, the rest 0.3 s later: well inside the settle time.
    std::fs::write(&path, &full[..full.len() / 2]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    std::fs::write(&path, &full).unwrap();
    let (_, m) = h.wait("slow file taken", SHORT, |m| m.event().starts_with("data_"));
    assert_eq!(m.event(), "data_accepted", "{}", m.json);
    assert_eq!(m.json["samples"], 449);
}

fn files_that_arrive_while_the_daemon_is_down_are_new_after_a_restart() {
    let mut h = Harness::start("[retrain]\non_start = true\n", &["digits-3.safetensors"]);
    h.wait_event("model_promoted", None, LONG);
    h.daemon.sigterm();
    assert!(h.daemon.wait_exit(SHORT).is_some_and(|s| s.success()));

    std::fs::copy(
        root().join("examples/digits/digits-3.safetensors"),
        h.env.data.join("while-down.safetensors"),
    )
    .unwrap();
    let mark = h.dash.seen.len();
    h.daemon = Daemon::start(&h.env, &[]);
    let (_, m) = h.wait_from(mark, "data_accepted after the restart", SHORT, |m| {
        m.event().starts_with("data_")
    });
    assert_eq!(m.event(), "data_accepted", "{}", m.json);
    assert_eq!(m.json["file"], "while-down.safetensors");
    // The files that were there at the last run are not announced again.
    assert_eq!(
        h.dash.seen[mark..]
            .iter()
            .filter(|m| m.event().starts_with("data_"))
            .count(),
        1
    );
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![
        test!(new_files_are_validated_quarantined_and_trigger_a_run),
        test!(a_file_still_being_written_is_not_taken_early),
        test!(files_that_arrive_while_the_daemon_is_down_are_new_after_a_restart),
    ]
}
