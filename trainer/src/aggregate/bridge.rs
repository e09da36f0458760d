//! The bridge model's tensors (`bridge.*`, `spec.bridge`): every client
//! sends all of them each round, and they are averaged over *all* clients
//! (sample-weighted deltas, then the server step), whatever the run's
//! algorithm does with the rest of the update. With the bridge alone this is
//! FedAvg of one common model: the smallest-common-model baseline.
//!
//! With `poolTeacher: ensemble` the clients also send their probabilities
//! on the public pool (`pool.*`), which become the global's ensemble
//! ([`super::pool`]).

use std::collections::BTreeMap;

use heterotune_crds::spec::PoolWeighting;

use super::array::Array;
use super::common::{
    FamilySums, ServerStep, BRIDGE_PREFIX, POOL_COUNTS, POOL_ENSEMBLE, POOL_PREFIX, POOL_PRIOR,
    POOL_PROBS,
};
use super::pool::PoolSums;
use super::{Aggregated, Aggregator, ClientInfo, ClientUpdate, RoundContext};
use crate::{Error, Result};

/// The run's aggregator with the bridge averaged over all clients.
pub struct Bridged {
    inner: Box<dyn Aggregator>,
    sums: FamilySums,
    pool: PoolSums,
}

impl Bridged {
    /// `inner` for everything but the bridge.
    pub fn new(inner: Box<dyn Aggregator>) -> Self {
        Bridged {
            inner,
            sums: FamilySums::default(),
            pool: PoolSums::default(),
        }
    }
}

/// The previous global's `bridge.*` tensors.
fn bridge_tensors(previous: &BTreeMap<String, Array>) -> impl Iterator<Item = (&String, &Array)> {
    previous
        .range(BRIDGE_PREFIX.to_string()..)
        .take_while(|(n, _)| n.starts_with(BRIDGE_PREFIX))
}

impl Aggregator for Bridged {
    pass_to_inner!(algorithm, plan);

    fn expected_tensors(
        &self,
        ctx: &RoundContext<'_>,
        client: &ClientInfo,
    ) -> Result<BTreeMap<String, Vec<usize>>> {
        let mut expected = self.inner.expected_tensors(ctx, client)?;
        let before = expected.len();
        expected.extend(bridge_tensors(ctx.previous).map(|(n, a)| (n.clone(), a.shape.clone())));
        if let Some(e) = ctx.previous.get(POOL_ENSEMBLE) {
            expected.insert(POOL_PROBS.to_string(), e.shape.clone());
            expected.insert(POOL_COUNTS.to_string(), e.shape[1..].to_vec());
        }
        if expected.len() == before {
            return Err(Error::config(
                "spec.bridge",
                "the previous global holds no bridge.* tensors: the run was started without \
                 this bridge (start a new run, or remove spec.bridge)",
            ));
        }
        Ok(expected)
    }

    fn add(&mut self, ctx: &RoundContext<'_>, mut update: ClientUpdate) -> Result<()> {
        let pool = update.tensors.split_off(POOL_PREFIX);
        let (pool, after): (BTreeMap<_, _>, BTreeMap<_, _>) = pool
            .into_iter()
            .partition(|(name, _)| name.starts_with(POOL_PREFIX));
        update.tensors.extend(after);
        if let (Some(probs), Some(counts)) = (pool.get(POOL_PROBS), pool.get(POOL_COUNTS)) {
            self.pool
                .add(&update.client, update.num_examples, probs, counts)?;
        }
        let rest = update.tensors.split_off(BRIDGE_PREFIX);
        let (bridge, rest): (BTreeMap<_, _>, BTreeMap<_, _>) = update
            .tensors
            .into_iter()
            .chain(rest)
            .partition(|(name, _)| name.starts_with(BRIDGE_PREFIX));
        update.tensors = bridge;
        self.sums.add(&update);
        update.tensors = rest;
        self.inner.add(ctx, update)
    }

    fn finish(self: Box<Self>, ctx: &RoundContext<'_>) -> Result<Aggregated> {
        let Bridged { inner, sums, pool } = *self;
        let mut aggregated = inner.finish(ctx)?;
        let step = ServerStep::new(ctx);
        for (name, previous) in bridge_tensors(ctx.previous) {
            match sums.mean(name) {
                Some(mean) => step.apply(&mut aggregated.tensors, name, previous, &mean),
                None => step.carry(&mut aggregated.tensors, name, previous),
            }
        }
        let weighting = ctx
            .spec
            .bridge
            .as_ref()
            .map_or(PoolWeighting::Examples, |b| b.distillation.pool_weighting);
        for (name, fresh) in [
            (POOL_ENSEMBLE, pool.ensemble(weighting)),
            (POOL_PRIOR, pool.prior()),
        ] {
            if let Some(value) = fresh.or_else(|| ctx.previous.get(name).cloned()) {
                aggregated.tensors.insert(name.to_string(), value);
            }
        }
        Ok(aggregated)
    }
}
