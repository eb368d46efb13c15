//! A bounds-checked, safe front to the `gemm` crate's f32 matrix product (the
//! one candle uses on CPU), with explicit row and column strides.

use candle_core::Result;
pub use gemm::Parallelism;

/// A strided matrix view: element `(i, j)` is at `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct Strides {
    pub rs: usize,
    pub cs: usize,
}

impl Strides {
    /// Row-major with `cols` columns.
    pub const fn rows(cols: usize) -> Self {
        Self { rs: cols, cs: 1 }
    }

    /// The transpose of a row-major matrix with `cols` columns (column-major view).
    pub const fn transposed(cols: usize) -> Self {
        Self { rs: 1, cs: cols }
    }

    fn last(&self, rows: usize, cols: usize) -> usize {
        (rows - 1) * self.rs + (cols - 1) * self.cs
    }
}

/// `dst[m, n] (+)= a[m, k] * b[k, n]`: accumulates into `dst` when
/// `accumulate`, overwrites it otherwise.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    ds: Strides,
    a: &[f32],
    as_: Strides,
    b: &[f32],
    bs: Strides,
    accumulate: bool,
    parallelism: Parallelism,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * ds.rs + j * ds.cs] = 0.0;
                }
            }
        }
        return Ok(());
    }
    if ds.last(m, n) >= dst.len() || as_.last(m, k) >= a.len() || bs.last(k, n) >= b.len() {
        candle_core::bail!(
            "matmul ({m}x{k} by {k}x{n}): an operand is smaller than its strides say"
        );
    }
    // SAFETY: every index the product touches was checked against the slices
    // above; `dst` is borrowed mutably, so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            ds.cs as isize,
            ds.rs as isize,
            accumulate,
            a.as_ptr(),
            as_.cs as isize,
            as_.rs as isize,
            b.as_ptr(),
            bs.cs as isize,
            bs.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// The parallelism for one product over the whole thread pool.
pub fn pool_parallelism() -> Parallelism {
    let n = rayon::current_num_threads();
    if n > 1 {
        Parallelism::Rayon(n)
    } else {
        Parallelism::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_products() {
        // a = [[1, 2], [3, 4]], b = [[5, 6], [7, 8]]
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [5.0, 6.0, 7.0, 8.0];
        let mut d = [0.0f32; 4];
        matmul(
            (2, 2, 2),
            &mut d,
            Strides::rows(2),
            &a,
            Strides::rows(2),
            &b,
            Strides::rows(2),
            false,
            Parallelism::None,
        )
        .unwrap();
        assert_eq!(d, [19.0, 22.0, 43.0, 50.0]);
        // a^T * b, accumulated onto the previous result.
        matmul(
            (2, 2, 2),
            &mut d,
            Strides::rows(2),
            &a,
            Strides::transposed(2),
            &b,
            Strides::rows(2),
            true,
            Parallelism::None,
        )
        .unwrap();
        assert_eq!(d, [19.0 + 26.0, 22.0 + 30.0, 43.0 + 38.0, 50.0 + 44.0]);
        let short = [0.0f32; 3];
        assert!(matmul(
            (2, 2, 2),
            &mut d,
            Strides::rows(2),
            &short,
            Strides::rows(2),
            &b,
            Strides::rows(2),
            false,
            Parallelism::None,
        )
        .is_err());
    }
}
