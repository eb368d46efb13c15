//! Human-readable text for the console: the per-evaluation line (as the seed
//! loop printed it), evaluation reports and run summaries.

use std::fmt::Write;

use crate::engine::eval::EvalReport;
use crate::engine::run::{Metrics, RunSummary};

/// `h:mm:ss` of a duration in seconds.
pub fn hms(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// One evaluation as a console line; a trailing `*` marks a new best model.
pub fn metrics_line(m: &Metrics) -> String {
    format!(
        "Epoch: {:>3}, Iter: {:>6}, Train Loss: {:>7.4}, Train Acc: {:>7.2}%, Val Loss: {:>7.4}, Val Acc: {:>7.2}%, LR: {:.1e}, Time: {} {}",
        m.epoch,
        m.step,
        m.train_loss,
        m.train_acc * 100.0,
        m.val_loss,
        m.val_acc * 100.0,
        m.lr,
        hms(m.elapsed_s),
        if m.improved { "*" } else { "" }
    )
    .trim_end()
    .to_string()
}

/// Loss, accuracy, per-class precision/recall/F1 and the confusion matrix.
pub fn eval_text(title: &str, rep: &EvalReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{title}: loss {:.4}, accuracy {:.2}% ({} samples), macro F1 {:.4}",
        rep.loss,
        rep.accuracy * 100.0,
        rep.samples,
        rep.macro_f1
    );
    let width = rep
        .per_class
        .iter()
        .map(|c| c.class.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    let _ = writeln!(
        s,
        "  {:<width$}  {:>9}  {:>9}  {:>9}  {:>7}",
        "class", "precision", "recall", "f1", "support"
    );
    for c in &rep.per_class {
        let _ = writeln!(
            s,
            "  {:<width$}  {:>9.4}  {:>9.4}  {:>9.4}  {:>7}",
            c.class, c.precision, c.recall, c.f1, c.support
        );
    }
    let _ = writeln!(
        s,
        "  confusion matrix (rows: true class, columns: predicted):"
    );
    let cell = rep
        .confusion_matrix
        .iter()
        .flatten()
        .max()
        .map(|m| m.to_string().len())
        .unwrap_or(1)
        .max(3);
    for (i, row) in rep.confusion_matrix.iter().enumerate() {
        let name = rep.per_class.get(i).map(|c| c.class.as_str()).unwrap_or("");
        let cells: Vec<String> = row.iter().map(|v| format!("{v:>cell$}")).collect();
        let _ = writeln!(s, "  {name:<width$}  {}", cells.join(" "));
    }
    s
}

/// The end-of-run report of `train`.
pub fn summary_text(sum: &RunSummary) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Run {}: {:?} after {} epochs, {} steps, {} ({})",
        sum.run_id,
        sum.outcome,
        sum.epochs,
        sum.steps,
        hms(sum.wall_s),
        sum.reason
    );
    if let Some(b) = &sum.best {
        let _ = writeln!(
            s,
            "Best: epoch {}, step {}, val loss {:.4}, val acc {:.2}%",
            b.epoch,
            b.step,
            b.val_loss,
            b.val_acc * 100.0
        );
    }
    for f in &sum.skipped_files {
        let _ = writeln!(s, "Skipped data file {}: {}", f.file, f.reason);
    }
    if let Some(t) = &sum.test {
        let rep = EvalReport {
            loss: t.loss,
            accuracy: t.accuracy,
            samples: t.samples,
            per_class: t.per_class.clone(),
            confusion_matrix: t.confusion_matrix.clone(),
            macro_f1: t.macro_f1,
        };
        s.push_str(&eval_text("Test of the best model", &rep));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_marks_improvement() {
        let m = Metrics {
            run_id: "r".into(),
            epoch: 2,
            step: 40,
            train_loss: 0.5,
            train_acc: 0.9,
            val_loss: 0.4,
            val_acc: 0.925,
            lr: 1e-3,
            elapsed_s: 3661.0,
            improved: true,
            best_val_loss: 0.4,
            best_val_acc: 0.925,
        };
        let l = metrics_line(&m);
        assert!(l.ends_with("Time: 1:01:01 *"), "{l}");
        assert!(l.contains("Val Acc:   92.50%"), "{l}");
        let l = metrics_line(&Metrics {
            improved: false,
            ..m
        });
        assert!(l.ends_with("1:01:01"), "{l}");
    }
}
