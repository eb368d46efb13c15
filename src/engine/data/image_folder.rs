//! `image-folder`: `class_name/*.png|jpg|jpeg` (as torchvision's `ImageFolder`),
//! or `train/class_name/...`, `dev/` (or `val/`) and `test/` folders that fix
//! the split. Each image is decoded with the `image` crate, converted to
//! grayscale (`data.channels = 1`) or RGB (3), resized to `data.image_size`
//! (bilinear, aspect ratio not kept) and kept as u8 `[C, H, W]`; batches are
//! normalised per channel.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use super::augment::Hwc;

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

/// A reader of `path` with the decoder's limits set: a forged header must not
/// make the decoder allocate without bound.
fn open_reader(
    path: &Path,
) -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>, FileError> {
    let mut reader = image::ImageReader::open(path)
        .map_err(FileError::Io)?
        .with_guessed_format()
        .map_err(FileError::Io)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    reader.limits(limits);
    Ok(reader)
}

/// Checks an image from its header only (format, dimensions), without decoding
/// it; returns (width, height).
pub fn check_header(path: &Path) -> Result<(u32, u32), FileError> {
    let reader = open_reader(path)?;
    if reader.format().is_none() {
        return Err(FileError::ImageFormat);
    }
    let (width, height) = reader.into_dimensions().map_err(FileError::Image)?;
    let fits = u64::from(width) * u64::from(height) * 4 <= MAX_IMAGE_ALLOC;
    if width == 0 || height == 0 || width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE || !fits {
        return Err(FileError::ImageDimensions {
            width,
            height,
            max: MAX_IMAGE_SIDE,
        });
    }
    Ok((width, height))
}

/// Decodes an image as 8-bit grayscale (`channels` 1) or RGB.
pub fn decode_hwc(path: &Path, channels: usize) -> Result<Hwc, FileError> {
    let img = open_reader(path)?.decode().map_err(FileError::Image)?;
    let (w, h) = (img.width(), img.height());
    let (c, data) = match channels {
        1 => (1, img.into_luma8().into_raw()),
        _ => (3, img.into_rgb8().into_raw()),
    };
    Ok(Hwc { w, h, c, data })
}

/// How an image is brought to `data.image_size` (the deterministic path, used
/// for every split; augmentation works on its output).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// Resized to exactly `image_size`, aspect ratio not kept.
    #[default]
    Stretch,
    /// torchvision's eval transform: resized, aspect ratio kept, so that the
    /// image covers `image_size / 0.875` (`Resize(256)` for 224), then the
    /// central `image_size` cropped (`CenterCrop(224)`).
    CenterCrop,
}

/// The fraction of the resized image the centre crop keeps (224 / 256).
const CENTER_CROP_FRACTION: f64 = 0.875;

/// `img` brought to `size` (`[h, w]`) the way `mode` says.
pub fn resize_to(img: &Hwc, size: [usize; 2], mode: ResizeMode) -> Result<Hwc, FileError> {
    let [h, w] = size;
    let (h, w) = (
        u32::try_from(h).map_err(|_| FileError::ImageSizeTooLarge)?,
        u32::try_from(w).map_err(|_| FileError::ImageSizeTooLarge)?,
    );
    match mode {
        ResizeMode::Stretch => Ok(img.resize(w, h)),
        ResizeMode::CenterCrop => {
            let scale = (f64::from(h) / f64::from(img.h)).max(f64::from(w) / f64::from(img.w))
                / CENTER_CROP_FRACTION;
            let rw = ((f64::from(img.w) * scale).round() as u32).max(w);
            let rh = ((f64::from(img.h) * scale).round() as u32).max(h);
            let resized = img.resize(rw, rh);
            // torchvision's CenterCrop: top-left at round((size - crop) / 2).
            let x = ((f64::from(rw - w)) / 2.0).round() as u32;
            let y = ((f64::from(rh - h)) / 2.0).round() as u32;
            Ok(resized.crop(x, y, w, h))
        }
    }
}

/// `[h, w, c]` bytes to `[c, h, w]`.
pub fn hwc_to_chw(img: &Hwc) -> Vec<u8> {
    let plane = img.w as usize * img.h as usize;
    let c = img.c;
    let mut chw = vec![0u8; c * plane];
    for (p, px) in img.data.chunks_exact(c).enumerate() {
        for (k, &v) in px.iter().enumerate() {
            chw[k * plane + p] = v;
        }
    }
    chw
}

/// Reads one image as a sample of shape `[channels, h, w]` (stretched to
/// `size`): the full check the daemon's watcher runs on a new image.
pub fn read(
    path: &Path,
    dir: &Path,
    size: [usize; 2],
    channels: usize,
) -> Result<FileSamples, FileError> {
    let class = class_of(&relative_name(dir, path))?;
    let img = resize_to(&decode_hwc(path, channels)?, size, ResizeMode::Stretch)?;
    let [h, w] = size;
    Ok(FileSamples {
        features: Features::U8(hwc_to_chw(&img)),
        labels: RawLabels::Name(vec![class]),
        sample_shape: vec![img.c, h, w],
    })
}

/// Decodes one image file (PNG or JPEG, by its content), converts it to
/// `channels` (1: grey, else RGB), resizes it to `size` `[H, W]` (bilinear,
/// the training path's `stretch`) and lays it out channels first: `channels *
/// H * W` bytes. The watcher's reader and `predict` both use it.
pub fn decode(path: &Path, size: [usize; 2], channels: usize) -> Result<Vec<u8>, FileError> {
    let img = resize_to(&decode_hwc(path, channels)?, size, ResizeMode::Stretch)?;
    Ok(hwc_to_chw(&img))
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
