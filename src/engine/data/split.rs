//! The train/val/test split: a pure function of (file name, index, seed), so a
//! sample never changes split when new files arrive.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::DataFormat;

/// Which split a sample belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
    Test,
}

/// Sample indices of each split.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SplitIndices {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
}

/// The split of sample `index` of file `file` (its name relative to the data folder).
pub fn split_of(file: &str, index: u64, seed: u64, val_fraction: f64, test_fraction: f64) -> Split {
    let mut key = Vec::with_capacity(file.len() + 9);
    key.extend_from_slice(file.as_bytes());
    key.push(0);
    key.extend_from_slice(&index.to_le_bytes());
    let h = xxh3_64_with_seed(&key, seed);
    // 53 high bits to a uniform number in [0, 1).
    let u = (h >> 11) as f64 / (1u64 << 53) as f64;
    if u < test_fraction {
        Split::Test
    } else if u < test_fraction + val_fraction {
        Split::Val
    } else {
        Split::Train
    }
}

/// The split a file is named for, if any: a top-level file whose stem is
/// `train`, `dev` / `val` / `valid` / `validation` or `test` (`train.txt`,
/// `dev.csv`), or for `image-folder` an image under a top-level `train/`,
/// `dev/`, `val/`, `valid/` or `test/` folder that holds class folders.
pub fn fixed_split(file: &str, format: DataFormat) -> Option<Split> {
    let parts: Vec<&str> = file.split('/').collect();
    let key = match (format, parts.as_slice()) {
        (DataFormat::ImageFolder, [dir, _class, _, ..]) => *dir,
        (DataFormat::ImageFolder, _) => return None,
        (_, [name]) => name.rsplit_once('.').map(|(stem, _)| stem).unwrap_or(name),
        _ => return None,
    };
    match key {
        "train" => Some(Split::Train),
        "dev" | "val" | "valid" | "validation" => Some(Split::Val),
        "test" => Some(Split::Test),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_named_for_a_split() {
        use DataFormat::*;
        assert_eq!(fixed_split("train.txt", TextTsv), Some(Split::Train));
        assert_eq!(fixed_split("dev.txt", TextTsv), Some(Split::Val));
        assert_eq!(fixed_split("test.csv", Csv), Some(Split::Test));
        assert_eq!(fixed_split("news-2.txt", TextTsv), None);
        assert_eq!(fixed_split("sub/train.txt", TextTsv), None);
        assert_eq!(fixed_split("val/cat/1.png", ImageFolder), Some(Split::Val));
        assert_eq!(fixed_split("test/1.png", ImageFolder), None);
        assert_eq!(fixed_split("cat/1.png", ImageFolder), None);
    }

    #[test]
    fn fractions_are_respected_and_stable() {
        let n = 20_000u64;
        let mut counts = [0usize; 3];
        for i in 0..n {
            let s = split_of("a.safetensors", i, 7, 0.1, 0.2);
            assert_eq!(s, split_of("a.safetensors", i, 7, 0.1, 0.2));
            counts[s as usize] += 1;
        }
        let frac = |c: usize| c as f64 / n as f64;
        assert!(
            (frac(counts[Split::Val as usize]) - 0.1).abs() < 0.01,
            "{counts:?}"
        );
        assert!(
            (frac(counts[Split::Test as usize]) - 0.2).abs() < 0.01,
            "{counts:?}"
        );
    }

    #[test]
    fn depends_on_file_and_seed() {
        let a: Vec<Split> = (0..200).map(|i| split_of("a", i, 1, 0.3, 0.3)).collect();
        let b: Vec<Split> = (0..200).map(|i| split_of("b", i, 1, 0.3, 0.3)).collect();
        let c: Vec<Split> = (0..200).map(|i| split_of("a", i, 2, 0.3, 0.3)).collect();
        assert_ne!(a, b);
        assert_ne!(a, c);
    }
}
