//! Host tensors for aggregation: row-major f32 arrays, their values'
//! encoding (F32 / BF16, little-endian) for the safetensors format of
//! [`crate::artifact`], and the f64 vector arithmetic the algorithms use.
//!
//! Aggregation runs in plain Rust, single-threaded, with f64 accumulators:
//! its results do not depend on libtorch's thread count or BLAS, so the same
//! inputs give the same bytes on any machine (FlexLoRA's SVD is the one
//! exception, see `flexlora.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use heterotune_crds::manifest::TensorInfo;

use crate::artifact::{parse_views, serialize_raw, RawTensor};
use crate::{Error, Result};

/// A dense row-major f32 tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    /// Shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// Values, `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

impl Array {
    /// An array of `shape` holding `data`; errors if the lengths disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::config(
                "array",
                format!("shape {shape:?} holds {numel} values, got {}", data.len()),
            ));
        }
        Ok(Array { shape, data })
    }

    /// Zeros of `shape`.
    pub fn zeros(shape: &[usize]) -> Self {
        Array {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// Rounds f64 values to an f32 array of `shape` (lengths must agree).
    pub(crate) fn from_f64(shape: &[usize], values: &[f64]) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        Array {
            shape: shape.to_vec(),
            data: values.iter().map(|&v| v as f32).collect(),
        }
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The values widened to f64.
    pub fn to_f64(&self) -> Vec<f64> {
        self.data.iter().map(|&v| f64::from(v)).collect()
    }
}

/// Stored element type of a tensor (`BF16` client deltas, `F32` global
/// states): the artifact writer's [`StoreDtype`](crate::artifact::StoreDtype).
pub use crate::artifact::StoreDtype as WireDtype;

/// bf16 bits to f32 (exact).
#[inline]
pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// f32 to bf16 bits, round to nearest even (NaN stays NaN).
#[inline]
pub(crate) fn f32_to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// Decodes little-endian `bytes` of `dtype` into f32 values; `None` for a
/// dtype other than F32 / BF16.
pub(crate) fn decode(dtype: safetensors::Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        safetensors::Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        safetensors::Dtype::BF16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        _ => None,
    }
}

/// Parses a trusted safetensors file (a global state) into f32 arrays.
/// Accepts F32 and BF16 tensors; `origin` names the file in errors.
pub fn parse_safetensors(bytes: &[u8], origin: &Path) -> Result<BTreeMap<String, Array>> {
    let mut out = BTreeMap::new();
    for (name, view) in parse_views(bytes, origin)? {
        let data = decode(view.dtype(), view.data()).ok_or_else(|| {
            Error::data(
                origin,
                format!("tensor {name}: dtype {:?} is not F32 or BF16", view.dtype()),
            )
        })?;
        out.insert(name, Array::new(view.shape().to_vec(), data)?);
    }
    Ok(out)
}

/// Encodes f32 values as little-endian bytes of `dtype` (BF16: round to
/// nearest even).
pub(crate) fn encode(values: &[f32], dtype: WireDtype) -> Vec<u8> {
    match dtype {
        WireDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        WireDtype::Bf16 => values
            .iter()
            .flat_map(|&v| f32_to_bf16(v).to_le_bytes())
            .collect(),
    }
}

/// Serialises arrays to safetensors bytes in `dtype` (no metadata, names
/// sorted): the same arrays always give the same bytes. Also returns the
/// manifest's tensor list.
pub fn serialize(
    tensors: &BTreeMap<String, Array>,
    dtype: WireDtype,
) -> Result<(Vec<u8>, Vec<TensorInfo>)> {
    serialize_raw(tensors.iter().map(|(name, a)| {
        let raw = RawTensor {
            dtype: dtype.safetensors(),
            shape: a.shape.clone(),
            data: encode(&a.data, dtype),
        };
        (name.clone(), raw)
    }))
}

/// Dot product in f64.
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Euclidean norm in f64.
pub(crate) fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// Cosine similarity; 0 when either vector is zero.
pub(crate) fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let (na, nb) = (norm(a), norm(b));
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot(a, b) / (na * nb)
    }
}

/// `acc += scale * x` (x in f32).
pub(crate) fn axpy_f32(acc: &mut [f64], scale: f64, x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += scale * f64::from(v);
    }
}

/// `acc += scale * x` (x in f64).
pub(crate) fn axpy(acc: &mut [f64], scale: f64, x: &[f64]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += scale * v;
    }
}

/// `v * scale`, elementwise, into a new vector.
pub(crate) fn scaled(v: &[f64], scale: f64) -> Vec<f64> {
    v.iter().map(|&x| x * scale).collect()
}

/// `v / divisor`, elementwise, into a new vector.
pub(crate) fn divided(v: &[f64], divisor: f64) -> Vec<f64> {
    v.iter().map(|&x| x / divisor).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_trip_and_rounding() {
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::INFINITY)), f32::INFINITY);
        for v in [0.0f32, -0.0, 1.0, -2.5, 3.0, 1e-3, 65504.0, -3.0e38] {
            let back = bf16_to_f32(f32_to_bf16(v));
            assert!((back - v).abs() <= v.abs() / 128.0, "{v} -> {back}");
        }
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        // Agrees with libtorch's conversion.
        let values = [1.6f32, -0.8, 3.25, 1e-5, 123456.0, 0.1];
        let t = tch::Tensor::from_slice(&values).to_kind(tch::Kind::BFloat16);
        let bytes = Vec::<u8>::try_from(t.view_dtype(tch::Kind::Uint8)).expect("bytes");
        let ours: Vec<u8> = values
            .iter()
            .flat_map(|&v| f32_to_bf16(v).to_le_bytes())
            .collect();
        assert_eq!(bytes, ours);
    }

    #[test]
    fn serialize_parse_round_trip() {
        let mut m = BTreeMap::new();
        m.insert(
            "b".to_string(),
            Array::new(vec![2, 2], vec![1.0, -2.0, 3.5, 0.25]).expect("array"),
        );
        m.insert("a".to_string(), Array::zeros(&[3]));
        let (bytes, infos) = serialize(&m, WireDtype::F32).expect("serialize");
        assert_eq!(infos[0].name, "a");
        assert_eq!(infos[1].dtype, "F32");
        let back = parse_safetensors(&bytes, Path::new("x")).expect("parse");
        assert_eq!(back, m);
        let (again, _) = serialize(&back, WireDtype::F32).expect("serialize");
        assert_eq!(again, bytes);
        assert!(Array::new(vec![2], vec![1.0]).is_err());
    }
}
