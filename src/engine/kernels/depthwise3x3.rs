//! The forward pass of the depthwise 3x3 convolution with stride 1 and
//! padding 1 (13 of MobileNetV2's 17 depthwise layers), one plane at a time,
//! on a copy of the plane with a zero border: each output row from the three
//! padded input rows in one pass, the nine taps multiplied and added in
//! registers (no edge cases, one store per value; the general kernel makes one
//! read-modify-write pass over the row per tap). `edge-trainer bench --layers`,
//! forward ms at batch 32: 32x56x56 5.0 -> 3.9, 144x28x28 10.3 -> 5.7,
//! 384x7x7 2.8 -> 1.9, 960x4x4 3.6 -> 1.8. The same approach for the backward
//! pass (the input gradient as this pass with the filter turned by 180
//! degrees, the filter gradient as per-tap dot products on the padded plane)
//! measured no faster than the general kernel, which it keeps.
//!
//! Compiled for AVX2 + FMA where the CPU has both, else for the baseline.

/// Whether the fast path computes a depthwise convolution of these sizes.
pub(super) fn applies(g: &super::conv::Geom) -> bool {
    !g.one_d && (g.kh, g.kw, g.sh, g.sw, g.ph, g.pw) == (3, 3, 1, 1, 1, 1) && g.h > 0 && g.w > 0
}

/// One `h x w` plane with a zero border of one value: `(h + 2) x (w + 2)`.
pub(super) struct Padded {
    buf: Vec<f32>,
    h: usize,
    w: usize,
}

impl Padded {
    /// A zero plane of `h x w` (plus the border).
    pub(super) fn new(h: usize, w: usize) -> Self {
        Self {
            buf: vec![0f32; (h + 2) * (w + 2)],
            h,
            w,
        }
    }

    /// Copies plane `x` (`h x w`) inside the border (which stays zero).
    pub(super) fn load(&mut self, x: &[f32]) {
        let pw = self.w + 2;
        for (r, xr) in x.chunks_exact(self.w).take(self.h).enumerate() {
            let at = (r + 1) * pw + 1;
            self.buf[at..at + self.w].copy_from_slice(xr);
        }
    }

    /// Padded row `r` (`0..h + 2`).
    #[inline(always)]
    fn row(&self, r: usize) -> &[f32] {
        let pw = self.w + 2;
        &self.buf[r * pw..(r + 1) * pw]
    }
}

/// `y = bias + conv(p, f)` over the plane (`h x w` outputs).
pub(super) fn forward_plane(p: &Padded, f: &[f32], bias: f32, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide(p: &Padded, f: &[f32], bias: f32, y: &mut [f32]) {
            forward_impl::<true>(p, f, bias, y)
        }
        // SAFETY: the CPU has AVX2 and FMA (checked above); the body is safe code.
        return unsafe { wide(p, f, bias, y) };
    }
    forward_impl::<false>(p, f, bias, y)
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    })
}

/// `a * b + c`, fused where the code is compiled for FMA (elsewhere
/// `mul_add` would be a library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn forward_impl<const FMA: bool>(p: &Padded, f: &[f32], bias: f32, y: &mut [f32]) {
    let w = p.w;
    let k: [f32; 9] = std::array::from_fn(|t| f[t]);
    for (oi, yr) in y.chunks_exact_mut(w).take(p.h).enumerate() {
        let (r0, r1, r2) = (p.row(oi), p.row(oi + 1), p.row(oi + 2));
        let (a0, a1, a2) = (&r0[..w], &r0[1..w + 1], &r0[2..w + 2]);
        let (b0, b1, b2) = (&r1[..w], &r1[1..w + 1], &r1[2..w + 2]);
        let (c0, c1, c2) = (&r2[..w], &r2[1..w + 1], &r2[2..w + 2]);
        for o in 0..yr.len().min(w) {
            let top = madd::<FMA>(k[0], a0[o], madd::<FMA>(k[1], a1[o], k[2] * a2[o]));
            let mid = madd::<FMA>(k[3], b0[o], madd::<FMA>(k[4], b1[o], k[5] * b2[o]));
            let bot = madd::<FMA>(k[6], c0[o], madd::<FMA>(k[7], c1[o], k[8] * c2[o]));
            yr[o] = bias + top + mid + bot;
        }
    }
}
