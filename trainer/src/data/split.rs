//! Deterministic, stratified train / validation / test splits, and the
//! portable seeded sampling that splits, partitions and adapter
//! initialisation share.
//!
//! # Determinism
//! Every random choice comes from [`ChaCha8Rng`] seeded with
//! [`seeded_rng`]`(seed, stream)`: ChaCha's output is specified, so it is
//! the same on every platform and in every `rand_chacha` release (unlike
//! `rand::rngs::StdRng`, whose algorithm may change between versions).
//! The sampling on top of it (shuffles, uniform integers, normals, gammas)
//! is implemented here rather than taken from `rand`/`rand_distr`, so a
//! dependency upgrade cannot change a split or a partition either.
//! Shuffles use only integer arithmetic and are bit-identical everywhere;
//! normal and gamma draws use `ln`/`sqrt`/`cos`, which may differ in the
//! last bit between C math libraries (this could move a Dirichlet boundary
//! only in a near-tie).
//!
//! # Stratification
//! [`split`] splits each class separately: the class's examples are
//! shuffled and the first `round(n_c * test)` go to test, the next
//! `round(n_c * validation)` to validation and the rest to train. Every
//! split therefore has (up to rounding) the dataset's class proportions; a
//! class with fewer than about `1 / fraction` examples may be absent from
//! the small splits. Each split is then shuffled, so its first `k` examples
//! are a random, near-stratified subset.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::source::Example;
use crate::error::{Error, Result};

/// RNG stream used by [`split`] (streams keep independent uses of one seed
/// uncorrelated).
pub const STREAM_SPLIT: u64 = 1;
/// RNG stream used by the client partitions.
pub const STREAM_PARTITION: u64 = 2;

/// A ChaCha8 generator for `seed`, on stream `stream`.
pub fn seeded_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Uniform integer in `0..n` (unbiased; `n` must be > 0).
pub fn uniform_index(rng: &mut impl RngCore, n: usize) -> usize {
    debug_assert!(n > 0);
    let n = n as u64;
    // Rejection sampling on the largest multiple of n below 2^64.
    let zone = u64::MAX - (u64::MAX % n) - 1;
    loop {
        let x = rng.next_u64();
        if x <= zone {
            return (x % n) as usize;
        }
    }
}

/// Fisher–Yates shuffle driven by [`uniform_index`].
pub fn shuffle<T>(rng: &mut impl RngCore, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = uniform_index(rng, i + 1);
        items.swap(i, j);
    }
}

/// Uniform float in `[0, 1)` with 53 random bits.
pub fn uniform01(rng: &mut impl RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Standard normal draw (Box–Muller, one value per call).
pub fn standard_normal(rng: &mut impl RngCore) -> f64 {
    // u1 in (0, 1] so ln(u1) is finite.
    let u1 = 1.0 - uniform01(rng);
    let u2 = uniform01(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Natural log of a Gamma(`alpha`, 1) draw (Marsaglia–Tsang; for
/// `alpha < 1` the boost `G(alpha) = G(alpha + 1) * U^(1/alpha)` is applied
/// in log space, so tiny `alpha` cannot underflow to zero).
pub fn ln_gamma_draw(rng: &mut impl RngCore, alpha: f64) -> f64 {
    debug_assert!(alpha > 0.0);
    if alpha < 1.0 {
        let u = 1.0 - uniform01(rng); // (0, 1]
        return ln_gamma_draw(rng, alpha + 1.0) + u.ln() / alpha;
    }
    let d = alpha - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u = 1.0 - uniform01(rng);
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return (d * v).ln();
        }
    }
}

/// A draw from the symmetric Dirichlet(`alpha`) over `n` categories.
pub fn dirichlet(rng: &mut impl RngCore, alpha: f64, n: usize) -> Vec<f64> {
    let logs: Vec<f64> = (0..n).map(|_| ln_gamma_draw(rng, alpha)).collect();
    let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logs.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = weights.iter().sum();
    weights.iter().map(|w| w / sum).collect()
}

/// Fractions of the dataset in each split (must sum to 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SplitFractions {
    /// Share used for training. Default 0.8.
    pub train: f64,
    /// Share held out for per-client validation. Default 0.1.
    pub validation: f64,
    /// Share held out as the global test set. Default 0.1.
    pub test: f64,
}

impl Default for SplitFractions {
    fn default() -> Self {
        SplitFractions {
            train: 0.8,
            validation: 0.1,
            test: 0.1,
        }
    }
}

impl SplitFractions {
    /// Checks that each fraction is in [0, 1], that they sum to 1 (within
    /// 1e-6) and that the train fraction is positive.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("split.train", self.train),
            ("split.validation", self.validation),
            ("split.test", self.test),
        ] {
            if !value.is_finite() || !(0.0..=1.0).contains(&value) {
                return Err(Error::config(
                    field,
                    format!("must be between 0 and 1, got {value}"),
                ));
            }
        }
        if self.train <= 0.0 {
            return Err(Error::config("split.train", "must be greater than 0"));
        }
        let sum = self.train + self.validation + self.test;
        if (sum - 1.0).abs() > 1e-6 {
            return Err(Error::config(
                "split",
                format!(
                    "train + validation + test must be 1, got {} + {} + {} = {sum}",
                    self.train, self.validation, self.test
                ),
            ));
        }
        Ok(())
    }
}

/// A split of a dataset: indices into the example slice given to [`split`].
/// Every index appears in exactly one of the three lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Splits {
    /// Training examples.
    pub train: Vec<usize>,
    /// Validation examples (partitioned over clients like train).
    pub validation: Vec<usize>,
    /// Test examples (the common, global test set).
    pub test: Vec<usize>,
}

/// Number of classes implied by `examples` (largest label + 1).
pub fn num_labels(examples: &[Example]) -> usize {
    examples.iter().map(|e| e.label + 1).max().unwrap_or(0)
}

/// Indices of `indices` grouped by class, in the given order.
pub(crate) fn group_by_label(
    examples: &[Example],
    indices: &[usize],
    num_labels: usize,
) -> Vec<Vec<usize>> {
    let mut groups = vec![Vec::new(); num_labels];
    for &i in indices {
        groups[examples[i].label].push(i);
    }
    groups
}

/// Splits `examples` into train / validation / test, stratified by label,
/// deterministically for `seed` (see the module docs).
pub fn split(examples: &[Example], fractions: &SplitFractions, seed: u64) -> Result<Splits> {
    fractions.validate()?;
    let mut rng = seeded_rng(seed, STREAM_SPLIT);
    let all: Vec<usize> = (0..examples.len()).collect();
    let mut splits = Splits::default();
    for mut group in group_by_label(examples, &all, num_labels(examples)) {
        shuffle(&mut rng, &mut group);
        let n = group.len();
        let n_test = ((n as f64 * fractions.test).round() as usize).min(n);
        let n_val = ((n as f64 * fractions.validation).round() as usize).min(n - n_test);
        splits.test.extend_from_slice(&group[..n_test]);
        splits
            .validation
            .extend_from_slice(&group[n_test..n_test + n_val]);
        splits.train.extend_from_slice(&group[n_test + n_val..]);
    }
    shuffle(&mut rng, &mut splits.train);
    shuffle(&mut rng, &mut splits.validation);
    shuffle(&mut rng, &mut splits.test);
    if splits.train.is_empty() {
        return Err(Error::config(
            "split.train",
            format!(
                "no training examples left out of {} (fractions {} / {} / {})",
                examples.len(),
                fractions.train,
                fractions.validation,
                fractions.test
            ),
        ));
    }
    Ok(splits)
}

/// The training examples' order: a seeded shuffle, reshuffled each time it
/// runs out (batches never straddle two shuffles' duplicates within one).
pub struct BatchSampler {
    rng: rand_chacha::ChaCha8Rng,
    order: Vec<usize>,
    cursor: usize,
}

impl BatchSampler {
    /// A sampler over `n` examples seeded by `seed`.
    pub fn new(seed: u64, n: usize) -> Self {
        let order: Vec<usize> = (0..n).collect();
        BatchSampler {
            rng: seeded_rng(seed, 0x74_7261_696e),
            cursor: order.len(),
            order,
        }
    }

    /// The next batch: `batch_size` rows (at most `n`).
    pub fn next(&mut self, batch_size: usize) -> Vec<usize> {
        let mut rows = Vec::with_capacity(batch_size);
        while rows.len() < batch_size.min(self.order.len()) {
            if self.cursor >= self.order.len() {
                shuffle(&mut self.rng, &mut self.order);
                self.cursor = 0;
            }
            rows.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        rows
    }
}

/// RNG stream of the public pool's draw (independent of the split's, so a
/// pool of 0 leaves every other split as it was).
pub const STREAM_POOL: u64 = 3;

/// Moves `round(n_c · fraction)` training examples of each class c out of
/// `train` into the public pool (stratified, deterministic for `seed`);
/// the rest of `train` keeps its order. Returns the pool's indices.
pub fn hold_out_pool(
    examples: &[Example],
    train: &mut Vec<usize>,
    fraction: f64,
    seed: u64,
) -> Result<Vec<usize>> {
    if !fraction.is_finite() || !(0.0..=0.5).contains(&fraction) {
        return Err(Error::config(
            "spec.task.splits.pool",
            format!("must be between 0 and 0.5, got {fraction}"),
        ));
    }
    if fraction == 0.0 {
        return Ok(Vec::new());
    }
    let mut rng = seeded_rng(seed, STREAM_POOL);
    let mut pool = Vec::new();
    for mut group in group_by_label(examples, train, num_labels(examples)) {
        shuffle(&mut rng, &mut group);
        let n = ((group.len() as f64 * fraction).round() as usize).min(group.len());
        pool.extend_from_slice(&group[..n]);
    }
    pool.sort_unstable();
    train.retain(|i| pool.binary_search(i).is_err());
    shuffle(&mut rng, &mut pool);
    if train.is_empty() {
        return Err(Error::config(
            "spec.task.splits.pool",
            format!("holding out {fraction} leaves no training examples"),
        ));
    }
    Ok(pool)
}

#[cfg(test)]
/// `counts[c]` examples of class c, interleaved.
pub(crate) fn synthetic(counts: &[usize]) -> Vec<Example> {
    let mut out = Vec::new();
    let max = counts.iter().copied().max().unwrap_or(0);
    for i in 0..max {
        for (label, &n) in counts.iter().enumerate() {
            if i < n {
                out.push(Example {
                    text: format!("example {label} {i}"),
                    label,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chacha_stream_is_stable() {
        // Pinned output: a change here means splits changed for everyone.
        let mut rng = seeded_rng(42, STREAM_SPLIT);
        let mut v: Vec<usize> = (0..10).collect();
        shuffle(&mut rng, &mut v);
        let mut again = seeded_rng(42, STREAM_SPLIT);
        let mut w: Vec<usize> = (0..10).collect();
        shuffle(&mut again, &mut w);
        assert_eq!(v, w);
        let mut other = seeded_rng(42, STREAM_PARTITION);
        let mut x: Vec<usize> = (0..10).collect();
        shuffle(&mut other, &mut x);
        assert_ne!(v, x);
        assert_eq!(v, PINNED_SHUFFLE);
    }

    const PINNED_SHUFFLE: [usize; 10] = [0, 5, 3, 9, 1, 4, 2, 7, 6, 8];

    #[test]
    fn split_is_deterministic_and_seed_dependent() {
        let ex = synthetic(&[300, 200, 100, 20]);
        let f = SplitFractions::default();
        let a = split(&ex, &f, 7).unwrap();
        let b = split(&ex, &f, 7).unwrap();
        assert_eq!(a, b);
        let c = split(&ex, &f, 8).unwrap();
        assert_ne!(a.test, c.test);
        let mut all: Vec<usize> = a
            .train
            .iter()
            .chain(&a.validation)
            .chain(&a.test)
            .copied()
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..ex.len()).collect::<Vec<_>>());
    }

    #[test]
    fn split_is_stratified() {
        let counts = [300, 200, 100, 20];
        let ex = synthetic(&counts);
        let s = split(&ex, &SplitFractions::default(), 1).unwrap();
        let count = |idx: &[usize], c: usize| idx.iter().filter(|&&i| ex[i].label == c).count();
        for (c, &n) in counts.iter().enumerate() {
            assert_eq!(count(&s.test, c), (n as f64 * 0.1).round() as usize);
            assert_eq!(count(&s.validation, c), (n as f64 * 0.1).round() as usize);
            assert_eq!(
                count(&s.train, c),
                n - 2 * (n as f64 * 0.1).round() as usize
            );
        }
    }

    #[test]
    fn fractions_are_validated() {
        let ex = synthetic(&[10]);
        let bad = SplitFractions {
            train: 0.8,
            validation: 0.3,
            test: 0.1,
        };
        let err = split(&ex, &bad, 0).unwrap_err().to_string();
        assert!(err.contains("must be 1"), "{err}");
        let neg = SplitFractions {
            train: 1.1,
            validation: -0.1,
            test: 0.0,
        };
        assert!(neg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("split.train"));
        let all_train = SplitFractions {
            train: 1.0,
            validation: 0.0,
            test: 0.0,
        };
        let s = split(&ex, &all_train, 0).unwrap();
        assert_eq!(s.train.len(), 10);
    }

    #[test]
    fn samplers_have_the_right_moments() {
        let mut rng = seeded_rng(3, 99);
        let n = 20_000;
        let xs: Vec<f64> = (0..n).map(|_| standard_normal(&mut rng)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
        for alpha in [0.1, 0.5, 2.5] {
            let g: Vec<f64> = (0..n)
                .map(|_| ln_gamma_draw(&mut rng, alpha).exp())
                .collect();
            let mean = g.iter().sum::<f64>() / n as f64;
            assert!(
                (mean - alpha).abs() < 0.05 * alpha.max(1.0),
                "{alpha}: {mean}"
            );
        }
        let p = dirichlet(&mut rng, 0.01, 5);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p.iter().all(|x| x.is_finite() && *x >= 0.0));
    }

    #[test]
    fn the_pool_is_stratified_disjoint_and_optional() {
        let examples = synthetic(&[40, 20, 10]);
        let s = split(&examples, &SplitFractions::default(), 7).unwrap();
        let mut train = s.train.clone();
        assert!(hold_out_pool(&examples, &mut train, 0.0, 7)
            .unwrap()
            .is_empty());
        assert_eq!(train, s.train, "no pool: the training split as it was");
        let pool = hold_out_pool(&examples, &mut train, 0.25, 7).unwrap();
        let count =
            |idx: &[usize], c: usize| idx.iter().filter(|&&i| examples[i].label == c).count();
        for c in 0..3 {
            let n = count(&s.train, c);
            assert_eq!(
                count(&pool, c),
                (n as f64 * 0.25).round() as usize,
                "class {c}"
            );
        }
        assert_eq!(train.len() + pool.len(), s.train.len());
        assert!(pool
            .iter()
            .all(|i| !train.contains(i) && !s.test.contains(i)));
        let mut again = s.train.clone();
        assert_eq!(hold_out_pool(&examples, &mut again, 0.25, 7).unwrap(), pool);
        assert!(hold_out_pool(&examples, &mut again, 0.9, 7).is_err());
    }
}
