//! The frozen-feature cache on disk: one file per cache key (frozen weights,
//! preprocessing, split point) in `{output.dir}/feature-cache/`, holding the
//! features of many samples, each under its sample key.
//!
//! Layout, little-endian: the magic `ETFEAT01`; the number of feature dims
//! (u32) and each dim (u32); the number of samples (u64); per sample its key
//! (u128) and its values (f32); last, the XXH3-128 of everything before it.
//! Files are written whole with an atomic rename; one that is short, too
//! large or fails its checksum is reported corrupt, and the caller rebuilds it.
//! The folder is kept under its size limit by removing the least recently
//! used files (a file is touched whenever a run uses it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::engine::fsutil::atomic_write;

const MAGIC: &[u8; 8] = b"ETFEAT01";
/// File name extension of a cache file.
pub const EXTENSION: &str = "feat";

/// Why a cache file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({reason}); it is rebuilt")]
    Corrupt { path: PathBuf, reason: String },
}

/// The features stored in one file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stored {
    /// Shape of one sample's features.
    pub shape: Vec<usize>,
    /// Sample keys, in file order.
    pub keys: Vec<u128>,
    /// Their values, `keys.len() * shape.product()`.
    pub values: Vec<f32>,
}

impl Stored {
    /// Values per sample.
    pub fn per(&self) -> usize {
        // Checked when read: the product fits.
        self.shape.iter().product()
    }

    /// Row of each key.
    pub fn index(&self) -> HashMap<u128, usize> {
        self.keys.iter().enumerate().map(|(i, &k)| (k, i)).collect()
    }

    /// The values of row `r`.
    pub fn row(&self, r: usize) -> &[f32] {
        let per = self.per();
        &self.values[r * per..(r + 1) * per]
    }
}

/// The file of cache key `key` in `dir`.
pub fn path_of(dir: &Path, key: u128) -> PathBuf {
    dir.join(format!("{key:032x}.{EXTENSION}"))
}

/// Reads a cache file; `Ok(None)` when there is none. Files over `max_bytes`
/// are not read (reported corrupt).
pub fn read(path: &Path, max_bytes: u64) -> Result<Option<Stored>, StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let corrupt = |reason: &str| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if len > max_bytes {
        return Err(corrupt("larger than train.cache_features_mb"));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    parse(&bytes).map(Some).map_err(|r| corrupt(&r))
}

fn parse(bytes: &[u8]) -> Result<Stored, String> {
    if bytes.len() < MAGIC.len() + 16 || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a feature cache file".into());
    }
    let (body, sum) = bytes.split_at(bytes.len() - 16);
    let mut want = [0u8; 16];
    want.copy_from_slice(sum);
    if xxhash_rust::xxh3::xxh3_128(body) != u128::from_le_bytes(want) {
        return Err("checksum mismatch".into());
    }
    let mut r = Reader {
        bytes: body,
        pos: MAGIC.len(),
    };
    let ndims = r.u32()? as usize;
    if ndims > 8 {
        return Err(format!("{ndims} feature dims"));
    }
    let shape = (0..ndims)
        .map(|_| r.u32().map(|d| d as usize))
        .collect::<Result<Vec<_>, _>>()?;
    let per = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("feature shape {shape:?}"))?;
    let count = usize::try_from(r.u64()?).map_err(|_| "sample count".to_string())?;
    let need = per
        .checked_mul(4)
        .and_then(|b| b.checked_add(16))
        .and_then(|row| count.checked_mul(row))
        .ok_or_else(|| "sample count".to_string())?;
    if body.len() - r.pos != need {
        return Err(format!(
            "{} bytes of samples, expected {need}",
            body.len() - r.pos
        ));
    }
    let mut keys = Vec::with_capacity(count);
    let mut values = Vec::with_capacity(count * per);
    for _ in 0..count {
        keys.push(r.u128()?);
        for _ in 0..per {
            values.push(f32::from_le_bytes(r.take::<4>()?));
        }
    }
    Ok(Stored {
        shape,
        keys,
        values,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let end = self.pos + N;
        let s = self.bytes.get(self.pos..end).ok_or("truncated")?;
        self.pos = end;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.take::<4>().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, String> {
        self.take::<8>().map(u64::from_le_bytes)
    }
    fn u128(&mut self) -> Result<u128, String> {
        self.take::<16>().map(u128::from_le_bytes)
    }
}

/// Writes `rows` (key, values of `shape`) to `path` atomically; returns the
/// bytes written.
pub fn write<'r>(
    path: &Path,
    shape: &[usize],
    rows: impl ExactSizeIterator<Item = (u128, &'r [f32])>,
) -> std::io::Result<u64> {
    let per: usize = shape.iter().product();
    let mut out =
        Vec::with_capacity(MAGIC.len() + 12 + shape.len() * 4 + rows.len() * (16 + per * 4) + 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
    for &d in shape {
        out.extend_from_slice(&(d as u32).to_le_bytes());
    }
    out.extend_from_slice(&(rows.len() as u64).to_le_bytes());
    for (key, values) in rows {
        out.extend_from_slice(&key.to_le_bytes());
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    let sum = xxhash_rust::xxh3::xxh3_128(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    atomic_write(path, &out)?;
    Ok(out.len() as u64)
}

/// Marks `path` as just used (its modification time), for eviction order.
pub fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

fn files(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let m = e.metadata().ok()?;
            let ours = path.extension().and_then(|x| x.to_str()) == Some(EXTENSION);
            if !(ours && m.is_file()) {
                return None;
            }
            Some((path, m.len(), m.modified().ok()?))
        })
        .collect()
}

/// Removes the least recently used cache files of `dir` but `keep` until
/// the folder holds at most `max_bytes`; returns the files removed.
pub fn evict(dir: &Path, keep: &Path, max_bytes: u64) -> Vec<PathBuf> {
    let mut all = files(dir);
    let mut total: u64 = all.iter().map(|(_, len, _)| len).sum();
    all.sort_by_key(|(_, _, t)| *t);
    let mut removed = Vec::new();
    for (path, len, _) in all {
        if total <= max_bytes {
            break;
        }
        if path == keep {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                total = total.saturating_sub(len);
                removed.push(path);
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot evict a feature cache file")
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_is_detected() {
        let t = tempfile::tempdir().unwrap();
        let p = path_of(t.path(), 7);
        assert!(read(&p, 1 << 20).unwrap().is_none());
        let rows = [(1u128, &[1.0f32, 2.0][..]), (9, &[3.0, 4.0][..])];
        let n = write(&p, &[2], rows.into_iter()).unwrap();
        assert_eq!(n, std::fs::metadata(&p).unwrap().len());
        let s = read(&p, 1 << 20).unwrap().unwrap();
        assert_eq!(s.shape, vec![2]);
        assert_eq!(s.keys, vec![1, 9]);
        assert_eq!(s.row(1), &[3.0, 4.0]);
        // One flipped byte, a truncation, a size over the limit: all refused.
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(read(&p, 1 << 20), Err(StoreError::Corrupt { .. })));
        std::fs::write(&p, &bytes[..20]).unwrap();
        assert!(matches!(read(&p, 1 << 20), Err(StoreError::Corrupt { .. })));
        write(&p, &[2], rows.into_iter()).unwrap();
        assert!(matches!(read(&p, 10), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn eviction_removes_the_least_recently_used_first() {
        let t = tempfile::tempdir().unwrap();
        let rows = || [(1u128, &[0.0f32; 64][..])].into_iter();
        let (a, b, c) = (
            path_of(t.path(), 1),
            path_of(t.path(), 2),
            path_of(t.path(), 3),
        );
        let size = write(&a, &[64], rows()).unwrap();
        write(&b, &[64], rows()).unwrap();
        write(&c, &[64], rows()).unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
        for (p, age) in [(&a, 3), (&b, 1), (&c, 2)] {
            let f = std::fs::File::options().append(true).open(p).unwrap();
            f.set_modified(old + std::time::Duration::from_secs(age))
                .unwrap();
        }
        std::fs::write(t.path().join("other.txt"), b"not ours").unwrap();
        // Room for two: b (oldest) goes; c is kept as asked although older than a.
        let removed = evict(t.path(), &c, 2 * size);
        assert_eq!(removed, vec![b.clone()]);
        assert_eq!(files(t.path()).len(), 2);
        let removed = evict(t.path(), &c, size);
        assert_eq!(removed, vec![a]);
        assert!(c.exists() && t.path().join("other.txt").exists());
    }
}
