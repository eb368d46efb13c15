//! Train-split augmentation of image samples with torchvision's semantics
//! (`RandomResizedCrop`, `RandomCrop(padding=)`, `RandomHorizontalFlip`,
//! `ColorJitter`), applied in that order to the resized sample. Every random
//! choice comes from an RNG seeded by (seed, epoch, file, position), so the same
//! run sees the same batches, a resumed run the batches it would have seen, and
//! each epoch a different augmentation.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// `[data.augment]`: what is applied to training images (all off by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentSpec {
    /// `RandomResizedCrop(image_size, scale, ratio)`.
    pub random_resized_crop: bool,
    /// Area fraction range of the random resized crop.
    pub scale: [f64; 2],
    /// Aspect ratio (w/h) range of the random resized crop.
    pub ratio: [f64; 2],
    /// `RandomCrop(image_size, padding=n)` with zero fill; 0 is off.
    pub random_crop_padding: usize,
    /// Probability of a horizontal flip (`RandomHorizontalFlip(p)`); 0 is off.
    pub horizontal_flip: f64,
    /// `ColorJitter` brightness: factor uniform in [max(0, 1-b), 1+b].
    pub brightness: f64,
    /// `ColorJitter` contrast.
    pub contrast: f64,
    /// `ColorJitter` saturation.
    pub saturation: f64,
    /// `ColorJitter` hue: shift uniform in [-h, h], h <= 0.5.
    pub hue: f64,
}

impl Default for AugmentSpec {
    fn default() -> Self {
        Self {
            random_resized_crop: false,
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            random_crop_padding: 0,
            horizontal_flip: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
            hue: 0.0,
        }
    }
}

impl AugmentSpec {
    /// Whether nothing is applied.
    pub fn is_off(&self) -> bool {
        !self.random_resized_crop
            && self.random_crop_padding == 0
            && self.horizontal_flip <= 0.0
            && !self.jitters()
    }

    fn jitters(&self) -> bool {
        self.brightness > 0.0 || self.contrast > 0.0 || self.saturation > 0.0 || self.hue > 0.0
    }

    /// The first key whose value is out of range, and why.
    pub fn invalid(&self) -> Option<(&'static str, String)> {
        let range =
            |r: [f64; 2]| r[0].is_finite() && r[1].is_finite() && r[0] > 0.0 && r[0] <= r[1];
        if !range(self.scale) || self.scale[1] > 1.0 {
            return Some(("data.augment.scale", "needs 0 < min <= max <= 1".into()));
        }
        if !range(self.ratio) {
            return Some(("data.augment.ratio", "needs 0 < min <= max".into()));
        }
        if !(0.0..=1.0).contains(&self.horizontal_flip) {
            return Some((
                "data.augment.horizontal_flip",
                "is a probability in [0, 1]".into(),
            ));
        }
        for (key, v) in [
            ("data.augment.brightness", self.brightness),
            ("data.augment.contrast", self.contrast),
            ("data.augment.saturation", self.saturation),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Some((key, "must be a finite number >= 0".into()));
            }
        }
        if !(0.0..=0.5).contains(&self.hue) {
            return Some(("data.augment.hue", "must be in [0, 0.5]".into()));
        }
        if self.random_resized_crop && self.random_crop_padding > 0 {
            return Some((
                "data.augment.random_crop_padding",
                "cannot be combined with random_resized_crop (choose one crop)".into(),
            ));
        }
        None
    }
}

/// The RNG of one sample's augmentation in one epoch.
pub fn sample_rng(seed: u64, epoch: u64, file: &str, position: u32) -> ChaCha8Rng {
    let mut key = Vec::with_capacity(file.len() + 13);
    key.extend_from_slice(file.as_bytes());
    key.push(0);
    key.extend_from_slice(&position.to_le_bytes());
    key.extend_from_slice(&epoch.to_le_bytes());
    ChaCha8Rng::seed_from_u64(xxh3_64_with_seed(&key, seed))
}

/// An 8-bit image, `[h, w, c]` row-major (c = 1 or 3).
#[derive(Debug, Clone, PartialEq)]
pub struct Hwc {
    pub w: u32,
    pub h: u32,
    pub c: usize,
    pub data: Vec<u8>,
}

impl Hwc {
    /// A region of the image.
    pub(super) fn crop(&self, x: u32, y: u32, w: u32, h: u32) -> Hwc {
        let c = self.c;
        let mut data = Vec::with_capacity(w as usize * h as usize * c);
        for row in y..y + h {
            let start = (row as usize * self.w as usize + x as usize) * c;
            data.extend_from_slice(&self.data[start..start + w as usize * c]);
        }
        Hwc { w, h, c, data }
    }

    /// Resized to `w` x `h` (bilinear, antialiased when shrinking, as PIL's
    /// and so torchvision's `Resize`; see [`taps`]).
    pub fn resize(&self, w: u32, h: u32) -> Hwc {
        if w == self.w && h == self.h {
            return self.clone();
        }
        let c = self.c;
        let (sw, sh) = (self.w as usize, self.h as usize);
        let (dw, dh) = (w as usize, h as usize);
        // Horizontal pass into f32 rows, then the vertical pass into bytes.
        let xt = taps(sw, dw);
        let mut mid = vec![0f32; sh * dw * c];
        for (src, out) in self
            .data
            .chunks_exact(sw * c)
            .zip(mid.chunks_exact_mut(dw * c))
        {
            for (t, px) in xt.iter().zip(out.chunks_exact_mut(c)) {
                let from = &src[t.start * c..(t.start + t.weights.len()) * c];
                for (wt, s) in t.weights.iter().zip(from.chunks_exact(c)) {
                    for (o, &v) in px.iter_mut().zip(s) {
                        *o += wt * f32::from(v);
                    }
                }
            }
        }
        let yt = taps(sh, dh);
        let row = dw * c;
        let mut data = vec![0u8; dh * row];
        let mut acc = vec![0f32; row];
        for (t, out) in yt.iter().zip(data.chunks_exact_mut(row)) {
            acc.iter_mut().for_each(|a| *a = 0.0);
            let rows = mid[t.start * row..(t.start + t.weights.len()) * row].chunks_exact(row);
            for (wt, r) in t.weights.iter().zip(rows) {
                for (a, &v) in acc.iter_mut().zip(r) {
                    *a += wt * v;
                }
            }
            for (o, &a) in out.iter_mut().zip(&acc) {
                *o = a.round().clamp(0.0, 255.0) as u8;
            }
        }
        Hwc { w, h, c, data }
    }

    fn flip_horizontal(&mut self) {
        let (w, c) = (self.w as usize, self.c);
        for row in self.data.chunks_exact_mut(w * c) {
            for x in 0..w / 2 {
                for k in 0..c {
                    row.swap(x * c + k, (w - 1 - x) * c + k);
                }
            }
        }
    }
}

/// The source span and weights of one output position of a resize.
struct Taps {
    start: usize,
    weights: Vec<f32>,
}

/// PIL's bilinear resampling weights from `src` to `dst` positions: a
/// triangle filter widened by the scale when shrinking (antialiasing), centred
/// on each output pixel's centre, normalised to sum 1.
fn taps(src: usize, dst: usize) -> Vec<Taps> {
    let scale = src as f64 / dst as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale;
    (0..dst)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0) as usize).min(src - 1);
            let hi = ((center + support + 0.5).floor() as usize).clamp(lo + 1, src);
            let mut weights: Vec<f64> = (lo..hi)
                .map(|j| {
                    let x = (j as f64 - center + 0.5) / filter_scale;
                    (1.0 - x.abs()).max(0.0)
                })
                .collect();
            let sum: f64 = weights.iter().sum();
            if sum > 0.0 {
                weights.iter_mut().for_each(|w| *w /= sum);
            } else {
                weights = vec![1.0 / (hi - lo) as f64; hi - lo];
            }
            Taps {
                start: lo,
                weights: weights.into_iter().map(|w| w as f32).collect(),
            }
        })
        .collect()
}

/// torchvision's `RandomResizedCrop.get_params`: (x, y, w, h) of the crop.
fn resized_crop_params(
    rng: &mut ChaCha8Rng,
    width: u32,
    height: u32,
    scale: [f64; 2],
    ratio: [f64; 2],
) -> (u32, u32, u32, u32) {
    let (wf, hf) = (f64::from(width), f64::from(height));
    let area = wf * hf;
    let (lr0, lr1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale[0]..=scale[1]);
        let aspect = rng.random_range(lr0..=lr1).exp();
        let w = (target * aspect).sqrt().round();
        let h = (target / aspect).sqrt().round();
        if w > 0.0 && w <= wf && h > 0.0 && h <= hf {
            let (w, h) = (w as u32, h as u32);
            let y = rng.random_range(0..=height - h);
            let x = rng.random_range(0..=width - w);
            return (x, y, w, h);
        }
    }
    // Fallback: the central crop of the nearest allowed ratio.
    let in_ratio = wf / hf;
    let (w, h) = if in_ratio < ratio[0] {
        (wf, (wf / ratio[0]).round())
    } else if in_ratio > ratio[1] {
        ((hf * ratio[1]).round(), hf)
    } else {
        (wf, hf)
    };
    let (w, h) = ((w as u32).clamp(1, width), (h as u32).clamp(1, height));
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// The geometric part: crop, pad-and-crop, flip. The output has the input's size.
fn geometric(spec: &AugmentSpec, img: &Hwc, rng: &mut ChaCha8Rng) -> Hwc {
    let (w, h) = (img.w, img.h);
    let mut out = if spec.random_resized_crop {
        let (x, y, cw, ch) = resized_crop_params(rng, w, h, spec.scale, spec.ratio);
        img.crop(x, y, cw, ch).resize(w, h)
    } else if spec.random_crop_padding > 0 {
        let p = spec.random_crop_padding as u32;
        let y = rng.random_range(0..=2 * p);
        let x = rng.random_range(0..=2 * p);
        pad_crop(img, p, x, y)
    } else {
        img.clone()
    };
    if spec.horizontal_flip > 0.0 && rng.random::<f64>() < spec.horizontal_flip {
        out.flip_horizontal();
    }
    out
}

/// The image padded by `p` zeros on every side, then cropped at (x, y) to its size.
fn pad_crop(img: &Hwc, p: u32, x: u32, y: u32) -> Hwc {
    let (w, h, c) = (img.w as i64, img.h as i64, img.c);
    let mut data = vec![0u8; img.data.len()];
    let (ox, oy) = (i64::from(x) - i64::from(p), i64::from(y) - i64::from(p));
    for row in 0..h {
        let sy = row + oy;
        if !(0..h).contains(&sy) {
            continue;
        }
        let x0 = (-ox).clamp(0, w);
        let x1 = (w - ox).clamp(0, w);
        if x0 >= x1 {
            continue;
        }
        let dst = ((row * w + x0) as usize) * c;
        let src = ((sy * w + x0 + ox) as usize) * c;
        let n = (x1 - x0) as usize * c;
        data[dst..dst + n].copy_from_slice(&img.data[src..src + n]);
    }
    Hwc {
        w: img.w,
        h: img.h,
        c,
        data,
    }
}

/// Luminance as torchvision's `rgb_to_grayscale`.
fn gray(r: f32, g: f32, b: f32) -> f32 {
    0.2989 * r + 0.587 * g + 0.114 * b
}

fn blend(v: f32, other: f32, factor: f32) -> f32 {
    (factor * v + (1.0 - factor) * other).clamp(0.0, 255.0)
}

fn factor(rng: &mut ChaCha8Rng, amount: f64) -> Option<f32> {
    (amount > 0.0).then(|| rng.random_range((1.0 - amount).max(0.0)..=1.0 + amount) as f32)
}

/// `ColorJitter` on `[h, w, c]` values in [0, 255]: the four factors are drawn,
/// then applied in a random order, as torchvision does.
fn jitter(spec: &AugmentSpec, px: &mut [f32], c: usize, rng: &mut ChaCha8Rng) {
    let mut order = [0usize, 1, 2, 3];
    order.shuffle(rng);
    let b = factor(rng, spec.brightness);
    let ct = factor(rng, spec.contrast);
    let s = factor(rng, spec.saturation);
    let hue = (spec.hue > 0.0).then(|| rng.random_range(-spec.hue..=spec.hue) as f32);
    for op in order {
        match op {
            0 => {
                if let Some(f) = b {
                    px.iter_mut().for_each(|v| *v = blend(*v, 0.0, f));
                }
            }
            1 => {
                if let Some(f) = ct {
                    let n = (px.len() / c).max(1) as f64;
                    let sum: f64 = if c == 3 {
                        px.chunks_exact(3)
                            .map(|p| f64::from(gray(p[0], p[1], p[2])))
                            .sum()
                    } else {
                        px.iter().map(|&v| f64::from(v)).sum()
                    };
                    let mean = (sum / n) as f32;
                    px.iter_mut().for_each(|v| *v = blend(*v, mean, f));
                }
            }
            2 => {
                if let (Some(f), 3) = (s, c) {
                    for p in px.chunks_exact_mut(3) {
                        let g = gray(p[0], p[1], p[2]);
                        p.iter_mut().for_each(|v| *v = blend(*v, g, f));
                    }
                }
            }
            _ => {
                if let (Some(shift), 3) = (hue, c) {
                    for p in px.chunks_exact_mut(3) {
                        let (h, s, v) = rgb_to_hsv(p[0] / 255.0, p[1] / 255.0, p[2] / 255.0);
                        let (r, g, b) = hsv_to_rgb((h + shift).rem_euclid(1.0), s, v);
                        p[0] = r * 255.0;
                        p[1] = g * 255.0;
                        p[2] = b * 255.0;
                    }
                }
            }
        }
    }
}

fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let s = if max > 0.0 { d / max } else { 0.0 };
    if d <= 0.0 {
        return (0.0, s, max);
    }
    let h = if max == r {
        ((g - b) / d).rem_euclid(6.0)
    } else if max == g {
        (b - r) / d + 2.0
    } else {
        (r - g) / d + 4.0
    };
    (h / 6.0, s, max)
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match (i as i32).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// The augmented sample as `[h, w, c]` values in [0, 255].
pub fn apply(spec: &AugmentSpec, img: &Hwc, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let out = geometric(spec, img, rng);
    let mut px: Vec<f32> = out.data.iter().map(|&v| f32::from(v)).collect();
    if spec.jitters() {
        jitter(spec, &mut px, out.c, rng);
    }
    px
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: u32, h: u32) -> Hwc {
        let data = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
        Hwc { w, h, c: 3, data }
    }

    #[test]
    fn same_key_same_augmentation_other_epoch_another() {
        let spec = AugmentSpec {
            random_resized_crop: true,
            horizontal_flip: 0.5,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
            hue: 0.1,
            ..AugmentSpec::default()
        };
        let img = ramp(16, 12);
        let a = apply(&spec, &img, &mut sample_rng(1, 3, "cat/a.jpg", 0));
        let b = apply(&spec, &img, &mut sample_rng(1, 3, "cat/a.jpg", 0));
        assert_eq!(a, b);
        assert_eq!(a.len(), img.data.len());
        assert!(a.iter().all(|v| (0.0..=255.0).contains(v)));
        let c = apply(&spec, &img, &mut sample_rng(1, 4, "cat/a.jpg", 0));
        assert_ne!(a, c);
        let d = apply(&spec, &img, &mut sample_rng(2, 3, "cat/a.jpg", 0));
        assert_ne!(a, d);
    }

    #[test]
    fn resize_is_pil_bilinear() {
        // Halving: a triangle of radius 2 source pixels, cut at the edge (weights 3/7, 3/7, 1/7).
        let row = Hwc {
            w: 4,
            h: 1,
            c: 1,
            data: vec![0, 80, 160, 240],
        };
        let t = taps(4, 2);
        assert_eq!(t[0].start, 0);
        let w: Vec<f32> = t[0].weights.clone();
        assert_eq!(w.len(), 3);
        assert!(
            (w[0] - 3.0 / 7.0).abs() < 1e-6 && (w[2] - 1.0 / 7.0).abs() < 1e-6,
            "{w:?}"
        );
        let half = row.resize(2, 1);
        assert_eq!(half.data, vec![57, 183]);
        // A 13x9 RGB image to 5x4, against Pillow's `resize((5, 4), BILINEAR)`
        // (which rounds to bytes between its passes: within 1).
        let img = Hwc {
            w: 13,
            h: 9,
            c: 3,
            data: (0..13 * 9 * 3)
                .map(|i| ((i * 37 + 11) % 256) as u8)
                .collect(),
        };
        let pil: [u8; 60] = [
            115, 122, 139, 146, 130, 120, 127, 144, 119, 119, 125, 127, 124, 122, 121, 132, 132,
            117, 124, 134, 138, 137, 124, 131, 136, 111, 121, 122, 131, 108, 116, 119, 138, 132,
            118, 127, 130, 140, 124, 125, 129, 140, 145, 126, 134, 130, 108, 125, 123, 128, 119,
            118, 126, 127, 133, 126, 126, 133, 132, 140,
        ];
        let ours = img.resize(5, 4).data;
        for (a, b) in ours.iter().zip(pil) {
            assert!(a.abs_diff(b) <= 1, "{ours:?}");
        }
        // Same size: unchanged; a constant image stays constant at any size.
        assert_eq!(row.resize(4, 1), row);
        let flat = Hwc {
            w: 7,
            h: 5,
            c: 3,
            data: vec![77; 105],
        };
        for (w, h) in [(3, 2), (11, 9), (1, 1), (7, 13)] {
            let r = flat.resize(w, h);
            assert_eq!(r.data.len(), (w * h * 3) as usize);
            assert!(r.data.iter().all(|&v| v == 77), "{w}x{h}");
        }
    }

    #[test]
    fn resized_crop_params_follow_torchvision() {
        let mut rng = sample_rng(0, 0, "x", 0);
        for _ in 0..200 {
            let (x, y, w, h) =
                resized_crop_params(&mut rng, 64, 48, [0.08, 1.0], [0.75, 4.0 / 3.0]);
            assert!(x + w <= 64 && y + h <= 48 && w > 0 && h > 0);
            let area = f64::from(w * h) / f64::from(64 * 48);
            assert!((0.06..=1.0).contains(&area), "{area}");
        }
        // No crop of the ratio fits: the central crop of the nearest ratio.
        let mut rng = sample_rng(0, 0, "x", 0);
        assert_eq!(
            resized_crop_params(&mut rng, 100, 10, [1.0, 1.0], [1.0, 1.0]),
            (45, 0, 10, 10)
        );
    }

    #[test]
    fn flip_pad_and_jitter_semantics() {
        let img = Hwc {
            w: 2,
            h: 1,
            c: 3,
            data: vec![1, 2, 3, 4, 5, 6],
        };
        let flip = AugmentSpec {
            horizontal_flip: 1.0,
            ..AugmentSpec::default()
        };
        assert_eq!(
            apply(&flip, &img, &mut sample_rng(0, 0, "x", 0)),
            vec![4.0, 5.0, 6.0, 1.0, 2.0, 3.0]
        );
        // Padding 1 then cropping at (0, 0): shifted right and down, zero filled.
        let sq = Hwc {
            w: 2,
            h: 2,
            c: 1,
            data: vec![1, 2, 3, 4],
        };
        assert_eq!(pad_crop(&sq, 1, 0, 0).data, vec![0, 0, 0, 1]);
        assert_eq!(pad_crop(&sq, 1, 1, 1).data, vec![1, 2, 3, 4]);
        assert_eq!(pad_crop(&sq, 1, 2, 1).data, vec![2, 0, 4, 0]);
        // Brightness 0 < b: values scale by the factor and stay in range.
        let mut px = vec![100.0, 200.0, 250.0];
        let spec = AugmentSpec {
            brightness: 0.5,
            ..AugmentSpec::default()
        };
        jitter(&spec, &mut px, 3, &mut sample_rng(0, 0, "x", 0));
        let f = px[0] / 100.0;
        assert!((0.5..=1.5).contains(&f), "{px:?}");
        assert!((px[1] - (200.0 * f).min(255.0)).abs() < 1e-3, "{px:?}");
        // Hue: a full turn is the identity; HSV round trip.
        let (h, s, v) = rgb_to_hsv(0.2, 0.5, 0.9);
        let (r, g, b) = hsv_to_rgb(h, s, v);
        assert!((r - 0.2).abs() < 1e-5 && (g - 0.5).abs() < 1e-5 && (b - 0.9).abs() < 1e-5);
        assert!(AugmentSpec::default().is_off());
        assert!(AugmentSpec::default().invalid().is_none());
        let bad = AugmentSpec {
            hue: 0.7,
            ..AugmentSpec::default()
        };
        assert_eq!(bad.invalid().map(|(k, _)| k), Some("data.augment.hue"));
    }
}
