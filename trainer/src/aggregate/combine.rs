//! Coordinate-wise robust combiners (`spec.aggregation.robust.combine:
//! median | trimmedMean`), wrapped around the run's aggregator.
//!
//! Where they apply: to the updates the algorithm averages together, tensor
//! by tensor and coordinate by coordinate, unweighted:
//!
//! * `bridge.*`: over all clients (the bridge is averaged over all clients);
//! * `shared.*` under `fedavg`: over all clients;
//! * everything else (CMGA's and family-fedavg's shared part, family parts,
//!   head): within each family, i.e. CMGA aligns and combines the families'
//!   robust updates (the combiner forms each family's `G_f` before the
//!   alignment).
//!
//! Every client of a group is then handed to the wrapped aggregator with
//! its group's robust value in place of its own delta and its weight
//! unchanged, so the aggregator's sample-weighted mean of the group is the
//! robust value (up to f64 rounding) and its statistics (clients, examples,
//! weights) stay as they are. A group of one or two clients gets no
//! protection from the combiner (the median of two is their mean): the norm
//! bound is the defence there.
//!
//! Memory: unlike the mean, this holds every accepted update (f32) until
//! the round ends. LoRA families are refused (their clients send factors of
//! different ranks: nothing to compare coordinate by coordinate).

use std::collections::BTreeMap;

use heterotune_crds::spec::{AggregationAlgorithm, RobustCombine};

use super::array::Array;
use super::common::BRIDGE_PREFIX;
use super::common::SHARED;
use super::{Aggregated, Aggregator, ClientInfo, ClientUpdate, RoundContext};
use crate::{Error, Result};

/// Whose updates of a tensor are combined together.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    /// Every client of the round.
    All,
    /// The clients of one family.
    Family(String),
}

/// The run's aggregator with a coordinate-wise robust combiner in front.
pub struct Robust {
    inner: Box<dyn Aggregator>,
    mode: RobustCombine,
    trim_fraction: f64,
    updates: Vec<ClientUpdate>,
}

impl Robust {
    /// `inner`, fed robust values per `mode` (`trim_fraction` for the
    /// trimmed mean).
    pub fn new(inner: Box<dyn Aggregator>, mode: RobustCombine, trim_fraction: f64) -> Self {
        Robust {
            inner,
            mode,
            trim_fraction,
            updates: Vec::new(),
        }
    }

    /// The combined value of every (scope, tensor) of the buffered updates.
    fn combined(&self) -> Result<BTreeMap<(Scope, String), Array>> {
        let fedavg = self.inner.algorithm() == AggregationAlgorithm::Fedavg;
        let mut members: BTreeMap<(Scope, String), Vec<&Array>> = BTreeMap::new();
        for u in &self.updates {
            for (name, t) in &u.tensors {
                members
                    .entry((scope_of(fedavg, name, &u.family), name.clone()))
                    .or_default()
                    .push(t);
            }
        }
        let mut out = BTreeMap::new();
        for (key, arrays) in members {
            let first = arrays[0];
            if arrays.iter().any(|a| a.shape != first.shape) {
                return Err(Error::config(
                    "spec.aggregation.robust.combine",
                    format!("{}: clients sent different shapes", key.1),
                ));
            }
            let data = coordinatewise(&arrays, self.mode, self.trim_fraction);
            out.insert(key, Array::from_f64(&first.shape, &data));
        }
        Ok(out)
    }
}

/// The scope of tensor `name` of a client of `family` (`fedavg`: the run's
/// algorithm averages the shared part over all clients).
fn scope_of(fedavg: bool, name: &str, family: &str) -> Scope {
    if name.starts_with(BRIDGE_PREFIX) || (fedavg && name.starts_with(SHARED)) {
        Scope::All
    } else {
        Scope::Family(family.to_string())
    }
}

/// The coordinate-wise median or trimmed mean of `arrays` (same shapes).
fn coordinatewise(arrays: &[&Array], mode: RobustCombine, trim_fraction: f64) -> Vec<f64> {
    let n = arrays.len();
    let k = match mode {
        RobustCombine::TrimmedMean => {
            ((trim_fraction * n as f64).floor() as usize).min((n - 1) / 2)
        }
        _ => 0,
    };
    let mut column = vec![0.0f64; n];
    (0..arrays[0].numel())
        .map(|i| {
            for (c, a) in column.iter_mut().zip(arrays) {
                *c = f64::from(a.data[i]);
            }
            column.sort_by(f64::total_cmp);
            match mode {
                RobustCombine::Median if n.is_multiple_of(2) => {
                    (column[n / 2 - 1] + column[n / 2]) / 2.0
                }
                RobustCombine::Median => column[n / 2],
                _ => {
                    let kept = &column[k..n - k];
                    kept.iter().sum::<f64>() / kept.len() as f64
                }
            }
        })
        .collect()
}

impl Aggregator for Robust {
    pass_to_inner!(algorithm, plan, expected_tensors);

    fn add(&mut self, _ctx: &RoundContext<'_>, update: ClientUpdate) -> Result<()> {
        self.updates.push(update);
        Ok(())
    }

    fn finish(mut self: Box<Self>, ctx: &RoundContext<'_>) -> Result<Aggregated> {
        let combined = self.combined()?;
        let updates = std::mem::take(&mut self.updates);
        let Robust { mut inner, .. } = *self;
        let fedavg = inner.algorithm() == AggregationAlgorithm::Fedavg;
        for mut u in updates {
            let family = u.family.clone();
            for (name, t) in u.tensors.iter_mut() {
                let scope = scope_of(fedavg, name, &family);
                if let Some(v) = combined.get(&(scope, name.clone())) {
                    t.data.clone_from(&v.data);
                }
            }
            inner.add(ctx, u)?;
        }
        inner.finish(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_trimmed_mean_by_hand() {
        let a = |v: &[f32]| Array::new(vec![v.len()], v.to_vec()).expect("array");
        let xs = [
            a(&[1.0, -2.0]),
            a(&[3.0, 0.0]),
            a(&[1000.0, 4.0]),
            a(&[2.0, -3.3e38]),
            a(&[0.0, 1.0]),
        ];
        let refs: Vec<&Array> = xs.iter().collect();
        // Sorted columns: (0, 1, 2, 3, 1000) and (-3.3e38, -2, 0, 1, 4).
        assert_eq!(
            coordinatewise(&refs, RobustCombine::Median, 0.0),
            vec![2.0, 0.0]
        );
        // trimFraction 0.2 of 5: one dropped at each end.
        assert_eq!(
            coordinatewise(&refs, RobustCombine::TrimmedMean, 0.2),
            vec![2.0, -1.0 / 3.0]
        );
        // Even count: the mean of the two middle values.
        assert_eq!(
            coordinatewise(&refs[..4], RobustCombine::Median, 0.0),
            vec![2.5, -1.0]
        );
        // trimFraction 0.1 of 5 trims nothing: the plain unweighted mean.
        let mean = coordinatewise(&refs[..3], RobustCombine::TrimmedMean, 0.1);
        assert_eq!(mean, vec![1004.0 / 3.0, 2.0 / 3.0]);
    }
}
