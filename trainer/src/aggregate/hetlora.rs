//! `hetlora`: HetLoRA (Cho et al. 2024) within each family: heterogeneous
//! per-client LoRA ranks, zero-padded to the family's largest rank,
//! averaged, truncated back per client.
//!
//! The global holds, per family, the factors at the family's largest rank
//! `R` (the largest `clients[].loraRank` of its clients in the spec):
//! `family/<key>/lora.layer{l}.{query,value}.a` `[R, d_in]` and `.b`
//! `[d_out, R]`. A client of rank `r` starts from the first `r` rows of `A`
//! and the first `r` columns of `B` (HetLoRA's truncation) and sends the
//! deltas of those. The server rebuilds each client's trained factors
//! (`truncate(θ, r_c) + Δ_c`), zero-pads them to `R`, and takes the
//! sample-weighted mean `M` (HetLoRA's aggregation of padded factors: the
//! components a low-rank client lacks are averaged with its zeros, which
//! shrinks them as in the paper); then `θ ← θ + η (M − θ)` (`η` = server
//! learning rate; η = 1 is HetLoRA exactly). HetLoRA's optional
//! sparsity-weighted aggregation and client-side rank self-pruning are not
//! implemented. The head (when shared) is averaged within the family.

use std::collections::BTreeMap;

use heterotune_crds::spec::AggregationAlgorithm;

use super::common::{
    add_padded, factor_of, family_name, family_tensors, lora_schema, sums_of, truncate,
    FamilyAccumulator, FamilySums, NextGlobal, LORA,
};
use super::{Aggregated, Aggregator, ClientInfo, ClientUpdate, RoundContext};
use crate::Result;

/// Adds client `update` to its family's `sums`: LoRA factors zero-padded to
/// the family's stored rank (as trained values `truncate(θ, r) + Δ` when
/// `as_values`, else as deltas), weighted by `n_c`; other tensors (the head)
/// as weighted deltas.
pub(crate) fn add_lora_update(
    ctx: &RoundContext<'_>,
    sums: &mut FamilySums,
    update: &ClientUpdate,
    as_values: bool,
) {
    let w = update.num_examples as f64;
    for (name, t) in &update.tensors {
        let full = ctx.previous.get(&family_name(&update.family, name));
        match (factor_of(name), full) {
            (Some(factor), Some(full)) => {
                let rank = update.lora_rank;
                let x: Vec<f64> = if as_values {
                    let start = truncate(factor, full, rank);
                    start
                        .data
                        .iter()
                        .zip(&t.data)
                        .map(|(&s, &d)| f64::from(s) + f64::from(d))
                        .collect()
                } else {
                    t.to_f64()
                };
                let acc = sums
                    .sums
                    .entry(name.clone())
                    .or_insert_with(|| vec![0.0; full.numel()]);
                add_padded(acc, &full.shape, factor, &x, rank, w);
            }
            _ => {
                let acc = sums
                    .sums
                    .entry(name.clone())
                    .or_insert_with(|| vec![0.0; t.numel()]);
                super::array::axpy_f32(acc, w, &t.data);
            }
        }
    }
    sums.record(update);
}

/// The `hetlora` aggregator.
#[derive(Debug, Default)]
pub struct HetLora {
    acc: FamilyAccumulator,
}

impl HetLora {
    /// A HetLoRA aggregator.
    pub fn new() -> Self {
        HetLora::default()
    }
}

impl Aggregator for HetLora {
    fn algorithm(&self) -> AggregationAlgorithm {
        AggregationAlgorithm::Hetlora
    }

    fn expected_tensors(
        &self,
        ctx: &RoundContext<'_>,
        client: &ClientInfo,
    ) -> Result<BTreeMap<String, Vec<usize>>> {
        lora_schema(ctx, client)
    }

    fn add(&mut self, ctx: &RoundContext<'_>, update: ClientUpdate) -> Result<()> {
        add_lora_update(ctx, sums_of(&mut self.acc, &update), &update, true);
        Ok(())
    }

    fn finish(self: Box<Self>, ctx: &RoundContext<'_>) -> Result<Aggregated> {
        let mut next = NextGlobal::new(ctx, &self.acc);
        // The family's mean trained factors `M`: the step is `M − θ`.
        next.step_families(
            ctx,
            &self.acc,
            "lora",
            |key| family_tensors(ctx.previous, key, LORA),
            |mean, prev| {
                mean.iter()
                    .zip(&prev.data)
                    .map(|(&m, &p)| m - f64::from(p))
                    .collect()
            },
        );
        next.average_head(ctx, &self.acc);
        Ok(next.done(Vec::new(), 0))
    }
}
