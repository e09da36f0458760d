//! `fedavg`: sample-weighted averaging of DeMA's shared part over all
//! clients (CMGA's ablation), family parts and head within each family.
//!
//! Shared tensors: `Δ = Σ_c n_c Δ_c / Σ_c n_c`, summed family by family
//! (families sorted, clients sorted within a family, f64 accumulators), then
//! `θ ← θ + η Δ` (server momentum as in [`super::cmga`]). The family
//! norms and pairwise cosines of the family updates are reported as for
//! CMGA (before = after: nothing is aligned), so the two can be compared.

use std::borrow::Cow;
use std::collections::BTreeMap;

use heterotune_crds::spec::AggregationAlgorithm;

use super::array::{divided, norm};
use super::cmga::{
    apply_group, carry_group, flatten, record_shared_norms, shared_groups, sum_in_order,
};
use super::common::{dema_schema, sums_of, FamilyAccumulator, NextGlobal, SharedSource};
use super::stats::{pairwise_cosines, GroupStats};
use super::{Aggregated, Aggregator, ClientInfo, ClientUpdate, RoundContext};
use crate::Result;

/// The `fedavg` aggregator.
#[derive(Debug, Default)]
pub struct FedAvg {
    acc: FamilyAccumulator,
}

impl FedAvg {
    /// A FedAvg aggregator.
    pub fn new() -> Self {
        FedAvg::default()
    }
}

impl Aggregator for FedAvg {
    fn algorithm(&self) -> AggregationAlgorithm {
        AggregationAlgorithm::Fedavg
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
        let total: f64 = self.acc.values().map(|s| s.examples as f64).sum();
        let mut groups = Vec::new();
        for (group, names) in shared_groups(ctx.previous) {
            if self.acc.is_empty() {
                carry_group(&mut next, ctx.previous, &names);
                continue;
            }
            let sizes: Vec<usize> = names.iter().map(|n| ctx.previous[n].numel()).collect();
            let sums: Vec<Vec<f64>> = self
                .acc
                .values()
                .map(|s| flatten(&s.sums, &names, &sizes))
                .collect();
            let terms: Vec<Cow<'_, [f64]>> = sums.iter().map(|s| Cow::Borrowed(&s[..])).collect();
            let delta = divided(&sum_in_order(&terms), total);
            apply_group(&mut next, ctx.previous, &names, &delta);

            let keys: Vec<&String> = self.acc.keys().collect();
            let family_updates: Vec<Vec<f64>> = self
                .acc
                .values()
                .zip(&sums)
                .map(|(s, v)| divided(v, s.examples as f64))
                .collect();
            let cosines = pairwise_cosines(&keys, &family_updates);
            groups.push(GroupStats {
                group,
                parameters: delta.len(),
                family_norms: keys
                    .iter()
                    .zip(&family_updates)
                    .map(|(k, v)| ((*k).clone(), norm(v)))
                    .collect(),
                harmonised_norms: None,
                cosines_before: cosines.clone(),
                cosines_after: cosines,
                conflicts_projected: 0,
                combined_norm: norm(&delta),
            });
        }
        record_shared_norms(&groups, &mut next.families);
        next.average_family_parts(ctx, &self.acc);
        Ok(next.done(groups, 0))
    }
}
