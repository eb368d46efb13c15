//! Safetensors decoding in one place, for checkpoints, `model.init` files and
//! data shards: a tensor is read with candle's own reader
//! ([`Tensor::from_raw_buffer`]) for every dtype candle knows (F16, BF16, F32,
//! F64, F8E4M3, U8, U32, I16, I32, I64), then converted. The only hand-decoded
//! dtypes are the integer ones candle has no type for (I8, U16, U64), which
//! data files may use for labels.

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// Why a tensor could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A dtype candle does not read (or, for labels, not an integer type).
    #[error("unsupported dtype {0:?}")]
    Dtype(Dtype),
    /// Candle refused the bytes (size does not match the shape).
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

/// The candle dtype of a safetensors dtype, where candle has one.
pub fn candle_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I16 => DType::I16,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::F8_E4M3 => DType::F8E4M3,
        _ => return None,
    })
}

/// The tensor in its own dtype, as candle reads it.
pub fn decode(view: &TensorView, device: &Device) -> Result<Tensor, DecodeError> {
    let dtype = candle_dtype(view.dtype()).ok_or(DecodeError::Dtype(view.dtype()))?;
    Ok(Tensor::from_raw_buffer(
        view.data(),
        dtype,
        view.shape(),
        device,
    )?)
}

/// The tensor as f32 (weights, features), whatever its dtype.
pub fn decode_f32(view: &TensorView, device: &Device) -> Result<Tensor, DecodeError> {
    Ok(decode(view, device)?.to_dtype(DType::F32)?)
}

/// The values as a flat f32 list (data features).
pub fn f32_values(view: &TensorView) -> Result<Vec<f32>, DecodeError> {
    Ok(decode_f32(view, &Device::Cpu)?.flatten_all()?.to_vec1()?)
}

/// The values of an integer tensor as a flat i64 list (labels); floats are
/// refused. U64 values above `i64::MAX` saturate.
pub fn i64_values(view: &TensorView) -> Result<Vec<i64>, DecodeError> {
    let data = view.data();
    match view.dtype() {
        Dtype::I8 => return Ok(data.iter().map(|&b| b as i8 as i64).collect()),
        Dtype::U16 => {
            return Ok(data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
                .collect())
        }
        Dtype::U64 => {
            return Ok(data
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    i64::try_from(u64::from_le_bytes(a)).unwrap_or(i64::MAX)
                })
                .collect())
        }
        _ => {}
    }
    let t = decode(view, &Device::Cpu)?;
    if t.dtype().is_float() {
        return Err(DecodeError::Dtype(view.dtype()));
    }
    Ok(t.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(dtype: Dtype, shape: &[usize], bytes: &'a [u8]) -> TensorView<'a> {
        TensorView::new(dtype, shape.to_vec(), bytes).unwrap()
    }

    #[test]
    fn floats_of_every_width() {
        // 1.0, -2.0, 0.5 in each encoding.
        let f16: Vec<u8> = [0x3c00u16, 0xc000, 0x3800]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect();
        let bf16: Vec<u8> = [0x3f80u16, 0xc000, 0x3f00]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect();
        let f32s: Vec<u8> = [1f32, -2.0, 0.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let f64s: Vec<u8> = [1f64, -2.0, 0.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        for (d, b) in [
            (Dtype::F16, &f16),
            (Dtype::BF16, &bf16),
            (Dtype::F32, &f32s),
            (Dtype::F64, &f64s),
        ] {
            assert_eq!(
                f32_values(&view(d, &[3], b)).unwrap(),
                vec![1.0, -2.0, 0.5],
                "{d:?}"
            );
        }
        let t = decode_f32(&view(Dtype::F16, &[3, 1], &f16), &Device::Cpu).unwrap();
        assert_eq!((t.dims(), t.dtype()), (&[3usize, 1][..], DType::F32));
        assert_eq!(
            f32_values(&view(Dtype::U8, &[2], &[3, 250])).unwrap(),
            vec![3.0, 250.0]
        );
    }

    #[test]
    fn half_conversion() {
        let h = |bits: u16| f32_values(&view(Dtype::F16, &[1], &bits.to_le_bytes())).unwrap()[0];
        assert_eq!(h(0x3c00), 1.0);
        assert_eq!(h(0xc000), -2.0);
        assert_eq!(h(0x0000), 0.0);
        assert_eq!(h(0x0001), 2f32.powi(-24));
        assert!(h(0x7c00).is_infinite());
    }

    #[test]
    fn integer_labels() {
        let i64s: Vec<u8> = [3i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            i64_values(&view(Dtype::I64, &[2], &i64s)).unwrap(),
            vec![3, -1]
        );
        let i32s: Vec<u8> = [7i32, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            i64_values(&view(Dtype::I32, &[2], &i32s)).unwrap(),
            vec![7, 2]
        );
        assert_eq!(
            i64_values(&view(Dtype::I8, &[2], &[0xff, 4])).unwrap(),
            vec![-1, 4]
        );
        assert_eq!(
            i64_values(&view(Dtype::U8, &[2], &[200, 4])).unwrap(),
            vec![200, 4]
        );
        let u16s: Vec<u8> = [60000u16, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            i64_values(&view(Dtype::U16, &[2], &u16s)).unwrap(),
            vec![60000, 1]
        );
        let f32s: Vec<u8> = [1f32].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(i64_values(&view(Dtype::F32, &[1], &f32s)).is_err());
    }
}
