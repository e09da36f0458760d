//! CMGA, Cross-Model Gradient Alignment, over DeMA's shared part (the
//! method; docs/aggregation.md and ../shared/design/method.md).
//!
//! Per shared group (a DeMA slot: its experts and gate tensors flattened in
//! name order into one vector of `P` values), with `S_f = Σ_{c∈f} n_c Δ_c`
//! and `N_f = Σ_{c∈f} n_c`:
//!
//! 1. family update `G_f = S_f / N_f`;
//! 2. magnitude harmonisation (`magnitudeHarmonisation`): every non-zero
//!    `G_f` is rescaled to the median of the non-zero family norms;
//! 3. alignment (`alignment`):
//!    * `pcgrad`: for each family `f`, over the other families `f'` in a
//!      seeded random order (ChaCha8 of `aggregation.seed`, stream keyed by
//!      round, group and family), with `O_f'` the others' updates after step
//!      2 (their *original* updates, never the projected ones): if
//!      `cos(G_f, O_f') < τ` (`conflictThreshold`), `G_f ← G_f − (G_f·O_f' /
//!      ‖O_f'‖²) O_f'`. After projecting, `G_f ⟂ O_f'`; for `τ ≤ 0` every
//!      pair of aligned updates ends with cosine ≥ τ (two families: exactly
//!      `−cos` of the originals when they conflicted);
//!    * `ties`: TIES-style sign consensus per coordinate: the elected sign
//!      is that of `Σ_f w_f G_f[i]`; families of the opposite sign are
//!      dropped at that coordinate and the coordinate becomes the weighted
//!      mean of the agreeing families (TIES's disjoint mean; no trimming);
//! 4. combine `Δ = Σ_f w_f G_f` with `w_f = N_f / N` (`familyWeighting:
//!    samples`) or `1 / F` (`uniform`);
//! 5. server step `θ ← θ + η Δ` (with momentum `m ← β m + Δ`, `θ ← θ + η m`).
//!
//! With `samples` weighting, a family left unchanged by steps 2-3
//! contributes its exact sum `S_f` (not `N_f · G_f`), so with one family,
//! or with no conflict and harmonisation off (or a no-op), `Δ = Σ_f S_f / N`
//! bit for bit: exactly `fedavg`'s result.
//!
//! Family parts (down/up) and the head are averaged within each family
//! (sample-weighted) when the spec shares them. Cost: `O(F² · P)` per group
//! for the cosines and projections, `O(C · P)` to accumulate `C` clients.

use std::borrow::Cow;
use std::collections::BTreeMap;

use heterotune_crds::spec::{AggregationAlgorithm, AlignmentRule, FamilyWeighting};
use sha2::{Digest, Sha256};

use super::array::{axpy, divided, dot, norm, scaled, Array};
use super::common::{
    dema_schema, global_shared, group_of, natural_key, sums_of, FamilyAccumulator, NextGlobal,
    SharedSource,
};
use super::stats::{pairwise_cosines, FamilyStats, GroupStats};
use super::{Aggregated, Aggregator, ClientInfo, ClientUpdate, RoundContext};
use crate::data::split::{seeded_rng, uniform_index};
use crate::Result;

/// CMGA's options (from `spec.aggregation`).
#[derive(Debug, Clone, PartialEq)]
pub struct CmgaOptions {
    /// Conflict rule.
    pub alignment: AlignmentRule,
    /// `τ`: PCGrad projects when the cosine is below it.
    pub threshold: f64,
    /// Rescale family updates to the median family norm.
    pub harmonise: bool,
    /// Family weights in the combination.
    pub weighting: FamilyWeighting,
    /// Seed of PCGrad's random order.
    pub seed: u64,
}

impl CmgaOptions {
    /// The options of `spec.aggregation`.
    pub fn from_spec(spec: &heterotune_crds::spec::FederatedTuneSpec) -> Self {
        let a = &spec.aggregation;
        CmgaOptions {
            alignment: a.alignment,
            threshold: a.conflict_threshold,
            harmonise: a.magnitude_harmonisation,
            weighting: a.family_weighting,
            seed: a.seed,
        }
    }
}

/// One family's accumulated update of a group.
#[derive(Debug, Clone, Copy)]
pub struct FamilyUpdate<'a> {
    /// Family key.
    pub family: &'a String,
    /// `N_f`, the family's examples (> 0).
    pub examples: u64,
    /// `S_f = Σ n_c Δ_c` over the group's flattened values.
    pub sum: &'a [f64],
}

/// The result of [`combine_group`].
#[derive(Debug, Clone)]
pub struct Combined {
    /// `Δ`, the combined update (before the server step).
    pub delta: Vec<f64>,
    /// The family updates after harmonisation and alignment.
    pub aligned: Vec<Vec<f64>>,
    /// Norms, cosines, conflicts (the group name is filled in).
    pub stats: GroupStats,
}

/// Total order of the other families for PCGrad: a Fisher–Yates shuffle
/// driven by ChaCha8(`seed`) on a stream keyed by round, group and family.
fn seeded_order(
    seed: u64,
    round: u32,
    group: &str,
    family: &str,
    mut order: Vec<usize>,
) -> Vec<usize> {
    let digest = Sha256::digest(format!("cmga-order:{round}:{group}:{family}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    let mut rng = seeded_rng(seed, u64::from_le_bytes(bytes));
    for i in (1..order.len()).rev() {
        let j = uniform_index(&mut rng, i + 1);
        order.swap(i, j);
    }
    order
}

/// Sums `terms` elementwise in order (the first term is copied, not added
/// to zeros, so a single term is returned bit for bit).
pub(crate) fn sum_in_order(terms: &[Cow<'_, [f64]>]) -> Vec<f64> {
    let mut acc = terms.first().map(|t| t.to_vec()).unwrap_or_default();
    for t in &terms[1.min(terms.len())..] {
        for (a, &v) in acc.iter_mut().zip(t.iter()) {
            *a += v;
        }
    }
    acc
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// Runs CMGA steps 1-4 on one group (see the module docs). `families` must
/// be non-empty, all sums of the same length, in a fixed (sorted) order.
pub fn combine_group(
    group: &str,
    round: u32,
    families: &[FamilyUpdate<'_>],
    opts: &CmgaOptions,
) -> Combined {
    let f = families.len();
    let names: Vec<&String> = families.iter().map(|u| u.family).collect();
    let total: f64 = families.iter().map(|u| u.examples as f64).sum();
    let mut g: Vec<Vec<f64>> = families
        .iter()
        .map(|u| divided(u.sum, u.examples as f64))
        .collect();
    let mut modified = vec![false; f];
    let norms: Vec<f64> = g.iter().map(|v| norm(v)).collect();
    let cosines_before = pairwise_cosines(&names, &g);

    let harmonised_norms = opts.harmonise.then(|| {
        harmonise(&mut g, &norms, &mut modified);
        names
            .iter()
            .zip(&g)
            .map(|(n, v)| ((*n).clone(), norm(v)))
            .collect()
    });
    let weights: Vec<f64> = match opts.weighting {
        FamilyWeighting::Samples => families.iter().map(|u| u.examples as f64 / total).collect(),
        FamilyWeighting::Uniform => vec![1.0 / f as f64; f],
    };
    let mut conflicts = 0u64;
    if opts.alignment == AlignmentRule::Pcgrad && f > 1 {
        let order =
            |i: usize, others: Vec<usize>| seeded_order(opts.seed, round, group, names[i], others);
        conflicts += pcgrad(&mut g, &mut modified, opts.threshold, order);
    }
    // Step 4 for the families as they are now (TIES overrides conflicting
    // coordinates below).
    let mut delta = combine(families, &g, &modified, opts.weighting, total);
    if opts.alignment == AlignmentRule::Ties && f > 1 {
        conflicts += ties(&mut g, &weights, &mut delta);
    }

    let stats = GroupStats {
        group: group.to_string(),
        parameters: delta.len(),
        family_norms: names
            .iter()
            .zip(&norms)
            .map(|(n, v)| ((*n).clone(), *v))
            .collect(),
        harmonised_norms,
        cosines_before,
        cosines_after: pairwise_cosines(&names, &g),
        conflicts_projected: conflicts,
        combined_norm: norm(&delta),
    };
    Combined {
        delta,
        aligned: g,
        stats,
    }
}

/// Step 2: rescales every non-zero family update `g[i]` (of norm
/// `norms[i]`) to the median of the non-zero norms, marking the ones it
/// changes in `modified`.
fn harmonise(g: &mut [Vec<f64>], norms: &[f64], modified: &mut [bool]) {
    let nonzero: Vec<f64> = norms.iter().copied().filter(|&n| n > 0.0).collect();
    if let Some(m) = median(nonzero) {
        for i in 0..g.len() {
            if norms[i] > 0.0 {
                let s = m / norms[i];
                if s != 1.0 {
                    g[i] = scaled(&g[i], s);
                    modified[i] = true;
                }
            }
        }
    }
}

/// Step 3, `pcgrad`: projects each family update off the others' original
/// updates it conflicts with (cosine below `threshold`), in the order
/// `order(i, others)`; marks the projected ones in `modified` and returns
/// the number of projections.
fn pcgrad(
    g: &mut [Vec<f64>],
    modified: &mut [bool],
    threshold: f64,
    order: impl Fn(usize, Vec<usize>) -> Vec<usize>,
) -> u64 {
    let f = g.len();
    let originals = g.to_vec();
    let sq: Vec<f64> = originals.iter().map(|o| dot(o, o)).collect();
    let mut conflicts = 0;
    for i in 0..f {
        let others: Vec<usize> = (0..f).filter(|&j| j != i).collect();
        for j in order(i, others) {
            if sq[j] == 0.0 {
                continue;
            }
            let gi_norm = norm(&g[i]);
            if gi_norm == 0.0 {
                break;
            }
            let d = dot(&g[i], &originals[j]);
            if d / (gi_norm * sq[j].sqrt()) < threshold {
                axpy(&mut g[i], -d / sq[j], &originals[j]);
                modified[i] = true;
                conflicts += 1;
            }
        }
    }
    conflicts
}

/// Step 4: `Δ = Σ_f w_f G_f`; with `samples` weighting a family left
/// unchanged (`!modified`) contributes its exact sum `S_f`.
fn combine(
    families: &[FamilyUpdate<'_>],
    g: &[Vec<f64>],
    modified: &[bool],
    weighting: FamilyWeighting,
    total: f64,
) -> Vec<f64> {
    match weighting {
        FamilyWeighting::Samples => {
            let terms: Vec<Cow<'_, [f64]>> = families
                .iter()
                .zip(g)
                .zip(modified)
                .map(|((u, gi), &m)| {
                    if m {
                        Cow::Owned(scaled(gi, u.examples as f64))
                    } else {
                        Cow::Borrowed(u.sum)
                    }
                })
                .collect();
            divided(&sum_in_order(&terms), total)
        }
        FamilyWeighting::Uniform => {
            let terms: Vec<Cow<'_, [f64]>> = g.iter().map(|v| Cow::Borrowed(&v[..])).collect();
            divided(&sum_in_order(&terms), g.len() as f64)
        }
    }
}

/// Step 3, `ties`: at each coordinate where some family disagrees with the
/// elected sign, drops the disagreeing families (zeroed in `g`) and sets
/// `delta` to the weighted mean of the agreeing ones; returns the number of
/// family coordinates dropped.
fn ties(g: &mut [Vec<f64>], weights: &[f64], delta: &mut [f64]) -> u64 {
    let f = g.len();
    let mut conflicts = 0;
    for (i, d) in delta.iter_mut().enumerate() {
        let elected: f64 = (0..f).map(|k| weights[k] * g[k][i]).sum();
        if elected == 0.0 || !(0..f).any(|k| g[k][i] * elected < 0.0) {
            continue;
        }
        let (mut num, mut den) = (0.0, 0.0);
        for k in 0..f {
            if g[k][i] * elected < 0.0 {
                g[k][i] = 0.0;
                conflicts += 1;
            } else {
                num += weights[k] * g[k][i];
                den += weights[k];
            }
        }
        *d = num / den;
    }
    conflicts
}

/// The previous global's shared groups (slots): group name → its tensor
/// names (sorted), groups in natural order.
pub(crate) fn shared_groups(previous: &BTreeMap<String, Array>) -> Vec<(String, Vec<String>)> {
    let mut groups: BTreeMap<(String, u64), (String, Vec<String>)> = BTreeMap::new();
    for name in global_shared(previous).keys() {
        let group = group_of(name).unwrap_or(name).to_string();
        groups
            .entry(natural_key(&group))
            .or_insert_with(|| (group.clone(), Vec::new()))
            .1
            .push(name.clone());
    }
    groups.into_values().collect()
}

/// Flattens family `sums`' tensors `names` into one vector (zeros for a
/// tensor the family has no sum of).
pub(crate) fn flatten(
    sums: &BTreeMap<String, Vec<f64>>,
    names: &[String],
    sizes: &[usize],
) -> Vec<f64> {
    let mut out = Vec::with_capacity(sizes.iter().sum());
    for (name, &n) in names.iter().zip(sizes) {
        match sums.get(name) {
            Some(s) => out.extend_from_slice(s),
            None => out.extend(std::iter::repeat_n(0.0, n)),
        }
    }
    out
}

/// Applies the server step to a group's flattened `delta`, tensor by tensor.
pub(crate) fn apply_group(
    next: &mut NextGlobal<'_>,
    previous: &BTreeMap<String, Array>,
    names: &[String],
    delta: &[f64],
) {
    let mut offset = 0;
    for name in names {
        let base = &previous[name];
        let n = base.numel();
        next.step
            .apply(&mut next.out, name, base, &delta[offset..offset + n]);
        offset += n;
    }
}

/// Keeps a group no family updated: its tensors (and momentum) unchanged.
pub(crate) fn carry_group(
    next: &mut NextGlobal<'_>,
    previous: &BTreeMap<String, Array>,
    names: &[String],
) {
    for n in names {
        next.step.carry(&mut next.out, n, &previous[n]);
    }
}

/// Records each family's shared update norm (all groups) in `families`.
pub(crate) fn record_shared_norms(
    groups: &[GroupStats],
    families: &mut BTreeMap<String, FamilyStats>,
) {
    for (key, fam) in families.iter_mut() {
        let sq: f64 = groups
            .iter()
            .filter_map(|g| g.family_norms.get(key))
            .map(|n| n * n)
            .sum();
        fam.update_norms.insert("shared".into(), sq.sqrt());
    }
}

/// The `cmga` aggregator.
#[derive(Debug)]
pub struct Cmga {
    opts: CmgaOptions,
    acc: FamilyAccumulator,
}

impl Cmga {
    /// A CMGA aggregator with `opts`.
    pub fn new(opts: CmgaOptions) -> Self {
        Cmga {
            opts,
            acc: BTreeMap::new(),
        }
    }
}

impl Aggregator for Cmga {
    fn algorithm(&self) -> AggregationAlgorithm {
        AggregationAlgorithm::Cmga
    }

    fn expected_tensors(
        &self,
        ctx: &RoundContext<'_>,
        client: &ClientInfo,
    ) -> Result<BTreeMap<String, Vec<usize>>> {
        dema_schema(ctx, client, SharedSource::Global)
    }

    fn add(&mut self, _ctx: &RoundContext<'_>, update: ClientUpdate) -> Result<()> {
        sums_of(&mut self.acc, &update).add(&update);
        Ok(())
    }

    fn finish(self: Box<Self>, ctx: &RoundContext<'_>) -> Result<Aggregated> {
        let mut next = NextGlobal::new(ctx, &self.acc);
        if self.opts.weighting == FamilyWeighting::Uniform {
            let w = 1.0 / next.families.len().max(1) as f64;
            for f in next.families.values_mut() {
                f.weight = w;
            }
        }
        let mut groups = Vec::new();
        let mut conflicts = 0;
        for (group, names) in shared_groups(ctx.previous) {
            let sizes: Vec<usize> = names.iter().map(|n| ctx.previous[n].numel()).collect();
            let flat: Vec<(&String, u64, Vec<f64>)> = self
                .acc
                .iter()
                .map(|(k, s)| (k, s.examples, flatten(&s.sums, &names, &sizes)))
                .collect();
            let updates: Vec<FamilyUpdate<'_>> = flat
                .iter()
                .map(|(k, n, v)| FamilyUpdate {
                    family: k,
                    examples: *n,
                    sum: v,
                })
                .collect();
            if updates.is_empty() {
                carry_group(&mut next, ctx.previous, &names);
                continue;
            }
            let combined = combine_group(&group, ctx.round, &updates, &self.opts);
            apply_group(&mut next, ctx.previous, &names, &combined.delta);
            conflicts += combined.stats.conflicts_projected;
            groups.push(combined.stats);
        }
        record_shared_norms(&groups, &mut next.families);
        next.average_family_parts(ctx, &self.acc);
        Ok(next.done(groups, conflicts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(alignment: AlignmentRule, threshold: f64) -> CmgaOptions {
        CmgaOptions {
            alignment,
            threshold,
            harmonise: false,
            weighting: FamilyWeighting::Samples,
            seed: 7,
        }
    }

    #[test]
    fn pcgrad_makes_conflicting_pairs_non_negative() {
        let names: Vec<String> = (0..4).map(|i| format!("f{i}")).collect();
        // Deterministic pseudo-random vectors with strong conflicts.
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        let base: Vec<f64> = (0..64).map(|_| next()).collect();
        let sums: Vec<Vec<f64>> = (0..4)
            .map(|i| {
                let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                base.iter().map(|&b| sign * b + 0.3 * next()).collect()
            })
            .collect();
        for tau in [0.0, -0.1] {
            let updates: Vec<FamilyUpdate<'_>> = names
                .iter()
                .zip(&sums)
                .map(|(n, s)| FamilyUpdate {
                    family: n,
                    examples: 1,
                    sum: s,
                })
                .collect();
            let c = combine_group(
                "shared.slot0",
                1,
                &updates,
                &opts(AlignmentRule::Pcgrad, tau),
            );
            assert!(c.stats.conflicts_projected > 0);
            assert!(c.stats.cosines_before.iter().any(|p| p.cosine < tau));
            let again = combine_group(
                "shared.slot0",
                1,
                &updates,
                &opts(AlignmentRule::Pcgrad, tau),
            );
            assert_eq!(c.delta, again.delta, "seeded order is deterministic");
            // Every aligned family update is orthogonal to or agrees with
            // each original it was checked against last (2 families: exact).
            let two = &updates[..2];
            let c2 = combine_group("shared.slot0", 1, two, &opts(AlignmentRule::Pcgrad, tau));
            for p in &c2.stats.cosines_after {
                assert!(p.cosine >= tau - 1e-12, "{p:?}");
            }
            let before = c2.stats.cosines_before[0].cosine;
            let after = c2.stats.cosines_after[0].cosine;
            assert!((after + before).abs() < 1e-9, "{before} {after}");
        }
    }

    #[test]
    fn ties_keeps_agreeing_coordinates() {
        let names = ["a".to_string(), "b".to_string(), "c".to_string()];
        let sums = [
            vec![1.0, 2.0, -1.0],
            vec![1.0, -4.0, -1.0],
            vec![2.0, 2.0, 0.0],
        ];
        let updates: Vec<FamilyUpdate<'_>> = names
            .iter()
            .zip(&sums)
            .map(|(n, s)| FamilyUpdate {
                family: n,
                examples: 1,
                sum: s,
            })
            .collect();
        let c = combine_group("g", 1, &updates, &opts(AlignmentRule::Ties, 0.0));
        // Coordinate 0: all agree: plain mean 4/3. Coordinate 1: elected
        // sign of 2-4+2 = 0 is none: plain mean 0. Coordinate 2: elected
        // negative; 0 agrees: (-1-1+0)/3.
        assert!((c.delta[0] - 4.0 / 3.0).abs() < 1e-12);
        assert_eq!(c.delta[1], 0.0);
        assert!((c.delta[2] + 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(c.stats.conflicts_projected, 0);
        let sums = [vec![1.0, 2.0], vec![1.0, -1.0], vec![2.0, 2.0]];
        let updates: Vec<FamilyUpdate<'_>> = names
            .iter()
            .zip(&sums)
            .map(|(n, s)| FamilyUpdate {
                family: n,
                examples: 1,
                sum: s,
            })
            .collect();
        let c = combine_group("g", 1, &updates, &opts(AlignmentRule::Ties, 0.0));
        // Coordinate 1: elected positive; b dropped: disjoint mean (2+2)/2.
        assert!((c.delta[1] - 2.0).abs() < 1e-12);
        assert_eq!(c.stats.conflicts_projected, 1);
        assert_eq!(c.aligned[1][1], 0.0);
    }

    #[test]
    fn harmonisation_uses_the_median_norm() {
        let names = ["a".to_string(), "b".to_string(), "c".to_string()];
        let sums = [vec![3.0, 4.0], vec![0.0, 10.0], vec![1.0, 0.0]];
        let updates: Vec<FamilyUpdate<'_>> = names
            .iter()
            .zip(&sums)
            .map(|(n, s)| FamilyUpdate {
                family: n,
                examples: 1,
                sum: s,
            })
            .collect();
        let o = CmgaOptions {
            harmonise: true,
            ..opts(AlignmentRule::Pcgrad, -1.0)
        };
        let c = combine_group("g", 1, &updates, &o);
        let h = c.stats.harmonised_norms.expect("harmonised");
        for v in h.values() {
            assert!((v - 5.0).abs() < 1e-12, "{h:?}");
        }
        assert!((c.delta[0] - (3.0 + 0.0 + 5.0) / 3.0).abs() < 1e-12);
    }
}
