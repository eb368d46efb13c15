//! Compact labels while a file is parsed, and the memory budget of one file.
//! Each row's label is a `u32` code into the file's distinct label texts (no
//! `String` per row); a file's decoded samples may take at most
//! `data.max_file_mb` of memory, checked row by row so that a small file that
//! decodes into a huge dataset is refused while it is read, not after.

use std::collections::HashMap;

use super::{FileError, RawLabels};

/// Most distinct labels one file may hold.
pub(super) const MAX_DISTINCT_LABELS: usize = 65_536;
/// Memory charged per sample for its label besides its features: an `i64`
/// index, or a `String` (pointer, length, capacity and the heap block) for a name.
const INDEX_LABEL_BYTES: u64 = 8;
const NAME_LABEL_BYTES: u64 = 48;

/// Longest piece of input quoted in a reason (bytes).
pub(super) const QUOTE_BYTES: usize = 64;

/// `s` quoted for a reason, cut to [`QUOTE_BYTES`].
pub(super) fn quote(s: &str) -> String {
    if s.len() <= QUOTE_BYTES {
        return format!("{s:?}");
    }
    let mut end = QUOTE_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

/// Distinct label texts and one code per row.
#[derive(Debug, Default)]
pub(super) struct LabelCodes {
    index: HashMap<String, u32>,
    /// Distinct texts, with the first row that has each.
    names: Vec<(String, usize)>,
    codes: Vec<u32>,
    /// Whether the code's text is an integer.
    is_int: Vec<bool>,
}

impl LabelCodes {
    /// Adds the label of the next row; returns whether it is an integer.
    pub(super) fn push(&mut self, label: &str) -> Result<bool, FileError> {
        let code = self.code_of(label)?;
        self.codes.push(code);
        Ok(self.is_int[code as usize])
    }

    /// Notes a label without keeping a code per row (checks only).
    pub(super) fn note(&mut self, label: &str, row: usize) -> Result<bool, FileError> {
        let before = self.names.len();
        let code = self.code_of(label)?;
        if self.names.len() > before {
            self.names[code as usize].1 = row;
        }
        Ok(self.is_int[code as usize])
    }

    fn code_of(&mut self, label: &str) -> Result<u32, FileError> {
        if let Some(&c) = self.index.get(label) {
            return Ok(c);
        }
        if self.names.len() >= MAX_DISTINCT_LABELS {
            return Err(FileError::TooManyLabels);
        }
        let c = self.names.len() as u32;
        self.index.insert(label.to_string(), c);
        self.names.push((label.to_string(), self.codes.len()));
        self.is_int.push(label.parse::<i64>().is_ok());
        Ok(c)
    }

    /// Whether every label seen is an integer (class indices).
    pub(super) fn all_int(&self) -> bool {
        self.is_int.iter().all(|&b| b)
    }

    /// The labels as the reader hands them on: class indices when every label
    /// is an integer, else class names.
    pub(super) fn finish(self) -> RawLabels {
        if self.all_int() {
            let values: Vec<i64> = self
                .names
                .iter()
                .map(|(n, _)| n.parse::<i64>().unwrap_or(-1))
                .collect();
            RawLabels::Index(self.codes.iter().map(|&c| values[c as usize]).collect())
        } else {
            RawLabels::Name(
                self.codes
                    .iter()
                    .map(|&c| self.names[c as usize].0.clone())
                    .collect(),
            )
        }
    }

    /// The distinct labels (one each), as [`LabelCodes::finish`] would type them.
    pub(super) fn distinct(&self) -> RawLabels {
        if self.all_int() {
            RawLabels::Index(
                self.names
                    .iter()
                    .map(|(n, _)| n.parse::<i64>().unwrap_or(-1))
                    .collect(),
            )
        } else {
            RawLabels::Name(self.names.iter().map(|(n, _)| n.clone()).collect())
        }
    }

    /// Refuses negative class indices (when every label is an integer).
    pub(super) fn check_not_negative(&self) -> Result<(), FileError> {
        if !self.all_int() {
            return Ok(());
        }
        for (name, row) in &self.names {
            let l: i64 = name.parse().unwrap_or(0);
            if l < 0 {
                return Err(FileError::NegativeLabel {
                    sample: *row,
                    label: l,
                });
            }
        }
        Ok(())
    }

    /// Checks the distinct labels against `classes` the way
    /// [`super::resolve_labels`] resolves them, naming the first row of a bad one.
    pub(super) fn check_against(&self, classes: &[String]) -> Result<(), FileError> {
        let all_int = self.all_int();
        for (name, row) in &self.names {
            if all_int {
                let l: i64 = name.parse().unwrap_or(-1);
                if l < 0 {
                    return Err(FileError::NegativeLabel {
                        sample: *row,
                        label: l,
                    });
                }
                if (l as u64) >= classes.len() as u64 {
                    return Err(FileError::LabelOutOfRange {
                        sample: *row,
                        label: l,
                        classes: classes.len(),
                    });
                }
            } else if !classes.iter().any(|c| c == name) {
                return Err(FileError::UnknownClass {
                    sample: *row,
                    label: quote(name),
                });
            }
        }
        Ok(())
    }
}

/// Whether `label` cannot be a class of `classes` as an index nor as a name:
/// such a row is refused at once while checking.
pub(super) fn impossible(label: &str, classes: &[String]) -> bool {
    let as_index = label
        .parse::<i64>()
        .is_ok_and(|l| l >= 0 && (l as u64) < classes.len() as u64);
    !as_index && !classes.iter().any(|c| c == label)
}

/// The memory budget of one file's decoded samples.
#[derive(Debug)]
pub(super) struct Budget {
    limit: u64,
    used: u64,
}

impl Budget {
    /// A budget of `limit` bytes (`data.max_file_mb`).
    pub(super) fn new(limit: u64) -> Self {
        Self { limit, used: 0 }
    }

    /// Charges one sample of `feature_bytes` with an integer or named label.
    pub(super) fn charge(
        &mut self,
        feature_bytes: u64,
        int_label: bool,
        row: usize,
    ) -> Result<(), FileError> {
        let label = if int_label {
            INDEX_LABEL_BYTES
        } else {
            NAME_LABEL_BYTES
        };
        self.used = self.used.saturating_add(feature_bytes + label);
        if self.used > self.limit {
            return Err(FileError::Budget {
                limit: self.limit,
                sample: row,
            });
        }
        Ok(())
    }
}

/// Hands freed heap memory back to the system (after a large file).
pub(super) fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's heap to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_become_indices_or_names() {
        let mut l = LabelCodes::default();
        for s in ["1", "0", "1"] {
            assert!(l.push(s).unwrap());
        }
        assert_eq!(l.finish(), RawLabels::Index(vec![1, 0, 1]));
        let mut l = LabelCodes::default();
        for s in ["cat", "0", "cat"] {
            l.push(s).unwrap();
        }
        assert_eq!(
            l.finish(),
            RawLabels::Name(vec!["cat".into(), "0".into(), "cat".into()])
        );
    }

    #[test]
    fn checks_name_the_first_bad_row() {
        let classes: Vec<String> = vec!["a".into(), "b".into()];
        let mut l = LabelCodes::default();
        for (i, s) in ["0", "1", "2", "2"].iter().enumerate() {
            l.note(s, i).unwrap();
        }
        let e = l.check_against(&classes).unwrap_err();
        assert!(
            matches!(
                e,
                FileError::LabelOutOfRange {
                    sample: 2,
                    label: 2,
                    classes: 2
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("sample 2 has label 2"), "{e}");
        assert!(impossible("c", &classes) && impossible("2", &classes));
        assert!(!impossible("b", &classes) && !impossible("1", &classes));
    }

    #[test]
    fn budget_refuses_past_the_limit() {
        let mut b = Budget::new(100);
        for row in 0..4 {
            b.charge(16, true, row).unwrap();
        }
        let e = b.charge(16, true, 4).unwrap_err();
        assert!(
            matches!(
                e,
                FileError::Budget {
                    limit: 100,
                    sample: 4
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("data.max_file_mb"));
    }
}
