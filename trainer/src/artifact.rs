//! Writing and reading adapter artifacts: `adapter.safetensors` plus its
//! `manifest.json`, the commit marker of the round protocol.
//!
//! The one safetensors writer and reader of the trainer is here:
//! [`serialize_raw`] and [`tensor_views`] over (name, dtype, shape, bytes),
//! free of libtorch, under both libtorch tensors ([`to_safetensors`],
//! [`from_safetensors`]) and aggregation's f32 arrays
//! (`aggregate::array::serialize`, `aggregate::array::parse_safetensors`).
//!
//! Both files are written to a temporary name and renamed into place, data
//! first and manifest last, so a reader never sees a manifest without its
//! complete data, and a crash never leaves a partial artifact that looks
//! complete.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use heterotune_crds::layout::{ADAPTER_FILE, MANIFEST_FILE};
use heterotune_crds::manifest::{ArtifactManifest, FileDigest, TensorInfo};
use safetensors::tensor::TensorView;
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// The `writerVersion` of every manifest and record the trainer writes.
pub const WRITER_VERSION: &str = concat!("heterotune-trainer ", env!("CARGO_PKG_VERSION"));

/// Numeric type tensors are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    /// bfloat16: what clients send (deltas; half the bytes).
    Bf16,
    /// float32: global states.
    F32,
}

impl StoreDtype {
    /// The safetensors / manifest name (`BF16`, `F32`).
    pub fn name(self) -> &'static str {
        match self {
            StoreDtype::Bf16 => "BF16",
            StoreDtype::F32 => "F32",
        }
    }

    /// The safetensors element type.
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            StoreDtype::Bf16 => safetensors::Dtype::BF16,
            StoreDtype::F32 => safetensors::Dtype::F32,
        }
    }

    fn kind(self) -> Kind {
        match self {
            StoreDtype::Bf16 => Kind::BFloat16,
            StoreDtype::F32 => Kind::Float,
        }
    }
}

/// Hex SHA-256 of `bytes` (the digest manifests record).
pub use heterotune_crds::digest::sha256_hex;

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = path.with_extension(format!(
        "{}.tmp-{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    let mut file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    file.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

// The safetensors format itself, over (name, dtype, shape, bytes) and free
// of libtorch: the one writer and reader behind both the tensor path below
// and the plain f32 arrays of aggregation (`aggregate::array`).

/// One tensor as safetensors stores it: element type, shape and raw
/// little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Element type.
    pub dtype: safetensors::Dtype,
    /// Shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// The values' bytes, row-major.
    pub data: Vec<u8>,
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Serialises named raw tensors to safetensors bytes (no metadata; the
/// format orders the data by dtype alignment, then name, so the same
/// tensors give the same bytes in any order). Also returns the manifest's
/// tensor list, in the order given.
pub fn serialize_raw(
    tensors: impl IntoIterator<Item = (String, RawTensor)>,
) -> Result<(Vec<u8>, Vec<TensorInfo>)> {
    let tensors: Vec<(String, RawTensor)> = tensors.into_iter().collect();
    let infos = tensors
        .iter()
        .map(|(name, r)| TensorInfo {
            name: name.clone(),
            dtype: format!("{:?}", r.dtype),
            shape: r.shape.clone(),
        })
        .collect();
    let bytes = safetensors::serialize(tensors.iter().map(|(n, r)| (n.as_str(), r)), None)
        .map_err(|e| Error::config("artifact", format!("cannot serialise safetensors: {e}")))?;
    Ok((bytes, infos))
}

/// The tensors of safetensors `bytes` as views borrowing them, sorted by
/// name (a fixed order: the format's own iteration order is a hash map's).
/// The header is validated (offsets, sizes against shapes).
pub fn tensor_views(
    bytes: &[u8],
) -> std::result::Result<Vec<(String, TensorView<'_>)>, safetensors::SafeTensorError> {
    let mut views = safetensors::SafeTensors::deserialize(bytes)?.tensors();
    views.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(views)
}

/// [`tensor_views`] of a trusted file; `origin` names it in errors.
pub fn parse_views<'a>(bytes: &'a [u8], origin: &Path) -> Result<Vec<(String, TensorView<'a>)>> {
    tensor_views(bytes).map_err(|e| Error::data(origin, format!("not valid safetensors: {e}")))
}

// Tensors (libtorch) on top of it.

fn raw(tensor: &Tensor, dtype: StoreDtype) -> Result<RawTensor> {
    let t = tensor
        .detach()
        .to_device(tch::Device::Cpu)
        .to_kind(dtype.kind())
        .contiguous();
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let data = Vec::<u8>::try_from(t.flatten(0, -1).view_dtype(Kind::Uint8))?;
    Ok(RawTensor {
        dtype: dtype.safetensors(),
        shape,
        data,
    })
}

/// Serialises named tensors to safetensors bytes in `dtype`. The same values
/// give the same bytes (names are sorted; no timestamps).
pub fn to_safetensors(
    tensors: &BTreeMap<String, Tensor>,
    dtype: StoreDtype,
) -> Result<(Vec<u8>, Vec<TensorInfo>)> {
    let raws = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), raw(t, dtype)?)))
        .collect::<Result<Vec<_>>>()?;
    serialize_raw(raws)
}

/// Parses safetensors bytes into f32 CPU tensors; `origin` names the source in errors.
pub fn from_safetensors(bytes: &[u8], origin: &Path) -> Result<BTreeMap<String, Tensor>> {
    Ok(from_safetensors_kept(bytes, origin)?
        .into_iter()
        .map(|(n, t)| (n, t.to_kind(Kind::Float)))
        .collect())
}

/// Parses safetensors bytes into CPU tensors, keeping their stored dtype.
pub fn from_safetensors_kept(bytes: &[u8], origin: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, view) in parse_views(bytes, origin)? {
        let kind = match view.dtype() {
            safetensors::Dtype::BF16 => Kind::BFloat16,
            safetensors::Dtype::F16 => Kind::Half,
            safetensors::Dtype::F32 => Kind::Float,
            other => {
                return Err(Error::data(
                    origin,
                    format!("tensor {name}: dtype {other:?} is not a float type (BF16, F16, F32)"),
                ))
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Writes an artifact into `dir`: the adapter data, then the manifest.
/// `manifest.artifact` and `manifest.tensors` are filled in here.
pub fn write_artifact(
    dir: &Path,
    tensors: &BTreeMap<String, Tensor>,
    dtype: StoreDtype,
    manifest: ArtifactManifest,
) -> Result<ArtifactManifest> {
    let (bytes, infos) = to_safetensors(tensors, dtype)?;
    commit(dir, &bytes, infos, manifest)
}

/// Commits serialised adapter `bytes` into `dir`: the data file, then the
/// manifest (with the data's digest and `infos`) that marks it complete,
/// both atomically. Returns the manifest as written.
pub fn commit(
    dir: &Path,
    bytes: &[u8],
    infos: Vec<TensorInfo>,
    mut manifest: ArtifactManifest,
) -> Result<ArtifactManifest> {
    manifest.artifact = FileDigest {
        path: ADAPTER_FILE.to_string(),
        sha256: sha256_hex(bytes),
        bytes: bytes.len() as u64,
    };
    manifest.tensors = infos;
    write_atomic(&dir.join(ADAPTER_FILE), bytes)?;
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::config("manifest", format!("cannot serialise: {e}")))?;
    write_atomic(&dir.join(MANIFEST_FILE), &json)?;
    Ok(manifest)
}

/// Reads a committed artifact's manifest and data file from `dir`, checking
/// the data against the manifest (a plain file name, size and sha256).
/// Returns the manifest, the data and the data file's path (for errors).
pub fn read_committed(dir: &Path) -> Result<(ArtifactManifest, Vec<u8>, PathBuf)> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = std::fs::read(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
    let manifest: ArtifactManifest = serde_json::from_slice(&text)
        .map_err(|e| Error::data(&manifest_path, format!("not a valid manifest: {e}")))?;
    let file = &manifest.artifact.path;
    if file.is_empty() || file.contains('/') || file.contains('\\') || file == "." || file == ".." {
        return Err(Error::data(
            &manifest_path,
            "artifact.path must be a plain file name",
        ));
    }
    let data_path = dir.join(file);
    let bytes = std::fs::read(&data_path).map_err(|e| Error::io(&data_path, e))?;
    if bytes.len() as u64 != manifest.artifact.bytes {
        return Err(Error::data(
            &data_path,
            format!(
                "size {} differs from the manifest's {}",
                bytes.len(),
                manifest.artifact.bytes
            ),
        ));
    }
    if sha256_hex(&bytes) != manifest.artifact.sha256 {
        return Err(Error::data(
            &data_path,
            "sha256 differs from the manifest's",
        ));
    }
    Ok((manifest, bytes, data_path))
}

/// Reads a committed artifact from `dir` ([`read_committed`]). Tensors
/// come back as f32 on the CPU.
pub fn read_artifact(dir: &Path) -> Result<(ArtifactManifest, BTreeMap<String, Tensor>)> {
    let (manifest, bytes, data_path) = read_committed(dir)?;
    let tensors = from_safetensors(&bytes, &data_path)?;
    Ok((manifest, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use heterotune_crds::manifest::ArtifactKind;

    fn manifest() -> ArtifactManifest {
        ArtifactManifest {
            client: Some("a".into()),
            family: Some("bert".into()),
            num_examples: 10,
            created_at: "2026-01-01T00:00:00Z".into(),
            ..ArtifactManifest::new(ArtifactKind::Client, "ns/run-abc", 1, 0, "test")
        }
    }

    #[test]
    fn round_trip_and_tamper_detection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "shared.slot0.gate.bias".to_string(),
            Tensor::from_slice(&[1.0f32, -2.5, 3.0]),
        );
        let written =
            write_artifact(dir.path(), &tensors, StoreDtype::Bf16, manifest()).expect("write");
        assert_eq!(written.tensors[0].dtype, "BF16");
        assert_eq!(written.tensors[0].shape, vec![3]);
        let (m, back) = read_artifact(dir.path()).expect("read");
        assert_eq!(m, written);
        let t = &back["shared.slot0.gate.bias"];
        assert_eq!(Vec::<f32>::try_from(t).expect("f32"), vec![1.0, -2.5, 3.0]);
        // Same values, same bytes.
        let (a, _) = to_safetensors(&tensors, StoreDtype::Bf16).expect("bytes");
        let (b, _) = to_safetensors(&tensors, StoreDtype::Bf16).expect("bytes");
        assert_eq!(a, b);
        // A flipped byte is caught.
        let data = dir.path().join(ADAPTER_FILE);
        let mut bytes = std::fs::read(&data).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&data, bytes).expect("write");
        let err = read_artifact(dir.path()).expect_err("tampered");
        assert!(err.to_string().contains("sha256"), "{err}");
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn raw_format_round_trip_and_errors() {
        // Views come back sorted by name, whatever the data order.
        let raws = [("b", 2.0f32), ("a", 1.0)].map(|(n, v)| {
            let raw = RawTensor {
                dtype: safetensors::Dtype::F32,
                shape: vec![1],
                data: v.to_le_bytes().to_vec(),
            };
            (n.to_string(), raw)
        });
        let (bytes, infos) = serialize_raw(raws).expect("bytes");
        assert_eq!(infos[0].name, "b");
        assert_eq!(infos[0].dtype, "F32");
        let views = tensor_views(&bytes).expect("views");
        let names: Vec<&str> = views.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(views[1].1.data(), 2.0f32.to_le_bytes());
        // The same as the tensor path.
        let mut tensors = BTreeMap::new();
        tensors.insert("a".to_string(), Tensor::from_slice(&[1.0f32]));
        tensors.insert("b".to_string(), Tensor::from_slice(&[2.0f32]));
        assert_eq!(
            to_safetensors(&tensors, StoreDtype::F32).expect("bytes").0,
            bytes
        );

        let err = from_safetensors(b"garbage", Path::new("x.safetensors"))
            .expect_err("garbage")
            .to_string();
        assert!(
            err.contains("x.safetensors") && err.contains("not valid safetensors"),
            "{err}"
        );
    }
}
