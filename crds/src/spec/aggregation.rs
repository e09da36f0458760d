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
    /// Bound on the L2 norm of one client's update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub max_update_norm: Option<f64>,
    /// What happens to an update above `maxUpdateNorm`.
    #[serde(default)]
    pub norm_bound_action: NormBoundAction,
    /// Largest accepted client artifact, in bytes.
    #[serde(default = "default_max_artifact_bytes")]
    #[schemars(range(min = 1024))]
    pub max_artifact_bytes: u64,
    /// Seed of CMGA's random order of the other families.
    #[serde(default)]
    pub seed: u64,
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
