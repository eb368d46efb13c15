//! `text-tsv`: UTF-8 files of `text<TAB>label` lines, as THUCNews and the seed
//! lay them out (`train.txt`, `dev.txt`, `test.txt`, `class.txt`). A label is a
//! class index (into `class.txt`) or a class name. Lines are trimmed and empty
//! lines skipped; the label is what follows the last TAB. The vocabulary comes
//! from a checkpoint, from `data.vocab`, or is built from the training split;
//! each text becomes `data.max_len` token ids.

use std::io::BufRead;
use std::path::Path;

use super::labels::{release_memory, Budget, LabelCodes};
use super::vocab::Vocab;
use super::{
    check_file, infer_classes, list_files, read_class_file, relative_name, resolve_labels,
    split_indices, DataError, DataSpec, Dataset, Features, FileError, FileSamples, RawLabels,
    SkippedFile,
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
    let mut texts = Vec::new();
    let mut labels = LabelCodes::default();
    for_each_line(path, |_, text, label| {
        labels.push(label)?;
        texts.push(text.to_string());
        Ok(())
    })?;
    Ok(TextFile {
        texts,
        labels: finish_labels(labels)?,
    })
}

/// The labels of a file, refusing negative class indices.
fn finish_labels(labels: LabelCodes) -> Result<RawLabels, FileError> {
    let labels = labels.finish();
    if let RawLabels::Index(v) = &labels {
        if let Some((i, l)) = v.iter().enumerate().find(|(_, l)| **l < 0) {
            return Err(FileError::NegativeLabel {
                sample: i,
                label: *l,
            });
        }
    }
    Ok(labels)
}

/// Reads the `text<TAB>label` lines of a file one at a time through one reused
/// buffer (lines trimmed, empty ones skipped, a leading BOM dropped) and hands
/// each (sample index, text, label) to `f`. Returns the number of samples; a
/// file without any is an error.
pub(super) fn for_each_line(
    path: &Path,
    mut f: impl FnMut(usize, &str, &str) -> Result<(), FileError>,
) -> Result<usize, FileError> {
    let file = std::fs::File::open(path).map_err(FileError::Io)?;
    let mut reader = std::io::BufReader::with_capacity(64 << 10, file);
    let mut buf = Vec::new();
    let (mut offset, mut line_no, mut samples) = (0usize, 0usize, 0usize);
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(FileError::Io)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let text = std::str::from_utf8(&buf).map_err(|e| FileError::NotUtf8 {
            offset: offset + e.valid_up_to(),
        })?;
        offset += n;
        let text = if line_no == 1 {
            text.strip_prefix('\u{feff}').unwrap_or(text)
        } else {
            text
        };
        let line = text.trim();
        if line.is_empty() {
            continue;
        }
        let Some((content, label)) = line.rsplit_once('\t') else {
            return Err(FileError::NoTab { line: line_no });
        };
        let label = label.trim();
        if label.is_empty() {
            return Err(FileError::EmptyLabel { line: line_no });
        }
        f(samples, content, label).map_err(|e| e.at_line(line_no))?;
        samples += 1;
    }
    if samples == 0 {
        return Err(FileError::NoTextLines);
    }
    Ok(samples)
}

/// One file as samples of token ids, with `vocab` (every token unknown without
/// one), encoded line by line; refused once its ids would take more than
/// `data.max_file_mb`.
pub fn read_samples(path: &Path, spec: &DataSpec) -> Result<FileSamples, FileError> {
    let empty;
    let vocab = match &spec.vocab {
        Some(v) => v,
        None => {
            empty = Vocab::build(std::iter::empty(), spec.tokenizer, 0, 1);
            &empty
        }
    };
    let mut ids = Vec::new();
    let mut labels = LabelCodes::default();
    let mut budget = Budget::new(spec.max_file_bytes);
    for_each_line(path, |row, text, label| {
        let int = labels.push(label)?;
        budget.charge(4 * spec.max_len as u64, int, row)?;
        ids.extend(
            vocab
                .encode(text, spec.tokenizer, spec.max_len)
                .into_iter()
                .map(|i| i as f32),
        );
        Ok(())
    })?;
    ids.shrink_to_fit();
    Ok(FileSamples {
        features: Features::F32(ids),
        labels: finish_labels(labels)?,
        sample_shape: vec![spec.max_len],
    })
}

/// The texts of many files in one buffer: no `String` per line.
#[derive(Debug, Default)]
struct Packed {
    text: String,
    ends: Vec<usize>,
}

impl Packed {
    fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(self.text.len());
    }

    fn truncate(&mut self, n: usize) {
        self.ends.truncate(n);
        self.text.truncate(self.ends.last().copied().unwrap_or(0));
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.text[start..self.ends[i]]
    }
}

/// Loads a text data folder: reads every file (skipping bad ones), resolves
/// labels, picks the vocabulary and turns every text into token ids.
pub fn load(spec: &DataSpec) -> Result<Dataset, DataError> {
    let paths = list_files(spec)?;
    let mut skipped = Vec::new();
    let mut texts = Packed::default();
    // Per good file: its name, its first text and its labels.
    let mut good: Vec<(String, usize, RawLabels)> = Vec::new();
    for path in &paths {
        let name = relative_name(&spec.dir, path);
        let first = texts.len();
        let mut labels = LabelCodes::default();
        let mut budget = Budget::new(spec.max_file_bytes);
        let read = check_file(path, spec)
            .and_then(|_| {
                for_each_line(path, |row, text, label| {
                    let int = labels.push(label)?;
                    budget.charge(4 * spec.max_len as u64, int, row)?;
                    texts.push(text);
                    Ok(())
                })
            })
            .and_then(|_| finish_labels(std::mem::take(&mut labels)));
        match read {
            Ok(l) => good.push((name, first, l)),
            Err(reason) => {
                texts.truncate(first);
                tracing::warn!(file = %path.display(), %reason, "skipping data file");
                skipped.push(SkippedFile {
                    file: name,
                    reason: reason.to_string(),
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
        (None, None) => infer_classes(good.iter().map(|(_, _, l)| l)),
    };
    // Samples kept, as ranges of `texts`.
    let mut kept: Vec<(usize, usize)> = Vec::new();
    let mut labels = Vec::new();
    let mut origins = Vec::new();
    let mut files = Vec::new();
    for (name, first, raw) in good {
        let resolved = match resolve_labels(&raw, &classes) {
            Ok(l) => l,
            Err(reason) => {
                tracing::warn!(file = %name, %reason, "skipping data file");
                skipped.push(SkippedFile {
                    file: name,
                    reason: reason.to_string(),
                });
                continue;
            }
        };
        let file_idx = files.len() as u32;
        origins.extend((0..resolved.len() as u32).map(|i| (file_idx, i)));
        kept.push((first, resolved.len()));
        labels.extend(resolved);
        files.push(name);
    }
    if labels.is_empty() {
        return Err(DataError::NoData {
            dir: spec.dir.clone(),
            reason: "every file has labels outside the class list".into(),
        });
    }
    let sample_text: Vec<usize> = kept
        .iter()
        .flat_map(|&(first, n)| first..first + n)
        .collect();
    let vocab = match (&spec.vocab, &spec.vocab_file) {
        (Some(v), _) => v.clone(),
        (None, Some(path)) => Vocab::read(path).map_err(DataError::Vocab)?,
        (None, None) => {
            let split = split_indices(&origins, &files, spec);
            Vocab::build(
                split.train.iter().map(|&i| texts.get(sample_text[i])),
                spec.tokenizer,
                spec.max_vocab,
                spec.min_freq,
            )
        }
    };
    let mut ids = Vec::with_capacity(sample_text.len() * spec.max_len);
    for &t in &sample_text {
        ids.extend(
            vocab
                .encode(texts.get(t), spec.tokenizer, spec.max_len)
                .into_iter()
                .map(|i| i as f32),
        );
    }
    drop(texts);
    drop(sample_text);
    release_memory();
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
        let e = read(&p).unwrap_err();
        assert!(matches!(e, FileError::NoTab { line: 2 }), "{e}");
        assert!(e.to_string().contains("line 2: no TAB"));
        std::fs::write(&p, [0x61, 0x09, 0x30, 0x0a, 0xff, 0xfe]).unwrap();
        let e = read(&p).unwrap_err();
        assert!(matches!(e, FileError::NotUtf8 { offset: 4 }), "{e}");
        assert!(e.to_string().contains("not UTF-8"));
    }
}
