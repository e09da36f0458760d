//! Robust combiners (`spec.aggregation.robust.combine: median |
//! trimmedMean | multiKrum | bulyan`), wrapped around the run's aggregator.
//!
//! Where they apply: to the updates the algorithm averages together,
//! unweighted; `median` and `trimmedMean` tensor by tensor and coordinate
//! by coordinate, `multiKrum` by whole part of an update (the tensors of
//! one of [`super::robust::PARTS`] in one group, as one vector: it keeps
//! the `n − f` updates whose summed squared distance to their `n − f − 2`
//! nearest others is lowest, and averages them; [`krum_select`]), and
//! `bulyan` likewise by whole part ([`bulyan_select`] picks `n − 2f` by
//! Krum, one at a time; [`bulyan_coordinate`] averages, coordinate by
//! coordinate, the `n − 4f` picked values closest to their median). The
//! groups:
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
//! protection from the combiner (the median of two is their mean; Krum
//! needs more than `f + 2`): the norm bound is the defence there. The
//! clients multi-Krum left out are named in `stats.robust.krumExcluded`.
//!
//! Memory: unlike the mean, this holds every accepted update (f32) until
//! the round ends. LoRA families are refused (their clients send factors of
//! different ranks: nothing to compare coordinate by coordinate).

use std::collections::BTreeMap;

use heterotune_crds::spec::{AggregationAlgorithm, RobustCombine, RobustSpec};

use super::array::Array;
use super::common::BRIDGE_PREFIX;
use super::common::SHARED;
use super::robust::part_of;
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
    byzantine: usize,
    updates: Vec<ClientUpdate>,
}

/// The combined value of every (scope, tensor) of a round.
type Combined = BTreeMap<(Scope, String), Array>;

impl Robust {
    /// `inner`, fed robust values per `robust.combine`.
    pub fn new(inner: Box<dyn Aggregator>, robust: &RobustSpec) -> Self {
        Robust {
            inner,
            mode: robust.combine,
            trim_fraction: robust.trim_fraction,
            byzantine: robust.byzantine_clients as usize,
            updates: Vec::new(),
        }
    }

    /// The combined value of every (scope, tensor) of the buffered updates.
    fn combined(&self) -> Result<Combined> {
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

impl Robust {
    /// Multi-Krum's value of every (scope, tensor) of the buffered
    /// updates, and who it left out (`client (part)`).
    fn krum_combined(&self) -> Result<(Combined, Vec<String>)> {
        let fedavg = self.inner.algorithm() == AggregationAlgorithm::Fedavg;
        // (scope, part) → its members: (update index, its tensors of the part).
        type Members<'a> = Vec<(usize, Vec<(&'a String, &'a Array)>)>;
        let mut groups: BTreeMap<(Scope, &'static str), Members<'_>> = BTreeMap::new();
        for (i, u) in self.updates.iter().enumerate() {
            for (name, t) in &u.tensors {
                let members = groups
                    .entry((scope_of(fedavg, name, &u.family), part_of(name)))
                    .or_default();
                match members.last_mut() {
                    Some((j, tensors)) if *j == i => tensors.push((name, t)),
                    _ => members.push((i, vec![(name, t)])),
                }
            }
        }
        let mut out = BTreeMap::new();
        let mut excluded = Vec::new();
        for ((scope, part), members) in groups {
            let first = &members[0].1;
            for (i, tensors) in &members {
                let same = tensors.len() == first.len()
                    && tensors
                        .iter()
                        .zip(first)
                        .all(|((a, x), (b, y))| a == b && x.shape == y.shape);
                if !same {
                    return Err(Error::config(
                        "spec.aggregation.robust.combine",
                        format!(
                            "multiKrum: {} sent other {part} tensors than {}",
                            self.updates[*i].client, self.updates[members[0].0].client
                        ),
                    ));
                }
            }
            let n = members.len();
            let mut distances = vec![vec![0.0f64; n]; n];
            for a in 0..n {
                for b in a + 1..n {
                    let d: f64 = members[a]
                        .1
                        .iter()
                        .zip(&members[b].1)
                        .map(|((_, x), (_, y))| squared_distance(x, y))
                        .sum();
                    distances[a][b] = d;
                    distances[b][a] = d;
                }
            }
            let bulyan = self.mode == RobustCombine::Bulyan;
            // Bulyan needs n ≥ 4f + 3: a smaller group takes a smaller f.
            let f = if bulyan {
                self.byzantine.min(n.saturating_sub(3) / 4)
            } else {
                self.byzantine
            };
            let kept = if bulyan {
                bulyan_select(&distances, f)
            } else {
                krum_select(&distances, f)
            };
            for (m, (i, _)) in members.iter().enumerate() {
                if !kept.contains(&m) {
                    excluded.push(format!("{} ({part})", self.updates[*i].client));
                }
            }
            for (t, (name, shape)) in first.iter().map(|(n, a)| (n, &a.shape)).enumerate() {
                let numel: usize = shape.iter().product();
                let mut column = vec![0.0f64; kept.len()];
                let value: Vec<f64> = (0..numel)
                    .map(|c| {
                        for (slot, &m) in column.iter_mut().zip(&kept) {
                            *slot = f64::from(members[m].1[t].1.data[c]);
                        }
                        if bulyan {
                            bulyan_coordinate(&mut column, f)
                        } else {
                            column.iter().sum::<f64>() / column.len() as f64
                        }
                    })
                    .collect();
                out.insert(
                    (scope.clone(), (*name).clone()),
                    Array::from_f64(shape, &value),
                );
            }
        }
        excluded.sort();
        Ok((out, excluded))
    }
}

/// `Σ (x − y)²` over two arrays of one shape, in f64.
fn squared_distance(x: &Array, y: &Array) -> f64 {
    x.data
        .iter()
        .zip(&y.data)
        .map(|(&a, &b)| {
            let d = f64::from(a) - f64::from(b);
            d * d
        })
        .sum()
}

/// Multi-Krum's choice among `n` updates with pairwise squared distances
/// `distances` (`n × n`, symmetric), assuming `f` of them hostile: each
/// update's score is the sum of its `n − f − 2` smallest distances to the
/// others; the `n − f` lowest scores are kept (ties: the earlier update).
/// With `n ≤ f + 2` there are no neighbours to score by: all are kept.
/// Returns the kept indices, ascending.
pub fn krum_select(distances: &[Vec<f64>], f: usize) -> Vec<usize> {
    let n = distances.len();
    if n <= f + 2 {
        return (0..n).collect();
    }
    let neighbours = n - f - 2;
    let mut scores: Vec<(f64, usize)> = (0..n)
        .map(|i| {
            let mut d: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| distances[i][j])
                .collect();
            d.sort_by(f64::total_cmp);
            (d[..neighbours].iter().sum(), i)
        })
        .collect();
    scores.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut kept: Vec<usize> = scores[..n - f].iter().map(|&(_, i)| i).collect();
    kept.sort_unstable();
    kept
}

/// Bulyan's choice among `n` updates with pairwise squared distances
/// `distances`, assuming `f` hostile (`n ≥ 4f + 3`): Krum applied `n − 2f`
/// times, each time to the updates not picked yet (each one's score: its
/// summed squared distances to its `m − f − 2` nearest others among the
/// `m` left; the lowest is picked, ties to the earlier update). Returns the
/// picked indices, ascending.
pub fn bulyan_select(distances: &[Vec<f64>], f: usize) -> Vec<usize> {
    let n = distances.len();
    let mut left: Vec<usize> = (0..n).collect();
    let mut picked = Vec::new();
    while picked.len() < n.saturating_sub(2 * f) {
        let neighbours = left.len().saturating_sub(f + 2);
        let score = |i: usize| -> f64 {
            let mut d: Vec<f64> = left
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| distances[i][j])
                .collect();
            d.sort_by(f64::total_cmp);
            d[..neighbours.min(d.len())].iter().sum()
        };
        let mut best = 0;
        let mut best_score = score(left[0]);
        for (k, &i) in left.iter().enumerate().skip(1) {
            let s = score(i);
            if s < best_score {
                (best, best_score) = (k, s);
            }
        }
        picked.push(left.remove(best));
    }
    picked.sort_unstable();
    picked
}

/// One coordinate of Bulyan: the mean of the `θ − 2f` of the picked
/// values (`θ` = `values.len()`) closest to their median (ties: the
/// smaller value first). Reorders `values`.
pub fn bulyan_coordinate(values: &mut [f64], f: usize) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n.is_multiple_of(2) {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    } else {
        values[n / 2]
    };
    let beta = n.saturating_sub(2 * f).max(1);
    let mut by_distance: Vec<f64> = values.to_vec();
    by_distance.sort_by(|a, b| {
        (a - median)
            .abs()
            .total_cmp(&(b - median).abs())
            .then(a.total_cmp(b))
    });
    by_distance[..beta].iter().sum::<f64>() / beta as f64
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
        let (combined, krum_excluded) = match self.mode {
            RobustCombine::MultiKrum | RobustCombine::Bulyan => self.krum_combined()?,
            _ => (self.combined()?, Vec::new()),
        };
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
        Ok(Aggregated {
            krum_excluded,
            ..inner.finish(ctx)?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn krum_keeps_the_updates_closest_to_their_neighbours() {
        // Points on a line: 0, 1, 2, 3 and an outlier at 100; f = 1, so each
        // score sums the 5 − 1 − 2 = 2 nearest squared distances:
        // 0: 1 + 4 = 5; 1: 1 + 1 = 2; 2: 1 + 1 = 2; 3: 1 + 4 = 5;
        // 100: 97² + 98². The four lowest are kept.
        let x = [0.0f64, 1.0, 2.0, 3.0, 100.0];
        let d: Vec<Vec<f64>> = x
            .iter()
            .map(|a| x.iter().map(|b| (a - b) * (a - b)).collect())
            .collect();
        assert_eq!(krum_select(&d, 1), vec![0, 1, 2, 3]);
        // f = 2: 1 neighbour each (1, 1, 1, 1, 97²): three kept, ties to
        // the earlier update.
        assert_eq!(krum_select(&d, 2), vec![0, 1, 2]);
        // Too few to score (n ≤ f + 2): all kept.
        assert_eq!(krum_select(&d[..3], 1), vec![0, 1, 2]);
        let small: Vec<Vec<f64>> = d[..3].iter().map(|r| r[..3].to_vec()).collect();
        assert_eq!(krum_select(&small, 1), vec![0, 1, 2]);
    }

    #[test]
    fn bulyan_picks_by_krum_and_averages_around_the_median() {
        // Seven updates on a line, one far outlier; f = 1 (7 = 4f + 3):
        // θ = 5 picked by repeated Krum, the outlier never among them.
        let x = [0.0f64, 1.0, 2.0, 3.0, 4.0, 5.0, 1000.0];
        let d: Vec<Vec<f64>> = x
            .iter()
            .map(|a| x.iter().map(|b| (a - b) * (a - b)).collect())
            .collect();
        let picked = bulyan_select(&d, 1);
        assert_eq!(picked.len(), 5);
        assert!(!picked.contains(&6), "{picked:?}");
        // f = 3, θ = 1: Krum's first pick. Scores over the 7 − 3 − 2 = 2
        // nearest: 0: 1 + 4; 1, 2, 3, 4: 1 + 1; 5: 1 + 4: tie to index 1.
        assert_eq!(bulyan_select(&d, 3), vec![1]);
        // Coordinate: θ = 5 values, β = 5 − 2 = 3 closest to the median 2:
        // 1, 2, 3 → 2; an outlier among the picked moves nothing.
        assert_eq!(bulyan_coordinate(&mut [0.0, 1.0, 2.0, 3.0, 1e30], 1), 2.0);
        assert_eq!(bulyan_coordinate(&mut [4.0, -1.0, 2.0], 1), 2.0);
        // f = 0: the plain mean.
        assert_eq!(bulyan_coordinate(&mut [1.0, 2.0, 6.0], 0), 3.0);
    }

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
