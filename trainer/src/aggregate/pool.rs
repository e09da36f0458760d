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
//! at most its weight's share, like any FedAvg update.
//!
//! The same weights, summed over clients and normalised, are the
//! federation's label prior ([`super::common::POOL_PRIOR`]): `π(c) ∝ Σ_k w_kc`.

use super::array::Array;
use super::common::{POOL_COUNTS, POOL_ENSEMBLE, POOL_PROBS};
use crate::{Error, Result};

/// Running sums of the round's pool probabilities.
#[derive(Debug, Default)]
pub struct PoolSums {
    /// `Σ_k w_kc p_k(c | x)`, row-major `[texts, classes]`.
    weighted: Vec<f64>,
    /// `Σ_k w_kc`, `[classes]`.
    weights: Vec<f64>,
    shape: Vec<usize>,
    clients: usize,
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
        let [texts, classes] = probs.shape[..] else {
            return Err(shape_error(client, POOL_PROBS, &probs.shape));
        };
        if counts.shape != [classes] {
            return Err(shape_error(client, POOL_COUNTS, &counts.shape));
        }
        if self.clients == 0 {
            self.shape = probs.shape.clone();
            self.weighted = vec![0.0; texts * classes];
            self.weights = vec![0.0; classes];
        } else if self.shape != probs.shape {
            return Err(shape_error(client, POOL_PROBS, &probs.shape));
        }
        let counts: Vec<f64> = counts.data.iter().map(|&v| f64::from(v.max(0.0))).collect();
        let total: f64 = counts.iter().sum();
        let w: Vec<f64> = counts
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
        for (row, sums) in probs
            .data
            .chunks(classes)
            .zip(self.weighted.chunks_mut(classes))
        {
            let row = clean_row(row);
            for c in 0..classes {
                sums[c] += w[c] * row[c];
            }
        }
        for (acc, wc) in self.weights.iter_mut().zip(&w) {
            *acc += wc;
        }
        self.clients += 1;
        Ok(())
    }

    /// The ensemble, or `None` when no client sent probabilities.
    pub fn ensemble(&self) -> Option<Array> {
        if self.clients == 0 {
            return None;
        }
        let classes = self.weights.len();
        let mut data = Vec::with_capacity(self.weighted.len());
        for row in self.weighted.chunks(classes) {
            let means: Vec<f64> = row
                .iter()
                .zip(&self.weights)
                .map(|(s, w)| if *w > 0.0 { s / w } else { 0.0 })
                .collect();
            data.extend(clean_row_f64(&means).into_iter().map(|v| v as f32));
        }
        Array::new(self.shape.clone(), data).ok()
    }

    /// The federation's label prior (`[classes]`, summing to 1), or `None`
    /// when no client sent counts.
    pub fn prior(&self) -> Option<Array> {
        let total: f64 = self.weights.iter().sum();
        if self.clients == 0 || total <= 0.0 {
            return None;
        }
        let data = self.weights.iter().map(|w| (w / total) as f32).collect();
        Array::new(vec![self.weights.len()], data).ok()
    }
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
        let e = sums.ensemble().unwrap();
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
        let e = sums.ensemble().unwrap();
        for row in e.data.chunks(2) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{:?}", e.data);
            assert!(row.iter().all(|v| (0.0..=1.0).contains(v)), "{:?}", e.data);
        }
        assert_eq!(e.data[..2], [1.0, 0.0]);
    }

    #[test]
    fn shapes_must_agree_across_clients() {
        let mut sums = PoolSums::default();
        assert!(sums.ensemble().is_none());
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
