//! Safetensors shards: `x` [N, ...] in f32/f64/f16/bf16 or u8, `y` [N] integer labels.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::{Features, FileError, FileSamples, RawLabels};
use crate::engine::st_decode;

/// Reads one shard; the error is a reason fit for a user.
pub fn read(path: &Path, x_key: &str, y_key: &str) -> Result<FileSamples, FileError> {
    let bytes = std::fs::read(path).map_err(FileError::Io)?;
    let st = SafeTensors::deserialize(&bytes).map_err(FileError::Safetensors)?;
    let (features, sample_shape, samples) = read_features(&st, x_key)?;
    let labels = read_labels(&st, y_key, x_key, samples)?;
    Ok(FileSamples {
        features,
        labels: RawLabels::Index(labels),
        sample_shape,
    })
}

/// The samples of `x_key` `[N, ...]`: their values, the shape of one, and `N`.
pub fn read_features(
    st: &SafeTensors,
    x_key: &str,
) -> Result<(Features, Vec<usize>, usize), FileError> {
    let x = st.tensor(x_key).map_err(|_| FileError::NoTensor {
        name: x_key.to_string(),
        has: names(st),
    })?;
    let xs = x.shape();
    if xs.len() < 2 {
        return Err(FileError::FeatureRank {
            key: x_key.to_string(),
            shape: xs.to_vec(),
        });
    }
    let features = match x.dtype() {
        Dtype::U8 => Features::U8(x.data().to_vec()),
        Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16 => Features::F32(
            st_decode::f32_values(&x).map_err(|source| FileError::Decode {
                key: x_key.to_string(),
                source,
            })?,
        ),
        other => {
            return Err(FileError::FeatureDtype {
                key: x_key.to_string(),
                dtype: other,
            })
        }
    };
    Ok((features, xs[1..].to_vec(), xs[0]))
}

/// The integer labels `y_key` `[N]` of `samples` samples of `x_key`.
pub fn read_labels(
    st: &SafeTensors,
    y_key: &str,
    x_key: &str,
    samples: usize,
) -> Result<Vec<i64>, FileError> {
    let y = st.tensor(y_key).map_err(|_| FileError::NoTensor {
        name: y_key.to_string(),
        has: names(st),
    })?;
    if y.shape().len() != 1 {
        return Err(FileError::LabelRank {
            key: y_key.to_string(),
            shape: y.shape().to_vec(),
        });
    }
    if y.shape()[0] != samples {
        return Err(FileError::LabelCount {
            x_key: x_key.to_string(),
            samples,
            y_key: y_key.to_string(),
            labels: y.shape()[0],
        });
    }
    match y.dtype() {
        Dtype::I64
        | Dtype::I32
        | Dtype::I16
        | Dtype::I8
        | Dtype::U8
        | Dtype::U16
        | Dtype::U32
        | Dtype::U64 => st_decode::i64_values(&y).map_err(|source| FileError::Decode {
            key: y_key.to_string(),
            source,
        }),
        other => Err(FileError::LabelDtype {
            key: y_key.to_string(),
            dtype: other,
        }),
    }
}

fn names(st: &SafeTensors) -> Vec<String> {
    let mut n: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    n.sort();
    n
}
