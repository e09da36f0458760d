//! The federation's ensemble on the public pool (`poolTeacher: ensemble`,
//! FedDF/FedMD-style): each client sends the class probabilities its served
//! model gives every pool text ([`POOL_PROBS`]) and its training examples
//! per class ([`POOL_COUNTS`]); the ensemble ([`POOL_ENSEMBLE`]) is, per
//! text `x` and class `c`,
//!
//! ```text
//! e(c | x) ∝ Σ_k w_kc p_k(c | x) / Σ_k w_kc,   w_kc = n_k · f_kc
//! ```
//!
//! with `n_k` the client's aggregation weight (its capped `numExamples`) and
//! `f_kc` its share of examples in class `c`: a client that never saw a
//! class has no say on it, so a model fitted to a skewed partition does not
//! drag the ensemble towards its own classes. Each row is then normalised.
//!
//! Client values are untrusted: probabilities are clamped to [0, 1] and each
//! row renormalised (a row of zeros counts as uniform), counts clamped to
//! ≥ 0 and normalised to shares, so a client can move a class's ensemble by
//! at most its weight's share, like any FedAvg update. Where the aggregator
//! can read the partition, the counts reaching here are the partition's, not
//! the client's (`intake`, `robust::partition_facts`).
//!
//! The same weights, summed over clients and normalised, are the
//! federation's label prior ([`super::common::POOL_PRIOR`]): `π(c) ∝ Σ_k w_kc`.

use heterotune_crds::spec::PoolWeighting;

use super::array::Array;
use super::common::{POOL_COUNTS, POOL_ENSEMBLE, POOL_PROBS};
use crate::{Error, Result};

/// One client's cleaned probabilities and per-class weights.
#[derive(Debug)]
struct Entry {
    client: String,
    /// `w_kc`, `[classes]`.
    weights: Vec<f64>,
    /// Cleaned rows, row-major `[texts, classes]`.
    probs: Vec<f64>,
}

/// The round's pool probabilities, client by client.
#[derive(Debug, Default)]
pub struct PoolSums {
    entries: Vec<Entry>,
    shape: Vec<usize>,
}

impl PoolSums {
    /// Adds client `client`'s probabilities `probs` and class `counts` with
    /// aggregation weight `num_examples`.
    pub fn add(
        &mut self,
        client: &str,
        num_examples: u64,
        probs: &Array,
        counts: &Array,
    ) -> Result<()> {
        let [_, classes] = probs.shape[..] else {
            return Err(shape_error(client, POOL_PROBS, &probs.shape));
        };
        if counts.shape != [classes] {
            return Err(shape_error(client, POOL_COUNTS, &counts.shape));
        }
        if self.entries.is_empty() {
            self.shape = probs.shape.clone();
        } else if self.shape != probs.shape {
            return Err(shape_error(client, POOL_PROBS, &probs.shape));
        }
        let counts: Vec<f64> = counts.data.iter().map(|&v| f64::from(v.max(0.0))).collect();
        let total: f64 = counts.iter().sum();
        let weights = counts
            .iter()
            .map(|&n| {
                let share = if total > 0.0 {
                    n / total
                } else {
                    1.0 / classes as f64
                };
                num_examples as f64 * share
            })
            .collect();
        let probs = probs.data.chunks(classes).flat_map(clean_row).collect();
        self.entries.push(Entry {
            client: client.to_string(),
            weights,
            probs,
        });
        Ok(())
    }

    fn classes(&self) -> usize {
        self.shape.get(1).copied().unwrap_or(0)
    }

    /// The ensemble of the entries with their weights each scaled by
    /// `scale[k]` (`[texts, classes]` rows, each normalised); `None` when
    /// no entry has weight.
    fn combine(&self, scale: &[f64]) -> Option<Vec<f64>> {
        let classes = self.classes();
        let texts = self.shape.first().copied().unwrap_or(0);
        let mut weighted = vec![0.0; texts * classes];
        let mut weights = vec![0.0; classes];
        for (k, e) in self.entries.iter().enumerate() {
            if scale[k] <= 0.0 {
                continue;
            }
            let w: Vec<f64> = e.weights.iter().map(|w| w * scale[k]).collect();
            for (sums, row) in weighted.chunks_mut(classes).zip(e.probs.chunks(classes)) {
                for c in 0..classes {
                    sums[c] += w[c] * row[c];
                }
            }
            for (acc, wc) in weights.iter_mut().zip(&w) {
                *acc += wc;
            }
        }
        if weights.iter().all(|w| *w <= 0.0) {
            return None;
        }
        let mut out = Vec::with_capacity(weighted.len());
        for row in weighted.chunks(classes) {
            let means: Vec<f64> = row
                .iter()
                .zip(&weights)
                .map(|(s, w)| if *w > 0.0 { s / w } else { 0.0 })
                .collect();
            out.extend(clean_row_f64(&means));
        }
        Some(out)
    }

    /// Each client's agreement with the federation, chance-corrected: the
    /// share of texts on which its top class is the federation's vote (one
    /// vote per client, its top class; a tie goes to the class with the
    /// highest mean probability), `(a − 1/C) / (1 − 1/C)`, at least 0. One
    /// vote each, not weighted by examples: a client with many examples that
    /// says one class for everything cannot outvote the others.
    pub fn agreements(&self) -> Vec<(String, f64)> {
        let classes = self.classes().max(1);
        let texts = self.shape.first().copied().unwrap_or(0);
        let vote: Vec<usize> = (0..texts)
            .map(|t| {
                let mut votes = vec![0usize; classes];
                let mut mass = vec![0.0; classes];
                for e in &self.entries {
                    let row = &e.probs[t * classes..(t + 1) * classes];
                    votes[top(row)] += 1;
                    for (m, p) in mass.iter_mut().zip(row) {
                        *m += p;
                    }
                }
                let most = votes.iter().copied().max().unwrap_or(0);
                let tied: Vec<f64> = (0..classes)
                    .map(|c| {
                        if votes[c] == most {
                            mass[c]
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                top(&tied)
            })
            .collect();
        let chance = 1.0 / classes as f64;
        self.entries
            .iter()
            .map(|e| {
                let agree = e
                    .probs
                    .chunks(classes)
                    .zip(&vote)
                    .filter(|(row, v)| top(row) == **v)
                    .count() as f64
                    / texts.max(1) as f64;
                let score = ((agree - chance) / (1.0 - chance)).clamp(0.0, 1.0);
                (e.client.clone(), score)
            })
            .collect()
    }

    /// The ensemble, or `None` when no client sent probabilities. With
    /// `weighting` [`PoolWeighting::Agreement`], each client's weights are
    /// scaled by its [`Self::agreements`] (the plain ensemble when every
    /// agreement is 0).
    pub fn ensemble(&self, weighting: PoolWeighting) -> Option<Array> {
        let ones = vec![1.0; self.entries.len()];
        let scale = match weighting {
            PoolWeighting::Examples => ones.clone(),
            PoolWeighting::Agreement => {
                let agreements = self.agreements();
                tracing::info!(
                    ?agreements,
                    "pool ensemble: each client's agreement with the others"
                );
                agreements.into_iter().map(|(_, a)| a).collect()
            }
        };
        let data = self.combine(&scale).or_else(|| self.combine(&ones))?;
        Array::new(
            self.shape.clone(),
            data.into_iter().map(|v| v as f32).collect(),
        )
        .ok()
    }

    /// The federation's label prior (`[classes]`, summing to 1), or `None`
    /// when no client sent counts.
    pub fn prior(&self) -> Option<Array> {
        let mut weights = vec![0.0; self.classes()];
        for e in &self.entries {
            for (acc, w) in weights.iter_mut().zip(&e.weights) {
                *acc += w;
            }
        }
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            return None;
        }
        let data = weights.iter().map(|w| (w / total) as f32).collect();
        Array::new(vec![weights.len()], data).ok()
    }
}

/// The index of a row's largest value (the first of ties).
fn top(row: &[f64]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// `row` clamped to [0, 1] (NaN → 0) and normalised; uniform if it sums to 0.
fn clean_row(row: &[f32]) -> Vec<f64> {
    clean_row_f64(&row.iter().map(|&v| f64::from(v)).collect::<Vec<_>>())
}

fn clean_row_f64(row: &[f64]) -> Vec<f64> {
    let clamped: Vec<f64> = row
        .iter()
        .map(|&v| if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) })
        .collect();
    let sum: f64 = clamped.iter().sum();
    if sum > 0.0 {
        clamped.iter().map(|v| v / sum).collect()
    } else {
        vec![1.0 / row.len().max(1) as f64; row.len()]
    }
}

fn shape_error(client: &str, name: &str, shape: &[usize]) -> Error {
    Error::config(
        "spec.bridge.distillation.poolTeacher",
        format!(
            "client {client} sent {name} of shape {shape:?}, which does not fit the pool's \
             {POOL_ENSEMBLE}"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(shape: &[usize], data: &[f32]) -> Array {
        Array::new(shape.to_vec(), data.to_vec()).unwrap()
    }

    #[test]
    fn a_client_that_never_saw_a_class_has_no_say_on_it() {
        // Text 0 is class 1. Client a saw only class 0 and says class 0;
        // client b saw both and says class 1.
        let mut sums = PoolSums::default();
        sums.add(
            "a",
            100,
            &arr(&[1, 2], &[0.9, 0.1]),
            &arr(&[2], &[100.0, 0.0]),
        )
        .unwrap();
        sums.add(
            "b",
            100,
            &arr(&[1, 2], &[0.1, 0.9]),
            &arr(&[2], &[50.0, 50.0]),
        )
        .unwrap();
        let e = sums.ensemble(PoolWeighting::Examples).unwrap();
        // class 0: (100·0.9 + 50·0.1) / 150 = 0.633; class 1: 50·0.9 / 50 = 0.9.
        let (c0, c1) = (0.9 * 100.0 / 150.0 + 0.1 * 50.0 / 150.0, 0.9);
        assert!(
            (e.data[1] as f64 - c1 / (c0 + c1)).abs() < 1e-6,
            "{:?}",
            e.data
        );
        assert!(e.data[1] > e.data[0], "{:?}", e.data);
        // A plain mean would tie: the weighting is what decides.
        assert!(((0.9f32 + 0.1) / 2.0 - 0.5).abs() < 1e-6);
    }

    #[test]
    fn agreement_weighting_takes_the_say_from_a_model_that_says_one_class_for_everything() {
        // Texts 0..4 are classes 0, 1, 0, 1. a and b are right; c, with ten
        // times their examples, all of class 0, says class 0 for everything.
        let right = arr(&[4, 2], &[0.8, 0.2, 0.2, 0.8, 0.8, 0.2, 0.2, 0.8]);
        let mut sums = PoolSums::default();
        sums.add("a", 100, &right, &arr(&[2], &[50.0, 50.0]))
            .unwrap();
        sums.add("b", 100, &right, &arr(&[2], &[50.0, 50.0]))
            .unwrap();
        sums.add(
            "c",
            1000,
            &arr(&[4, 2], &[0.99, 0.01].repeat(4)),
            &arr(&[2], &[1000.0, 0.0]),
        )
        .unwrap();
        let said = |e: &Array| -> Vec<usize> {
            e.data.chunks(2).map(|r| usize::from(r[1] > r[0])).collect()
        };
        // Weighted by examples, c's column 0 outweighs a and b.
        assert_eq!(
            said(&sums.ensemble(PoolWeighting::Examples).unwrap()),
            [0, 0, 0, 0]
        );
        let agreements = sums.agreements();
        assert_eq!(
            agreements,
            [("a".into(), 1.0), ("b".into(), 1.0), ("c".into(), 0.0)]
        );
        assert_eq!(
            said(&sums.ensemble(PoolWeighting::Agreement).unwrap()),
            [0, 1, 0, 1]
        );
    }

    #[test]
    fn a_tied_vote_goes_to_the_larger_mean_and_one_client_alone_keeps_its_say() {
        let mut sums = PoolSums::default();
        sums.add("a", 1, &arr(&[1, 2], &[0.9, 0.1]), &arr(&[2], &[1.0, 1.0]))
            .unwrap();
        assert_eq!(sums.agreements(), [("a".into(), 1.0)]);
        // b disagrees with a, less sure: the tie goes to a's class.
        sums.add("b", 1, &arr(&[1, 2], &[0.4, 0.6]), &arr(&[2], &[1.0, 1.0]))
            .unwrap();
        assert_eq!(sums.agreements(), [("a".into(), 1.0), ("b".into(), 0.0)]);
        let e = sums.ensemble(PoolWeighting::Agreement).unwrap();
        assert!((e.data[0] - 0.9).abs() < 1e-6, "{:?}", e.data);
    }

    #[test]
    fn the_prior_is_the_federations_share_of_examples_per_class() {
        let mut sums = PoolSums::default();
        assert!(sums.prior().is_none());
        // a: 100 examples, all class 0; b: 300 examples, 1:2.
        sums.add(
            "a",
            100,
            &arr(&[1, 2], &[0.5; 2]),
            &arr(&[2], &[100.0, 0.0]),
        )
        .unwrap();
        sums.add("b", 300, &arr(&[1, 2], &[0.5; 2]), &arr(&[2], &[1.0, 2.0]))
            .unwrap();
        let p = sums.prior().unwrap();
        assert_eq!(p.shape, [2]);
        // class 0: 100 + 100 = 200 of 400.
        assert!(
            (p.data[0] - 0.5).abs() < 1e-6 && (p.data[1] - 0.5).abs() < 1e-6,
            "{:?}",
            p.data
        );
    }

    #[test]
    fn hostile_values_are_clamped_and_rows_normalised() {
        let mut sums = PoolSums::default();
        sums.add(
            "x",
            1,
            &arr(&[2, 2], &[1e30, -5.0, f32::NAN, 0.0]),
            &arr(&[2], &[1.0, 1e30]),
        )
        .unwrap();
        let e = sums.ensemble(PoolWeighting::Examples).unwrap();
        for row in e.data.chunks(2) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{:?}", e.data);
            assert!(row.iter().all(|v| (0.0..=1.0).contains(v)), "{:?}", e.data);
        }
        assert_eq!(e.data[..2], [1.0, 0.0]);
    }

    #[test]
    fn shapes_must_agree_across_clients() {
        let mut sums = PoolSums::default();
        assert!(sums.ensemble(PoolWeighting::Examples).is_none());
        sums.add("a", 1, &arr(&[1, 2], &[0.5, 0.5]), &arr(&[2], &[1.0, 1.0]))
            .unwrap();
        let err = sums
            .add("b", 1, &arr(&[2, 2], &[0.5; 4]), &arr(&[2], &[1.0, 1.0]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("client b") && err.contains(POOL_PROBS),
            "{err}"
        );
        assert!(sums
            .add("c", 1, &arr(&[1, 2], &[0.5, 0.5]), &arr(&[3], &[1.0; 3]))
            .is_err());
    }
}
