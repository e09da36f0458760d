//! Taking in a round's client artifacts, in two passes, so that the
//! round-level defences ([`super::robust`]) can see every update's norms
//! and weight before anything is added:
//!
//! 1. **verify** every committed artifact in client-name order
//!    ([`super::verify`], with `maxUpdateNorm`), and keep its per-part
//!    norms, its reported `numExamples` and its sha256; its decoded values
//!    are kept too while their total stays within
//!    [`RoundOptions::retain_bytes`], and dropped otherwise;
//! 2. compute the adaptive bounds (lower median RMS per part), reject or
//!    clip the updates above them, cap the weights (partition sizes, then
//!    `maxExamplesShare`), and add the updates to the aggregator in
//!    client-name order: kept values directly, dropped ones re-read and
//!    re-verified (an artifact whose sha256 changed between the passes is
//!    rejected as `checksum_mismatch`).
//!
//! Memory: the norms (a few numbers per client) plus at most
//! `retain_bytes` of decoded updates, plus the aggregator's own state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use heterotune_crds::spec::{FederatedTuneSpec, NormBoundAction};

use super::array::Array;
use super::common::POOL_COUNTS;
use super::reject::{Reject, RejectReason};
use super::robust::{
    apply_scales, capped_weights, part_norms, NormBounds, PartNorm, PartitionFacts,
};
use super::stats::{Participant, RoundStats};
use super::verify::{self, Verified};
use super::{Aggregator, RoundContext};
use crate::{Error, Result};

/// Default of [`RoundOptions::retain_bytes`]: 512 MiB of f32 values.
pub const DEFAULT_RETAIN_BYTES: u64 = 512 * 1024 * 1024;

/// How a round is taken in.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundOptions {
    /// Decoded updates (f32 bytes) kept in memory between the two passes;
    /// beyond it, updates are re-read in the second pass.
    pub retain_bytes: u64,
    /// What the aggregator knows of each client's training partition (its
    /// size, which caps `numExamples`, and its examples per class, which
    /// replace the class counts it reports with the pool ensemble); `None`:
    /// prepared from the spec's data when `robust.examplesFromPartition` is
    /// on and the data can be read here ([`super::robust::partition_facts`]).
    pub partition: Option<BTreeMap<String, PartitionFacts>>,
}

impl Default for RoundOptions {
    fn default() -> Self {
        RoundOptions {
            retain_bytes: DEFAULT_RETAIN_BYTES,
            partition: None,
        }
    }
}

/// An update accepted by the first pass.
struct Candidate {
    path: PathBuf,
    verified: Verified,
    retained: bool,
    norms: BTreeMap<&'static str, PartNorm>,
}

/// Records `reject` in `stats`.
fn record_reject(stats: &mut RoundStats, reject: Reject) {
    stats.bytes_rejected += reject.bytes;
    *stats
        .reject_counts
        .entry(reject.reason.label().to_string())
        .or_default() += 1;
    stats.rejects.push(reject);
}

/// Fills `options.partition` from the spec's data when asked and possible;
/// returns where `numExamples` is capped (`partition`, `unavailable`,
/// `off`).
pub(crate) fn examples_cap(spec: &FederatedTuneSpec, options: &mut RoundOptions) -> &'static str {
    if !spec.aggregation.robust.examples_from_partition {
        options.partition = None;
        return "off";
    }
    if options.partition.is_none() {
        options.partition = super::robust::partition_facts(spec);
    }
    if options.partition.is_some() {
        "partition"
    } else {
        "unavailable"
    }
}

/// The client folders under `dir` (name, path), in name order; none when
/// `dir` does not exist.
pub(crate) fn client_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut entries: Vec<(String, PathBuf)> = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(read) => {
            for entry in read {
                let entry = entry.map_err(|e| Error::io(dir, e))?;
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if is_dir {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    entries.push((name, entry.path()));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(dir, e)),
    }
    entries.sort();
    Ok(entries)
}

/// Pass 1: verifies every committed artifact of `entries`; returns the
/// accepted ones and the names of all committed ones.
fn first_pass(
    ctx: &RoundContext<'_>,
    schemas: &BTreeMap<String, BTreeMap<String, Vec<usize>>>,
    entries: &[(String, PathBuf)],
    retain_bytes: u64,
    stats: &mut RoundStats,
) -> (Vec<Candidate>, BTreeSet<String>) {
    let mut committed = BTreeSet::new();
    let mut candidates = Vec::new();
    let mut retained_total = 0u64;
    for (name, path) in entries {
        if !verify::is_committed(path) {
            continue;
        }
        committed.insert(name.clone());
        match verify::verify_client(ctx, schemas, path, name) {
            Ok(mut verified) => {
                let norms = part_norms(&verified.update.tensors);
                let size: u64 = norms.values().map(|n| n.numel as u64 * 4).sum();
                let retained = retained_total.saturating_add(size) <= retain_bytes;
                if retained {
                    retained_total += size;
                } else {
                    verified.update.tensors.clear();
                }
                candidates.push(Candidate {
                    path: path.clone(),
                    verified,
                    retained,
                    norms,
                });
            }
            Err(reject) => record_reject(stats, reject),
        }
    }
    (candidates, committed)
}

/// The candidate's weight before the share cap: `numExamples`, capped by
/// its partition's size when known (`partition`, at least 1).
fn partition_capped(c: &Candidate, partition: Option<&PartitionFacts>) -> u64 {
    let reported = c.verified.update.num_examples;
    match partition {
        Some(p) => reported.min(p.examples.max(1)),
        None => reported,
    }
}

/// Verifies every committed artifact of `entries` and adds the accepted
/// ones to `aggregator` in client-name order, after the adaptive bound and
/// the weight caps; records participants, rejects, the robust statistics
/// and the clients with no committed artifact in `stats`.
pub(crate) fn take_round(
    ctx: &RoundContext<'_>,
    schemas: &BTreeMap<String, BTreeMap<String, Vec<usize>>>,
    entries: &[(String, PathBuf)],
    options: &RoundOptions,
    aggregator: &mut dyn Aggregator,
    stats: &mut RoundStats,
) -> Result<()> {
    let agg = &ctx.spec.aggregation;
    let (candidates, committed) = first_pass(ctx, schemas, entries, options.retain_bytes, stats);
    let bounds = NormBounds::new(
        agg.robust.norm_bound_multiple,
        candidates.iter().map(|c| &c.norms),
    );
    stats.robust.median_rms = bounds
        .median_rms
        .iter()
        .map(|(p, m)| ((*p).to_string(), *m))
        .collect();
    let mut kept = Vec::new();
    for c in candidates {
        let scales = bounds.scales(&c.norms);
        if !scales.is_empty() && agg.norm_bound_action == NormBoundAction::Reject {
            let parts: Vec<&str> = scales.keys().copied().collect();
            let reject = Reject {
                client: c.verified.update.client.clone(),
                reason: RejectReason::NormExceeded,
                detail: format!(
                    "{} above {} × the round's median RMS (robust.normBoundMultiple)",
                    parts.join(", "),
                    bounds.multiple
                ),
                bytes: c.verified.bytes,
            };
            record_reject(stats, reject);
        } else {
            kept.push((c, scales));
        }
    }
    let partition = |c: &Candidate| {
        options
            .partition
            .as_ref()
            .and_then(|m| m.get(&c.verified.update.client))
    };
    let reported: Vec<u64> = kept
        .iter()
        .map(|(c, _)| partition_capped(c, partition(c)))
        .collect();
    let weights = capped_weights(&reported, agg.robust.max_examples_share);
    let plan: Vec<(&str, &str)> = kept
        .iter()
        .map(|(c, _)| {
            (
                c.verified.update.client.as_str(),
                c.verified.update.family.as_str(),
            )
        })
        .collect();
    aggregator.plan(&plan);
    for ((c, scales), weight) in kept.into_iter().zip(weights) {
        let classes = partition(&c).map(|p| p.class_counts.as_slice());
        second_pass(ctx, schemas, c, &scales, weight, classes, aggregator, stats)?;
    }
    stats.missing = ctx
        .clients
        .keys()
        .filter(|c| !committed.contains(*c))
        .cloned()
        .collect();
    Ok(())
}

/// Pass 2 for one candidate: its values (kept, or re-read and checked to be
/// the same file), scaled by `scales`, weighted `weight`, its class counts
/// replaced by its partition's `classes` when known, into `aggregator`.
#[allow(clippy::too_many_arguments)]
fn second_pass(
    ctx: &RoundContext<'_>,
    schemas: &BTreeMap<String, BTreeMap<String, Vec<usize>>>,
    c: Candidate,
    scales: &BTreeMap<&'static str, f64>,
    weight: u64,
    classes: Option<&[u64]>,
    aggregator: &mut dyn Aggregator,
    stats: &mut RoundStats,
) -> Result<()> {
    let Candidate {
        path,
        verified: mut v,
        retained,
        ..
    } = c;
    if !retained {
        let name = v.update.client.clone();
        match verify::verify_client(ctx, schemas, &path, &name) {
            Ok(again) if again.sha256 == v.sha256 => v.update.tensors = again.update.tensors,
            Ok(again) => {
                let reject = Reject {
                    client: name,
                    reason: RejectReason::ChecksumMismatch,
                    detail: "the artifact changed between the two passes of the aggregation".into(),
                    bytes: again.bytes,
                };
                record_reject(stats, reject);
                return Ok(());
            }
            Err(reject) => {
                record_reject(stats, reject);
                return Ok(());
            }
        }
    }
    apply_scales(&mut v.update.tensors, scales);
    if let (Some(counts), Some(truth)) = (v.update.tensors.get_mut(POOL_COUNTS), classes) {
        if replace_counts(counts, truth) {
            stats.robust.counts_replaced.push(v.update.client.clone());
        }
    }
    if !scales.is_empty() {
        stats.robust.clipped.push(v.update.client.clone());
    }
    if weight < v.update.num_examples {
        stats.robust.weights_capped.push(v.update.client.clone());
    }
    stats.participants.push(Participant {
        client: v.update.client.clone(),
        family: v.update.family.clone(),
        num_examples: v.update.num_examples,
        weight,
        bytes: v.bytes,
        update_norm: v.update_norm,
        clipped: v.clipped || !scales.is_empty(),
        clipped_parts: scales.keys().map(|p| (*p).to_string()).collect(),
        test_accuracy: v.test_accuracy,
        test_macro_f1: v.test_macro_f1,
        received_accuracy: v.received_accuracy,
        received_macro_f1: v.received_macro_f1,
    });
    stats.bytes_received += v.bytes;
    stats.examples += weight;
    v.update.num_examples = weight;
    aggregator.add(ctx, v.update)
}

/// Sets `counts` (a client's `pool.counts`) to its partition's `truth`;
/// whether they differed. Counts of another length (a spec whose labels
/// the partition does not have) are left as they are.
fn replace_counts(counts: &mut Array, truth: &[u64]) -> bool {
    if counts.data.len() != truth.len() {
        return false;
    }
    let mut changed = false;
    for (c, &t) in counts.data.iter_mut().zip(truth) {
        let t = t as f32;
        // bf16 on the wire: counts above 256 are rounded; compare loosely.
        if (*c - t).abs() > t.abs() / 128.0 + 0.5 {
            changed = true;
        }
        *c = t;
    }
    changed
}

/// [`Error::QuorumNotMet`] when fewer updates than the quorum were accepted.
pub(crate) fn check_quorum(stats: &RoundStats) -> Result<()> {
    if (stats.participants.len() as u64) >= u64::from(stats.quorum) {
        return Ok(());
    }
    let mut parts: Vec<String> = stats
        .rejects
        .iter()
        .map(|r| format!("{} rejected ({}: {})", r.client, r.reason, r.detail))
        .collect();
    if !stats.missing.is_empty() {
        parts.push(format!("missing: {}", stats.missing.join(", ")));
    }
    Err(Error::QuorumNotMet {
        round: stats.round,
        accepted: stats.participants.len(),
        required: stats.quorum,
        summary: parts.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(values: &[f32]) -> Array {
        Array {
            shape: vec![values.len()],
            data: values.to_vec(),
        }
    }

    #[test]
    fn reported_class_counts_are_replaced_by_the_partitions() {
        // A client claiming every example for class 0.
        let mut claimed = counts(&[50.0, 0.0, 0.0]);
        assert!(replace_counts(&mut claimed, &[10, 25, 15]));
        assert_eq!(claimed.data, [10.0, 25.0, 15.0]);
        // Honest counts, rounded to bf16 on the wire (301 → 300), are the
        // same counts: replaced silently.
        let mut honest = counts(&[300.0, 2.0, 0.0]);
        assert!(!replace_counts(&mut honest, &[301, 2, 0]));
        assert_eq!(honest.data, [301.0, 2.0, 0.0]);
        // Another number of classes: left alone.
        let mut other = counts(&[1.0, 2.0]);
        assert!(!replace_counts(&mut other, &[1, 2, 3]));
        assert_eq!(other.data, [1.0, 2.0]);
    }
}
