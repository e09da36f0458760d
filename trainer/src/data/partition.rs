//! Partitions of the train and validation splits over federated clients.
//!
//! Schemes ([`PartitionScheme`]):
//! * `iid`: each class's examples are shuffled and dealt round-robin, so
//!   every client gets (±1) the same number of examples and the dataset's
//!   class proportions;
//! * `dirichlet { alpha }`: label skew. For each class, proportions
//!   `p ~ Dir(alpha, ..., alpha)` over the clients are drawn and the class's
//!   (shuffled) examples are cut at `round(cumsum(p) * n_c)`. The same `p`
//!   cuts the class's validation examples, so a client's held-out split has
//!   its training distribution. Small `alpha` (0.1) gives each client a few
//!   classes; large `alpha` approaches `iid`. If a client ends up with fewer
//!   than `minExamples` training examples (or `minValidationExamples`
//!   validation examples) every proportion is redrawn, at most
//!   [`MAX_DIRICHLET_DRAWS`] times, then it is an error that names alpha,
//!   the number of clients and the smallest client found;
//! * `indices { clients }`: explicit lists of example indices (into the
//!   deduplicated dataset, in file order) per client; a client trains on
//!   its indices that fall in the train split and validates on those in
//!   the validation split (indices in the test split are ignored);
//! * `shards { uris }`: one file per client, read with the dataset's fields
//!   and label map (see [`federate`]).
//!
//! The partition seed is separate from the split seed and from any
//! training seed. The test split is never partitioned: it is the common,
//! global test set.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::data::source::{self, normalize_text, DatasetConfig, Example, LoadReport};
use crate::data::split::{
    dirichlet, group_by_label, hold_out_pool, num_labels, seeded_rng, shuffle, split,
    SplitFractions, Splits, STREAM_PARTITION,
};
use crate::error::{Error, Result};

/// How many times a Dirichlet partition is redrawn before giving up on
/// `minExamples`.
pub const MAX_DIRICHLET_DRAWS: usize = 1000;

/// How the examples are divided among clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum PartitionScheme {
    /// Stratified round-robin: same size and class mix for every client.
    Iid,
    /// Dirichlet(`alpha`) label skew over clients.
    Dirichlet {
        /// Concentration: 0.1 strong skew, 0.5 moderate, 1.0 mild.
        alpha: f64,
    },
    /// Explicit example indices (into the deduplicated dataset) per client.
    Indices {
        /// `clients[i]` lists client i's examples.
        clients: Vec<Vec<usize>>,
    },
    /// One dataset file per client (`uris[i]` is client i's data).
    Shards {
        /// Local paths or `file://` URIs, one per client.
        uris: Vec<String>,
    },
}

fn default_min_examples() -> usize {
    1
}

/// Partition settings (part of the job configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PartitionConfig {
    /// Number of clients.
    pub clients: usize,
    /// The scheme.
    pub scheme: PartitionScheme,
    /// Partition seed (independent of the split and training seeds).
    #[serde(default)]
    pub seed: u64,
    /// Every client gets at least this many training examples. Default 1.
    #[serde(default = "default_min_examples")]
    pub min_examples: usize,
    /// Every client gets at least this many validation examples. Default 0.
    #[serde(default)]
    pub min_validation_examples: usize,
}

impl PartitionConfig {
    /// Checks the settings that do not depend on the data.
    pub fn validate(&self) -> Result<()> {
        if self.clients == 0 {
            return Err(Error::config("partition.clients", "must be at least 1"));
        }
        match &self.scheme {
            PartitionScheme::Iid => {}
            PartitionScheme::Dirichlet { alpha } => {
                if !alpha.is_finite() || *alpha <= 0.0 {
                    return Err(Error::config(
                        "partition.scheme.alpha",
                        format!("must be a positive number, got {alpha}"),
                    ));
                }
            }
            PartitionScheme::Indices { clients } => {
                if clients.len() != self.clients {
                    return Err(Error::config(
                        "partition.scheme.clients",
                        format!(
                            "lists {} clients but partition.clients is {}",
                            clients.len(),
                            self.clients
                        ),
                    ));
                }
            }
            PartitionScheme::Shards { uris } => {
                if uris.len() != self.clients {
                    return Err(Error::config(
                        "partition.scheme.uris",
                        format!(
                            "lists {} shards but partition.clients is {}",
                            uris.len(),
                            self.clients
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One client's share: indices into the example slice that was partitioned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIndices {
    /// Training examples.
    pub train: Vec<usize>,
    /// Validation (held-out) examples.
    pub validation: Vec<usize>,
}

/// The result of [`partition`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// `clients[i]` is client i's share.
    pub clients: Vec<ClientIndices>,
    /// Dirichlet draws it took to satisfy the minimums (1 for other schemes).
    pub draws: usize,
}

/// Divides the train and validation splits of `examples` among
/// `cfg.clients` clients. Every train and validation index is assigned to
/// exactly one client (for `indices`: at most one, the listed ones).
/// `shards` needs file access: use [`federate`].
pub fn partition(
    examples: &[Example],
    splits: &Splits,
    cfg: &PartitionConfig,
) -> Result<Partition> {
    cfg.validate()?;
    let n_labels = num_labels(examples);
    let mut rng = seeded_rng(cfg.seed, STREAM_PARTITION);
    let n = cfg.clients;
    let (mut clients, draws) = match &cfg.scheme {
        PartitionScheme::Iid => {
            let mut clients = vec![ClientIndices::default(); n];
            let mut next = 0usize;
            for mut group in group_by_label(examples, &splits.train, n_labels) {
                shuffle(&mut rng, &mut group);
                for i in group {
                    clients[next % n].train.push(i);
                    next += 1;
                }
            }
            let mut next = 0usize;
            for mut group in group_by_label(examples, &splits.validation, n_labels) {
                shuffle(&mut rng, &mut group);
                for i in group {
                    clients[next % n].validation.push(i);
                    next += 1;
                }
            }
            check_minimums(&clients, cfg, "iid")?;
            (clients, 1)
        }
        PartitionScheme::Dirichlet { alpha } => {
            dirichlet_partition(examples, splits, cfg, *alpha, n_labels, &mut rng)?
        }
        PartitionScheme::Indices { clients: lists } => {
            let mut which = vec![0u8; examples.len()]; // 1 train, 2 validation, 0 test
            for &i in &splits.train {
                which[i] = 1;
            }
            for &i in &splits.validation {
                which[i] = 2;
            }
            let mut owner: Vec<Option<usize>> = vec![None; examples.len()];
            let mut clients = vec![ClientIndices::default(); n];
            for (c, list) in lists.iter().enumerate() {
                for &i in list {
                    let Some(slot) = owner.get_mut(i) else {
                        return Err(Error::config(
                            format!("partition.scheme.clients[{c}]"),
                            format!(
                                "index {i} is out of range: the dataset has {} examples \
                                 (indices count deduplicated examples in file order)",
                                examples.len()
                            ),
                        ));
                    };
                    if let Some(prev) = slot {
                        return Err(Error::config(
                            format!("partition.scheme.clients[{c}]"),
                            format!("index {i} is also listed for client {prev}"),
                        ));
                    }
                    *slot = Some(c);
                    match which[i] {
                        1 => clients[c].train.push(i),
                        2 => clients[c].validation.push(i),
                        _ => {}
                    }
                }
            }
            check_minimums(&clients, cfg, "indices")?;
            return Ok(Partition { clients, draws: 1 });
        }
        PartitionScheme::Shards { .. } => {
            return Err(Error::config(
                "partition.scheme",
                "`shards` reads one file per client: use data::federate",
            ))
        }
    };
    for client in &mut clients {
        shuffle(&mut rng, &mut client.train);
        shuffle(&mut rng, &mut client.validation);
    }
    Ok(Partition { clients, draws })
}

fn dirichlet_partition(
    examples: &[Example],
    splits: &Splits,
    cfg: &PartitionConfig,
    alpha: f64,
    n_labels: usize,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<(Vec<ClientIndices>, usize)> {
    let n = cfg.clients;
    let too_few = |what: &str, have: usize, min: usize| {
        Error::config(
            "partition.minExamples",
            format!(
                "{have} {what} examples cannot give {n} clients at least {min} each; lower \
                 the minimum or use fewer clients"
            ),
        )
    };
    if splits.train.len() < n * cfg.min_examples {
        return Err(too_few("training", splits.train.len(), cfg.min_examples));
    }
    if splits.validation.len() < n * cfg.min_validation_examples {
        return Err(too_few(
            "validation",
            splits.validation.len(),
            cfg.min_validation_examples,
        ));
    }
    let mut train = group_by_label(examples, &splits.train, n_labels);
    let mut validation = group_by_label(examples, &splits.validation, n_labels);
    for group in train.iter_mut().chain(validation.iter_mut()) {
        shuffle(rng, group);
    }
    let mut best = (0usize, 0usize); // smallest train / validation client in the best draw
    for draw in 1..=MAX_DIRICHLET_DRAWS {
        let mut clients = vec![ClientIndices::default(); n];
        for (train_c, val_c) in train.iter().zip(&validation) {
            let p = dirichlet(rng, alpha, n);
            let mut cum = 0.0;
            let (mut t0, mut v0) = (0usize, 0usize);
            for (k, (client, share)) in clients.iter_mut().zip(&p).enumerate() {
                cum += share;
                // The last client takes the remainder, so every example is
                // assigned even when the cumulative sum rounds below 1.
                let (t1, v1) = if k + 1 == n {
                    (train_c.len(), val_c.len())
                } else {
                    (
                        cut(cum, train_c.len()).max(t0),
                        cut(cum, val_c.len()).max(v0),
                    )
                };
                client.train.extend_from_slice(&train_c[t0..t1]);
                client.validation.extend_from_slice(&val_c[v0..v1]);
                t0 = t1;
                v0 = v1;
            }
        }
        let min_train = clients.iter().map(|c| c.train.len()).min().unwrap_or(0);
        let min_val = clients
            .iter()
            .map(|c| c.validation.len())
            .min()
            .unwrap_or(0);
        if min_train >= cfg.min_examples && min_val >= cfg.min_validation_examples {
            return Ok((clients, draw));
        }
        if (min_train, min_val) > best {
            best = (min_train, min_val);
        }
    }
    Err(Error::config(
        "partition.scheme.alpha",
        format!(
            "Dirichlet(alpha={alpha}) over {n} clients: after {MAX_DIRICHLET_DRAWS} draws some \
             client still had fewer than {} training / {} validation examples (best draw: \
             smallest client {} / {} of {} / {}); raise alpha, lower minExamples, or use \
             fewer clients",
            cfg.min_examples,
            cfg.min_validation_examples,
            best.0,
            best.1,
            splits.train.len(),
            splits.validation.len()
        ),
    ))
}

/// End of a client's slice: `round(cum * len)`, clamped to `len`.
fn cut(cum: f64, len: usize) -> usize {
    ((cum * len as f64).round() as usize).min(len)
}

fn check_minimums(clients: &[ClientIndices], cfg: &PartitionConfig, scheme: &str) -> Result<()> {
    for (c, client) in clients.iter().enumerate() {
        if client.train.len() < cfg.min_examples {
            return Err(Error::config(
                "partition.minExamples",
                format!(
                    "{scheme} partition over {} clients: client {c} gets {} training examples, \
                     fewer than {}",
                    cfg.clients,
                    client.train.len(),
                    cfg.min_examples
                ),
            ));
        }
        if client.validation.len() < cfg.min_validation_examples {
            return Err(Error::config(
                "partition.minValidationExamples",
                format!(
                    "{scheme} partition over {} clients: client {c} gets {} validation \
                     examples, fewer than {}",
                    cfg.clients,
                    client.validation.len(),
                    cfg.min_validation_examples
                ),
            ));
        }
    }
    Ok(())
}

/// The data section of a job configuration: which dataset, how to split
/// it, and how to partition it over clients.
///
/// ```json
/// {"dataset": {"uri": "/data/trec.jsonl", "labels": ["ABBR","DESC","ENTY","HUM","LOC","NUM"]},
///  "split": {"train": 0.8, "validation": 0.1, "test": 0.1}, "splitSeed": 0,
///  "partition": {"clients": 6, "seed": 1, "scheme": {"type": "dirichlet", "alpha": 0.5}}}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataConfig {
    /// The dataset (in `shards` mode: the global test set, used whole).
    pub dataset: DatasetConfig,
    /// Split fractions. Default 0.8 / 0.1 / 0.1.
    #[serde(default)]
    pub split: SplitFractions,
    /// Seed of the train / validation / test split.
    #[serde(default)]
    pub split_seed: u64,
    /// Fraction of the training split held out as the public, unlabeled
    /// pool ([`hold_out_pool`]). Default 0.
    #[serde(default)]
    pub pool: f64,
    /// Partition over clients.
    pub partition: PartitionConfig,
}

/// One client's examples.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientData {
    /// Training examples.
    pub train: Vec<Example>,
    /// Held-out examples (the client's local validation split).
    pub validation: Vec<Example>,
}

impl ClientData {
    /// Training examples per class id (`num_labels` entries).
    pub fn label_counts(&self, num_labels: usize) -> Vec<usize> {
        let mut counts = vec![0; num_labels];
        for e in &self.train {
            if let Some(c) = counts.get_mut(e.label) {
                *c += 1;
            }
        }
        counts
    }
}

/// A dataset prepared for a federation.
#[derive(Debug, Clone)]
pub struct FederatedData {
    /// Class names (class id = index).
    pub labels: Vec<String>,
    /// `clients[i]` is client i's data.
    pub clients: Vec<ClientData>,
    /// The common, global test set (not partitioned).
    pub test: Vec<Example>,
    /// The public pool: texts held out of the training split, labels
    /// removed (every label 0); empty without `pool`.
    pub pool: Vec<Example>,
    /// Load report of `dataset` (in `shards` mode: of the test file).
    pub report: LoadReport,
    /// Load reports of the shards (`shards` mode only).
    pub shard_reports: Vec<LoadReport>,
    /// Shard examples dropped because their text is in the test set
    /// (`shards` mode only).
    pub test_overlap_dropped: usize,
    /// Dirichlet draws needed to meet the minimums (1 otherwise).
    pub draws: usize,
}

/// Loads, splits and partitions the data `cfg` describes.
///
/// * `iid`, `dirichlet`, `indices`: the dataset is split into train /
///   validation / test by `split` and `splitSeed`; train and validation
///   are partitioned over the clients; test is the global test set.
/// * `shards`: `dataset` is the global test set (used whole); client i
///   reads `uris[i]` with the dataset's fields and label map (`labels` is
///   then required, so that every shard uses the same class ids), drops
///   any example whose text is in the test set, and splits the rest into
///   train / validation in the ratio `split.train : split.validation`
///   (`split.test` is not used).
pub fn federate(cfg: &DataConfig) -> Result<FederatedData> {
    cfg.partition.validate()?;
    cfg.split.validate()?;
    if let PartitionScheme::Shards { uris } = &cfg.partition.scheme {
        return federate_shards(cfg, uris);
    }
    let dataset = source::load(&cfg.dataset)?;
    let mut splits = split(&dataset.examples, &cfg.split, cfg.split_seed)?;
    let pool = hold_out_pool(
        &dataset.examples,
        &mut splits.train,
        cfg.pool,
        cfg.split_seed,
    )?;
    let part = partition(&dataset.examples, &splits, &cfg.partition)?;
    let pick = |idx: &[usize]| -> Vec<Example> {
        idx.iter().map(|&i| dataset.examples[i].clone()).collect()
    };
    let clients = part
        .clients
        .iter()
        .map(|c| ClientData {
            train: pick(&c.train),
            validation: pick(&c.validation),
        })
        .collect();
    let test = pick(&splits.test);
    let pool = pool
        .iter()
        .map(|&i| Example {
            text: dataset.examples[i].text.clone(),
            label: 0,
        })
        .collect();
    Ok(FederatedData {
        labels: dataset.labels,
        clients,
        test,
        pool,
        report: dataset.report,
        shard_reports: Vec::new(),
        test_overlap_dropped: 0,
        draws: part.draws,
    })
}

fn federate_shards(cfg: &DataConfig, uris: &[String]) -> Result<FederatedData> {
    if cfg.pool > 0.0 {
        return Err(Error::config(
            "spec.task.splits.pool",
            "a public pool is held out of the shared dataset's training split: it does not \
             apply to `shards` partitions (set it to 0, or use a dirichlet or iid partition)",
        ));
    }
    if cfg.dataset.labels.is_none() {
        return Err(Error::config(
            "dataset.labels",
            "required with `shards` partitions, so that every shard uses the same class ids",
        ));
    }
    let test_set = source::load(&cfg.dataset)?;
    let test_keys: HashSet<String> = test_set
        .examples
        .iter()
        .map(|e| normalize_text(&e.text))
        .collect();
    let kept = cfg.split.train + cfg.split.validation;
    let fractions = SplitFractions {
        train: cfg.split.train / kept,
        validation: cfg.split.validation / kept,
        test: 0.0,
    };
    let mut clients = Vec::with_capacity(uris.len());
    let mut shard_reports = Vec::with_capacity(uris.len());
    let mut dropped = 0;
    for (i, uri) in uris.iter().enumerate() {
        let shard_cfg = DatasetConfig {
            uri: uri.clone(),
            ..cfg.dataset.clone()
        };
        let shard = source::load(&shard_cfg)?;
        let before = shard.examples.len();
        let examples: Vec<Example> = shard
            .examples
            .into_iter()
            .filter(|e| !test_keys.contains(&normalize_text(&e.text)))
            .collect();
        dropped += before - examples.len();
        if examples.is_empty() {
            return Err(Error::data(
                &shard.path,
                format!("shard of client {i}: every example is also in the test set"),
            ));
        }
        let s = split(&examples, &fractions, cfg.split_seed)?;
        let client = ClientData {
            train: s.train.iter().map(|&j| examples[j].clone()).collect(),
            validation: s.validation.iter().map(|&j| examples[j].clone()).collect(),
        };
        check_minimums(
            &[ClientIndices {
                train: s.train,
                validation: s.validation,
            }],
            &cfg.partition,
            &format!("shard `{uri}` (client {i})"),
        )?;
        clients.push(client);
        shard_reports.push(shard.report);
    }
    Ok(FederatedData {
        labels: test_set.labels,
        clients,
        test: test_set.examples,
        pool: Vec::new(),
        report: test_set.report,
        shard_reports,
        test_overlap_dropped: dropped,
        draws: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::split::synthetic;

    fn cfg(clients: usize, scheme: PartitionScheme, seed: u64) -> PartitionConfig {
        PartitionConfig {
            clients,
            scheme,
            seed,
            min_examples: 1,
            min_validation_examples: 0,
        }
    }

    fn entropy(counts: &[usize]) -> f64 {
        let total: usize = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / total as f64;
                -p * p.ln()
            })
            .sum()
    }

    fn mean_entropy(ex: &[Example], part: &Partition, n_labels: usize) -> f64 {
        let hs: Vec<f64> = part
            .clients
            .iter()
            .map(|c| {
                let mut counts = vec![0; n_labels];
                for &i in &c.train {
                    counts[ex[i].label] += 1;
                }
                entropy(&counts)
            })
            .collect();
        hs.iter().sum::<f64>() / hs.len() as f64
    }

    fn assert_exact_cover(part: &Partition, splits: &Splits) {
        let mut train: Vec<usize> = part.clients.iter().flat_map(|c| c.train.clone()).collect();
        let mut val: Vec<usize> = part
            .clients
            .iter()
            .flat_map(|c| c.validation.clone())
            .collect();
        let mut want_train = splits.train.clone();
        let mut want_val = splits.validation.clone();
        for v in [&mut train, &mut val, &mut want_train, &mut want_val] {
            v.sort_unstable();
        }
        assert_eq!(train, want_train);
        assert_eq!(val, want_val);
    }

    fn trec_like() -> Vec<Example> {
        synthetic(&[86, 1153, 1245, 1215, 824, 858])
    }

    #[test]
    fn iid_is_balanced_and_covers_everything() {
        let ex = trec_like();
        let splits = split(&ex, &SplitFractions::default(), 0).unwrap();
        let part = partition(&ex, &splits, &cfg(6, PartitionScheme::Iid, 0)).unwrap();
        assert_exact_cover(&part, &splits);
        let sizes: Vec<usize> = part.clients.iter().map(|c| c.train.len()).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{sizes:?}"
        );
    }

    #[test]
    fn dirichlet_covers_everything_and_is_deterministic() {
        let ex = trec_like();
        let splits = split(&ex, &SplitFractions::default(), 0).unwrap();
        let c = cfg(6, PartitionScheme::Dirichlet { alpha: 0.5 }, 11);
        let a = partition(&ex, &splits, &c).unwrap();
        assert_exact_cover(&a, &splits);
        assert_eq!(a, partition(&ex, &splits, &c).unwrap());
        let other = cfg(6, PartitionScheme::Dirichlet { alpha: 0.5 }, 12);
        assert_ne!(a, partition(&ex, &splits, &other).unwrap());
    }

    #[test]
    fn small_alpha_gives_label_skew() {
        let ex = trec_like();
        let splits = split(&ex, &SplitFractions::default(), 0).unwrap();
        let iid = partition(&ex, &splits, &cfg(6, PartitionScheme::Iid, 3)).unwrap();
        let skew = partition(
            &ex,
            &splits,
            &cfg(6, PartitionScheme::Dirichlet { alpha: 0.1 }, 3),
        )
        .unwrap();
        let mild = partition(
            &ex,
            &splits,
            &cfg(6, PartitionScheme::Dirichlet { alpha: 100.0 }, 3),
        )
        .unwrap();
        let (h_iid, h_skew, h_mild) = (
            mean_entropy(&ex, &iid, 6),
            mean_entropy(&ex, &skew, 6),
            mean_entropy(&ex, &mild, 6),
        );
        assert!(h_skew < 0.7 * h_iid, "iid {h_iid} vs alpha=0.1 {h_skew}");
        assert!(
            (h_mild - h_iid).abs() < 0.05,
            "iid {h_iid} vs alpha=100 {h_mild}"
        );
    }

    #[test]
    fn validation_follows_the_clients_train_distribution() {
        let ex = trec_like();
        let splits = split(&ex, &SplitFractions::default(), 0).unwrap();
        let part = partition(
            &ex,
            &splits,
            &cfg(4, PartitionScheme::Dirichlet { alpha: 0.1 }, 5),
        )
        .unwrap();
        for client in &part.clients {
            let mut train = [0usize; 6];
            let mut val = [0usize; 6];
            for &i in &client.train {
                train[ex[i].label] += 1;
            }
            for &i in &client.validation {
                val[ex[i].label] += 1;
            }
            // A class the client has (almost) no training data for has
            // (almost) no validation data either: same proportions cut both.
            for c in 0..6 {
                if train[c] <= 1 {
                    assert!(val[c] <= 1, "train {train:?} val {val:?}");
                }
            }
        }
    }

    #[test]
    fn min_examples_is_guaranteed_or_an_error() {
        let ex = synthetic(&[150, 150, 150, 150]);
        let splits = split(&ex, &SplitFractions::default(), 0).unwrap();
        let mut c = cfg(8, PartitionScheme::Dirichlet { alpha: 0.3 }, 1);
        c.min_examples = 30;
        let part = partition(&ex, &splits, &c).unwrap();
        assert!(part.clients.iter().all(|cl| cl.train.len() >= 30));
        assert!(part.draws > 1, "the minimum should have forced a redraw");
        assert_exact_cover(&part, &splits);

        let mut impossible = cfg(20, PartitionScheme::Dirichlet { alpha: 0.01 }, 1);
        impossible.min_examples = 20;
        let err = partition(&ex, &splits, &impossible)
            .unwrap_err()
            .to_string();
        assert!(err.contains("alpha=0.01"), "{err}");
        assert!(err.contains("20 clients"), "{err}");
        assert!(err.contains("fewer than 20"), "{err}");

        let mut too_many = cfg(10, PartitionScheme::Iid, 1);
        too_many.min_examples = 100;
        let err = partition(&ex, &splits, &too_many).unwrap_err().to_string();
        assert!(err.contains("minExamples"), "{err}");
    }

    #[test]
    fn explicit_indices() {
        let ex = synthetic(&[10, 10]);
        let splits = split(&ex, &SplitFractions::default(), 0).unwrap();
        let lists = vec![(0..10).collect::<Vec<_>>(), (10..20).collect()];
        let part = partition(
            &ex,
            &splits,
            &cfg(2, PartitionScheme::Indices { clients: lists }, 0),
        )
        .unwrap();
        for (c, client) in part.clients.iter().enumerate() {
            let range = c * 10..(c + 1) * 10;
            assert!(client.train.iter().all(|i| range.contains(i)));
            assert!(client.train.iter().all(|i| splits.train.contains(i)));
            assert!(client
                .validation
                .iter()
                .all(|i| splits.validation.contains(i)));
        }
        let dup = vec![vec![0, 1], vec![1]];
        let err = partition(
            &ex,
            &splits,
            &cfg(2, PartitionScheme::Indices { clients: dup }, 0),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("also listed for client 0"), "{err}");
        let oob = vec![vec![0], vec![99]];
        let err = partition(
            &ex,
            &splits,
            &cfg(2, PartitionScheme::Indices { clients: oob }, 0),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("clients[1]") && err.contains("99"), "{err}");
        let short = vec![vec![0]];
        assert!(partition(
            &ex,
            &splits,
            &cfg(2, PartitionScheme::Indices { clients: short }, 0)
        )
        .is_err());
    }

    #[test]
    fn config_serde() {
        let c: DataConfig = serde_json::from_str(
            r#"{"dataset":{"uri":"x.jsonl"},"splitSeed":3,
                "partition":{"clients":6,"seed":1,"scheme":{"type":"dirichlet","alpha":0.5}}}"#,
        )
        .unwrap();
        assert_eq!(
            c.partition.scheme,
            PartitionScheme::Dirichlet { alpha: 0.5 }
        );
        assert_eq!(c.partition.min_examples, 1);
        assert_eq!(c.split, SplitFractions::default());
        assert_eq!(c.split_seed, 3);
        let iid: PartitionScheme = serde_json::from_str(r#"{"type":"iid"}"#).unwrap();
        assert_eq!(iid, PartitionScheme::Iid);
        let shards: PartitionScheme =
            serde_json::from_str(r#"{"type":"shards","uris":["a.csv","b.csv"]}"#).unwrap();
        assert_eq!(
            shards,
            PartitionScheme::Shards {
                uris: vec!["a.csv".into(), "b.csv".into()]
            }
        );
    }

    fn write_jsonl(dir: &tempfile::TempDir, name: &str, rows: &[(String, &str)]) -> String {
        let path = dir.path().join(name);
        let body: String = rows
            .iter()
            .map(|(t, l)| format!("{}\n", serde_json::json!({"text": t, "label": l})))
            .collect();
        std::fs::write(&path, body).unwrap();
        path.to_str().unwrap().to_string()
    }

    #[test]
    fn federate_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<(String, &str)> = (0..400)
            .map(|i| (format!("question number {i}"), ["a", "b", "c", "d"][i % 4]))
            .chain((0..50).map(|i| (format!("question  number {i}"), "a"))) // duplicates
            .collect();
        let uri = write_jsonl(&dir, "all.jsonl", &rows);
        let mut dataset = DatasetConfig::new(uri);
        dataset.labels = Some(vec!["a".into(), "b".into(), "c".into(), "d".into()]);
        let cfg = DataConfig {
            dataset,
            split: SplitFractions::default(),
            split_seed: 0,
            pool: 0.0,
            partition: cfg(4, PartitionScheme::Dirichlet { alpha: 1.0 }, 0),
        };
        let fed = federate(&cfg).unwrap();
        assert_eq!(fed.report.duplicates, 50);
        assert_eq!(fed.report.label_conflicts, 37); // labels b, c, d among i < 50
        assert_eq!(fed.test.len(), 40);
        let total: usize = fed
            .clients
            .iter()
            .map(|c| c.train.len() + c.validation.len())
            .sum();
        assert_eq!(total + fed.test.len(), 400);
        assert_eq!(
            fed.clients[0].label_counts(4).iter().sum::<usize>(),
            fed.clients[0].train.len()
        );
    }

    #[test]
    fn federate_shards_drops_test_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let test_rows: Vec<(String, &str)> = (0..20)
            .map(|i| (format!("t {i}"), ["a", "b"][i % 2]))
            .collect();
        let test_uri = write_jsonl(&dir, "test.jsonl", &test_rows);
        let mut shard_uris = Vec::new();
        for s in 0..2 {
            let mut rows: Vec<(String, &str)> = (0..50)
                .map(|i| (format!("shard {s} {i}"), ["a", "b"][i % 2]))
                .collect();
            rows.push(("t  3".to_string(), "b")); // in the test set
            shard_uris.push(write_jsonl(&dir, &format!("s{s}.jsonl"), &rows));
        }
        let mut dataset = DatasetConfig::new(test_uri);
        let cfg_no_labels = DataConfig {
            dataset: dataset.clone(),
            split: SplitFractions::default(),
            split_seed: 0,
            pool: 0.0,
            partition: cfg(
                2,
                PartitionScheme::Shards {
                    uris: shard_uris.clone(),
                },
                0,
            ),
        };
        let err = federate(&cfg_no_labels).unwrap_err().to_string();
        assert!(err.contains("dataset.labels"), "{err}");

        dataset.labels = Some(vec!["a".into(), "b".into()]);
        let cfg = DataConfig {
            dataset,
            ..cfg_no_labels
        };
        let fed = federate(&cfg).unwrap();
        assert_eq!(fed.test.len(), 20);
        assert_eq!(fed.test_overlap_dropped, 2);
        for client in &fed.clients {
            assert_eq!(client.train.len() + client.validation.len(), 50);
            // 0.8 : 0.1 renormalised = 8/9 : 1/9 per class of 25 -> 3 validation each.
            assert_eq!(client.validation.len(), 6);
        }
    }
}
