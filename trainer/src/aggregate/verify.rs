//! Verification of client artifacts, which are untrusted input.
//!
//! A client directory `round-NNNN/clients/<dir>/` is *committed* when its
//! `manifest.json` exists; directories without one are still uploading (or
//! never will) and are listed as missing, not rejected. A committed artifact
//! is accepted only if every check below passes, in this order (the first
//! failure is the recorded reason):
//!
//! | check | reason label |
//! |---|---|
//! | `manifest.json` is a regular file of at most 16 MiB, readable | `manifest_unreadable` |
//! | it parses as an [`ArtifactManifest`] (non-numeric `metrics` entries, such as a NaN written as `null`, are dropped first) | `manifest_invalid` |
//! | `kind` is `client` | `wrong_kind` |
//! | `schemaVersion` is the one this build writes | `unsupported_schema` |
//! | `run` is this run | `wrong_run` |
//! | `round` is this round | `wrong_round` |
//! | `baseRound` is `round - 1` (the delta is relative to the previous global) | `stale_base` |
//! | `client` equals the directory name | `client_mismatch` |
//! | the client is in the spec | `unknown_client` |
//! | `family` is the family key of the client's model in the spec | `family_mismatch` |
//! | `0 < numExamples ≤ 2^40` | `invalid_examples` |
//! | `artifact.path` is a plain file name | `manifest_invalid` |
//! | declared and actual size are at most `aggregation.maxArtifactBytes` | `too_large` |
//! | the data file is a regular file (not a link) | `not_a_file` |
//! | actual size equals the declared size | `size_mismatch` |
//! | sha256 equals the declared digest | `checksum_mismatch` |
//! | the data parses as safetensors | `malformed_data` |
//! | the manifest's tensor list equals the file's header | `manifest_tensors_mismatch` |
//! | every expected tensor is present | `missing_tensor` |
//! | no other tensor is present | `unexpected_tensor` |
//! | every tensor is BF16 | `wrong_dtype` |
//! | every shape is the expected one | `wrong_shape` |
//! | every value is finite | `non_finite` |
//! | the update's L2 norm (over all its tensors) is at most `maxUpdateNorm` | `norm_exceeded` (with `normBoundAction: reject`; `clip` scales the update down to the bound instead) |
//!
//! The manifest's self-reported scores `test_accuracy` and `test_macro_f1`
//! (feeding the global manifest's `accuracy` metrics) and
//! `received_test_accuracy` / `received_test_macro_f1` (the `previous_global_*`
//! metrics) are kept only when finite and in [0, 1]; any other value is
//! ignored, never a reject.
//!
//! The expected tensors come from the aggregator ([`super::Aggregator::expected_tensors`]),
//! which derives them from the previous global artifact and the spec's share
//! policy: the previous global is the schema of the round.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;

use heterotune_crds::layout::MANIFEST_FILE;
use heterotune_crds::manifest::{ArtifactKind, ArtifactManifest, MANIFEST_SCHEMA_VERSION};
use heterotune_crds::spec::NormBoundAction;
use serde::{Deserialize, Serialize};

use super::array::{decode, Array};
use super::{ClientUpdate, RoundContext};
use crate::artifact::{sha256_hex, tensor_views};

/// Largest accepted client manifest.
pub const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;

/// Largest accepted `numExamples` (keeps sums of weights exact in u64 and f64).
pub const MAX_EXAMPLES: u64 = 1 << 40;

/// Why a client artifact was rejected. [`RejectReason::label`] is stable:
/// use it as a metric label (`heterotune_artifacts_rejected_total{reason=...}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The manifest could not be read (not a file, too large, I/O error).
    ManifestUnreadable,
    /// The manifest is not a valid artifact manifest (or names a data file
    /// outside its directory).
    ManifestInvalid,
    /// The manifest is not a client manifest.
    WrongKind,
    /// The manifest's schema version is not the one this build reads.
    UnsupportedSchema,
    /// The manifest belongs to another run.
    WrongRun,
    /// The manifest belongs to another round.
    WrongRound,
    /// The update was trained from another global state than the previous round's.
    StaleBase,
    /// The manifest names another client than its directory.
    ClientMismatch,
    /// The client is not in the spec.
    UnknownClient,
    /// The manifest's family is not the family of the client's model.
    FamilyMismatch,
    /// The manifest's `numExamples` (the aggregation weight) is 0 or above
    /// [`MAX_EXAMPLES`].
    InvalidExamples,
    /// The artifact is larger than `aggregation.maxArtifactBytes`.
    TooLarge,
    /// The data file is missing, a link or not a regular file.
    NotAFile,
    /// The data file's size differs from the manifest's (truncated upload).
    SizeMismatch,
    /// The data file's sha256 differs from the manifest's.
    ChecksumMismatch,
    /// The data file is not valid safetensors.
    MalformedData,
    /// The manifest's tensor list differs from the data file's header.
    ManifestTensorsMismatch,
    /// An expected tensor is absent.
    MissingTensor,
    /// A tensor the spec does not imply for this client is present.
    UnexpectedTensor,
    /// A tensor is not BF16.
    WrongDtype,
    /// A tensor's shape differs from the expected one.
    WrongShape,
    /// A value is NaN or infinite.
    NonFinite,
    /// The update's norm exceeds `maxUpdateNorm` (with `normBoundAction: reject`).
    NormExceeded,
}

impl RejectReason {
    /// Every reason, in declaration order.
    pub const ALL: [RejectReason; 23] = [
        RejectReason::ManifestUnreadable,
        RejectReason::ManifestInvalid,
        RejectReason::WrongKind,
        RejectReason::UnsupportedSchema,
        RejectReason::WrongRun,
        RejectReason::WrongRound,
        RejectReason::StaleBase,
        RejectReason::ClientMismatch,
        RejectReason::UnknownClient,
        RejectReason::FamilyMismatch,
        RejectReason::InvalidExamples,
        RejectReason::TooLarge,
        RejectReason::NotAFile,
        RejectReason::SizeMismatch,
        RejectReason::ChecksumMismatch,
        RejectReason::MalformedData,
        RejectReason::ManifestTensorsMismatch,
        RejectReason::MissingTensor,
        RejectReason::UnexpectedTensor,
        RejectReason::WrongDtype,
        RejectReason::WrongShape,
        RejectReason::NonFinite,
        RejectReason::NormExceeded,
    ];

    /// Stable snake_case label (metrics, stats, logs).
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::ManifestUnreadable => "manifest_unreadable",
            RejectReason::ManifestInvalid => "manifest_invalid",
            RejectReason::WrongKind => "wrong_kind",
            RejectReason::UnsupportedSchema => "unsupported_schema",
            RejectReason::WrongRun => "wrong_run",
            RejectReason::WrongRound => "wrong_round",
            RejectReason::StaleBase => "stale_base",
            RejectReason::ClientMismatch => "client_mismatch",
            RejectReason::UnknownClient => "unknown_client",
            RejectReason::FamilyMismatch => "family_mismatch",
            RejectReason::InvalidExamples => "invalid_examples",
            RejectReason::TooLarge => "too_large",
            RejectReason::NotAFile => "not_a_file",
            RejectReason::SizeMismatch => "size_mismatch",
            RejectReason::ChecksumMismatch => "checksum_mismatch",
            RejectReason::MalformedData => "malformed_data",
            RejectReason::ManifestTensorsMismatch => "manifest_tensors_mismatch",
            RejectReason::MissingTensor => "missing_tensor",
            RejectReason::UnexpectedTensor => "unexpected_tensor",
            RejectReason::WrongDtype => "wrong_dtype",
            RejectReason::WrongShape => "wrong_shape",
            RejectReason::NonFinite => "non_finite",
            RejectReason::NormExceeded => "norm_exceeded",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A rejected artifact: never aggregated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reject {
    /// The client directory's name (the claimed client).
    pub client: String,
    /// Why.
    pub reason: RejectReason,
    /// Human-readable detail (never contains tensor values).
    pub detail: String,
    /// Bytes of the data file that were read before rejecting (0 if none).
    pub bytes: u64,
}

/// An accepted update, ready for the aggregator.
#[derive(Debug)]
pub struct Verified {
    /// The update (deltas as f32, already clipped when the bound clips).
    pub update: ClientUpdate,
    /// Size of the data file.
    pub bytes: u64,
    /// L2 norm of the update as received (before any clipping).
    pub update_norm: f64,
    /// Whether the update was scaled down to `maxUpdateNorm`.
    pub clipped: bool,
    /// The manifest's `test_accuracy`, when it is finite and in [0, 1].
    pub test_accuracy: Option<f64>,
    /// The manifest's `test_macro_f1`, when it is finite and in [0, 1].
    pub test_macro_f1: Option<f64>,
    /// The manifest's `received_test_accuracy` (the received global model
    /// before local training), when it is finite and in [0, 1].
    pub received_accuracy: Option<f64>,
    /// The manifest's `received_test_macro_f1`, likewise.
    pub received_macro_f1: Option<f64>,
}

/// A self-reported score of the manifest's `metrics`: `None` unless it is
/// finite and in [0, 1] (untrusted and informational: a bad value is
/// ignored, never a reason to reject the update).
fn score(metrics: &BTreeMap<String, f64>, key: &str) -> Option<f64> {
    metrics
        .get(key)
        .copied()
        .and_then(heterotune_crds::manifest::valid_score)
}

/// Parses a client manifest (non-numeric metrics dropped, see
/// [`ArtifactManifest::from_slice`]).
fn parse_manifest(text: &[u8]) -> serde_json::Result<ArtifactManifest> {
    ArtifactManifest::from_slice(text)
}

struct Rejecter<'a> {
    client: &'a str,
    bytes: u64,
}

impl Rejecter<'_> {
    fn reject(&self, reason: RejectReason, detail: impl Into<String>) -> Reject {
        Reject {
            client: self.client.to_string(),
            reason,
            detail: detail.into(),
            bytes: self.bytes,
        }
    }
}

/// Reads at most `limit + 1` bytes of a regular file (links refused).
fn read_bounded(path: &Path, limit: u64) -> std::result::Result<Vec<u8>, String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !meta.file_type().is_file() {
        return Err("not a regular file".into());
    }
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::with_capacity(meta.len().min(limit) as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// Whether `dir` holds a committed artifact (its manifest exists, as any
/// kind of file: a link there is committed, then rejected).
pub fn is_committed(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir.join(MANIFEST_FILE)).is_ok()
}

/// Verifies the committed artifact in `dir` (directory name `dir_name`)
/// against the round `ctx` and the expected tensors `schemas` (per client
/// name). On success the update's values are f32 deltas, clipped if the
/// norm bound clips.
pub fn verify_client(
    ctx: &RoundContext<'_>,
    schemas: &BTreeMap<String, BTreeMap<String, Vec<usize>>>,
    dir: &Path,
    dir_name: &str,
) -> std::result::Result<Verified, Reject> {
    let mut r = Rejecter {
        client: dir_name,
        bytes: 0,
    };
    let agg = &ctx.spec.aggregation;

    // The manifest.
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = read_bounded(&manifest_path, MAX_MANIFEST_BYTES)
        .map_err(|e| r.reject(RejectReason::ManifestUnreadable, e))?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(r.reject(
            RejectReason::ManifestUnreadable,
            format!("manifest larger than {MAX_MANIFEST_BYTES} bytes"),
        ));
    }
    let m = parse_manifest(&text)
        .map_err(|e| r.reject(RejectReason::ManifestInvalid, e.to_string()))?;
    if m.kind != ArtifactKind::Client {
        return Err(r.reject(RejectReason::WrongKind, format!("kind {:?}", m.kind)));
    }
    if m.schema_version != MANIFEST_SCHEMA_VERSION {
        return Err(r.reject(
            RejectReason::UnsupportedSchema,
            format!(
                "schemaVersion {} (this build reads {MANIFEST_SCHEMA_VERSION})",
                m.schema_version
            ),
        ));
    }
    if m.run != ctx.run {
        return Err(r.reject(
            RejectReason::WrongRun,
            format!("run {:?}, expected {:?}", m.run, ctx.run),
        ));
    }
    if m.round != ctx.round {
        return Err(r.reject(
            RejectReason::WrongRound,
            format!("round {}, expected {}", m.round, ctx.round),
        ));
    }
    if m.base_round.checked_add(1) != Some(ctx.round) {
        return Err(r.reject(
            RejectReason::StaleBase,
            format!(
                "trained from the global of round {}, expected round {}",
                m.base_round,
                ctx.round.saturating_sub(1)
            ),
        ));
    }
    let claimed = m.client.as_deref().unwrap_or("");
    if claimed != dir_name {
        return Err(r.reject(
            RejectReason::ClientMismatch,
            format!("manifest names client {claimed:?}"),
        ));
    }
    let Some(info) = ctx.clients.get(dir_name) else {
        return Err(r.reject(RejectReason::UnknownClient, "not a client of the spec"));
    };
    let family = m.family.as_deref().unwrap_or("");
    if family != info.family {
        return Err(r.reject(
            RejectReason::FamilyMismatch,
            format!("family {family:?}, the spec's model is {:?}", info.family),
        ));
    }
    if m.num_examples == 0 || m.num_examples > MAX_EXAMPLES {
        return Err(r.reject(
            RejectReason::InvalidExamples,
            format!(
                "numExamples {} is not in 1..={MAX_EXAMPLES}",
                m.num_examples
            ),
        ));
    }
    let file_name = &m.artifact.path;
    if file_name.is_empty()
        || file_name.contains('/')
        || file_name.contains('\\')
        || file_name == "."
        || file_name == ".."
    {
        return Err(r.reject(
            RejectReason::ManifestInvalid,
            format!("artifact.path {file_name:?} is not a plain file name"),
        ));
    }
    let cap = agg.max_artifact_bytes;
    if m.artifact.bytes > cap {
        return Err(r.reject(
            RejectReason::TooLarge,
            format!("declares {} bytes, the limit is {cap}", m.artifact.bytes),
        ));
    }

    // The data.
    let data_path = dir.join(file_name);
    let meta = std::fs::symlink_metadata(&data_path)
        .map_err(|e| r.reject(RejectReason::NotAFile, format!("{file_name}: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(r.reject(
            RejectReason::NotAFile,
            format!("{file_name} is not a regular file"),
        ));
    }
    if meta.len() > cap {
        return Err(r.reject(
            RejectReason::TooLarge,
            format!("{} bytes, the limit is {cap}", meta.len()),
        ));
    }
    if meta.len() != m.artifact.bytes {
        return Err(r.reject(
            RejectReason::SizeMismatch,
            format!(
                "{} bytes, the manifest declares {}",
                meta.len(),
                m.artifact.bytes
            ),
        ));
    }
    let bytes = read_bounded(&data_path, cap)
        .map_err(|e| r.reject(RejectReason::NotAFile, format!("{file_name}: {e}")))?;
    r.bytes = bytes.len() as u64;
    if bytes.len() as u64 != m.artifact.bytes {
        return Err(r.reject(
            RejectReason::SizeMismatch,
            format!(
                "read {} bytes, the manifest declares {}",
                bytes.len(),
                m.artifact.bytes
            ),
        ));
    }
    if sha256_hex(&bytes) != m.artifact.sha256.to_ascii_lowercase() {
        return Err(r.reject(
            RejectReason::ChecksumMismatch,
            "sha256 differs from the manifest's",
        ));
    }
    let views =
        tensor_views(&bytes).map_err(|e| r.reject(RejectReason::MalformedData, e.to_string()))?;

    // The header against the manifest, then against the schema.
    let mut header: BTreeMap<String, (String, Vec<usize>)> = BTreeMap::new();
    for (name, view) in &views {
        header.insert(
            name.clone(),
            (format!("{:?}", view.dtype()), view.shape().to_vec()),
        );
    }
    let mut listed: BTreeMap<String, (String, Vec<usize>)> = BTreeMap::new();
    for t in &m.tensors {
        if listed
            .insert(t.name.clone(), (t.dtype.clone(), t.shape.clone()))
            .is_some()
        {
            return Err(r.reject(
                RejectReason::ManifestTensorsMismatch,
                format!("tensor {} listed twice", t.name),
            ));
        }
    }
    if listed != header {
        return Err(r.reject(
            RejectReason::ManifestTensorsMismatch,
            "the manifest's tensors differ from the data file's header",
        ));
    }
    let empty = BTreeMap::new();
    let schema = schemas.get(dir_name).unwrap_or(&empty);
    if let Some(name) = schema.keys().find(|n| !header.contains_key(*n)) {
        return Err(r.reject(RejectReason::MissingTensor, name.clone()));
    }
    if let Some(name) = header.keys().find(|n| !schema.contains_key(*n)) {
        return Err(r.reject(RejectReason::UnexpectedTensor, name.clone()));
    }
    for (name, (dtype, shape)) in &header {
        if dtype != "BF16" {
            return Err(r.reject(
                RejectReason::WrongDtype,
                format!("{name}: {dtype}, expected BF16"),
            ));
        }
        let want = &schema[name];
        if shape != want {
            return Err(r.reject(
                RejectReason::WrongShape,
                format!("{name}: {shape:?}, expected {want:?}"),
            ));
        }
    }

    // The values, in name order (the norm's sum has a fixed order).
    let mut tensors = BTreeMap::new();
    let mut sum_sq = 0.0f64;
    for (name, view) in views {
        let data = decode(view.dtype(), view.data()).ok_or_else(|| {
            r.reject(
                RejectReason::WrongDtype,
                format!("{name}: {:?}", view.dtype()),
            )
        })?;
        // One branch-free pass for finiteness and the squared norm (8
        // independent accumulators, so the loop vectorises; fixed order,
        // so the result is deterministic).
        let mut finite = true;
        let mut lanes = [0.0f64; 8];
        let chunks = data.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            for (acc, &v) in lanes.iter_mut().zip(c) {
                finite &= v.is_finite();
                *acc += f64::from(v) * f64::from(v);
            }
        }
        for &v in tail {
            finite &= v.is_finite();
            lanes[0] += f64::from(v) * f64::from(v);
        }
        let sq: f64 = lanes.iter().sum();
        if !finite {
            let i = data.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err(r.reject(
                RejectReason::NonFinite,
                format!("{name}: value {i} is not finite"),
            ));
        }
        sum_sq += sq;
        let array = Array::new(view.shape().to_vec(), data)
            .map_err(|e| r.reject(RejectReason::MalformedData, e.to_string()))?;
        tensors.insert(name, array);
    }
    let update_norm = sum_sq.sqrt();
    let mut clipped = false;
    if let Some(bound) = agg.max_update_norm {
        if update_norm > bound {
            match agg.norm_bound_action {
                NormBoundAction::Reject => {
                    return Err(r.reject(
                        RejectReason::NormExceeded,
                        format!("update norm {update_norm:.6e} exceeds maxUpdateNorm {bound}"),
                    ))
                }
                NormBoundAction::Clip => {
                    let scale = (bound / update_norm) as f32;
                    for t in tensors.values_mut() {
                        for v in &mut t.data {
                            *v *= scale;
                        }
                    }
                    clipped = true;
                }
            }
        }
    }
    Ok(Verified {
        update: ClientUpdate {
            client: dir_name.to_string(),
            family: info.family.clone(),
            num_examples: m.num_examples,
            lora_rank: info.lora_rank,
            tensors,
        },
        bytes: r.bytes,
        update_norm,
        clipped,
        test_accuracy: score(&m.metrics, "test_accuracy"),
        test_macro_f1: score(&m.metrics, "test_macro_f1"),
        received_accuracy: score(&m.metrics, "received_test_accuracy"),
        received_macro_f1: score(&m.metrics, "received_test_macro_f1"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique_and_snake_case() {
        let mut labels: Vec<&str> = RejectReason::ALL.iter().map(|r| r.label()).collect();
        for l in &labels {
            assert!(l.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{l}");
        }
        for r in RejectReason::ALL {
            let json = serde_json::to_string(&r).expect("json");
            assert_eq!(json, format!("\"{}\"", r.label()));
        }
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), RejectReason::ALL.len());
    }
}
