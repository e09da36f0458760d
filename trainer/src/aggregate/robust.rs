//! Defences against hostile updates that pass verification (well-formed,
//! finite, of the right shapes, yet scaled ×1000, near the BF16 limit, or
//! weighted by an inflated `numExamples`): `spec.aggregation.robust`.
//!
//! * **Adaptive norm bound** (`normBoundMultiple`, default 5; 0 disables):
//!   every update is split into parts, `shared` (`shared.*`), `bridge`
//!   (`bridge.*`), `pool` (`pool.*`: probabilities, not deltas) and `own`
//!   (everything else: family parts, head, LoRA
//!   factors). A part's statistic is its RMS value `‖Δ_p‖ / √numel_p`,
//!   which does not depend on the family's width or the client's rank, so
//!   every client of the round is compared with every other. The bound of
//!   a part is `k ×` the round's *lower* median of that statistic over the
//!   accepted updates that send it (with two clients: the smaller one, so
//!   one of two clients cannot lift the bound by itself); a part above it
//!   is scaled down to it (`normBoundAction: clip`) or the update is
//!   rejected (`reject`). A zero median (most clients sent zeros) applies
//!   no bound.
//! * **Weights**: a client's weight is its `numExamples`, capped by its
//!   partition's training-set size when the aggregator can prepare the
//!   spec's data ([`partition_sizes`], `examplesFromPartition`), then
//!   water-filled ([`capped_weights`]) so that no weight exceeds
//!   `maxExamplesShare` of the round's total.
//!
//! The combiners (`combine: median | trimmedMean | multiKrum | bulyan`) are in
//! [`super::combine`].

use std::collections::BTreeMap;

use heterotune_crds::spec::{AdapterKind, FederatedTuneSpec, RobustCombine, RobustSpec};
use serde::{Deserialize, Serialize};

use super::array::Array;
use super::common::SHARED;
use super::common::{BRIDGE_PREFIX, POOL_PREFIX};
use crate::{Error, Result};

/// Part labels of an update, for the adaptive bound.
pub const PARTS: [&str; 4] = ["bridge", "own", "pool", "shared"];

/// The part of an update tensor `name` belongs to.
pub fn part_of(name: &str) -> &'static str {
    if name.starts_with(BRIDGE_PREFIX) {
        "bridge"
    } else if name.starts_with(POOL_PREFIX) {
        "pool"
    } else if name.starts_with(SHARED) {
        "shared"
    } else {
        "own"
    }
}

/// Sum of squares and number of values of one part of an update.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PartNorm {
    /// `Σ v²` (f64, in tensor-name order).
    pub sum_sq: f64,
    /// Number of values.
    pub numel: usize,
}

impl PartNorm {
    /// `‖Δ_p‖`.
    pub fn norm(&self) -> f64 {
        self.sum_sq.sqrt()
    }

    /// `‖Δ_p‖ / √numel_p` (0 for an empty part).
    pub fn rms(&self) -> f64 {
        if self.numel == 0 {
            0.0
        } else {
            (self.sum_sq / self.numel as f64).sqrt()
        }
    }
}

/// The per-part norms of `tensors` (parts with no tensor are absent).
pub fn part_norms(tensors: &BTreeMap<String, Array>) -> BTreeMap<&'static str, PartNorm> {
    let mut out: BTreeMap<&'static str, PartNorm> = BTreeMap::new();
    for (name, t) in tensors {
        let p = out.entry(part_of(name)).or_default();
        p.sum_sq += t
            .data
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>();
        p.numel += t.numel();
    }
    out
}

/// The lower median (`⌈n/2⌉`-th smallest) of `values`; `None` when empty.
pub fn lower_median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[(values.len() - 1) / 2])
}

/// The round's adaptive bounds: per part, the lower median RMS and `k`.
#[derive(Debug, Clone, PartialEq)]
pub struct NormBounds {
    /// `normBoundMultiple` (0: no bound).
    pub multiple: f64,
    /// Per part, the lower median of the accepted updates' RMS values.
    pub median_rms: BTreeMap<&'static str, f64>,
}

impl NormBounds {
    /// The bounds of a round whose accepted updates have the part norms `updates`.
    pub fn new<'a>(
        multiple: f64,
        updates: impl Iterator<Item = &'a BTreeMap<&'static str, PartNorm>> + Clone,
    ) -> Self {
        let mut median_rms = BTreeMap::new();
        for part in PARTS {
            let values: Vec<f64> = updates
                .clone()
                .filter_map(|u| u.get(part).map(PartNorm::rms))
                .collect();
            if let Some(m) = lower_median(values) {
                median_rms.insert(part, m);
            }
        }
        NormBounds {
            multiple,
            median_rms,
        }
    }

    /// The scale of every part of an update of part norms `norms` that is
    /// above its bound (`bound / norm` < 1); empty when none is.
    pub fn scales(&self, norms: &BTreeMap<&'static str, PartNorm>) -> BTreeMap<&'static str, f64> {
        let mut out = BTreeMap::new();
        if self.multiple <= 0.0 {
            return out;
        }
        for (part, n) in norms {
            let Some(&median) = self.median_rms.get(part) else {
                continue;
            };
            let bound = self.multiple * median * (n.numel as f64).sqrt();
            let norm = n.norm();
            if median > 0.0 && norm > bound {
                out.insert(*part, bound / norm);
            }
        }
        out
    }
}

/// Scales every tensor of `tensors` whose part has a scale in `scales`.
pub fn apply_scales(tensors: &mut BTreeMap<String, Array>, scales: &BTreeMap<&'static str, f64>) {
    for (name, t) in tensors.iter_mut() {
        if let Some(&s) = scales.get(part_of(name)) {
            // In f64: the scale of a ±3e38 update is below f32's normal range.
            for v in &mut t.data {
                *v = (f64::from(*v) * s) as f32;
            }
        }
    }
}

/// Caps the weights `reported` so that none exceeds `share` of their total
/// (water-filling: every weight above a threshold `T` becomes `⌊T⌋`, with
/// `T = share · Σ min(n_c, T)`). With `share ≥ 1` or a single client they
/// are returned unchanged; when no threshold exists (`share ≤ 1/C`), every
/// weight becomes the smallest one (equal weights). Deterministic, integer.
pub fn capped_weights(reported: &[u64], share: f64) -> Vec<u64> {
    let total: f64 = reported.iter().map(|&n| n as f64).sum();
    let max = reported.iter().copied().max().unwrap_or(0) as f64;
    if share >= 1.0 || reported.len() <= 1 || max <= share * total {
        return reported.to_vec();
    }
    let mut sorted: Vec<f64> = reported.iter().map(|&n| n as f64).collect();
    sorted.sort_by(f64::total_cmp);
    let c = sorted.len();
    let smallest = sorted[0];
    let mut rest = total;
    let mut threshold = smallest;
    for j in 1..c {
        // The largest j are capped; `rest` sums the others.
        rest -= sorted[c - j];
        let denom = 1.0 - share * j as f64;
        if denom <= 0.0 {
            break;
        }
        let t = share * rest / denom;
        if t >= sorted[c - j - 1] {
            threshold = t;
            break;
        }
    }
    let cap = (threshold.floor() as u64).max(smallest as u64).max(1);
    reported.iter().map(|&n| n.min(cap)).collect()
}

/// Each spec client's training-set size (by name), from the spec's data and
/// partition (the same deterministic partition the clients train on), or
/// `None` when the data cannot be prepared here (no error is surfaced: the
/// cap is then recorded as unavailable, and a failing dataset's content
/// never reaches the statistics).
pub fn partition_sizes(spec: &FederatedTuneSpec) -> Option<BTreeMap<String, u64>> {
    partition_facts(spec).map(|facts| {
        facts
            .into_iter()
            .map(|(name, f)| (name, f.examples))
            .collect()
    })
}

/// What the aggregator knows of one client's training partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionFacts {
    /// Its training-set size.
    pub examples: u64,
    /// Its training examples per class id (`task.labels` order).
    pub class_counts: Vec<u64>,
}

/// [`partition_sizes`] with each client's examples per class: what a client
/// reports of its label counts (`pool.counts`) is replaced by these.
pub fn partition_facts(spec: &FederatedTuneSpec) -> Option<BTreeMap<String, PartitionFacts>> {
    let cfg = crate::job::data_config(spec).ok()?;
    let data = crate::data::partition::federate(&cfg).ok()?;
    if data.clients.len() != spec.clients.len() {
        return None;
    }
    Some(
        spec.clients
            .iter()
            .zip(&data.clients)
            .map(|(c, d)| {
                let facts = PartitionFacts {
                    examples: d.train.len() as u64,
                    class_counts: d
                        .label_counts(data.labels.len())
                        .into_iter()
                        .map(|n| n as u64)
                        .collect(),
                };
                (c.name.clone(), facts)
            })
            .collect(),
    )
}

/// Checks `spec.aggregation.robust`: finite values in range, and a
/// coordinate-wise combiner only where updates have the same shapes (DeMA).
pub fn check_spec(spec: &FederatedTuneSpec) -> Result<()> {
    let r = &spec.aggregation.robust;
    let field = "spec.aggregation.robust";
    if !(r.norm_bound_multiple.is_finite() && r.norm_bound_multiple >= 0.0) {
        return Err(Error::config(
            format!("{field}.normBoundMultiple"),
            format!("must be finite and ≥ 0, got {}", r.norm_bound_multiple),
        ));
    }
    if !(0.0..=1.0).contains(&r.max_examples_share) {
        return Err(Error::config(
            format!("{field}.maxExamplesShare"),
            format!("must be in [0, 1], got {}", r.max_examples_share),
        ));
    }
    if !(0.0..0.5).contains(&r.trim_fraction) {
        return Err(Error::config(
            format!("{field}.trimFraction"),
            format!("must be in [0, 0.5), got {}", r.trim_fraction),
        ));
    }
    if r.combine != RobustCombine::Mean && spec.adapter.kind != AdapterKind::Dema {
        return Err(Error::config(
            format!("{field}.combine"),
            format!(
                "{} needs adapter.type dema: the clients of a LoRA family send factors of \
                 different ranks, which cannot be compared coordinate by coordinate",
                r.combine.as_str()
            ),
        ));
    }
    Ok(())
}

/// What the defences did in a round (`stats.robust` of the global manifest).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RobustStats {
    /// `combine` in force (`mean`, `median`, `trimmedMean`, `multiKrum`).
    pub combine: String,
    /// `normBoundMultiple` in force (0: no adaptive bound).
    pub norm_bound_multiple: f64,
    /// Per part, the round's lower median RMS value of the accepted updates.
    pub median_rms: BTreeMap<String, f64>,
    /// `maxExamplesShare` in force.
    pub max_examples_share: f64,
    /// Where `numExamples` was capped: `partition` (by the clients'
    /// partition sizes), `unavailable` (the data could not be prepared
    /// here), `off` (`examplesFromPartition: false`).
    pub examples_cap: String,
    /// Clients whose weight is below their reported `numExamples`.
    pub weights_capped: Vec<String>,
    /// Clients with a part clipped by the adaptive bound.
    pub clipped: Vec<String>,
    /// Clients whose reported class counts (`pool.counts`) were not their
    /// partition's, which replaced them (with `examplesFromPartition`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub counts_replaced: Vec<String>,
    /// `combine: multiKrum`: the parts it left out, as `client (part)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub krum_excluded: Vec<String>,
}

impl RobustStats {
    /// The statistics skeleton of `robust`.
    pub fn of(robust: &RobustSpec) -> Self {
        RobustStats {
            combine: robust.combine.as_str().to_string(),
            norm_bound_multiple: robust.norm_bound_multiple,
            max_examples_share: robust.max_examples_share,
            ..RobustStats::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_water_filled() {
        // 11 of 21 is above half: capped at T = 10 (10 of 20).
        assert_eq!(capped_weights(&[7, 3, 11], 0.5), vec![7, 3, 10]);
        // Two clients: at most equal weights.
        assert_eq!(capped_weights(&[100, 300], 0.5), vec![100, 100]);
        assert_eq!(capped_weights(&[100, 1 << 40], 0.5), vec![100, 100]);
        // Six clients, one inflated to 2^40: T = 0.5 · 500 / 0.5 = 500.
        assert_eq!(
            capped_weights(&[100, 100, 100, 100, 100, 1 << 40], 0.5),
            vec![100, 100, 100, 100, 100, 500]
        );
        // Two inflated of six at share 0.25: T = 0.25 · 400 / 0.5 = 200.
        assert_eq!(
            capped_weights(&[100, 100, 100, 100, 1 << 40, 1 << 39], 0.25),
            vec![100, 100, 100, 100, 200, 200]
        );
        // Below 1/C no threshold exists: equal weights.
        assert_eq!(capped_weights(&[5, 9, 30], 0.3), vec![5, 5, 5]);
        // Honest and balanced, share 1 or one client: unchanged.
        assert_eq!(capped_weights(&[4, 4, 8], 0.5), vec![4, 4, 8]);
        assert_eq!(capped_weights(&[7, 3, 11], 1.0), vec![7, 3, 11]);
        assert_eq!(capped_weights(&[1 << 40], 0.5), vec![1 << 40]);
    }

    #[test]
    fn the_bound_is_a_multiple_of_the_lower_median_rms() {
        let n = |sum_sq: f64, numel: usize| {
            let mut m = BTreeMap::new();
            m.insert("shared", PartNorm { sum_sq, numel });
            m
        };
        // RMS 1, 2, 1000 (numel 4): lower median 2, bound 5 · 2 · 2 = 20.
        let updates = [n(4.0, 4), n(16.0, 4), n(4.0e6, 4)];
        let b = NormBounds::new(5.0, updates.iter());
        assert_eq!(b.median_rms["shared"], 2.0);
        assert!(b.scales(&updates[0]).is_empty() && b.scales(&updates[1]).is_empty());
        let s = b.scales(&updates[2])["shared"];
        assert!((s - 20.0 / 2000.0).abs() < 1e-15, "{s}");
        // Two clients: the lower median is the smaller one.
        let b = NormBounds::new(5.0, updates[1..].iter());
        assert_eq!(b.median_rms["shared"], 2.0);
        // 0 disables it.
        assert!(NormBounds::new(0.0, updates.iter())
            .scales(&updates[2])
            .is_empty());
        assert_eq!(lower_median(vec![3.0, 1.0, 2.0, 4.0]), Some(2.0));
    }
}
