//! Evaluation of the aggregated (global) model.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the federation's own product, the aggregated model, is evaluated on
/// the global test set. Each client's model after its local training is
/// always evaluated too (the clients report it in their manifests); that
/// number is personalised to the client's skewed data, while the global
/// model is what the federation delivers to every member of a family.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EvaluationSpec {
    /// Each client evaluates the global model it receives (the previous
    /// round's, with its own private parts) before training on it; the next
    /// round's aggregation records the result as that round's global
    /// accuracy. Costs one pass over the test set per client and round.
    #[serde(default = "super::defaults::yes")]
    pub each_round: bool,
    /// After the last round, every client evaluates the final global model
    /// (an evaluation phase after the last aggregation; a client whose
    /// evaluation fails after its retries is left out, the run still
    /// succeeds).
    #[serde(default = "super::defaults::yes")]
    pub after_last_round: bool,
    /// How many test examples each client scores in every round (the
    /// global model it receives and its model after training): the first
    /// this many of the global test set (the split's seeded order), the
    /// same for every client. Unset: the whole test set
    /// (`task.maxTestExamples`). The evaluation after the last round always
    /// scores the whole test set. Fewer make every round cheaper at the
    /// price of noisier per-round curves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub round_test_examples: Option<u32>,
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        EvaluationSpec {
            each_round: true,
            after_last_round: true,
            round_test_examples: None,
        }
    }
}
