//! CSV files: a header row, one label column, every other column a numeric feature.
//! Rows are parsed one at a time into one reused record; features go into one
//! contiguous `f32` buffer and labels into `u32` codes, with the file's memory
//! budget checked row by row.

use std::path::Path;

use super::labels::{quote, Budget, LabelCodes, QUOTE_BYTES};
use super::{Features, FileError, FileSamples};

/// Most header names quoted in a reason.
const MAX_LISTED_HEADERS: usize = 16;

/// Reads one CSV file; the error is a reason fit for a user.
#[cfg_attr(not(test), allow(dead_code))]
pub fn read(path: &Path, label_column: &str, delimiter: u8) -> Result<FileSamples, FileError> {
    read_limited(path, label_column, delimiter, u64::MAX)
}

/// [`read`], refusing a file whose decoded samples take more than `max_bytes`.
pub(super) fn read_limited(
    path: &Path,
    label_column: &str,
    delimiter: u8,
    max_bytes: u64,
) -> Result<FileSamples, FileError> {
    let mut features = Vec::new();
    let mut labels = LabelCodes::default();
    let mut budget = Budget::new(max_bytes);
    let n_features = for_each_row(path, label_column, true, delimiter, |row, values, label| {
        let int = labels.push(label)?;
        budget.charge(4 * values.len() as u64, int, row)?;
        features.extend_from_slice(values);
        Ok(())
    })?;
    features.shrink_to_fit();
    Ok(FileSamples {
        features: Features::F32(features),
        labels: labels.finish(),
        sample_shape: vec![n_features],
    })
}

/// Parses the rows of a CSV file one by one and hands each (row index, feature
/// values, label text) to `f`, checking the header, field counts, numbers and
/// finiteness on the way. Returns the number of features per row. A file
/// without the label column is an error when `required`; otherwise every
/// column is a feature and the label text is empty (`predict`'s inputs).
pub fn for_each_row(
    path: &Path,
    label_column: &str,
    required: bool,
    delimiter: u8,
    mut f: impl FnMut(usize, &[f32], &str) -> Result<(), FileError>,
) -> Result<usize, FileError> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(FileError::CsvOpen)?;
    let headers = reader.headers().map_err(FileError::CsvHeader)?.clone();
    let found = headers.iter().position(|h| h == label_column);
    let label_idx = match found {
        None if !required => None,
        found => Some(found.ok_or_else(|| {
            let mut listed: Vec<String> = headers
                .iter()
                .take(MAX_LISTED_HEADERS)
                .map(|h| {
                    if h.len() > 64 {
                        quote(h)
                    } else {
                        h.to_string()
                    }
                })
                .collect();
            if headers.len() > MAX_LISTED_HEADERS {
                listed.push(format!("… {} more", headers.len() - MAX_LISTED_HEADERS));
            }
            FileError::NoLabelColumn {
                column: quote(label_column),
                headers: listed,
            }
        })?),
    };
    let n_features = headers.len() - usize::from(label_idx.is_some());
    if n_features == 0 {
        return Err(FileError::NoFeatureColumns);
    }
    let mut record = csv::StringRecord::new();
    let mut values = Vec::with_capacity(n_features);
    let mut row = 0usize;
    loop {
        let line = row + 2;
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(source) => return Err(FileError::CsvRecord { line, source }),
        }
        if record.len() != headers.len() {
            return Err(FileError::FieldCount {
                line,
                got: record.len(),
                expected: headers.len(),
            });
        }
        values.clear();
        let mut label = "";
        for (col, field) in record.iter().enumerate() {
            if Some(col) == label_idx {
                if field.is_empty() {
                    return Err(FileError::EmptyLabel { line });
                }
                label = field;
                continue;
            }
            let v: f32 = field.parse().map_err(|_| FileError::NotANumber {
                line,
                column: quote(&headers[col]),
                value: quote(field),
            })?;
            if !v.is_finite() {
                return Err(FileError::NonFiniteField {
                    line,
                    column: quote(&headers[col]),
                    value: if field.len() > QUOTE_BYTES {
                        quote(field)
                    } else {
                        field.to_string()
                    },
                });
            }
            values.push(v);
        }
        f(row, &values, label).map_err(|e| e.at_line(line))?;
        row += 1;
    }
    Ok(n_features)
}

#[cfg(test)]
mod tests {
    use super::super::RawLabels;
    use super::*;
    use std::io::Write;

    fn write(content: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content.as_bytes()).unwrap();
        f
    }

    #[test]
    fn reads_features_and_index_labels() {
        let f = write("a,label,b\n1,0,2\n3,1,4\n");
        let s = read(f.path(), "label", b',').unwrap();
        assert_eq!(s.features, Features::F32(vec![1.0, 2.0, 3.0, 4.0]));
        assert_eq!(s.labels, RawLabels::Index(vec![0, 1]));
        assert_eq!(s.sample_shape, vec![2]);
    }

    #[test]
    fn name_labels_and_errors() {
        let f = write("x;y;class\n1;2;cat\n");
        let s = read(f.path(), "class", b';').unwrap();
        assert_eq!(s.labels, RawLabels::Name(vec!["cat".into()]));
        let f = write("a,label\nfoo,1\n");
        let e = read(f.path(), "label", b',').unwrap_err();
        assert!(matches!(e, FileError::NotANumber { line: 2, .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "line 2, column \"a\": \"foo\" is not a number"
        );
        let f = write("a,label\nNaN,1\n");
        let e = read(f.path(), "label", b',').unwrap_err();
        assert!(
            matches!(e, FileError::NonFiniteField { line: 2, .. }),
            "{e}"
        );
        assert_eq!(e.to_string(), "line 2, column \"a\": non-finite value NaN");
        let f = write("a,b\n1,2\n");
        let e = read(f.path(), "label", b',').unwrap_err();
        assert!(matches!(e, FileError::NoLabelColumn { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "no label column \"label\" in the header (a, b)"
        );
    }

    #[test]
    fn a_huge_field_is_quoted_short_and_the_budget_stops_a_big_file() {
        let f = write(&format!("a,label\n{},1\n", "9".repeat(2 << 20)));
        let e = read(f.path(), "label", b',').unwrap_err().to_string();
        assert!(e.len() < 300 && e.contains("bytes)"), "{}", e.len());
        let mut text = String::from("a,label\n");
        for i in 0..1000 {
            text.push_str(&format!("{i},{}\n", i % 2));
        }
        let f = write(&text);
        // 1000 rows of 4 + 8 bytes: fits in 12,000 bytes, not in 11,000.
        assert_eq!(
            read_limited(f.path(), "label", b',', 12_000).unwrap().len(),
            1000
        );
        let e = read_limited(f.path(), "label", b',', 11_000).unwrap_err();
        assert!(
            matches!(e.cause(), FileError::Budget { limit: 11_000, .. }),
            "{e}"
        );
        let e = e.to_string();
        assert!(
            e.contains("data.max_file_mb") && e.starts_with("line "),
            "{e}"
        );
    }
}
