//! How the server combines client updates each round.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Aggregation settings (one strategy per run, as in Flower).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AggregationSpec {
    /// The strategy.
    #[serde(default)]
    pub algorithm: AggregationAlgorithm,
    /// CMGA's conflict rule: `pcgrad` projects a family update off another
    /// family's when their cosine is below `conflictThreshold`; `ties` keeps
    /// only coordinates that agree with the elected sign.
    #[serde(default)]
    pub alignment: AlignmentRule,
    /// CMGA: cosine below which two family updates conflict.
    #[serde(default)]
    #[schemars(range(min = -1.0, max = 1.0))]
    pub conflict_threshold: f64,
    /// CMGA: rescale each family update to the median family norm so that
    /// one family cannot dominate by scale alone.
    #[serde(default)]
    pub magnitude_harmonisation: bool,
    /// CMGA: weight of each family in the combination.
    #[serde(default)]
    pub family_weighting: FamilyWeighting,
    /// Server learning rate applied to the combined update.
    #[serde(default = "default_server_lr")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub server_learning_rate: f64,
    /// Server momentum (0 disables it).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 0.999))]
    pub server_momentum: f64,
    /// Absolute bound on the L2 norm of one client's update (off when
    /// unset; the adaptive bound `robust.normBoundMultiple` is on by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub max_update_norm: Option<f64>,
    /// What happens to an update above `maxUpdateNorm` or the adaptive bound.
    #[serde(default)]
    pub norm_bound_action: NormBoundAction,
    /// Largest accepted client artifact, in bytes.
    #[serde(default = "default_max_artifact_bytes")]
    #[schemars(range(min = 1024))]
    pub max_artifact_bytes: u64,
    /// Seed of CMGA's random order of the other families.
    #[serde(default)]
    pub seed: u64,
    /// Defences against hostile (well-formed but malicious) updates.
    #[serde(default)]
    pub robust: RobustSpec,
    /// Client-level differential privacy (off when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacySpec>,
}

/// Client-level differential privacy, DP-FedAvg style (docs/aggregation.md,
/// "Differential privacy"): the aggregator clips each client's whole update
/// (every tensor it sends) to `clipNorm` in L2, weighs every client equally,
/// and adds Gaussian noise of standard deviation `noiseMultiplier ×
/// clipNorm` to each sum it releases. The aggregator is trusted with the
/// clipped updates (central DP); what leaves it — every global — is (ε, δ)
/// differentially private with respect to any one client's whole data, with
/// ε from a Rényi-DP accountant over the rounds run (`report.json`,
/// `heterotune plan`). Needs a linear aggregation: `fedavg` or
/// `family-fedavg`, `robust.combine: mean`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrivacySpec {
    /// L2 bound on one client's update per round (all its tensors
    /// together); larger updates are scaled down to it.
    #[schemars(range(min = 0.0))]
    pub clip_norm: f64,
    /// σ: the noise's standard deviation in units of `clipNorm`.
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub noise_multiplier: f64,
    /// δ of the reported (ε, δ) guarantee (well below 1 / number of clients).
    #[serde(default = "default_delta")]
    #[schemars(range(min = 0.0, max = 0.1))]
    pub delta: f64,
}

fn default_delta() -> f64 {
    1e-5
}

/// Defences against hostile updates (docs/aggregation.md, "Hostile updates").
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RobustSpec {
    /// Adaptive norm bound: a part of an update (shared, bridge, the rest)
    /// whose RMS value exceeds this multiple of the round's median RMS of
    /// that part is clipped to it (or rejected, per `normBoundAction`).
    /// 0 disables it.
    #[serde(default = "default_norm_bound_multiple")]
    #[schemars(range(min = 0.0))]
    pub norm_bound_multiple: f64,
    /// No client's aggregation weight above this fraction of the round's
    /// total weight (larger weights are capped, water-filling). 1 disables it.
    #[serde(default = "default_max_examples_share")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_examples_share: f64,
    /// Cap each client's `numExamples` by its partition's training-set size
    /// when the aggregator can read the dataset (the local runner can).
    #[serde(default = "default_true")]
    pub examples_from_partition: bool,
    /// How the updates that are averaged together are combined (over all
    /// clients for the bridge and FedAvg's shared part, else within each
    /// family, before CMGA's alignment): the weighted mean, coordinate by
    /// coordinate (median, trimmed mean), or by whole update (multi-Krum).
    #[serde(default)]
    pub combine: RobustCombine,
    /// `trimmedMean`: fraction of the updates dropped at each end of every
    /// coordinate (`floor(fraction · n)` each side).
    #[serde(default = "default_trim_fraction")]
    #[schemars(range(min = 0.0, max = 0.49))]
    pub trim_fraction: f64,
    /// `multiKrum` and `bulyan`: `f`, the hostile clients assumed in each
    /// group of updates averaged together. `multiKrum` averages the `n − f`
    /// updates with the lowest Krum scores (each one's summed squared
    /// distance to its `n − f − 2` nearest others); a group of `f + 2` or
    /// fewer keeps all. `bulyan` takes at most `⌊(n − 3) / 4⌋` of a group.
    #[serde(default = "default_byzantine_clients")]
    #[schemars(range(min = 1, max = 1000))]
    pub byzantine_clients: u32,
}

fn default_norm_bound_multiple() -> f64 {
    5.0
}

fn default_max_examples_share() -> f64 {
    0.5
}

fn default_true() -> bool {
    true
}

fn default_byzantine_clients() -> u32 {
    1
}

fn default_trim_fraction() -> f64 {
    0.2
}

impl Default for RobustSpec {
    fn default() -> Self {
        RobustSpec {
            norm_bound_multiple: default_norm_bound_multiple(),
            max_examples_share: default_max_examples_share(),
            examples_from_partition: true,
            combine: RobustCombine::default(),
            trim_fraction: default_trim_fraction(),
            byzantine_clients: default_byzantine_clients(),
        }
    }
}

/// Coordinate-wise combination of the updates averaged together.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RobustCombine {
    /// Sample-weighted mean (the algorithms as described).
    #[default]
    Mean,
    /// Unweighted coordinate-wise median.
    Median,
    /// Unweighted coordinate-wise trimmed mean (`trimFraction`).
    TrimmedMean,
    /// Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018): the
    /// unweighted mean of the `n − byzantineClients` updates closest to
    /// their neighbours, per part (shared, own, bridge, pool) of each group.
    MultiKrum,
    /// Bulyan (El Mhamdi et al. 2018), per part of each group: Krum picks
    /// `n − 2f` updates one at a time, then each coordinate is the mean of
    /// the `n − 4f` picked values closest to their median. Needs
    /// `n ≥ 4f + 3`; a smaller group is combined with the largest `f` it
    /// takes, `⌊(n − 3) / 4⌋` (0: the plain mean).
    Bulyan,
}

impl RobustCombine {
    /// The name used in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            RobustCombine::Mean => "mean",
            RobustCombine::Median => "median",
            RobustCombine::TrimmedMean => "trimmedMean",
            RobustCombine::MultiKrum => "multiKrum",
            RobustCombine::Bulyan => "bulyan",
        }
    }
}

fn default_server_lr() -> f64 {
    1.0
}

fn default_max_artifact_bytes() -> u64 {
    256 * 1024 * 1024
}

impl Default for AggregationSpec {
    fn default() -> Self {
        AggregationSpec {
            algorithm: AggregationAlgorithm::default(),
            alignment: AlignmentRule::default(),
            conflict_threshold: 0.0,
            magnitude_harmonisation: false,
            family_weighting: FamilyWeighting::default(),
            server_learning_rate: default_server_lr(),
            server_momentum: 0.0,
            max_update_norm: None,
            norm_bound_action: NormBoundAction::default(),
            max_artifact_bytes: default_max_artifact_bytes(),
            seed: 0,
            robust: RobustSpec::default(),
            privacy: None,
        }
    }
}

/// Aggregation strategies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AggregationAlgorithm {
    /// Cross-Model Gradient Alignment over DeMA's shared part (the method).
    #[default]
    Cmga,
    /// Sample-weighted averaging of DeMA's shared part (CMGA's ablation).
    Fedavg,
    /// Averaging within each family only (DeMA or LoRA).
    FamilyFedavg,
    /// HetLoRA: zero-pad LoRA factors to the largest rank, average, truncate back.
    Hetlora,
    /// FlexLoRA: average full LoRA products, redistribute by truncated SVD.
    Flexlora,
    /// No exchange: every client trains alone (the lower bound).
    LocalOnly,
}

impl AggregationAlgorithm {
    /// The name used in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            AggregationAlgorithm::Cmga => "cmga",
            AggregationAlgorithm::Fedavg => "fedavg",
            AggregationAlgorithm::FamilyFedavg => "family-fedavg",
            AggregationAlgorithm::Hetlora => "hetlora",
            AggregationAlgorithm::Flexlora => "flexlora",
            AggregationAlgorithm::LocalOnly => "local-only",
        }
    }
}

/// CMGA's conflict rule.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AlignmentRule {
    /// PCGrad-style projection against the other families' original updates.
    #[default]
    Pcgrad,
    /// TIES-style sign consensus.
    Ties,
}

/// Family weights in CMGA's combination.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FamilyWeighting {
    /// By share of training examples.
    #[default]
    Samples,
    /// Equal weight per family.
    Uniform,
}

/// What to do with an update whose norm exceeds the bound.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NormBoundAction {
    /// Scale it down to the bound.
    #[default]
    Clip,
    /// Reject the artifact.
    Reject,
}
