//! Replays the PyTorch ReduceLROnPlateau fixtures (made by
//! `scripts/make_torch_fixtures.py`) and checks the lr sequence and the
//! scheduler's counters after every step against torch's.

use std::path::Path;

use edge_trainer::engine::schedule::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    config: PlateauConfig,
    initial_lr: f64,
    /// `None` stands for NaN.
    metrics: Vec<Option<f64>>,
    lrs: Vec<f64>,
    best: Vec<serde_json::Value>,
    num_bad_epochs: Vec<usize>,
    cooldown_counter: Vec<usize>,
}

fn parse_best(v: &serde_json::Value) -> f64 {
    match v {
        serde_json::Value::Number(n) => n.as_f64().unwrap(),
        serde_json::Value::String(s) => match s.as_str() {
            "inf" => f64::INFINITY,
            "-inf" => f64::NEG_INFINITY,
            "nan" => f64::NAN,
            other => panic!("bad best value {other}"),
        },
        other => panic!("bad best value {other}"),
    }
}

fn same(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-12 * b.abs()
}

#[test]
fn plateau_matches_torch() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plateau/cases.json");
    let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(!fixture.cases.is_empty());
    for case in &fixture.cases {
        let n = case.metrics.len();
        assert!(
            n > 0
                && case.lrs.len() == n
                && case.best.len() == n
                && case.num_bad_epochs.len() == n
                && case.cooldown_counter.len() == n,
            "{}: inconsistent fixture",
            case.name
        );
        let mut sched = ReduceLrOnPlateau::new(case.config.clone());
        let mut lr = case.initial_lr;
        let mut reductions = 0;
        for (i, m) in case.metrics.iter().enumerate() {
            let new_lr = sched.step(m.unwrap_or(f64::NAN), lr);
            if new_lr != lr {
                reductions += 1;
            }
            lr = new_lr;
            let at = format!("{} step {}", case.name, i + 1);
            assert!(
                same(lr, case.lrs[i]),
                "{at}: lr {lr} != torch {}",
                case.lrs[i]
            );
            let best = parse_best(&case.best[i]);
            assert!(
                same(sched.best(), best),
                "{at}: best {} != torch {best}",
                sched.best()
            );
            assert_eq!(
                sched.num_bad_epochs(),
                case.num_bad_epochs[i],
                "{at}: num_bad_epochs"
            );
            assert_eq!(
                sched.cooldown_counter(),
                case.cooldown_counter[i],
                "{at}: cooldown_counter"
            );
        }
        println!(
            "{:<26} {n} steps, {reductions} reductions, final lr {lr:e}: matches torch",
            case.name
        );
    }
}
