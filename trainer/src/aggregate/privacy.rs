//! Client-level differential privacy (`spec.aggregation.privacy`),
//! DP-FedAvg style: a wrapper around the run's (linear) aggregator.
//!
//! For every accepted update, before the algorithm sees it:
//! 1. **clip**: the whole update (every tensor the client sends) is scaled
//!    to L2 norm at most `C = clipNorm`;
//! 2. **weigh equally**: its weight becomes 1 (a self-reported example count
//!    would change the sensitivity), so each average is `sum / n`;
//! 3. **noise**: every value gets Gaussian noise of variance `σ²C² / m`,
//!    `m` the number of updates summed into that tensor's average this round
//!    (all accepted updates for `bridge.*` and, under `fedavg`, `shared.*`;
//!    the client's family's accepted updates otherwise). Each released sum
//!    then carries noise of variance exactly `σ²C²` (the `m` independent
//!    draws add up), while one client moves the sums jointly by at most `C`
//!    in L2: the round is the Gaussian mechanism with noise multiplier `σ`
//!    (ε from [`heterotune_crds::privacy::epsilon`]).
//!
//! `m` comes from the round's composition, which the intake hands over
//! before the first update ([`Aggregator::plan`]); if fewer updates of a
//! family arrive than planned (an artifact that changed between the intake's
//! two passes), the noise would fall short and the round fails instead.
//! The noise is drawn from the operating system's randomness, never from the
//! spec's seeds (a known seed would let anyone subtract it): a global of a
//! private run is not reproducible byte for byte.

use std::collections::BTreeMap;

use heterotune_crds::spec::FederatedTuneSpec;
use heterotune_crds::spec::{AggregationAlgorithm, PrivacySpec, RobustCombine};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::robust::part_of;
use super::{Aggregated, Aggregator, ClientInfo, ClientUpdate, RoundContext};
use crate::{Error, Result};

/// The run's aggregator behind clipping, equal weights and Gaussian noise.
pub struct Private {
    inner: Box<dyn Aggregator>,
    spec: PrivacySpec,
    /// `fedavg` averages `shared.*` over all clients, `family-fedavg` within
    /// each family.
    shared_over_all: bool,
    /// Accepted updates this round, per family, and in all.
    planned: BTreeMap<String, usize>,
    added: BTreeMap<String, usize>,
    clipped: Vec<String>,
    rng: StdRng,
}

/// Checks `spec.aggregation.privacy` (the CRD's rules say the same).
pub fn check_spec(spec: &FederatedTuneSpec) -> Result<()> {
    let Some(p) = &spec.aggregation.privacy else {
        return Ok(());
    };
    let field = "spec.aggregation.privacy";
    if !(p.clip_norm.is_finite() && p.clip_norm > 0.0) {
        return Err(Error::config(
            field,
            format!("clipNorm must be above 0, got {}", p.clip_norm),
        ));
    }
    if !(p.noise_multiplier.is_finite() && p.noise_multiplier > 0.0) {
        return Err(Error::config(
            field,
            format!(
                "noiseMultiplier must be above 0, got {}",
                p.noise_multiplier
            ),
        ));
    }
    if !(p.delta > 0.0 && p.delta < 1.0) {
        return Err(Error::config(
            field,
            format!("delta must lie in (0, 1), got {}", p.delta),
        ));
    }
    let alg = spec.aggregation.algorithm;
    if !matches!(
        alg,
        AggregationAlgorithm::Fedavg | AggregationAlgorithm::FamilyFedavg
    ) || spec.aggregation.robust.combine != RobustCombine::Mean
    {
        return Err(Error::config(
            field,
            format!(
                "adds noise to sums of clipped updates: it needs algorithm fedavg or \
                 family-fedavg and robust.combine mean, not {} with {:?}",
                alg.as_str(),
                spec.aggregation.robust.combine
            ),
        ));
    }
    Ok(())
}

impl Private {
    /// `inner` behind the privacy of `spec` (checked by [`check_spec`]).
    pub fn new(inner: Box<dyn Aggregator>, spec: PrivacySpec) -> Self {
        Private {
            shared_over_all: inner.algorithm() == AggregationAlgorithm::Fedavg,
            inner,
            spec,
            planned: BTreeMap::new(),
            added: BTreeMap::new(),
            clipped: Vec::new(),
            rng: StdRng::from_os_rng(),
        }
    }

    /// How many updates are summed into tensor `name` of a `family` client.
    fn summed(&self, name: &str, family: &str) -> usize {
        let all = || self.planned.values().sum();
        match part_of(name) {
            "bridge" => all(),
            "shared" if self.shared_over_all => all(),
            _ => self.planned.get(family).copied().unwrap_or(0),
        }
    }
}

impl Aggregator for Private {
    pass_to_inner!(algorithm, expected_tensors);

    fn plan(&mut self, accepted: &[(&str, &str)]) {
        self.planned.clear();
        for (_, family) in accepted {
            *self.planned.entry((*family).to_string()).or_default() += 1;
        }
        self.inner.plan(accepted);
    }

    fn add(&mut self, ctx: &RoundContext<'_>, mut update: ClientUpdate) -> Result<()> {
        if !self.planned.contains_key(&update.family) {
            return Err(Error::config(
                "spec.aggregation.privacy",
                format!(
                    "round {}: {}'s update was not in the round's plan",
                    ctx.round, update.client
                ),
            ));
        }
        let (clip, sigma) = (self.spec.clip_norm, self.spec.noise_multiplier);
        let norm = update
            .tensors
            .values()
            .flat_map(|t| t.data.iter())
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum::<f64>()
            .sqrt();
        let scale = if norm > clip {
            self.clipped.push(update.client.clone());
            clip / norm
        } else {
            1.0
        };
        for (name, t) in update.tensors.iter_mut() {
            let m = self.summed(name, &update.family).max(1);
            let std = sigma * clip / (m as f64).sqrt();
            for v in t.data.iter_mut() {
                let noise: f64 = StandardNormal.sample(&mut self.rng);
                *v = (f64::from(*v) * scale + std * noise) as f32;
            }
        }
        update.num_examples = 1;
        *self.added.entry(update.family.clone()).or_default() += 1;
        self.inner.add(ctx, update)
    }

    fn finish(self: Box<Self>, ctx: &RoundContext<'_>) -> Result<Aggregated> {
        if self.added != self.planned {
            return Err(Error::config(
                "spec.aggregation.privacy",
                format!(
                    "round {}: {:?} updates per family arrived, {:?} were planned: the noise \
                     would fall short of the guarantee, so the round is not written (it is retried)",
                    ctx.round, self.added, self.planned
                ),
            ));
        }
        let clipped = self.clipped;
        Ok(Aggregated {
            privacy_clipped: clipped,
            ..self.inner.finish(ctx)?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::array::Array;

    /// An inner aggregator that keeps what it is given.
    #[derive(Default)]
    struct Keep(std::rc::Rc<std::cell::RefCell<Vec<ClientUpdate>>>);

    impl Aggregator for Keep {
        fn algorithm(&self) -> AggregationAlgorithm {
            AggregationAlgorithm::Fedavg
        }
        fn expected_tensors(
            &self,
            _: &RoundContext<'_>,
            _: &ClientInfo,
        ) -> Result<BTreeMap<String, Vec<usize>>> {
            Ok(BTreeMap::new())
        }
        fn add(&mut self, _: &RoundContext<'_>, update: ClientUpdate) -> Result<()> {
            self.0.borrow_mut().push(update);
            Ok(())
        }
        fn finish(self: Box<Self>, _: &RoundContext<'_>) -> Result<Aggregated> {
            Ok(Aggregated::default())
        }
    }

    fn update(client: &str, family: &str, values: Vec<f32>) -> ClientUpdate {
        let n = values.len();
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "shared.0.w".to_string(),
            Array::new(vec![n], values.clone()).unwrap(),
        );
        tensors.insert("head.w".to_string(), Array::new(vec![n], values).unwrap());
        ClientUpdate {
            client: client.into(),
            family: family.into(),
            num_examples: 500,
            lora_rank: 0,
            tensors,
        }
    }

    fn private(sigma: f64) -> (Private, std::rc::Rc<std::cell::RefCell<Vec<ClientUpdate>>>) {
        let keep = Keep::default();
        let seen = keep.0.clone();
        let spec = PrivacySpec {
            clip_norm: 1.0,
            noise_multiplier: sigma,
            delta: 1e-5,
        };
        (Private::new(Box::new(keep), spec), seen)
    }

    fn context_spec() -> FederatedTuneSpec {
        let text = r#"{"clients": [
            {"name": "a", "model": {"family": "bert", "uri": "/m/one"}},
            {"name": "b", "model": {"family": "bert", "uri": "/m/one"}},
            {"name": "c", "model": {"family": "bert", "uri": "/m/two"}}],
            "task": {"dataset": {"uri": "/d.jsonl"}, "labels": ["x", "z"]}}"#;
        serde_json::from_str(text).expect("spec")
    }

    #[test]
    fn updates_are_clipped_weighed_equally_and_noised_by_group_size() {
        let spec = context_spec();
        let previous = BTreeMap::new();
        let ctx = RoundContext::new(&spec, "run", 1, &previous);
        // No noise to speak of: the clipping alone.
        let (mut p, seen) = private(1e-9);
        p.plan(&[("a", "f1"), ("b", "f1"), ("c", "f2")]);
        p.add(&ctx, update("a", "f1", vec![3.0; 8])).unwrap();
        p.add(&ctx, update("b", "f1", vec![0.01; 8])).unwrap();
        p.add(&ctx, update("c", "f2", vec![0.0; 8])).unwrap();
        let norm = |u: &ClientUpdate| {
            u.tensors
                .values()
                .flat_map(|t| t.data.iter())
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let seen = seen.borrow();
        assert!((norm(&seen[0]) - 1.0).abs() < 1e-5, "clipped to C");
        assert!(
            (norm(&seen[1]) - 0.01 * 4.0).abs() < 1e-5,
            "small ones kept"
        );
        assert!(seen.iter().all(|u| u.num_examples == 1));
        // Group sizes: shared over all 3 under fedavg, the head within the family.
        assert_eq!(p.summed("shared.0.w", "f1"), 3);
        assert_eq!(p.summed("bridge.x", "f2"), 3);
        assert_eq!(p.summed("head.w", "f1"), 2);
        assert_eq!(p.summed("head.w", "f2"), 1);
    }

    #[test]
    fn the_noise_has_the_planned_spread_and_a_short_round_fails() {
        let spec = context_spec();
        let previous = BTreeMap::new();
        let ctx = RoundContext::new(&spec, "run", 1, &previous);
        let (mut p, seen) = private(2.0);
        p.plan(&[("a", "f1"), ("b", "f1"), ("c", "f1"), ("d", "f1")]);
        p.add(&ctx, update("a", "f1", vec![0.0; 20_000])).unwrap();
        {
            let seen = seen.borrow();
            let head = &seen[0].tensors["head.w"].data;
            let var = head.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / head.len() as f64;
            // σ²C²/m = 4 / 4 = 1
            assert!((var - 1.0).abs() < 0.05, "variance {var}");
        }
        let err = Box::new(p)
            .finish(&ctx)
            .expect_err("3 of 4 planned updates missing");
        assert!(err.to_string().contains("fall short"), "{err}");
    }
}
