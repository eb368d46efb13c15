//! What the retained `status` tells a fleet dashboard without any history: the
//! current model's scores and how the last run ended. Kept up to date from the
//! events the daemon publishes ([`note`]) and, at start, from the current
//! model's run folder ([`score_at_start`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::messages::Event;
use crate::engine::promote::Score;
use crate::engine::run::Outcome;

/// The current model's scores (`status.current_score`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelScore {
    /// Run id of the model.
    pub run_id: String,
    /// The split the scores come from (`test`, or `val` when the test split was empty).
    pub split: String,
    pub accuracy: f64,
    pub loss: f64,
    pub macro_f1: f64,
    pub samples: u64,
}

impl ModelScore {
    fn of(split: &str, s: &Score) -> Self {
        Self {
            run_id: s.run_id.clone(),
            split: split.to_string(),
            accuracy: s.accuracy,
            loss: s.loss,
            macro_f1: s.macro_f1,
            samples: s.samples,
        }
    }
}

/// How the last run ended (`status.last_run`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastRun {
    pub run_id: String,
    pub outcome: Outcome,
    pub reason: String,
    pub epochs: u64,
    /// When it ended (RFC 3339 UTC).
    pub ended: String,
    /// Whether its model replaced the current one; null until decided, and
    /// for a run that produced no model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promoted: Option<bool>,
}

/// The status fields an event changes, if it changes any.
#[derive(Debug, Default, PartialEq)]
pub struct StatusNote {
    pub last_run: Option<LastRun>,
    pub promoted: Option<(String, bool)>,
    pub score: Option<ModelScore>,
}

/// What `event` tells the retained status.
pub fn note(event: &Event) -> Option<StatusNote> {
    let run_end = |e: &super::messages::RunEnd| StatusNote {
        last_run: Some(LastRun {
            run_id: e.run_id.clone(),
            outcome: e.outcome,
            reason: e.reason.clone(),
            epochs: e.epochs,
            ended: crate::engine::run::now_rfc3339(),
            promoted: None,
        }),
        ..StatusNote::default()
    };
    match event {
        Event::RunFinished(e) | Event::RunCancelled(e) => Some(run_end(e)),
        Event::RunFailed { end, .. } => Some(run_end(end)),
        Event::ModelPromoted(d) => Some(StatusNote {
            promoted: Some((d.run_id.clone(), true)),
            score: Some(ModelScore::of(&d.split, &d.candidate)),
            ..StatusNote::default()
        }),
        Event::ModelKept(d) => Some(StatusNote {
            promoted: Some((d.run_id.clone(), false)),
            // The model in service was scored again, on the same split.
            score: d.current.as_ref().map(|c| ModelScore::of(&d.split, c)),
            ..StatusNote::default()
        }),
        Event::PromotionFailed { run_id, .. } => Some(StatusNote {
            promoted: Some((run_id.clone(), false)),
            ..StatusNote::default()
        }),
        _ => None,
    }
}

/// The test scores of the current model's run (`runs/{run_id}/summary.json`),
/// when that run folder is still there.
pub fn score_at_start(runs_dir: &Path, run_id: &str) -> Option<ModelScore> {
    #[derive(Deserialize)]
    struct Test {
        loss: f64,
        accuracy: f64,
        #[serde(default)]
        macro_f1: f64,
        #[serde(default)]
        samples: u64,
    }
    #[derive(Deserialize)]
    struct Summary {
        test: Option<Test>,
    }
    // A run id is one path level; anything else is not looked up.
    if run_id.is_empty() || run_id.contains(['/', '\\']) || run_id.starts_with('.') {
        return None;
    }
    let text = std::fs::read(runs_dir.join(run_id).join("summary.json")).ok()?;
    let t = serde_json::from_slice::<Summary>(&text).ok()?.test?;
    Some(ModelScore {
        run_id: run_id.to_string(),
        split: "test".into(),
        accuracy: t.accuracy,
        loss: t.loss,
        macro_f1: t.macro_f1,
        samples: t.samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::messages::{PromotionDecision, RunEnd, RunOrigin};
    use crate::engine::promote::PromoteMetric;

    fn score(run_id: &str, accuracy: f64) -> Score {
        Score {
            loss: 0.5,
            accuracy,
            macro_f1: 0.6,
            samples: 10,
            run_id: run_id.into(),
        }
    }

    fn decision(current: Option<Score>) -> PromotionDecision {
        PromotionDecision {
            run_id: "r2".into(),
            metric: PromoteMetric::default(),
            split: "test".into(),
            candidate: score("r2", 0.9),
            current,
            reason: "x".into(),
            path: "/o/current.safetensors".into(),
            previous_path: None,
            onnx: None,
            onnx_error: None,
        }
    }

    #[test]
    fn run_ends_and_promotions_update_the_status() {
        let end = RunEnd::without_summary("r1", "boom".into(), &RunOrigin::default());
        let n = note(&Event::RunFailed {
            end,
            kind: crate::engine::error::FailureKind::Internal,
        })
        .unwrap();
        let last = n.last_run.unwrap();
        assert_eq!(
            (last.run_id.as_str(), last.outcome),
            ("r1", Outcome::Failed)
        );
        let n = note(&Event::ModelPromoted(decision(None))).unwrap();
        assert_eq!(n.promoted, Some(("r2".into(), true)));
        assert_eq!(n.score.unwrap().accuracy, 0.9);
        let n = note(&Event::ModelKept(decision(Some(score("r0", 0.95))))).unwrap();
        assert_eq!(n.promoted, Some(("r2".into(), false)));
        assert_eq!(n.score.unwrap().run_id, "r0");
        assert!(note(&Event::CommandRejected {
            command: None,
            request_id: None,
            reason: "x".into(),
            suppressed: None
        })
        .is_none());
    }

    #[test]
    fn the_score_at_start_comes_from_the_run_summary() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("r7");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("summary.json"),
            br#"{"test": {"loss": 0.25, "accuracy": 0.875, "macro_f1": 0.8, "samples": 8}}"#,
        )
        .unwrap();
        let s = score_at_start(t.path(), "r7").unwrap();
        assert_eq!((s.accuracy, s.samples), (0.875, 8));
        assert!(score_at_start(t.path(), "missing").is_none());
        assert!(score_at_start(t.path(), "../r7").is_none());
    }
}
