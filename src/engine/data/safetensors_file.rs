//! Safetensors shards: `x` [N, ...] in f32/f64/f16/bf16 or u8, `y` [N] integer labels.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::{Features, FileError, FileSamples, RawLabels};
use crate::engine::st_decode;

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
        Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16 => {
            Features::F32(st_decode::f32_values(&x).map_err(|e| format!("{x_key:?}: {e}"))?)
        }
        other => {
            return Err(format!(
                "{x_key:?} has dtype {other:?}; supported: F32, F64, F16, BF16, U8"
            )
            .into())
        }
    };
    let labels: Vec<i64> = match y.dtype() {
        Dtype::I64
        | Dtype::I32
        | Dtype::I16
        | Dtype::I8
        | Dtype::U8
        | Dtype::U16
        | Dtype::U32
        | Dtype::U64 => st_decode::i64_values(&y).map_err(|e| format!("{y_key:?}: {e}"))?,
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
