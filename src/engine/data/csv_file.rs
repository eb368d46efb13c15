//! CSV files: a header row, one label column, every other column a numeric feature.

use std::path::Path;

use super::{Features, FileError, FileSamples, RawLabels};

/// Reads one CSV file; the error is a reason fit for a user.
pub fn read(path: &Path, label_column: &str, delimiter: u8) -> Result<FileSamples, FileError> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| format!("cannot read: {e}"))?;
    let headers = reader
        .headers()
        .map_err(|e| format!("cannot read the header row: {e}"))?
        .clone();
    let label_idx = headers
        .iter()
        .position(|h| h == label_column)
        .ok_or_else(|| {
            format!(
                "no label column {label_column:?} in the header ({})",
                headers.iter().collect::<Vec<_>>().join(", ")
            )
        })?;
    let n_features = headers.len() - 1;
    if n_features == 0 {
        return Err("no feature columns besides the label".into());
    }
    let mut features = Vec::new();
    let mut names = Vec::new();
    for (row, record) in reader.records().enumerate() {
        let line = row + 2;
        let record = record.map_err(|e| format!("line {line}: {e}"))?;
        if record.len() != headers.len() {
            return Err(format!(
                "line {line} has {} fields, the header has {}",
                record.len(),
                headers.len()
            )
            .into());
        }
        for (col, field) in record.iter().enumerate() {
            if col == label_idx {
                if field.is_empty() {
                    return Err(format!("line {line}: empty label").into());
                }
                names.push(field.to_string());
                continue;
            }
            let v: f32 = field.parse().map_err(|_| {
                format!(
                    "line {line}, column {:?}: {field:?} is not a number",
                    &headers[col]
                )
            })?;
            if !v.is_finite() {
                return Err(format!(
                    "line {line}, column {:?}: non-finite value {field}",
                    &headers[col]
                )
                .into());
            }
            features.push(v);
        }
    }
    // Labels that are all integers are class indices; otherwise class names.
    let as_index: Option<Vec<i64>> = names.iter().map(|s| s.parse::<i64>().ok()).collect();
    let labels = match as_index {
        Some(v) => RawLabels::Index(v),
        None => RawLabels::Name(names),
    };
    Ok(FileSamples {
        features: Features::F32(features),
        labels,
        sample_shape: vec![n_features],
    })
}

#[cfg(test)]
mod tests {
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
        assert!(read(f.path(), "label", b',')
            .unwrap_err()
            .contains("not a number"));
        let f = write("a,label\nNaN,1\n");
        assert!(read(f.path(), "label", b',')
            .unwrap_err()
            .contains("non-finite"));
        let f = write("a,b\n1,2\n");
        assert!(read(f.path(), "label", b',')
            .unwrap_err()
            .contains("no label column"));
    }
}
