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
//! | `baseSha256`, when present, is the previous global's data sha256 | `stale_base` |
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
//! The adaptive bound (`robust.normBoundMultiple`), which needs every
//! update's norms first, is applied afterwards ([`super::intake`]).
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

use heterotune_crds::layout::{MANIFEST_FILE, MAX_RECORD_BYTES};
use heterotune_crds::manifest::{ArtifactKind, ArtifactManifest, MANIFEST_SCHEMA_VERSION};
use heterotune_crds::spec::{AggregationSpec, NormBoundAction};
use safetensors::tensor::TensorView;

use super::array::{decode, Array};
use super::reject::{Reject, RejectReason, Rejecter};
use super::{ClientInfo, ClientUpdate, RoundContext};
use crate::artifact::{sha256_hex, tensor_views};

/// Largest accepted `numExamples` (keeps sums of weights exact in u64 and f64).
pub const MAX_EXAMPLES: u64 = 1 << 40;

/// An accepted update, ready for the aggregator.
#[derive(Debug)]
pub struct Verified {
    /// The update (deltas as f32, already clipped when the bound clips).
    pub update: ClientUpdate,
    /// Size of the data file.
    pub bytes: u64,
    /// The data file's sha256 (lowercase hex, as verified).
    pub sha256: String,
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
///
/// The checklist, in order (the first failure rejects): the manifest
/// ([`check_manifest`]), the data file ([`read_data`]), its header against
/// the manifest and the schema ([`check_header`]), the values
/// ([`decode_values`]) and the norm bound ([`apply_norm_bound`]).
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
    let m = read_manifest(&r, dir)?;
    let info = check_manifest(&r, ctx, &m, dir_name)?;
    let bytes = read_data(&mut r, dir, &m, ctx.spec.aggregation.max_artifact_bytes)?;
    let views =
        tensor_views(&bytes).map_err(|e| r.reject(RejectReason::MalformedData, e.to_string()))?;
    let empty = BTreeMap::new();
    let schema = schemas.get(dir_name).unwrap_or(&empty);
    check_header(&r, &views, &m, schema)?;
    let (mut tensors, sum_sq) = decode_values(&r, views)?;
    let update_norm = sum_sq.sqrt();
    let clipped = apply_norm_bound(&r, &ctx.spec.aggregation, update_norm, &mut tensors)?;
    Ok(Verified {
        update: ClientUpdate {
            client: dir_name.to_string(),
            family: info.family.clone(),
            num_examples: m.num_examples,
            lora_rank: info.lora_rank,
            tensors,
        },
        bytes: r.bytes,
        sha256: m.artifact.sha256.to_ascii_lowercase(),
        update_norm,
        clipped,
        test_accuracy: score(&m.metrics, "test_accuracy"),
        test_macro_f1: score(&m.metrics, "test_macro_f1"),
        received_accuracy: score(&m.metrics, "received_test_accuracy"),
        received_macro_f1: score(&m.metrics, "received_test_macro_f1"),
    })
}

/// Reads and parses the manifest in `dir` (bounded in size).
fn read_manifest(r: &Rejecter<'_>, dir: &Path) -> std::result::Result<ArtifactManifest, Reject> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = read_bounded(&manifest_path, MAX_RECORD_BYTES)
        .map_err(|e| r.reject(RejectReason::ManifestUnreadable, e))?;
    if text.len() as u64 > MAX_RECORD_BYTES {
        return Err(r.reject(
            RejectReason::ManifestUnreadable,
            format!("manifest larger than {MAX_RECORD_BYTES} bytes"),
        ));
    }
    let m = parse_manifest(&text)
        .map_err(|e| r.reject(RejectReason::ManifestInvalid, e.to_string()))?;
    Ok(m)
}

/// Checks the manifest `m` against the round: kind, schema, run, round,
/// base round, client, family, examples, data file name and declared size.
/// Returns the spec's client it names.
fn check_manifest<'c>(
    r: &Rejecter<'_>,
    ctx: &'c RoundContext<'_>,
    m: &ArtifactManifest,
    dir_name: &str,
) -> std::result::Result<&'c ClientInfo, Reject> {
    let agg = &ctx.spec.aggregation;
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
    if let (Some(want), Some(got)) = (&ctx.previous_sha256, &m.base_sha256) {
        if !got.eq_ignore_ascii_case(want) {
            // Untrusted text: echoed only when it is a digest.
            let got = if got.len() == 64 && got.bytes().all(|b| b.is_ascii_hexdigit()) {
                got.as_str()
            } else {
                "(not a sha256)"
            };
            return Err(r.reject(
                RejectReason::StaleBase,
                format!(
                    "trained from the global with sha256 {got}, but the global of round {} is {want} (a global no longer in the store)",
                    ctx.round.saturating_sub(1)
                ),
            ));
        }
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

    Ok(info)
}

/// Reads the data file `m.artifact.path` of `dir` (a regular file of the
/// declared size, at most `cap` bytes, with the declared sha256); records
/// the bytes read in `r`.
fn read_data(
    r: &mut Rejecter<'_>,
    dir: &Path,
    m: &ArtifactManifest,
    cap: u64,
) -> std::result::Result<Vec<u8>, Reject> {
    let file_name = &m.artifact.path;
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
    Ok(bytes)
}

/// Checks the data file's header against the manifest's tensor list, then
/// against the expected tensors `schema` (names, BF16, shapes).
fn check_header(
    r: &Rejecter<'_>,
    views: &[(String, TensorView<'_>)],
    m: &ArtifactManifest,
    schema: &BTreeMap<String, Vec<usize>>,
) -> std::result::Result<(), Reject> {
    let mut header: BTreeMap<String, (String, Vec<usize>)> = BTreeMap::new();
    for (name, view) in views {
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

    Ok(())
}

/// The values as f32 arrays, in name order, checked finite, and the sum of
/// their squares (in that fixed order).
fn decode_values(
    r: &Rejecter<'_>,
    views: Vec<(String, TensorView<'_>)>,
) -> std::result::Result<(BTreeMap<String, Array>, f64), Reject> {
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
    Ok((tensors, sum_sq))
}

/// Applies `maxUpdateNorm` to an update of norm `update_norm`: rejects it,
/// or scales `tensors` down to the bound (returns whether it did).
fn apply_norm_bound(
    r: &Rejecter<'_>,
    agg: &AggregationSpec,
    update_norm: f64,
    tensors: &mut BTreeMap<String, Array>,
) -> std::result::Result<bool, Reject> {
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
    Ok(clipped)
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
