//! Files whose values dwarf the others': when training goes non-finite, a file
//! holding values orders of magnitude larger than the rest (yet under
//! `data.max_abs_value`) is the likelier cause than the learning rate, and the
//! failure names it. One pass over the features, on the failure path only.

use std::fmt;

use super::{Dataset, Features};

/// A file's largest |value| must be this many times the typical file's to be named.
const DOMINANCE: f32 = 1_000.0;

/// Most files named in a reason.
const MAX_NAMED: usize = 5;

/// Files whose largest |value| dominates the other files' by orders of
/// magnitude; displayed as a clause to append to a failure reason (nothing
/// when there are none).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outliers {
    /// File name and its largest |value|, the largest first.
    pub files: Vec<(String, f32)>,
    /// The largest |value| of the typical file (the lower median of the files').
    pub typical: f32,
}

impl Outliers {
    /// Whether no file stands out.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl fmt::Display for Outliers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.files.is_empty() {
            return Ok(());
        }
        write!(f, "; or the data: ")?;
        for (i, (name, max)) in self.files.iter().take(MAX_NAMED).enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{name} (values up to {})", Num(*max))?;
        }
        if self.files.len() > MAX_NAMED {
            write!(f, " and {} more files", self.files.len() - MAX_NAMED)?;
        }
        let orders = (self.files[0].1 / self.typical.max(f32::MIN_POSITIVE)).log10();
        write!(
            f,
            " {} values orders of magnitude above the other files' (typically up to {}, {orders:.0} orders); check or remove {}",
            if self.files.len() == 1 { "holds" } else { "hold" },
            Num(self.typical),
            if self.files.len() == 1 { "it" } else { "them" },
        )
    }
}

/// A value as people write it: plain when moderate, else with an exponent.
struct Num(f32);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.0.abs();
        if a == 0.0 || (1e-3..1e6).contains(&a) {
            // Four decimals at most, trailing zeros cut: 2.9799528 -> 2.98.
            let s = format!("{:.4}", self.0);
            let s = s.trim_end_matches('0').trim_end_matches('.');
            write!(f, "{s}")
        } else {
            write!(f, "{:e}", self.0)
        }
    }
}

/// The files of `data` whose largest |value| is at least [`DOMINANCE`] times
/// the lower median of the files' largest values. Only float features (u8
/// pixels and token ids cannot dominate); at least two files are needed.
pub fn outlier_files(data: &Dataset) -> Outliers {
    let Features::F32(values) = &data.features else {
        return Outliers::default();
    };
    let per = data.sample_len().max(1);
    let mut max = vec![0f32; data.files.len()];
    for (sample, &(file, _)) in data.origins.iter().enumerate() {
        let Some(slot) = max.get_mut(file as usize) else {
            continue;
        };
        let start = sample * per;
        if let Some(xs) = values.get(start..start + per) {
            for v in xs {
                let a = v.abs();
                // Infinities and NaN count as the largest float.
                if a > *slot || a.is_nan() {
                    *slot = if a.is_finite() { a } else { f32::MAX };
                }
            }
        }
    }
    if max.len() < 2 {
        return Outliers::default();
    }
    let mut sorted = max.clone();
    sorted.sort_by(f32::total_cmp);
    let typical = sorted[(sorted.len() - 1) / 2];
    let mut files: Vec<(String, f32)> = data
        .files
        .iter()
        .zip(&max)
        .filter(|(_, m)| **m >= DOMINANCE * typical.max(f32::MIN_POSITIVE) && **m > 0.0)
        .map(|(n, &m)| (n.clone(), m))
        .collect();
    files.sort_by(|a, b| b.1.total_cmp(&a.1));
    Outliers { files, typical }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(files: &[(&str, Vec<f32>)]) -> Dataset {
        let mut features = Vec::new();
        let mut origins = Vec::new();
        for (i, (_, v)) in files.iter().enumerate() {
            for (j, chunk) in v.chunks(2).enumerate() {
                features.extend_from_slice(chunk);
                origins.push((i as u32, j as u32));
            }
        }
        Dataset {
            labels: vec![0; origins.len()],
            features: Features::F32(features),
            sample_shape: vec![2],
            classes: vec!["0".into(), "1".into()],
            origins,
            files: files.iter().map(|(n, _)| n.to_string()).collect(),
            skipped: Vec::new(),
            vocab: None,
        }
    }

    #[test]
    fn a_file_with_values_orders_of_magnitude_larger_is_named() {
        let d = dataset(&[
            ("a.csv", vec![1.0, -16.0, 3.0, 4.0]),
            ("big.csv", vec![1.0, 3e38, 0.0, 0.0]),
            ("c.csv", vec![0.5, 12.0]),
        ]);
        let o = outlier_files(&d);
        assert_eq!(o.files, vec![("big.csv".to_string(), 3e38)]);
        assert_eq!(o.typical, 16.0);
        let text = o.to_string();
        assert!(text.contains("big.csv (values up to 3e38)"), "{text}");
        assert!(text.contains("37 orders"), "{text}");
        assert!(!text.contains("a.csv"), "{text}");
        assert_eq!(Num(2.979_952_8).to_string(), "2.98");
        assert_eq!(Num(300_000.0).to_string(), "300000");
        assert_eq!(Num(0.0).to_string(), "0");
        assert_eq!(Num(3e-5).to_string(), "3e-5");
    }

    #[test]
    fn ordinary_spreads_and_single_files_name_nothing() {
        let d = dataset(&[("a.csv", vec![1.0, 2.0]), ("b.csv", vec![500.0, 2.0])]);
        assert!(outlier_files(&d).is_empty());
        assert_eq!(outlier_files(&d).to_string(), "");
        let d = dataset(&[("a.csv", vec![1.0, 3e38])]);
        assert!(outlier_files(&d).is_empty());
        let d = dataset(&[("a.csv", vec![0.0, 0.0]), ("b.csv", vec![0.0, 0.0])]);
        assert!(outlier_files(&d).is_empty());
    }
}
