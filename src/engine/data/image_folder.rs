//! `image-folder`: `class_name/*.png|jpg|jpeg` (as torchvision's `ImageFolder`),
//! or `train/class_name/...`, `dev/` (or `val/`) and `test/` folders that fix
//! the split. Each image is decoded with the `image` crate, converted to
//! grayscale (`data.channels = 1`) or RGB (3), resized to `data.image_size`
//! (bilinear, aspect ratio not kept) and kept as u8 `[C, H, W]`; batches are
//! normalised per channel.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::DynamicImage;

/// Largest width or height of an image that is decoded.
const MAX_IMAGE_SIDE: u32 = 8192;
/// Most memory one image decode may allocate.
const MAX_IMAGE_ALLOC: u64 = 256 << 20;

use super::{relative_name, DataError, Features, FileError, FileSamples, RawLabels};

/// File extensions read as images (case-insensitive).
pub const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Top-level folders that hold class folders and fix the split.
pub const SPLIT_DIRS: [&str; 5] = ["train", "dev", "val", "valid", "test"];

/// Whether `path` has an image extension.
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Every image under `dir` (recursively, sorted), leaving out hidden entries
/// and the top-level `rejected/` folder.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| DataError::Folder {
            dir: d.clone(),
            reason: e.to_string(),
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            // Links are never descended into (no cycles, no escape); a link or
            // other non-regular entry with an image name is listed and then
            // skipped with its reason.
            match super::entries::listing(ft) {
                super::entries::Listing::Descend => {
                    if !(d == dir && name == "rejected") {
                        stack.push(path);
                    }
                }
                super::entries::Listing::Candidate
                    if is_image(&path) || (ft.is_symlink() && path.is_dir()) =>
                {
                    out.push(path)
                }
                super::entries::Listing::Candidate => {}
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The class of an image from its path relative to the data folder: the folder
/// right under the data folder, or under a split folder (`train/cat/x.png`).
pub fn class_of(relative: &str) -> Result<String, FileError> {
    let parts: Vec<&str> = relative.split('/').collect();
    match parts.as_slice() {
        [split, class, _, ..] if SPLIT_DIRS.contains(split) => Ok(class.to_string()),
        [class, _, ..] => Ok(class.to_string()),
        _ => Err(FileError::NoClassFolder),
    }
}

/// Reads one image as a sample of shape `[channels, h, w]`.
pub fn read(
    path: &Path,
    dir: &Path,
    size: [usize; 2],
    channels: usize,
) -> Result<FileSamples, FileError> {
    let class = class_of(&relative_name(dir, path))?;
    let data = decode(path, size, channels)?;
    let [h, w] = size;
    Ok(FileSamples {
        features: Features::U8(data),
        labels: RawLabels::Name(vec![class]),
        sample_shape: vec![channels, h, w],
    })
}

/// Decodes one image file (PNG or JPEG, by its content), converts it to
/// `channels` (1: grey, else RGB), resizes it to `size` `[H, W]` (bilinear) and
/// lays it out channels first: `channels * H * W` bytes. The training reader
/// and `predict` both use it.
pub fn decode(path: &Path, size: [usize; 2], channels: usize) -> Result<Vec<u8>, FileError> {
    let mut reader = image::ImageReader::open(path)
        .map_err(FileError::Io)?
        .with_guessed_format()
        .map_err(FileError::Io)?;
    // A forged header must not make the decoder allocate without bound.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    reader.limits(limits);
    let img = reader.decode().map_err(FileError::Image)?;
    let [h, w] = size;
    let (h32, w32) = (
        u32::try_from(h).map_err(|_| FileError::ImageSizeTooLarge)?,
        u32::try_from(w).map_err(|_| FileError::ImageSizeTooLarge)?,
    );
    let img = match channels {
        1 => DynamicImage::ImageLuma8(img.to_luma8()),
        _ => DynamicImage::ImageRgb8(img.to_rgb8()),
    };
    let img = if img.width() == w32 && img.height() == h32 {
        img
    } else {
        img.resize_exact(w32, h32, FilterType::Triangle)
    };
    let data = match channels {
        1 => img.to_luma8().into_raw(),
        _ => {
            // HWC -> CHW
            let hwc = img.to_rgb8().into_raw();
            let plane = h * w;
            let mut chw = vec![0u8; 3 * plane];
            for (p, px) in hwc.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    chw[c * plane + p] = px[c];
                }
            }
            chw
        }
    };
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_from_folders() {
        assert_eq!(class_of("cat/1.png").unwrap(), "cat");
        assert_eq!(class_of("cat/more/1.png").unwrap(), "cat");
        assert_eq!(class_of("train/cat/1.png").unwrap(), "cat");
        assert_eq!(class_of("test/1.png").unwrap(), "test");
        assert!(matches!(class_of("1.png"), Err(FileError::NoClassFolder)));
    }

    #[test]
    fn linked_folders_are_listed_as_refused_entries_never_descended() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside.path().join("7")).unwrap();
        let img = image::RgbImage::from_pixel(2, 2, image::Rgb([1, 2, 3]));
        img.save(outside.path().join("7/x.png")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("3")).unwrap();
        img.save(d.join("3/a.png")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("7"), d.join("sneaky")).unwrap();
        std::os::unix::fs::symlink("..", d.join("3/loop")).unwrap();
        let listed = list(d).unwrap();
        let names: Vec<String> = listed.iter().map(|p| relative_name(d, p)).collect();
        assert_eq!(names, vec!["3/a.png", "3/loop", "sneaky"]);
        let spec = super::super::DataSpec::new(d, super::super::DataFormat::ImageFolder);
        let e = super::super::read_file(&d.join("sneaky"), &spec).unwrap_err();
        assert!(matches!(e, FileError::LinkOutside { .. }), "{e}");
        assert!(e.to_string().contains("outside the data folder"), "{e}");
        let e = super::super::read_file(&d.join("3/loop"), &spec)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("links are followed to regular files only"),
            "{e}"
        );
        let ds = super::super::load_dataset(&spec).unwrap();
        assert_eq!(ds.len(), 1);
        assert_eq!(ds.skipped.len(), 2);
    }

    #[test]
    fn decodes_resizes_and_lays_out_chw() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("red")).unwrap();
        let p = dir.path().join("red/a.png");
        let img = image::RgbImage::from_pixel(4, 6, image::Rgb([200, 10, 0]));
        img.save(&p).unwrap();
        let s = read(&p, dir.path(), [3, 2], 3).unwrap();
        assert_eq!(s.sample_shape, vec![3, 3, 2]);
        let Features::U8(v) = &s.features else {
            panic!()
        };
        assert_eq!(&v[..6], &[200; 6]);
        assert_eq!(&v[6..12], &[10; 6]);
        assert_eq!(s.labels, RawLabels::Name(vec!["red".into()]));
        let g = read(&p, dir.path(), [6, 4], 1).unwrap();
        assert_eq!(g.sample_shape, vec![1, 6, 4]);
        std::fs::write(dir.path().join("red/bad.png"), b"not a png").unwrap();
        let e = read(&dir.path().join("red/bad.png"), dir.path(), [3, 2], 3).unwrap_err();
        assert!(matches!(e, FileError::Image(_)), "{e}");
        assert!(e.to_string().contains("cannot decode"), "{e}");
        assert_eq!(list(dir.path()).unwrap().len(), 2);
    }
}
