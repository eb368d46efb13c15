//! `edge-trainer plot`: loss, accuracy and learning-rate curves from a
//! `metrics.jsonl`, drawn as SVG or PNG (chosen by the output's extension).

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::engine::fsutil::atomic_write;
use crate::engine::run::Metrics;

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}, line {line}: not a metrics record: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{0} holds no metrics records")]
    Empty(PathBuf),
    #[error("output {0} must end in .svg or .png")]
    Extension(PathBuf),
    #[error("drawing failed: {0}")]
    Draw(String),
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

fn draw_err<E: std::fmt::Display>(e: E) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// Reads every record of a metrics log; a bad line is an error naming it.
pub fn read_metrics(path: &Path) -> Result<Vec<Metrics>, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|e| PlotError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let m: Metrics = serde_json::from_str(line).map_err(|e| PlotError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        out.push(m);
    }
    if out.is_empty() {
        return Err(PlotError::Empty(path.to_path_buf()));
    }
    Ok(out)
}

const WIDTH: u32 = 900;
const HEIGHT: u32 = 960;

/// Draws the curves of `metrics` into `out` (`.svg` or `.png`), atomically.
pub fn plot(metrics: &[Metrics], out: &Path) -> Result<(), PlotError> {
    let ext = out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    register_font();
    let bytes = match ext.as_deref() {
        Some("svg") => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
                draw(&root, metrics)?;
                root.present().map_err(draw_err)?;
            }
            svg.into_bytes()
        }
        Some("png") => {
            let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
            {
                let root =
                    BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
                draw(&root, metrics)?;
                root.present().map_err(draw_err)?;
            }
            let img = image::RgbImage::from_raw(WIDTH, HEIGHT, rgb)
                .ok_or_else(|| PlotError::Draw("bitmap size mismatch".into()))?;
            let mut png = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(draw_err)?;
            png
        }
        _ => return Err(PlotError::Extension(out.to_path_buf())),
    };
    atomic_write(out, &bytes).map_err(|e| PlotError::Write {
        path: out.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Text is measured (and, in bitmaps, drawn) with the embedded DejaVu Sans.
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

type Series = Vec<(f64, f64)>;

fn series(metrics: &[Metrics], f: impl Fn(&Metrics) -> f64) -> Series {
    metrics
        .iter()
        .map(|m| (m.step as f64, f(m)))
        .filter(|(_, y)| y.is_finite())
        .collect()
}

fn bounds(all: &[&Series], pad: f64) -> (f64, f64) {
    let ys = all.iter().flat_map(|s| s.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), y| {
        (l.min(y), h.max(y))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = (hi - lo).max(1e-9);
    (lo - span * pad, hi + span * pad)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    metrics: &[Metrics],
) -> Result<(), PlotError> {
    root.fill(&WHITE).map_err(draw_err)?;
    let title = format!("run {}", metrics[0].run_id);
    let root = root.titled(&title, ("sans-serif", 22)).map_err(draw_err)?;
    let panels = root.split_evenly((3, 1));
    let x_max = metrics.iter().map(|m| m.step).max().unwrap_or(1).max(1) as f64;
    let x_min = metrics.iter().map(|m| m.step).min().unwrap_or(0) as f64;
    let x_range = x_min.min(x_max - 1.0)..x_max;

    let curves = [
        (
            "loss",
            series(metrics, |m| m.train_loss),
            series(metrics, |m| m.val_loss),
        ),
        (
            "accuracy",
            series(metrics, |m| m.train_acc),
            series(metrics, |m| m.val_acc),
        ),
    ];
    for (panel, (name, train, val)) in panels.iter().zip(curves.iter()) {
        let (lo, hi) = bounds(&[train, val], 0.05);
        let mut chart = ChartBuilder::on(panel)
            .caption(*name, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(64)
            .build_cartesian_2d(x_range.clone(), lo..hi)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_desc(*name)
            .draw()
            .map_err(draw_err)?;
        for (label, data, color) in [("train", train, BLUE), ("val", val, RED)] {
            chart
                .draw_series(LineSeries::new(data.iter().copied(), color.stroke_width(2)))
                .map_err(draw_err)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;
    }

    let lr = series(metrics, |m| m.lr);
    let lr_pos: Series = lr.into_iter().filter(|p| p.1 > 0.0).collect();
    let (lo, hi) = lr_pos
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), p| {
            (l.min(p.1), h.max(p.1))
        });
    let (lo, hi) = if lo.is_finite() {
        (lo / 2.0, hi * 2.0)
    } else {
        (1e-6, 1.0)
    };
    let mut chart = ChartBuilder::on(&panels[2])
        .caption("learning rate", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range, (lo..hi).log_scale())
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("lr")
        .y_labels(6)
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .draw()
        .map_err(draw_err)?;
    chart
        .draw_series(LineSeries::new(
            lr_pos,
            RGBColor(0, 140, 60).stroke_width(2),
        ))
        .map_err(draw_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Vec<Metrics> {
        (1..=10)
            .map(|i| Metrics {
                run_id: "r1".into(),
                epoch: i,
                step: i * 10,
                train_loss: 1.0 / i as f64,
                train_acc: 1.0 - 0.5 / i as f64,
                val_loss: 1.2 / i as f64,
                val_acc: 1.0 - 0.6 / i as f64,
                lr: if i < 6 { 1e-3 } else { 1e-4 },
                elapsed_s: i as f64,
                improved: true,
                best_val_loss: 1.2 / i as f64,
                best_val_acc: 1.0 - 0.6 / i as f64,
            })
            .collect()
    }

    #[test]
    fn svg_and_png_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("m.svg");
        plot(&metrics(), &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg") && text.contains("learning rate"));
        let png = dir.path().join("m.png");
        plot(&metrics(), &png).unwrap();
        let img = image::open(&png).unwrap();
        assert_eq!((img.width(), img.height()), (WIDTH, HEIGHT));
        // Something other than the white background was drawn.
        let rgb = img.to_rgb8();
        assert!(rgb.pixels().filter(|p| p.0 != [255, 255, 255]).count() > 1000);
    }

    #[test]
    fn bad_inputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        std::fs::write(&p, "{\"run_id\": 3}\n").unwrap();
        let e = read_metrics(&p).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl, line 1"), "{e}");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_metrics(&p)
            .unwrap_err()
            .to_string()
            .contains("no metrics"));
        let e = plot(&metrics(), &dir.path().join("x.gif"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(".svg or .png"), "{e}");
    }
}
