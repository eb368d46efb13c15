//! Tokens and the vocabulary of text data, built as the seed built its
//! `vocab.pkl`: tokens of the training texts by descending count (ties in order
//! of first appearance), at most `max_size` of them with at least `min_freq`
//! occurrences, then `<UNK>` and `<PAD>` as the last two entries. A text becomes
//! exactly `max_len` ids: truncated, or padded with `<PAD>` at the end.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{FileError, TokenizerKind};

/// The token that stands for any token outside the vocabulary.
pub const UNK: &str = "<UNK>";
/// The token that fills a text up to `max_len`.
pub const PAD: &str = "<PAD>";

/// The tokens of `text`: its characters (`char`, works for Chinese) or its
/// whitespace-separated words (`whitespace`).
pub fn tokenize(text: &str, kind: TokenizerKind) -> Vec<&str> {
    match kind {
        TokenizerKind::Char => text
            .char_indices()
            .map(|(i, c)| &text[i..i + c.len_utf8()])
            .collect(),
        TokenizerKind::Whitespace => text.split_whitespace().collect(),
    }
}

/// The serialised form: the tokens in id order plus the two special ids.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VocabRepr {
    tokens: Vec<String>,
    pad: usize,
    unk: usize,
}

/// A vocabulary: token <-> id, with padding and unknown tokens. Stored in
/// checkpoint metadata so evaluation and the daemon tokenise as training did.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "VocabRepr", into = "VocabRepr")]
pub struct Vocab {
    tokens: Vec<String>,
    pad: usize,
    unk: usize,
    index: HashMap<String, u32>,
}

impl PartialEq for Vocab {
    fn eq(&self, other: &Self) -> bool {
        self.tokens == other.tokens && self.pad == other.pad && self.unk == other.unk
    }
}

impl From<Vocab> for VocabRepr {
    fn from(v: Vocab) -> Self {
        Self {
            tokens: v.tokens,
            pad: v.pad,
            unk: v.unk,
        }
    }
}

impl TryFrom<VocabRepr> for Vocab {
    type Error = FileError;
    fn try_from(r: VocabRepr) -> Result<Self, FileError> {
        Vocab::new(r.tokens, r.pad, r.unk)
    }
}

impl Vocab {
    /// A vocabulary of `tokens` (in id order) with the given padding and unknown ids.
    pub fn new(tokens: Vec<String>, pad: usize, unk: usize) -> Result<Self, FileError> {
        if pad >= tokens.len() || unk >= tokens.len() || pad == unk {
            return Err(FileError::VocabIds {
                pad,
                unk,
                tokens: tokens.len(),
            });
        }
        let mut index = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            if index.insert(t.clone(), i as u32).is_some() {
                return Err(FileError::DuplicateToken { token: t.clone() });
            }
        }
        Ok(Self {
            tokens,
            pad,
            unk,
            index,
        })
    }

    /// Builds the vocabulary of `texts` as the seed does (see the module docs).
    pub fn build<'a>(
        texts: impl IntoIterator<Item = &'a str>,
        kind: TokenizerKind,
        max_size: usize,
        min_freq: usize,
    ) -> Self {
        let mut count: HashMap<&'a str, (usize, usize)> = HashMap::new();
        for text in texts {
            for tok in tokenize(text, kind) {
                if tok == UNK || tok == PAD {
                    continue;
                }
                let next = count.len();
                count.entry(tok).or_insert((0, next)).0 += 1;
            }
        }
        let mut list: Vec<(&str, usize, usize)> = count
            .into_iter()
            .filter(|(_, (n, _))| *n >= min_freq.max(1))
            .map(|(t, (n, first))| (t, n, first))
            .collect();
        list.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
        list.truncate(max_size);
        let mut tokens: Vec<String> = list.into_iter().map(|(t, _, _)| t.to_string()).collect();
        let unk = tokens.len();
        tokens.push(UNK.to_string());
        tokens.push(PAD.to_string());
        let pad = unk + 1;
        let index = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        Self {
            tokens,
            pad,
            unk,
            index,
        }
    }

    /// Reads a vocabulary file: one token per line, line N holding id N (UTF-8).
    /// `<UNK>` and `<PAD>` are appended when the file lacks them.
    pub fn read(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::VocabRead {
            path: path.to_path_buf(),
            source,
        })?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let body = text.strip_suffix('\n').unwrap_or(text);
        let mut tokens = Vec::new();
        for (i, line) in body.split('\n').enumerate() {
            let tok = line.strip_suffix('\r').unwrap_or(line);
            if tok.is_empty() {
                return Err(FileError::VocabEmptyLine {
                    path: path.to_path_buf(),
                    line: i + 1,
                });
            }
            tokens.push(tok.to_string());
        }
        for special in [UNK, PAD] {
            if !tokens.iter().any(|t| t == special) {
                tokens.push(special.to_string());
            }
        }
        let pad = tokens.iter().position(|t| t == PAD).unwrap_or(0);
        let unk = tokens.iter().position(|t| t == UNK).unwrap_or(0);
        Self::new(tokens, pad, unk).map_err(|e| FileError::InVocab {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Number of tokens, special ones included.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the vocabulary is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The padding id (the embedding's `padding_idx`).
    pub fn pad_index(&self) -> usize {
        self.pad
    }

    /// The unknown-token id.
    pub fn unk_index(&self) -> usize {
        self.unk
    }

    /// The tokens in id order.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// The id of `token` (the unknown id when it is not in the vocabulary).
    pub fn id(&self, token: &str) -> u32 {
        self.index.get(token).copied().unwrap_or(self.unk as u32)
    }

    /// Exactly `max_len` ids for `text`: truncated, or padded at the end.
    pub fn encode(&self, text: &str, kind: TokenizerKind, max_len: usize) -> Vec<u32> {
        let mut ids: Vec<u32> = tokenize(text, kind)
            .into_iter()
            .take(max_len)
            .map(|t| self.id(t))
            .collect();
        ids.resize(max_len, self.pad as u32);
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_and_whitespace_tokens() {
        assert_eq!(
            tokenize("中国 队", TokenizerKind::Char),
            vec!["中", "国", " ", "队"]
        );
        assert_eq!(
            tokenize("  the  cat sat ", TokenizerKind::Whitespace),
            vec!["the", "cat", "sat"]
        );
    }

    #[test]
    fn built_like_the_seed() {
        let v = Vocab::build(["abca", "cb", "d"], TokenizerKind::Char, 10, 1);
        // counts a2 b2 c2 d1; ties in order of first appearance.
        assert_eq!(v.tokens(), &["a", "b", "c", "d", "<UNK>", "<PAD>"]);
        assert_eq!((v.unk_index(), v.pad_index()), (4, 5));
        let small = Vocab::build(["abca", "cb", "d"], TokenizerKind::Char, 2, 1);
        assert_eq!(small.tokens(), &["a", "b", "<UNK>", "<PAD>"]);
        let frequent = Vocab::build(["abca", "cb", "d"], TokenizerKind::Char, 10, 2);
        assert_eq!(frequent.len(), 5);
        assert_eq!(v.encode("abz", TokenizerKind::Char, 5), vec![0, 1, 4, 5, 5]);
        assert_eq!(v.encode("abcdabcd", TokenizerKind::Char, 3), vec![0, 1, 2]);
    }

    #[test]
    fn file_and_json_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vocab.txt");
        std::fs::write(&p, "<PAD>\n体\n \n<UNK>\n").unwrap();
        let v = Vocab::read(&p).unwrap();
        assert_eq!((v.pad_index(), v.unk_index(), v.len()), (0, 3, 4));
        assert_eq!(v.id(" "), 2);
        let json = serde_json::to_string(&v).unwrap();
        let back: Vocab = serde_json::from_str(&json).unwrap();
        assert_eq!(back, v);
        assert_eq!(back.id("体"), 1);
        std::fs::write(&p, "a\nb\na\n").unwrap();
        let e = Vocab::read(&p).unwrap_err();
        assert!(
            matches!(e.cause(), FileError::DuplicateToken { token } if token == "a"),
            "{e}"
        );
        assert!(e.to_string().contains("twice"));
        std::fs::write(&p, "a\nb\n").unwrap();
        assert_eq!(
            Vocab::read(&p).unwrap().tokens(),
            &["a", "b", "<UNK>", "<PAD>"]
        );
    }
}
