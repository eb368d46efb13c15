//! Checking a file without keeping its samples: what the daemon does with every
//! new data file. CSV and text files are checked row by row as they are parsed
//! (the sample shape against the reference as soon as it is known, each label
//! against the reference classes as it is read), holding only the file's
//! distinct labels; the same memory budget as loading applies, so a file passes
//! the check exactly when it would load. Other formats are read and checked.

use std::path::Path;

use super::labels::{impossible, release_memory, Budget, LabelCodes};
use super::{
    check_file, csv_file, image_folder, read_file, relative_name, resolve_labels, text_tsv,
    BadValue, DataFormat, DataSpec, FileError, RawLabels,
};

/// What a checked file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCheck {
    /// Number of samples.
    pub samples: usize,
    /// Shape of one sample.
    pub sample_shape: Vec<usize>,
}

fn shape_error(found: &[usize], expected: &[usize]) -> FileError {
    FileError::Shape {
        found: found.to_vec(),
        expected: expected.to_vec(),
    }
}

/// Checks one file on its own and, where given, against the reference sample
/// shape and classes; the error is a reason fit for a user.
pub fn scan_file(
    path: &Path,
    spec: &DataSpec,
    shape: Option<&[usize]>,
    classes: Option<&[String]>,
) -> Result<FileCheck, FileError> {
    let result = match spec.format {
        DataFormat::Csv => scan_csv(path, spec, shape, classes).map(|(c, _)| c),
        DataFormat::TextTsv => scan_text(path, spec, shape, classes).map(|(c, _)| c),
        DataFormat::Safetensors | DataFormat::ImageFolder => {
            let samples = read_file(path, spec)?;
            if let Some(expected) = shape {
                if samples.sample_shape != expected {
                    return Err(shape_error(&samples.sample_shape, expected));
                }
            }
            if let Some(classes) = classes {
                resolve_labels(&samples.labels, classes)?;
            }
            Ok(FileCheck {
                samples: samples.len(),
                sample_shape: samples.sample_shape,
            })
        }
    };
    release_memory();
    result
}

/// The distinct labels of a file that passes [`scan_file`] on its own, as the
/// loader reads them (indices when every label is an integer, else names):
/// what the classes are inferred from when no model or class list gives them.
/// An image's label is its class folder (the image is not decoded).
pub fn file_labels(path: &Path, spec: &DataSpec) -> Result<RawLabels, FileError> {
    let result = match spec.format {
        DataFormat::Csv => scan_csv(path, spec, None, None).map(|(_, l)| l.distinct()),
        DataFormat::TextTsv => scan_text(path, spec, None, None).map(|(_, l)| l.distinct()),
        DataFormat::ImageFolder => {
            check_file(path, spec)?;
            image_folder::class_of(&relative_name(&spec.dir, path))
                .map(|c| RawLabels::Name(vec![c]))
        }
        DataFormat::Safetensors => read_file(path, spec).map(|s| s.labels),
    };
    release_memory();
    result
}

fn label_check(
    labels: &mut LabelCodes,
    classes: Option<&[String]>,
    label: &str,
    row: usize,
) -> Result<bool, FileError> {
    if let Some(classes) = classes {
        if impossible(label, classes) {
            return Err(FileError::NotAClass {
                label: super::labels::quote(label),
                classes: classes.len(),
            });
        }
    }
    labels.note(label, row)
}

fn finish(
    labels: LabelCodes,
    classes: Option<&[String]>,
    samples: usize,
    sample_shape: Vec<usize>,
) -> Result<(FileCheck, LabelCodes), FileError> {
    if samples == 0 {
        return Err(FileError::NoSamples);
    }
    // Negative indices are refused on their own, as when loading.
    labels.check_not_negative()?;
    if let Some(classes) = classes {
        labels.check_against(classes)?;
    }
    Ok((
        FileCheck {
            samples,
            sample_shape,
        },
        labels,
    ))
}

fn scan_csv(
    path: &Path,
    spec: &DataSpec,
    shape: Option<&[usize]>,
    classes: Option<&[String]>,
) -> Result<(FileCheck, LabelCodes), FileError> {
    check_file(path, spec)?;
    let mut labels = LabelCodes::default();
    let mut budget = Budget::new(spec.max_file_bytes);
    let mut samples = 0;
    let n = csv_file::for_each_row(
        path,
        &spec.label_column,
        true,
        spec.delimiter,
        |row, values, label| {
            if row == 0 {
                if let Some(expected) = shape {
                    if expected != [values.len()] {
                        return Err(shape_error(&[values.len()], expected));
                    }
                }
            }
            if let Some((i, bad)) = BadValue::first(values, spec.max_abs_value) {
                return Err(FileError::BadFeatureValue {
                    feature: i + 1,
                    bad,
                });
            }
            let int = label_check(&mut labels, classes, label, row)?;
            budget.charge(4 * values.len() as u64, int, row)?;
            samples += 1;
            Ok(())
        },
    )?;
    finish(labels, classes, samples, vec![n])
}

fn scan_text(
    path: &Path,
    spec: &DataSpec,
    shape: Option<&[usize]>,
    classes: Option<&[String]>,
) -> Result<(FileCheck, LabelCodes), FileError> {
    check_file(path, spec)?;
    let sample_shape = vec![spec.max_len];
    if let Some(expected) = shape {
        if expected != sample_shape.as_slice() {
            return Err(shape_error(&sample_shape, expected));
        }
    }
    let mut labels = LabelCodes::default();
    let mut budget = Budget::new(spec.max_file_bytes);
    let samples = text_tsv::for_each_line(path, |row, _, label| {
        let int = label_check(&mut labels, classes, label, row)?;
        budget.charge(4 * spec.max_len as u64, int, row)
    })?;
    finish(labels, classes, samples, sample_shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, format: DataFormat) -> DataSpec {
        DataSpec::new(dir, format)
    }

    #[test]
    fn scan_agrees_with_reading_and_checks_rows_against_the_reference() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let csv = d.join("a.csv");
        std::fs::write(&csv, "a,b,label\n1,2,0\n3,4,1\n5,6,1\n").unwrap();
        let s = spec(d, DataFormat::Csv);
        let c = scan_file(&csv, &s, None, None).unwrap();
        assert_eq!(
            c,
            FileCheck {
                samples: 3,
                sample_shape: vec![2]
            }
        );
        let classes: Vec<String> = vec!["x".into(), "y".into()];
        assert!(scan_file(&csv, &s, Some(&[2]), Some(&classes)).is_ok());
        let e = scan_file(&csv, &s, Some(&[3]), None).unwrap_err();
        assert!(
            matches!(e.cause(), FileError::Shape { found, expected } if found == &[2] && expected == &[3]),
            "{e}"
        );
        let e = e.to_string();
        assert!(e.contains("sample shape [2] differs from [3]"), "{e}");
        std::fs::write(&csv, "a,b,label\n1,2,0\n3,4,cat\n5,6,1\n").unwrap();
        let e = scan_file(&csv, &s, None, Some(&classes)).unwrap_err();
        assert!(
            matches!(&e, FileError::AtLine { line: 3, source } if matches!(**source, FileError::NotAClass { classes: 2, .. })),
            "{e}"
        );
        let e = e.to_string();
        assert!(e.starts_with("line 3: label \"cat\""), "{e}");
        std::fs::write(&csv, "a,b,label\n1,2,0\n3,4,-1\n").unwrap();
        let e = scan_file(&csv, &s, None, None).unwrap_err();
        assert!(
            matches!(
                e,
                FileError::NegativeLabel {
                    sample: 1,
                    label: -1
                }
            ),
            "{e}"
        );
        let e = e.to_string();
        assert!(e.contains("negative label -1"), "{e}");

        let txt = d.join("b.txt");
        std::fs::write(&txt, "hello\t0\nworld\t1\n").unwrap();
        let mut s = spec(d, DataFormat::TextTsv);
        s.max_len = 8;
        let c = scan_file(&txt, &s, Some(&[8]), Some(&classes)).unwrap();
        assert_eq!(
            c,
            FileCheck {
                samples: 2,
                sample_shape: vec![8]
            }
        );
        std::fs::write(&txt, "hello\t0\nworld\t5\n").unwrap();
        let e = scan_file(&txt, &s, None, Some(&classes))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("line 2: label \"5\""), "{e}");
    }

    #[test]
    fn many_tiny_text_lines_exceed_the_memory_budget_while_read() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("tiny.txt");
        std::fs::write(&p, "a\t0\n".repeat(10_000)).unwrap();
        let mut s = spec(t.path(), DataFormat::TextTsv);
        // 10,000 samples of 32 ids (128 bytes) + 8: 1.36 MB, over a 1 MiB budget.
        s.max_file_bytes = 1 << 20;
        let e = scan_file(&p, &s, None, None).unwrap_err();
        assert!(matches!(e.cause(), FileError::Budget { .. }), "{e}");
        assert!(e.to_string().contains("data.max_file_mb"), "{e}");
        let e = read_file(&p, &s).unwrap_err();
        assert!(matches!(e.cause(), FileError::Budget { .. }), "{e}");
        assert!(e.to_string().contains("data.max_file_mb"), "{e}");
        let ds = super::super::load_dataset(&DataSpec {
            max_file_bytes: 1 << 20,
            ..spec(t.path(), DataFormat::TextTsv)
        });
        assert!(ds.is_err());
        s.max_file_bytes = 2 << 20;
        assert_eq!(scan_file(&p, &s, None, None).unwrap().samples, 10_000);
    }

    /// Issue 18 break 5: a finite but absurd value (3e38) is refused with a
    /// reason naming the value and where it is; the limit is configurable.
    #[test]
    fn absurd_magnitudes_are_refused_naming_value_and_place() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let csv = d.join("huge.csv");
        std::fs::write(&csv, "a,b,label\n1,2,0\n3,3e38,1\n").unwrap();
        let mut s = spec(d, DataFormat::Csv);
        let e = scan_file(&csv, &s, None, None).unwrap_err().to_string();
        assert!(e.starts_with("line 3: feature 2 has the value 3e38"), "{e}");
        assert!(e.contains("data.max_abs_value"), "{e}");
        let e = read_file(&csv, &s).unwrap_err();
        assert!(
            matches!(
                e,
                FileError::BadSampleValue {
                    sample: 1,
                    bad: BadValue::TooLarge { .. }
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("sample 1 has the value 3e38"), "{e}");
        s.max_abs_value = f32::MAX;
        assert_eq!(scan_file(&csv, &s, None, None).unwrap().samples, 2);

        // Float safetensors alike; u8 features cannot exceed the limit.
        use safetensors::tensor::TensorView;
        use safetensors::Dtype;
        let x: Vec<u8> = [0.5f32, 1.0, -2.0, -3e38]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let y: Vec<u8> = [0i64, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            ("x", TensorView::new(Dtype::F32, vec![2, 2], &x).unwrap()),
            ("y", TensorView::new(Dtype::I64, vec![2], &y).unwrap()),
        ];
        let st = d.join("huge.safetensors");
        std::fs::write(&st, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
        let s = spec(d, DataFormat::Safetensors);
        let e = scan_file(&st, &s, None, None).unwrap_err().to_string();
        assert!(e.contains("sample 1 has the value -3e38"), "{e}");
    }
}
