//! `family-fedavg`: everything averaged within each family only (nothing
//! crosses families). With one client per family this is local training.
//!
//! * DeMA: each family keeps its own copy of the shared part,
//!   `family/<key>/shared.slot{s}.*`, updated by the sample-weighted mean of
//!   its clients' deltas; in the first round it starts from the initial
//!   global's top-level `shared.*`. The written global holds **no**
//!   top-level `shared.*`, so a client loading `family/<key>/...` stripped
//!   gets its family's copy. Family parts and head as in `fedavg`.
//! * LoRA: `family/<key>/lora.*` (stored at the family's largest rank),
//!   updated by the sample-weighted mean of the clients' deltas zero-padded
//!   to that rank (with homogeneous ranks: plain FedAvg of LoRA factors);
//!   the head within the family.

use std::collections::BTreeMap;

use heterotune_crds::spec::{AdapterKind, AggregationAlgorithm};

use super::common::{
    average_within_families, dema_schema, family_name, family_stats, lora_schema, shared_base,
    FamilyAccumulator, ServerStep, SharedSource, HEAD, LORA,
};
use super::hetlora::add_lora_update;
use super::{Aggregated, Aggregator, ClientInfo, ClientUpdate, RoundContext};
use crate::Result;

/// The `family-fedavg` aggregator (DeMA or LoRA, per `adapter.type`).
#[derive(Debug)]
pub struct FamilyFedAvg {
    adapter: AdapterKind,
    acc: FamilyAccumulator,
}

impl FamilyFedAvg {
    /// A per-family FedAvg aggregator for adapters of kind `adapter`.
    pub fn new(adapter: AdapterKind) -> Self {
        FamilyFedAvg {
            adapter,
            acc: BTreeMap::new(),
        }
    }
}

impl Aggregator for FamilyFedAvg {
    fn algorithm(&self) -> AggregationAlgorithm {
        AggregationAlgorithm::FamilyFedavg
    }

    fn expected_tensors(
        &self,
        ctx: &RoundContext<'_>,
        client: &ClientInfo,
    ) -> Result<BTreeMap<String, Vec<usize>>> {
        match self.adapter {
            AdapterKind::Dema => dema_schema(ctx, client, SharedSource::PerFamily),
            AdapterKind::Lora => lora_schema(ctx, client),
        }
    }

    fn add(&mut self, ctx: &RoundContext<'_>, update: ClientUpdate) -> Result<()> {
        let sums = self.acc.entry(update.family.clone()).or_default();
        match self.adapter {
            AdapterKind::Dema => sums.add(&update),
            AdapterKind::Lora => add_lora_update(ctx, sums, &update, false),
        }
        Ok(())
    }

    fn finish(self: Box<Self>, ctx: &RoundContext<'_>) -> Result<Aggregated> {
        let step = ServerStep::new(ctx);
        let mut out = BTreeMap::new();
        let mut families = family_stats(&self.acc);
        match self.adapter {
            AdapterKind::Dema => {
                for key in ctx.families.keys() {
                    let sums = self.acc.get(key);
                    let mut sq = 0.0;
                    for (local, base) in shared_base(ctx, key, SharedSource::PerFamily) {
                        let global = family_name(key, &local);
                        match sums.and_then(|s| s.mean(&local)) {
                            Some(delta) => {
                                sq += super::array::dot(&delta, &delta);
                                step.apply(&mut out, &global, base, &delta);
                            }
                            None => step.carry(&mut out, &global, base),
                        }
                    }
                    if let Some(f) = families.get_mut(key) {
                        f.update_norms.insert("shared".into(), sq.sqrt());
                    }
                }
                super::cmga::average_family_parts(ctx, &self.acc, &step, &mut out, &mut families);
            }
            AdapterKind::Lora => {
                average_within_families(
                    ctx,
                    &self.acc,
                    &step,
                    LORA,
                    "lora",
                    &mut out,
                    &mut families,
                );
                if ctx.spec.adapter.share.head {
                    average_within_families(
                        ctx,
                        &self.acc,
                        &step,
                        HEAD,
                        "head",
                        &mut out,
                        &mut families,
                    );
                }
            }
        }
        Ok(Aggregated {
            tensors: out,
            families,
            groups: Vec::new(),
            conflicts_projected: 0,
        })
    }
}
