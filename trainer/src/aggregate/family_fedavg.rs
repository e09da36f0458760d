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
    dema_schema, lora_schema, shared_base, sums_of, FamilyAccumulator, NextGlobal, SharedSource,
    LORA,
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
        let sums = sums_of(&mut self.acc, &update);
        match self.adapter {
            AdapterKind::Dema => sums.add(&update),
            AdapterKind::Lora => add_lora_update(ctx, sums, &update, false),
        }
        Ok(())
    }

    fn finish(self: Box<Self>, ctx: &RoundContext<'_>) -> Result<Aggregated> {
        let mut next = NextGlobal::new(ctx, &self.acc);
        match self.adapter {
            AdapterKind::Dema => {
                // Each family's own copy of the shared part.
                next.step_families(
                    ctx,
                    &self.acc,
                    "shared",
                    |key| shared_base(ctx, key, SharedSource::PerFamily),
                    |mean, _| mean,
                );
                next.average_family_parts(ctx, &self.acc);
            }
            AdapterKind::Lora => {
                next.average_within_families(ctx, &self.acc, LORA, "lora");
                next.average_head(ctx, &self.acc);
            }
        }
        Ok(next.done(Vec::new(), 0))
    }
}
