//! The bridge: one small common model that every client co-trains next to
//! its own, averaged over *all* clients, with mutual distillation between
//! the two on the client's own data (this project's cross-architecture
//! transfer; docs/method.md, "The bridge").

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::client::ModelSpec;

/// A bridge model shared by every client of the federation.
///
/// Each round a client trains DeMA adapters and a head on the bridge's
/// frozen backbone as well as on its own, on the same batches, each model
/// learning from the labels and from the other's softened predictions. The
/// bridge's adapters and head are averaged over every client, whatever its
/// own architecture: with the bridge alone the federation is the
/// smallest-common-model FedAvg baseline, so what the pair adds over that
/// baseline is cross-family knowledge.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BridgeSpec {
    /// The common backbone: one every client can run (the smallest of the
    /// federation's models is the natural choice). Its adapters use
    /// `adapter.rank` and `adapter.experts`, one slot per adapted layer.
    pub model: ModelSpec,

    /// How strongly the two models learn from each other.
    #[serde(default)]
    pub distillation: DistillationSpec,

    /// Which model a client serves and is evaluated with.
    #[serde(default)]
    pub serve: ServedModel,

    /// The correction of the own model's predictions before they are
    /// served: `poolEnsemble` (the default) adds a per-class bias to its
    /// logits, fitted on the public pool so that its predictions there
    /// match the federation's ensemble on average, which takes out the
    /// over-prediction of the client's own classes that its skewed labels
    /// taught it; `none` serves them as they are. Needs `poolTeacher:
    /// ensemble` and a pool (without them nothing is corrected). The
    /// bridge is never corrected, and what a client sends is uncorrected.
    #[serde(default)]
    pub calibration: Calibration,

    /// The learning rate of the bridge's adapters; `training.learningRate`
    /// when unset. Set it where the own models' adapters want another rate
    /// than the bridge's DeMA: LoRA own models (`adapter.type: lora`) at a
    /// LoRA rate, the bridge at the rate its DeMA adapters were tuned at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub learning_rate: Option<f64>,
}

/// Mutual distillation between a client's own model and the bridge.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DistillationSpec {
    /// Weight of the own model's distillation term on the client's data
    /// (KL divergence from the bridge's softened predictions, times
    /// temperature²) next to its cross-entropy on the labels.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub weight: f64,
    /// Weight of the bridge's distillation term on the client's data (from
    /// the own model's predictions): 0 makes the teaching one-way.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub bridge_weight: f64,
    /// Softmax temperature of the distillation term.
    #[serde(default = "default_temperature")]
    #[schemars(range(min = 0.1, max = 100.0))]
    pub temperature: f64,
    /// Weight of the bridge teaching the client's own model on the public
    /// pool (`task.splits.pool`): on texts of every class, also the classes
    /// the client's family never saw. Unused without a pool.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub pool_weight: f64,
    /// Which model teaches on the public pool: `bridge` (the bridge teaches
    /// the own model), `validated` (each round, the one of the two with the
    /// higher accuracy on the client's validation split at the round's
    /// start; ties go to the bridge) or `ensemble` (the default: the
    /// federation's ensemble on the pool teaches both models, FedDF-style).
    #[serde(default)]
    pub pool_teacher: PoolTeacher,
    /// How the aggregator weighs the clients' predictions in the pool's
    /// ensemble (`poolTeacher: ensemble`): see [`PoolWeighting`].
    #[serde(default)]
    pub pool_weighting: PoolWeighting,
    /// Steps the aggregator distils the averaged bridge on the public pool
    /// against the round's ensemble before it writes the global (FedDF's
    /// server step): the clients' bridges drift towards their own skewed
    /// labels in their local steps, and the average of drifted models sits
    /// below the ensemble that taught them. Each step is one batch of
    /// `training.batchSize` pool texts at `temperature`, AdamW at the
    /// bridge's learning rate, the batch order seeded by the spec's seed
    /// and the round. 0 (the default) leaves the average as it is. Needs
    /// `poolTeacher: ensemble` and a pool, and an aggregator that can read
    /// the task's dataset and the bridge's model (the local runner always;
    /// a cluster aggregation Job when both URIs are reachable from it).
    /// Measured worse than without it on unseen seeds (the bridge fits
    /// the ensemble on the small pool and loses accuracy: docs/method.md).
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(max = 10000))]
    pub server_steps: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The correction a client applies to its own model's predictions before
/// it serves them (alone or in the ensemble with the bridge).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Calibration {
    /// The own model's predictions as they are.
    None,
    /// A per-class bias added to the own model's logits, fitted on the
    /// public pool so that the own model's predictions there match the
    /// federation's ensemble in the global (`poolTeacher: ensemble`) as
    /// closely as a bias can (least cross-entropy: the bias is the one
    /// whose predictions, averaged over the pool, equal the ensemble's).
    /// A model trained on a client's skewed labels over-predicts the
    /// client's classes; the bias takes that out without any label. The
    /// bridge, averaged over every client, is served as it is; what a client
    /// sends on the pool is its uncorrected view, so the ensemble does not
    /// echo itself. Without a pool ensemble (no pool, round 1) nothing is
    /// corrected.
    #[default]
    PoolEnsemble,
}

/// How the clients' predictions on the pool are weighted in the ensemble.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolWeighting {
    /// Per class, by the client's training examples of that class.
    #[default]
    Examples,
    /// As `examples`, each client's weight then scaled by its agreement
    /// with the others (truth discovery): the share of pool texts on which
    /// its top class is the top class of the ensemble of every other
    /// client, corrected for chance (`(a − 1/C) / (1 − 1/C)`, at least 0).
    /// A model that says one class for everything, or guesses, agrees at
    /// chance and loses its say; the labels are never needed.
    Agreement,
}

/// Which model of the pair teaches the other on the public pool.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolTeacher {
    /// The bridge teaches the own model.
    Bridge,
    /// The model that validates better at the round's start teaches.
    Validated,
    /// The federation's ensemble teaches both models (FedDF/FedMD-style):
    /// every client sends the class probabilities its served model gives
    /// each pool text, and its label counts; the aggregator averages them
    /// per class, weighting each client by its examples of that class (a
    /// client that never saw a class has no say on it), and the next round
    /// both models of every client distil from that ensemble on the pool.
    /// Round 1, before any ensemble exists, falls back to `bridge`. The
    /// default (measured best: docs/benchmarks.md); without a pool nothing
    /// is taught or sent. The probabilities are sent in the clear, so a
    /// pool with `aggregation.privacy` needs another teacher.
    #[default]
    Ensemble,
}

impl Default for DistillationSpec {
    fn default() -> Self {
        DistillationSpec {
            weight: default_weight(),
            bridge_weight: default_weight(),
            temperature: default_temperature(),
            pool_weight: default_weight(),
            pool_teacher: PoolTeacher::default(),
            pool_weighting: PoolWeighting::default(),
            server_steps: 0,
        }
    }
}

fn default_weight() -> f64 {
    1.0
}

fn default_temperature() -> f64 {
    2.0
}

/// The model a client with a bridge serves.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServedModel {
    /// The client's own model.
    Own,
    /// The bridge model (the same for every client).
    Bridge,
    /// `ensemble`, except for a client whose own backbone is the bridge's:
    /// its own model adds no capacity, only less data, and it serves the
    /// bridge.
    #[default]
    Auto,
    /// Of `own`, `bridge` and `ensemble`, the one with the highest accuracy
    /// on the client's own validation split (ties go to the ensemble, then
    /// the bridge). Under label skew that split has the client's skew, so
    /// this favours a model fitted to the client's own distribution (what
    /// a site that serves its own traffic may want), not the federation's.
    Validated,
    /// Of `auto`'s choice, `ensemble`, `bridge` and `own` (calibrated), the
    /// one whose top class on the public pool agrees most often with the
    /// federation's ensemble in the global (ties in that order). The pool
    /// has every class in the federation's proportions, unlike the client's
    /// skewed validation split, and the ensemble stands in for its labels:
    /// a site whose own model adds only its skew serves the bridge. What
    /// the client sends on the pool is `auto`'s, so the choice never feeds
    /// back into training. Without a pool ensemble (no pool, round 1) it is
    /// `auto`. Measured worse than `auto` on unseen seeds: the bridge is in
    /// every client's contribution to the ensemble, so it agrees with it by
    /// construction (docs/method.md).
    Agreement,
    /// The mean of the two models' class probabilities.
    Ensemble,
    /// The two models' class probabilities weighted, example by example, by
    /// each model's confidence (its top probability): a model that does not
    /// know an example's class (one its family never saw) tends to hedge,
    /// and the other one decides.
    Confident,
}

impl ServedModel {
    /// The name used in the spec (and as the key of evaluation variants).
    pub fn as_str(self) -> &'static str {
        match self {
            ServedModel::Auto => "auto",
            ServedModel::Validated => "validated",
            ServedModel::Agreement => "agreement",
            ServedModel::Own => "own",
            ServedModel::Bridge => "bridge",
            ServedModel::Ensemble => "ensemble",
            ServedModel::Confident => "confident",
        }
    }

    /// What a client whose own model is at `own_uri` serves: `auto`
    /// resolved against `bridge_uri`; `validated` and `agreement` by
    /// `evidence` of each candidate (the validation accuracy, the pool
    /// agreement: whichever the rule reads), the first of equal ones
    /// winning; the other choices as they are.
    pub fn choose(
        self,
        own_uri: &str,
        bridge_uri: &str,
        evidence: impl Fn(ServedModel) -> f64,
    ) -> ServedModel {
        let best = |candidates: &[ServedModel]| {
            let mut best = (candidates[0], f64::NEG_INFINITY);
            for &candidate in candidates {
                let score = evidence(candidate);
                if score > best.1 {
                    best = (candidate, score);
                }
            }
            best.0
        };
        match self {
            ServedModel::Auto => auto(own_uri, bridge_uri),
            ServedModel::Validated => best(&ServedModel::VALIDATED_CANDIDATES),
            ServedModel::Agreement => {
                let auto = auto(own_uri, bridge_uri);
                let mut candidates = vec![auto];
                candidates.extend(
                    ServedModel::VALIDATED_CANDIDATES
                        .into_iter()
                        .filter(|&c| c != auto),
                );
                best(&candidates)
            }
            fixed => fixed,
        }
    }

    /// Whether the choice reads the pool's agreement with the ensemble
    /// (the evidence [`ServedModel::choose`] then needs).
    pub fn reads_pool(self) -> bool {
        self == ServedModel::Agreement
    }

    /// The model whose probabilities a client sends on the pool, `served`
    /// being its choice: `auto`'s for `agreement` (a choice made against
    /// the ensemble must not feed the ensemble), `served` otherwise.
    pub fn sent(self, own_uri: &str, bridge_uri: &str, served: ServedModel) -> ServedModel {
        match self {
            ServedModel::Agreement => auto(own_uri, bridge_uri),
            _ => served,
        }
    }

    /// What `validated` chooses from, in order of preference among equals
    /// (`agreement` puts `auto`'s choice first).
    pub const VALIDATED_CANDIDATES: [ServedModel; 3] =
        [ServedModel::Ensemble, ServedModel::Bridge, ServedModel::Own];

    /// Every model a client can serve (`auto` is one of them), in report order.
    pub const ALL: [ServedModel; 4] = [
        ServedModel::Own,
        ServedModel::Bridge,
        ServedModel::Ensemble,
        ServedModel::Confident,
    ];
}

/// `auto` for a client whose own model is at `own_uri`: the bridge on the
/// bridge's own backbone, the ensemble elsewhere.
fn auto(own_uri: &str, bridge_uri: &str) -> ServedModel {
    let same = |u: &str| u.trim_end_matches('/').to_string();
    if same(own_uri) == same(bridge_uri) {
        ServedModel::Bridge
    } else {
        ServedModel::Ensemble
    }
}

#[cfg(test)]
mod tests {
    use super::ServedModel;

    #[test]
    fn auto_serves_the_bridge_only_on_the_bridges_own_backbone() {
        let bridge = "cache://models/paraphrase-MiniLM-L3-v2";
        let auto = ServedModel::Auto;
        let any = |_: ServedModel| 0.5;
        assert_eq!(auto.choose(bridge, bridge, any), ServedModel::Bridge);
        assert_eq!(
            auto.choose(&format!("{bridge}/"), bridge, any),
            ServedModel::Bridge
        );
        assert_eq!(
            auto.choose("cache://models/all-mpnet-base-v2", bridge, any),
            ServedModel::Ensemble
        );
        assert_eq!(
            ServedModel::Own.choose(bridge, bridge, any),
            ServedModel::Own
        );
        assert!(!ServedModel::ALL.contains(&ServedModel::Auto));
    }

    /// The evidence of a choice: `own`, `bridge` and `ensemble`'s scores.
    fn scores(own: f64, bridge: f64, ensemble: f64) -> impl Fn(ServedModel) -> f64 {
        move |v: ServedModel| match v {
            ServedModel::Own => own,
            ServedModel::Bridge => bridge,
            ServedModel::Ensemble => ensemble,
            _ => 1.0, // never a candidate
        }
    }

    #[test]
    fn validated_serves_the_best_validated_model_and_prefers_the_ensemble_among_equals() {
        let v = |own, bridge, ensemble| {
            ServedModel::Validated.choose("a", "b", scores(own, bridge, ensemble))
        };
        assert_eq!(v(0.9, 0.8, 0.85), ServedModel::Own);
        assert_eq!(v(0.3, 0.8, 0.6), ServedModel::Bridge);
        assert_eq!(v(0.8, 0.8, 0.8), ServedModel::Ensemble);
        assert_eq!(v(0.8, 0.85, 0.7), ServedModel::Bridge);
        assert_eq!(v(0.9, 0.9, 0.7), ServedModel::Bridge);
        assert!(!ServedModel::ALL.contains(&ServedModel::Validated));
        assert!(!ServedModel::VALIDATED_CANDIDATES.contains(&ServedModel::Validated));
    }

    #[test]
    fn agreement_serves_the_model_closest_to_the_ensemble_and_prefers_autos_choice() {
        let bridge_uri = "cache://models/paraphrase-MiniLM-L3-v2";
        let other = "cache://models/all-mpnet-base-v2";
        let a = |uri: &str, own, bridge, ensemble| {
            ServedModel::Agreement.choose(uri, bridge_uri, scores(own, bridge, ensemble))
        };
        assert_eq!(a(other, 0.7, 0.9, 0.8), ServedModel::Bridge);
        assert_eq!(a(other, 0.95, 0.9, 0.8), ServedModel::Own);
        // equal: auto's choice first, the ensemble for another backbone…
        assert_eq!(a(other, 0.8, 0.8, 0.8), ServedModel::Ensemble);
        // …the bridge on the bridge's own backbone
        assert_eq!(a(bridge_uri, 0.8, 0.8, 0.8), ServedModel::Bridge);
        assert_eq!(a(bridge_uri, 0.8, 0.7, 0.85), ServedModel::Ensemble);
        assert!(!ServedModel::ALL.contains(&ServedModel::Agreement));
    }

    #[test]
    fn a_client_sends_autos_choice_under_agreement_and_its_served_model_otherwise() {
        let bridge_uri = "cache://models/paraphrase-MiniLM-L3-v2";
        let other = "cache://models/all-mpnet-base-v2";
        let agree = ServedModel::Agreement;
        assert_eq!(
            agree.sent(other, bridge_uri, ServedModel::Own),
            ServedModel::Ensemble
        );
        assert_eq!(
            agree.sent(bridge_uri, bridge_uri, ServedModel::Ensemble),
            ServedModel::Bridge
        );
        assert_eq!(
            ServedModel::Validated.sent(other, bridge_uri, ServedModel::Own),
            ServedModel::Own
        );
        assert!(agree.reads_pool() && !ServedModel::Validated.reads_pool());
    }
}
