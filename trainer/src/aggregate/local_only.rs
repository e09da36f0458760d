//! `local-only`: no exchange. Clients send artifacts with no tensors (their
//! manifest still reports examples and metrics, so the round's quorum and
//! statistics work as for every algorithm); the round's global is the
//! previous global, unchanged, so the round completes like any other.

use std::collections::BTreeMap;

use heterotune_crds::spec::AggregationAlgorithm;

use super::common::{family_stats, sums_of, FamilyAccumulator};
use super::{Aggregated, Aggregator, ClientInfo, ClientUpdate, RoundContext};
use crate::Result;

/// The `local-only` aggregator.
#[derive(Debug, Default)]
pub struct LocalOnly {
    acc: FamilyAccumulator,
}

impl LocalOnly {
    /// A local-only aggregator.
    pub fn new() -> Self {
        LocalOnly::default()
    }
}

impl Aggregator for LocalOnly {
    fn algorithm(&self) -> AggregationAlgorithm {
        AggregationAlgorithm::LocalOnly
    }

    fn expected_tensors(
        &self,
        _ctx: &RoundContext<'_>,
        _client: &ClientInfo,
    ) -> Result<BTreeMap<String, Vec<usize>>> {
        Ok(BTreeMap::new())
    }

    fn add(&mut self, _ctx: &RoundContext<'_>, update: ClientUpdate) -> Result<()> {
        sums_of(&mut self.acc, &update).record(&update);
        Ok(())
    }

    fn finish(self: Box<Self>, ctx: &RoundContext<'_>) -> Result<Aggregated> {
        Ok(Aggregated {
            tensors: ctx.previous.clone(),
            families: family_stats(&self.acc),
            ..Aggregated::default()
        })
    }
}
