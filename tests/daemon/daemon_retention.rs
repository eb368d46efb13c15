//! Bounded disk and no forgetting (issue 16): the disk guard, and the
//! class-incremental stream on the digits — five phases, each dropping files of
//! two new classes into `data.dir` and nothing of the old ones — trained three
//! ways: a class-balanced replay budget of 20% of the stream (`[data.retention]`),
//! keeping everything, and new files only (the old ones deleted by hand). The
//! final model is scored on held-out samples of all ten classes. Other
//! settings for all three passes: extra TOML in `EDGE_TRAINER_FORGETTING_TOML`
//! (e.g. `EDGE_TRAINER_FORGETTING_TOML=$'[train]\nseed = 3'`).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::helpers::*;
use crate::paths::{root, BIN};
use crate::trials::{test, Test};

/// One digits sample: 8x8 u8 pixels and its class.
pub type Sample = (Vec<u8>, i64);

/// Every sample of the bundled digits, in file order.
pub fn digits() -> Vec<Sample> {
    let mut out = Vec::new();
    for i in 0..4 {
        let p = root().join(format!("examples/digits/digits-{i}.safetensors"));
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let x = st.tensor("x").unwrap();
        let y = st.tensor("y").unwrap();
        assert_eq!(x.dtype(), safetensors::Dtype::U8);
        let labels: Vec<i64> = y
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        for (k, px) in x.data().chunks_exact(64).enumerate() {
            out.push((px.to_vec(), labels[k]));
        }
    }
    out
}

/// Writes `samples` as a digits shard at `path`, renamed into place (complete
/// the moment it appears).
pub fn write_shard(path: &Path, samples: &[&Sample]) {
    let x: Vec<u8> = samples.iter().flat_map(|s| s.0.iter().copied()).collect();
    let y: Vec<u8> = samples.iter().flat_map(|s| s.1.to_le_bytes()).collect();
    let n = samples.len();
    let views = vec![
        (
            "x",
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![n, 8, 8], &x)
                .unwrap(),
        ),
        (
            "y",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![n], &y).unwrap(),
        ),
    ];
    let bytes = safetensors::tensor::serialize(views, None).unwrap();
    let name = path.file_name().unwrap().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Samples per stream file: small files, so a budget can be met closely.
const CHUNK: usize = 8;

/// The stream: a held-out fifth of every class for the final score, the rest
/// in files of [`CHUNK`] samples of one class, grouped into five phases of two
/// classes each.
struct Stream {
    phases: Vec<Vec<(String, Vec<Sample>)>>,
    held_out: Vec<Sample>,
    samples: usize,
}

fn stream() -> Stream {
    let all = digits();
    let mut held_out = Vec::new();
    let mut by_class: Vec<Vec<Sample>> = vec![Vec::new(); 10];
    for (i, s) in all.into_iter().enumerate() {
        if i % 5 == 0 {
            held_out.push(s);
        } else {
            by_class[s.1 as usize].push(s);
        }
    }
    let samples = by_class.iter().map(Vec::len).sum();
    let phases = (0..5)
        .map(|p| {
            let mut files = Vec::new();
            for c in [2 * p, 2 * p + 1] {
                for (k, chunk) in by_class[c].chunks(CHUNK).enumerate() {
                    files.push((format!("p{p}-c{c}-{k:02}.safetensors"), chunk.to_vec()));
                }
            }
            files
        })
        .collect();
    Stream {
        phases,
        held_out,
        samples,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Replay,
    KeepAll,
    NewOnly,
}

/// What one pass over the stream gave.
struct Outcome {
    accuracy: f64,
    started: Vec<Value>,
    evicted: Vec<Value>,
    status: Value,
    h: Harness,
}

fn eval_accuracy(h: &Harness, held_out: &[Sample]) -> f64 {
    let dir = h.env.dir.path().join("held-out");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(h.env.data.join("class.txt"), dir.join("class.txt")).unwrap();
    let refs: Vec<&Sample> = held_out.iter().collect();
    write_shard(&dir.join("test.safetensors"), &refs);
    let o = Command::new(BIN)
        .args(["eval", "--json", "--split", "test", "--config"])
        .arg(&h.env.config)
        .arg("--set")
        .arg(format!("data.dir={}", dir.display()))
        .arg("--checkpoint")
        .arg(h.env.out.join("current.safetensors"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["samples"].as_u64(), Some(held_out.len() as u64));
    v["accuracy"].as_f64().unwrap()
}

fn run_stream(mode: Mode, s: &Stream, budget: u64) -> Outcome {
    // Adam's default learning rate (the test environment's 0.01 is for speed):
    // a warm-started run moves less far from what the model knew.
    let mut extra = "[train.optimizer]\nlr = 0.001\n".to_string();
    extra += &match mode {
        Mode::Replay => format!(
            "[data.retention]\npolicy = \"class-balanced\"\nmax_samples = {budget}\narchive_dir = \"archive\"\n"
        ),
        Mode::KeepAll | Mode::NewOnly => String::new(),
    };
    // To try other settings on all three: extra TOML (sections other than
    // [data.retention] and [train.optimizer]) in EDGE_TRAINER_FORGETTING_TOML.
    if let Ok(more) = std::env::var("EDGE_TRAINER_FORGETTING_TOML") {
        extra = format!("{extra}\n{more}");
    }
    let shards = [
        "digits-0.safetensors",
        "digits-1.safetensors",
        "digits-2.safetensors",
        "digits-3.safetensors",
    ];
    let mut h = Harness::start(&extra, &shards);
    let events = h.dash.topic("events");
    let mut started = Vec::new();
    for (p, files) in s.phases.iter().enumerate() {
        if mode == Mode::NewOnly && p > 0 {
            for (name, _) in &s.phases[p - 1] {
                std::fs::remove_file(h.env.data.join(name)).unwrap();
            }
        }
        for (name, samples) in files {
            let refs: Vec<&Sample> = samples.iter().collect();
            write_shard(&h.env.data.join(name), &refs);
        }
        let rid = format!("phase-{p}");
        let run_id = h.train(&rid, &format!(r#"{{"request_id": "{rid}"}}"#));
        let (_, st) = h.wait_event("run_started", Some(&run_id), LONG);
        started.push(st.json.clone());
        let (_, end) = h.wait_from(0, &format!("end of {run_id}"), LONG, |m| {
            m.topic == events
                && matches!(m.event(), "run_finished" | "run_failed" | "run_cancelled")
                && m.run_id() == run_id
        });
        if end.event() != "run_finished" {
            h.fail(&format!("phase {p} did not finish: {}", end.json));
        }
        h.wait_from(0, "promotion decision", LONG, |m| {
            m.topic == events
                && matches!(m.event(), "model_promoted" | "model_kept")
                && m.run_id() == run_id
        });
    }
    let status_topic = h.dash.topic("status");
    let (_, status) = h.wait("idle status", LONG, |m| {
        m.topic == status_topic && m.json["state"] == "idle"
    });
    let status = h
        .dash
        .on("status")
        .last()
        .map(|m| m.json.clone())
        .unwrap_or(status.json);
    let evicted = h
        .dash
        .on("events")
        .into_iter()
        .filter(|m| m.event() == "data_evicted")
        .map(|m| m.json.clone())
        .collect();
    let accuracy = eval_accuracy(&h, &s.held_out);
    Outcome {
        accuracy,
        started,
        evicted,
        status,
        h,
    }
}

/// Samples per class of the digits shards in `dir` (by the `cN` in their names).
fn classes_in(dir: &Path) -> Vec<u64> {
    let mut n = vec![0u64; 10];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(c) = name
            .split('-')
            .find_map(|p| p.strip_prefix('c')?.parse::<usize>().ok())
        {
            n[c] += 1;
        }
    }
    n
}

fn class_incremental_replay_within_a_fifth_rivals_keeping_everything() {
    let s = stream();
    let budget = (s.samples / 5) as u64;
    let replay = run_stream(Mode::Replay, &s, budget);
    let keep = run_stream(Mode::KeepAll, &s, budget);
    let new_only = run_stream(Mode::NewOnly, &s, budget);
    println!(
        "forgetting: {} stream samples, replay budget {budget}; held-out accuracy over 10 classes ({} samples): replay {:.4}, keep-everything {:.4}, new-only {:.4}; replay/keep = {:.3}",
        s.samples,
        s.held_out.len(),
        replay.accuracy,
        keep.accuracy,
        new_only.accuracy,
        replay.accuracy / keep.accuracy
    );
    for (name, o) in [
        ("replay", &replay),
        ("keep-everything", &keep),
        ("new-only", &new_only),
    ] {
        let r = &o.started[4]["replay"];
        println!(
            "forgetting: {name}'s last run trained on {} new and {} replayed samples",
            r["new_samples"], r["replayed_samples"]
        );
    }

    // The bounded runs: each trained on its new files plus at most the budget.
    for (p, st) in replay.started.iter().enumerate() {
        let r = &st["replay"];
        let new: usize = s.phases[p].iter().map(|(_, v)| v.len()).sum();
        assert_eq!(
            r["new_samples"].as_u64(),
            Some(new as u64),
            "phase {p}: {st}"
        );
        assert_eq!(r["new_files"].as_u64(), Some(s.phases[p].len() as u64));
        let replayed = r["replayed_samples"].as_u64().unwrap();
        assert!(replayed <= budget, "phase {p}: {replayed} > {budget}");
        if p > 0 {
            assert!(replayed > budget / 2, "phase {p}: {replayed} replayed");
        }
    }
    // Keep-everything replays all; new-only nothing.
    let before_last: usize = s.phases[..4]
        .iter()
        .flat_map(|p| p.iter().map(|(_, v)| v.len()))
        .sum();
    assert_eq!(
        keep.started[4]["replay"]["replayed_samples"].as_u64(),
        Some(before_last as u64)
    );
    assert_eq!(new_only.started[4]["replay"]["replayed_samples"], 0);

    // Evictions announced, counted, archived, and every class still there.
    assert!(!replay.evicted.is_empty());
    let mut files = 0;
    for ev in &replay.evicted {
        assert_eq!(ev["action"], "archived", "{ev}");
        assert!(
            ev["reason"].as_str().unwrap().contains("max_samples"),
            "{ev}"
        );
        assert!(ev["kept_samples"].as_u64().unwrap() <= budget, "{ev}");
        files += ev["evicted_files"].as_u64().unwrap();
    }
    let storage = &replay.status["storage"];
    assert_eq!(storage["evicted_files"].as_u64(), Some(files), "{storage}");
    assert!(
        storage["free_mb"].as_f64().is_some_and(|f| f > 0.0),
        "{storage}"
    );
    assert!(storage["data_mb"].as_f64().is_some(), "{storage}");
    let archived = classes_in(&replay.h.env.dir.path().join("archive"));
    assert_eq!(archived.iter().sum::<u64>(), files);
    let kept = classes_in(&replay.h.env.data);
    assert!(kept.iter().all(|&n| n > 0), "a class was lost: {kept:?}");

    // The figures (README "Bounded disk and replay"; over train.seed 1-4 and
    // 42 replay/keep-everything was 0.91-0.95, new-only 0.42-0.52): replay
    // reaches 90% of keep-everything, asserted with a margin of 0.05; new-only
    // forgets (it knows the last two classes and little of the others).
    assert!(keep.accuracy >= 0.9, "keep-everything {:.4}", keep.accuracy);
    assert!(
        replay.accuracy >= 0.85 * keep.accuracy,
        "replay {:.4} vs keep-everything {:.4}",
        replay.accuracy,
        keep.accuracy
    );
    assert!(
        new_only.accuracy <= 0.65 && replay.accuracy - new_only.accuracy >= 0.25,
        "new-only {:.4} did not forget (replay {:.4})",
        new_only.accuracy,
        replay.accuracy
    );
    for mut o in [replay, keep, new_only] {
        o.h.daemon.sigterm();
        assert!(o.h.daemon.wait_exit(LONG).is_some_and(|s| s.success()));
    }
}

fn the_disk_guard_fails_a_run_up_front_and_keeps_the_model() {
    let mut h = Harness::start("", &[]);
    let first = h.train("one", r#"{"request_id": "one"}"#);
    h.wait_event("model_promoted", Some(&first), LONG);
    let (_, idle) = h.wait("idle", LONG, |m| {
        m.topic.ends_with("/status")
            && m.json["state"] == "idle"
            && m.json["current_model"] == first.as_str()
    });
    assert!(
        idle.json["storage"]["runs"].as_u64() >= Some(1),
        "{}",
        idle.json
    );
    let current = h.env.out.join("current.safetensors");
    let model = std::fs::read(&current).unwrap();
    h.daemon.sigterm();
    assert!(h.daemon.wait_exit(LONG).is_some_and(|s| s.success()));

    // Restarted asking for more free space than any disk has.
    h.daemon = Daemon::start(
        &h.env,
        &[("EDGE_TRAINER__OUTPUT__MIN_FREE_MB", "1000000000000".into())],
    );
    let from = h.dash.seen.len();
    h.wait_from(from, "the restarted daemon's status", LONG, |m| {
        m.topic.ends_with("/status") && m.json["state"] == "idle"
    });
    let from = h.dash.seen.len();
    h.dash.send("train", r#"{"request_id": "two"}"#);
    let events = h.dash.topic("events");
    let (_, failed) = h.wait_from(from, "run_failed", LONG, |m| {
        m.topic == events && m.event() == "run_failed"
    });
    assert_eq!(failed.json["kind"], "disk_full", "{}", failed.json);
    assert_eq!(failed.json["request_ids"][0], "two");
    let reason = failed.json["reason"].as_str().unwrap();
    assert!(
        reason.contains("MiB free") && reason.contains("output.min_free_mb"),
        "{reason}"
    );
    assert!(
        h.dash.seen[from..]
            .iter()
            .all(|m| m.event() != "run_started"),
        "the run must not start"
    );
    let run_id = failed.run_id().to_string();
    assert!(!h.env.run_dir(&run_id).exists());
    assert_eq!(std::fs::read(&current).unwrap(), model);
    // Still serving.
    let from = h.dash.seen.len();
    h.dash.send("status", "{}");
    h.wait_from(from, "status answer", SHORT, |m| {
        m.topic.ends_with("/status") && m.json["state"] == "idle"
    });
    h.daemon.sigterm();
    assert!(h.daemon.wait_exit(LONG).is_some_and(|s| s.success()));
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Soak with data arriving throughout: every round drops five files of one
/// class (40 samples, the `retrain.min_new_samples` trigger), and the daemon
/// trains by itself. `data.dir` stays within the replay budget plus one
/// round, `output.dir/runs` within `output.keep_runs` plus the two protected
/// runs, every class seen stays in the data, and RSS stays flat. The run
/// wall times are printed (no timed assertions).
///
/// CI runs 12 rounds; the long form: `EDGE_TRAINER_RETENTION_SOAK_RUNS=300
/// cargo test --release --test daemon bounded_disk -- --nocapture`.
fn bounded_disk_over_many_automatic_runs() {
    let rounds: usize = std::env::var("EDGE_TRAINER_RETENTION_SOAK_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    const BUDGET: u64 = 200;
    const KEEP_RUNS: usize = 3;
    let extra = format!(
        r#"
[model]
hidden = [16]
[train]
max_epochs = 3
[retrain]
min_new_samples = 40
file_settle_s = 0.1
rescan_s = 0.5
[output]
keep_runs = {KEEP_RUNS}
[data.retention]
policy = "class-balanced"
max_samples = {BUDGET}
"#
    );
    let shards = [
        "digits-0.safetensors",
        "digits-1.safetensors",
        "digits-2.safetensors",
        "digits-3.safetensors",
    ];
    let mut h = Harness::start(&extra, &shards);
    let pid = h.daemon.child.id();
    let mut by_class: Vec<Vec<Sample>> = vec![Vec::new(); 10];
    for s in digits() {
        by_class[s.1 as usize].push(s);
    }
    let events = h.dash.topic("events");
    let status_topic = h.dash.topic("status");
    let warm_up = (rounds / 4).clamp(3, 20);
    let (mut rss0, mut walls, mut pruned) = (0, Vec::new(), 0usize);
    for i in 0..rounds {
        let c = i % 10;
        let from = h.dash.seen.len();
        for k in 0..5 {
            let start = ((i / 10) * 40 + k * CHUNK) % (by_class[c].len() - CHUNK);
            let refs: Vec<&Sample> = by_class[c][start..start + CHUNK].iter().collect();
            write_shard(
                &h.env.data.join(format!("r{i:04}-c{c}-{k}.safetensors")),
                &refs,
            );
        }
        let (i_end, end) = h.wait_from(from, &format!("the run of round {i}"), LONG, |m| {
            m.topic == events && matches!(m.event(), "run_finished" | "run_failed")
        });
        if end.event() != "run_finished" {
            h.fail(&format!("round {i}: {}", end.json));
        }
        walls.push(end.json["wall_s"].as_f64().unwrap_or(0.0));
        h.wait_from(i_end, "idle", LONG, |m| {
            m.topic == status_topic && m.json["state"] == "idle"
        });
        pruned += h.dash.seen[from..]
            .iter()
            .filter(|m| m.event() == "runs_pruned")
            .map(|m| m.json["runs"].as_array().map_or(0, Vec::len))
            .sum::<usize>();
        // Bounded: the replay budget plus this round's 40 new samples.
        let per_class = classes_in(&h.env.data);
        let samples: u64 = per_class.iter().sum::<u64>() * CHUNK as u64;
        assert!(
            samples <= BUDGET + 40,
            "round {i}: {samples} samples in data.dir"
        );
        for (class, n) in per_class.iter().enumerate().take((i + 1).min(10)) {
            assert!(*n > 0, "round {i}: class {class} was lost: {per_class:?}");
        }
        let runs = std::fs::read_dir(h.env.out.join("runs")).unwrap().count();
        assert!(runs <= KEEP_RUNS + 2, "round {i}: {runs} run folders");
        if h.dash.seen.len() > 5000 {
            h.dash.seen.drain(..4000);
        }
        if i + 1 == warm_up {
            rss0 = vm_rss_kib(pid);
        }
    }
    let rss1 = vm_rss_kib(pid);
    let mean = |w: &[f64]| w.iter().sum::<f64>() / w.len().max(1) as f64;
    let q = (walls.len() / 4).max(1);
    println!(
        "bounded_disk: {rounds} automatic runs, {pruned} run folders pruned; run wall time first {q} mean {:.2}s, last {q} mean {:.2}s; RSS after {warm_up} runs {rss0} KiB, at the end {rss1} KiB",
        mean(&walls[..q]),
        mean(&walls[walls.len() - q..])
    );
    assert!(
        rounds <= KEEP_RUNS + 2 || pruned > 0,
        "no run folder was pruned"
    );
    assert!(
        rss1 <= rss0 + rss0 / 4 + 16 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
    h.daemon.sigterm();
    assert!(h.daemon.wait_exit(LONG).is_some_and(|s| s.success()));
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![
        test!(class_incremental_replay_within_a_fifth_rivals_keeping_everything),
        test!(the_disk_guard_fails_a_run_up_front_and_keeps_the_model),
        test!(bounded_disk_over_many_automatic_runs),
    ]
}
