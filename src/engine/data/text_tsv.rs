//! `text-tsv`: UTF-8 files of `text<TAB>label` lines, as THUCNews and the seed
//! lay them out (`train.txt`, `dev.txt`, `test.txt`, `class.txt`). A label is a
//! class index (into `class.txt`) or a class name. Lines are trimmed and empty
//! lines skipped; the label is what follows the last TAB. The vocabulary comes
//! from a checkpoint, from `data.vocab`, or is built from the training split;
//! each text becomes `data.max_len` token ids.

use std::path::Path;

use super::vocab::Vocab;
use super::{
    infer_classes, list_files, read_class_file, relative_name, resolve_labels, split_indices,
    DataError, DataSpec, Dataset, Features, FileError, FileSamples, RawLabels, SkippedFile,
};

/// File names in a text data folder that are not data.
pub const RESERVED: [&str; 3] = ["class.txt", "classes.txt", "vocab.txt"];

/// The texts and labels of one file.
#[derive(Debug, Clone)]
pub struct TextFile {
    pub texts: Vec<String>,
    pub labels: RawLabels,
}

/// Reads and checks one file; the error is a reason fit for a user.
pub fn read(path: &Path) -> Result<TextFile, FileError> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut texts = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some((content, label)) = line.rsplit_once('\t') else {
            return Err(format!(
                "line {}: no TAB between text and label (expected `text<TAB>label`)",
                i + 1
            )
            .into());
        };
        let label = label.trim();
        if label.is_empty() {
            return Err(format!("line {}: empty label", i + 1).into());
        }
        texts.push(content.to_string());
        labels.push(label.to_string());
    }
    if texts.is_empty() {
        return Err("the file holds no `text<TAB>label` lines".into());
    }
    let indices: Option<Vec<i64>> = labels.iter().map(|l| l.parse::<i64>().ok()).collect();
    let labels = match indices {
        Some(v) => {
            if let Some((i, l)) = v.iter().enumerate().find(|(_, l)| **l < 0) {
                return Err(format!("sample {i} has negative label {l}").into());
            }
            RawLabels::Index(v)
        }
        None => RawLabels::Name(labels),
    };
    Ok(TextFile { texts, labels })
}

/// One file as samples of token ids, with `vocab` (every token unknown without one).
pub fn read_samples(path: &Path, spec: &DataSpec) -> Result<FileSamples, FileError> {
    let file = read(path)?;
    let empty;
    let vocab = match &spec.vocab {
        Some(v) => v,
        None => {
            empty = Vocab::build(std::iter::empty(), spec.tokenizer, 0, 1);
            &empty
        }
    };
    let mut ids = Vec::with_capacity(file.texts.len() * spec.max_len);
    for t in &file.texts {
        ids.extend(
            vocab
                .encode(t, spec.tokenizer, spec.max_len)
                .into_iter()
                .map(|i| i as f32),
        );
    }
    Ok(FileSamples {
        features: Features::F32(ids),
        labels: file.labels,
        sample_shape: vec![spec.max_len],
    })
}

/// Loads a text data folder: reads every file (skipping bad ones), resolves
/// labels, picks the vocabulary and turns every text into token ids.
pub fn load(spec: &DataSpec) -> Result<Dataset, DataError> {
    let paths = list_files(spec)?;
    let mut skipped = Vec::new();
    let mut good: Vec<(String, TextFile)> = Vec::new();
    for path in &paths {
        let name = relative_name(&spec.dir, path);
        match read(path) {
            Ok(f) => good.push((name, f)),
            Err(reason) => {
                tracing::warn!(file = %path.display(), %reason, "skipping data file");
                skipped.push(SkippedFile {
                    file: name,
                    reason: reason.into(),
                });
            }
        }
    }
    if good.is_empty() {
        return Err(DataError::NoData {
            dir: spec.dir.clone(),
            reason: if paths.is_empty() {
                "no *.txt or *.tsv files with `text<TAB>label` lines".into()
            } else {
                format!("all {} files were rejected", paths.len())
            },
        });
    }
    let classes = match (&spec.classes, read_class_file(&spec.dir)?) {
        (Some(c), _) => c.clone(),
        (None, Some(c)) => c,
        (None, None) => infer_classes(good.iter().map(|(_, f)| &f.labels)),
    };
    let mut texts: Vec<String> = Vec::new();
    let mut labels = Vec::new();
    let mut origins = Vec::new();
    let mut files = Vec::new();
    for (name, f) in good {
        let resolved = match resolve_labels(&f.labels, &classes) {
            Ok(l) => l,
            Err(reason) => {
                tracing::warn!(file = %name, %reason, "skipping data file");
                skipped.push(SkippedFile {
                    file: name,
                    reason: reason.into(),
                });
                continue;
            }
        };
        let file_idx = files.len() as u32;
        origins.extend((0..resolved.len() as u32).map(|i| (file_idx, i)));
        labels.extend(resolved);
        texts.extend(f.texts);
        files.push(name);
    }
    if texts.is_empty() {
        return Err(DataError::NoData {
            dir: spec.dir.clone(),
            reason: "every file has labels outside the class list".into(),
        });
    }
    let vocab = match (&spec.vocab, &spec.vocab_file) {
        (Some(v), _) => v.clone(),
        (None, Some(path)) => Vocab::read(path).map_err(DataError::Vocab)?,
        (None, None) => {
            let split = split_indices(&origins, &files, spec);
            Vocab::build(
                split.train.iter().map(|&i| texts[i].as_str()),
                spec.tokenizer,
                spec.max_vocab,
                spec.min_freq,
            )
        }
    };
    let mut ids = Vec::with_capacity(texts.len() * spec.max_len);
    for t in &texts {
        ids.extend(
            vocab
                .encode(t, spec.tokenizer, spec.max_len)
                .into_iter()
                .map(|i| i as f32),
        );
    }
    skipped.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(Dataset {
        features: Features::F32(ids),
        labels,
        sample_shape: vec![spec.max_len],
        classes,
        origins,
        files,
        skipped,
        vocab: Some(vocab),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_labels_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "\u{feff}中国队夺冠\t0\n\n  股市 上涨\t1  \n").unwrap();
        let f = read(&p).unwrap();
        assert_eq!(f.texts, vec!["中国队夺冠", "股市 上涨"]);
        assert_eq!(f.labels, RawLabels::Index(vec![0, 1]));
        std::fs::write(&p, "a\tsports\nb\tfinance\n").unwrap();
        assert_eq!(
            read(&p).unwrap().labels,
            RawLabels::Name(vec!["sports".into(), "finance".into()])
        );
        std::fs::write(&p, "a\t0\nno tab here\n").unwrap();
        assert!(read(&p).unwrap_err().contains("line 2: no TAB"));
        std::fs::write(&p, [0x61, 0x09, 0x30, 0x0a, 0xff, 0xfe]).unwrap();
        assert!(read(&p).unwrap_err().contains("not UTF-8"));
    }
}
