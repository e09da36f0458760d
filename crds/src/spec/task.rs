//! The learning task: dataset, labels, splits, and how data is spread over clients.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the federation learns.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskSpec {
    /// The labelled text dataset.
    pub dataset: DatasetSpec,

    /// The class names, in a fixed order shared by every client (the label
    /// map: class i is `labels[i]`).
    #[schemars(length(min = 2, max = 1000), inner(length(min = 1, max = 256)))]
    pub labels: Vec<String>,

    /// Fractions held out for validation (per client) and test (global).
    #[serde(default)]
    pub splits: SplitSpec,

    /// How training and validation examples are spread over clients.
    #[serde(default)]
    pub partition: PartitionSpec,

    /// Evaluate the global model on at most this many test examples per round
    /// (a fixed, seeded subset); unset evaluates the whole test split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_test_examples: Option<u32>,
}

/// A labelled text dataset in CSV, TSV or JSON Lines.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatasetSpec {
    /// `cache://data/...`, an absolute path or `file://` URI, or `s3://bucket/key`.
    #[schemars(
        length(min = 1, max = 1024),
        regex(pattern = r"^(cache://|file://|s3://|/).+")
    )]
    pub uri: String,

    /// File format; inferred from the extension (.csv, .tsv, .jsonl) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DatasetFormat>,

    /// Column or JSON field holding the text.
    #[serde(default = "default_text_field")]
    #[schemars(length(min = 1, max = 256))]
    pub text_field: String,

    /// Column or JSON field holding the label.
    #[serde(default = "default_label_field")]
    #[schemars(length(min = 1, max = 256))]
    pub label_field: String,

    /// Maps raw label values to names in `task.labels` (for example `"1": spam`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 10000))]
    pub label_aliases: BTreeMap<String, String>,
}

fn default_text_field() -> String {
    "text".to_string()
}

fn default_label_field() -> String {
    "label".to_string()
}

/// Dataset file formats.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    /// Comma-separated with a header row; quoted fields may span lines.
    Csv,
    /// Tab-separated with a header row.
    Tsv,
    /// One JSON object per line.
    Jsonl,
}

/// Held-out fractions; training gets the rest. Splits are stratified by
/// label and fixed by `seed`, so every client and every run agree.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.validation + self.test <= 0.9",
    "message": "validation + test must leave at least 10% of the data for training",
    "reason": "FieldValueInvalid"
}]))]
pub struct SplitSpec {
    /// Fraction for validation (partitioned over clients like training data).
    #[serde(default = "default_validation")]
    #[schemars(range(min = 0.0, max = 0.9))]
    pub validation: f64,
    /// Fraction for the global test set (not partitioned).
    #[serde(default = "default_test")]
    #[schemars(range(min = 0.0, max = 0.9))]
    pub test: f64,
    /// Seed of the split.
    #[serde(default)]
    pub seed: u64,
    /// Fraction of the training split held out as a public, unlabeled pool
    /// (texts only, stratified, disjoint from every client's data and from
    /// the test set): the bridge teaches every client's own model on it
    /// (`spec.bridge`). 0 (the default) holds out nothing.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 0.5))]
    pub pool: f64,
}

fn default_validation() -> f64 {
    0.1
}

fn default_test() -> f64 {
    0.1
}

impl Default for SplitSpec {
    fn default() -> Self {
        SplitSpec {
            validation: default_validation(),
            pool: 0.0,
            test: default_test(),
            seed: 0,
        }
    }
}

/// How examples are distributed over clients.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PartitionSpec {
    /// `dirichlet` (label skew), `iid`, or `shards` (each client brings
    /// `clients[].data.uri`).
    #[serde(default)]
    pub strategy: PartitionStrategy,
    /// Concentration of the Dirichlet label skew: small is more skewed
    /// (0.1 strong, 0.5 moderate, 1.0 mild).
    #[serde(default = "default_alpha")]
    #[schemars(range(min = 0.001, max = 1000.0))]
    pub alpha: f64,
    /// Seed of the partition, separate from the training seed so that one
    /// partition can be trained with several seeds.
    #[serde(default)]
    pub seed: u64,
    /// Every client gets at least this many training examples.
    #[serde(default = "default_min_examples")]
    #[schemars(range(min = 1, max = 1000000))]
    pub min_examples_per_client: u32,
}

fn default_alpha() -> f64 {
    0.5
}

fn default_min_examples() -> u32 {
    16
}

impl Default for PartitionSpec {
    fn default() -> Self {
        PartitionSpec {
            strategy: PartitionStrategy::default(),
            alpha: default_alpha(),
            seed: 0,
            min_examples_per_client: default_min_examples(),
        }
    }
}

/// Partition strategies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PartitionStrategy {
    /// Label skew: per label, client shares drawn from Dirichlet(alpha).
    #[default]
    Dirichlet,
    /// Uniformly at random.
    Iid,
    /// Each client's own file (`clients[].data.uri`).
    Shards,
}
