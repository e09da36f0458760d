//! The header of a `.safetensors` file: tensor names, dtypes and shapes,
//! read without touching the weights (8-byte little-endian length, then
//! that many bytes of JSON).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;

use super::error::ModelError;

/// Largest header accepted (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TensorInfo {
    /// Element type as safetensors names it (`F32`, `BF16`, `F16`, ...).
    pub dtype: String,
    /// Dimensions.
    pub shape: Vec<u64>,
}

/// A parsed safetensors header.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// Tensors by name (`__metadata__` left out).
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl Header {
    /// Reads the header of `path`.
    ///
    /// # Errors
    /// [`ModelError`] naming the file: unreadable, truncated, a header over
    /// 100 MB, or JSON that is not a safetensors header.
    pub fn read(path: &Path) -> Result<Header, ModelError> {
        let bad = |message: String| ModelError::new(path, message);
        let mut file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|e| bad(format!("cannot read the header length: {e}")))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER_BYTES {
            return Err(bad(format!("header of {n} bytes is over the 100 MB limit")));
        }
        let mut bytes = vec![0u8; n as usize];
        file.read_exact(&mut bytes)
            .map_err(|e| bad(format!("truncated header: {e}")))?;
        Header::parse(&bytes).map_err(bad)
    }

    /// Parses header JSON bytes.
    ///
    /// # Errors
    /// A message when the bytes are not a JSON object of tensor entries.
    pub fn parse(bytes: &[u8]) -> Result<Header, String> {
        let mut map: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid header JSON: {e}"))?;
        map.remove("__metadata__");
        let tensors = map
            .into_iter()
            .map(|(name, v)| {
                TensorInfo::deserialize(v)
                    .map(|t| (name.clone(), t))
                    .map_err(|e| format!("tensor {name}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Header { tensors })
    }

    /// Total number of elements over all tensors.
    pub fn parameters(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| t.shape.iter().product::<u64>())
            .sum()
    }

    /// The dtype most parameters are stored in (`None` without tensors).
    pub fn main_dtype(&self) -> Option<&str> {
        let mut by_dtype: BTreeMap<&str, u64> = BTreeMap::new();
        for t in self.tensors.values() {
            *by_dtype.entry(t.dtype.as_str()).or_default() += t.shape.iter().product::<u64>();
        }
        by_dtype
            .into_iter()
            .max_by_key(|&(_, n)| n)
            .map(|(dtype, _)| dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str) -> tempfile::NamedTempFile {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        let f = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(f.path(), bytes).expect("write");
        f
    }

    #[test]
    fn counts_parameters_and_dtype() {
        let f = file(
            r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[48,52]}}"#,
        );
        let h = Header::read(f.path()).expect("header");
        assert_eq!(h.parameters(), 14);
        assert_eq!(h.main_dtype(), Some("F32"));
        assert_eq!(h.tensors.len(), 2);
    }

    #[test]
    fn bad_headers_name_the_file() {
        let f = file("not json");
        let err = Header::read(f.path()).expect_err("bad");
        assert!(err.to_string().contains("invalid header JSON"), "{err}");
        let short = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(short.path(), [1u8, 2]).expect("write");
        let err = Header::read(short.path()).expect_err("short");
        assert!(err
            .to_string()
            .contains(&short.path().display().to_string()));
    }
}
