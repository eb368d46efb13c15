//! Safetensors shards: `x` [N, ...] in f32/f64/f16/bf16 or u8, `y` [N] integer labels.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::{Features, FileError, FileSamples, RawLabels};

/// Reads one shard; the error is a reason fit for a user.
pub fn read(path: &Path, x_key: &str, y_key: &str) -> Result<FileSamples, FileError> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("not a valid safetensors file: {e}"))?;
    let x = st
        .tensor(x_key)
        .map_err(|_| format!("no tensor named {x_key:?} (has: {})", names(&st)))?;
    let y = st
        .tensor(y_key)
        .map_err(|_| format!("no tensor named {y_key:?} (has: {})", names(&st)))?;
    let xs = x.shape();
    if xs.len() < 2 {
        return Err(format!(
            "{x_key:?} has shape {xs:?}; expected [N, features...] with at least 2 dimensions"
        )
        .into());
    }
    if y.shape().len() != 1 {
        return Err(format!("{y_key:?} has shape {:?}; expected [N]", y.shape()).into());
    }
    if y.shape()[0] != xs[0] {
        return Err(format!(
            "{x_key:?} has {} samples but {y_key:?} has {} labels",
            xs[0],
            y.shape()[0]
        )
        .into());
    }
    let features = match x.dtype() {
        Dtype::U8 => Features::U8(x.data().to_vec()),
        Dtype::F32 => Features::F32(le_chunks::<4>(x.data()).map(f32::from_le_bytes).collect()),
        Dtype::F64 => Features::F32(
            le_chunks::<8>(x.data())
                .map(|b| f64::from_le_bytes(b) as f32)
                .collect(),
        ),
        Dtype::F16 => Features::F32(
            le_chunks::<2>(x.data())
                .map(|b| half_to_f32(u16::from_le_bytes(b)))
                .collect(),
        ),
        Dtype::BF16 => Features::F32(
            le_chunks::<2>(x.data())
                .map(|b| f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16))
                .collect(),
        ),
        other => {
            return Err(format!(
                "{x_key:?} has dtype {other:?}; supported: F32, F64, F16, BF16, U8"
            )
            .into())
        }
    };
    let labels: Vec<i64> = match y.dtype() {
        Dtype::I64 => le_chunks::<8>(y.data()).map(i64::from_le_bytes).collect(),
        Dtype::I32 => le_chunks::<4>(y.data())
            .map(|b| i32::from_le_bytes(b) as i64)
            .collect(),
        Dtype::I16 => le_chunks::<2>(y.data())
            .map(|b| i16::from_le_bytes(b) as i64)
            .collect(),
        Dtype::I8 => y.data().iter().map(|&b| b as i8 as i64).collect(),
        Dtype::U8 => y.data().iter().map(|&b| b as i64).collect(),
        Dtype::U16 => le_chunks::<2>(y.data())
            .map(|b| u16::from_le_bytes(b) as i64)
            .collect(),
        Dtype::U32 => le_chunks::<4>(y.data())
            .map(|b| u32::from_le_bytes(b) as i64)
            .collect(),
        Dtype::U64 => le_chunks::<8>(y.data())
            .map(|b| i64::try_from(u64::from_le_bytes(b)).unwrap_or(i64::MAX))
            .collect(),
        other => {
            return Err(
                format!("{y_key:?} has dtype {other:?}; labels must be an integer type").into(),
            )
        }
    };
    Ok(FileSamples {
        features,
        labels: RawLabels::Index(labels),
        sample_shape: xs[1..].to_vec(),
    })
}

fn names(st: &SafeTensors) -> String {
    let mut n = st.names();
    n.sort();
    n.join(", ")
}

fn le_chunks<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    data.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    })
}

/// IEEE 754 half precision to f32.
fn half_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: normalise.
            let mut e: i32 = -1;
            let mut f = f;
            while f & 0x400 == 0 {
                f <<= 1;
                e += 1;
            }
            let f = f & 0x3ff;
            sign | (((127 - 15 - e) as u32) << 23) | (f << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_conversion() {
        assert_eq!(half_to_f32(0x3c00), 1.0);
        assert_eq!(half_to_f32(0xc000), -2.0);
        assert_eq!(half_to_f32(0x0000), 0.0);
        assert_eq!(half_to_f32(0x0001), 2f32.powi(-24));
        assert!(half_to_f32(0x7c00).is_infinite());
    }
}
