//! The statistics of one aggregation round, written as the global
//! manifest's `stats` (camelCase JSON) and returned to the caller.

use std::collections::BTreeMap;
use std::fmt;

use heterotune_crds::spec::{AggregationAlgorithm, AlignmentRule, FederatedTuneSpec};
use serde::{Deserialize, Serialize};

use super::reject::Reject;
use super::robust::RobustStats;

/// Everything one round's aggregation measured.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoundStats {
    /// The algorithm's spec name (`cmga`, `fedavg`, ...).
    pub algorithm: String,
    /// CMGA's alignment rule (`pcgrad`, `ties`), for `cmga` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alignment: Option<String>,
    /// The round aggregated.
    pub round: u32,
    /// The quorum in force (`spec.quorum()`).
    pub quorum: u32,
    /// Accepted updates, in aggregation order (sorted by client name).
    pub participants: Vec<Participant>,
    /// Rejected artifacts with their reasons.
    pub rejects: Vec<Reject>,
    /// Number of rejects per reason label.
    pub reject_counts: BTreeMap<String, u32>,
    /// Spec clients with no committed artifact this round.
    pub missing: Vec<String>,
    /// Total training examples behind the accepted updates.
    pub examples: u64,
    /// Bytes of accepted artifacts (data files).
    pub bytes_received: u64,
    /// Bytes read from rejected artifacts.
    pub bytes_rejected: u64,
    /// Per family key: participants, weight, update norms.
    pub families: BTreeMap<String, FamilyStats>,
    /// CMGA (and FedAvg, for comparison): per shared group (slot), family
    /// norms and pairwise cosines before/after alignment.
    pub groups: Vec<GroupStats>,
    /// Conflicts resolved over all groups (PCGrad: projections applied;
    /// TIES: family coordinates dropped by the sign election).
    pub conflicts_projected: u64,
    /// What the defences against hostile updates did.
    #[serde(default)]
    pub robust: RobustStats,
    /// `aggregation.privacy`: its settings, the guarantee after this round
    /// and the clients whose update was clipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyStats>,
    /// `bridge.distillation.serverSteps`: the server's distillation of the
    /// averaged bridge on the public pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_distillation: Option<ServerDistillationStats>,
    /// Where the time went.
    pub timing: Timing,
}

/// Differential privacy of the run after one round (`aggregation.privacy`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrivacyStats {
    /// L2 bound on each client's update.
    pub clip_norm: f64,
    /// σ.
    pub noise_multiplier: f64,
    /// δ of the guarantee.
    pub delta: f64,
    /// ε after the rounds run so far (Rényi-DP accountant).
    pub epsilon: f64,
    /// Clients whose update was above `clipNorm` this round.
    pub clipped: Vec<String>,
}

/// The server's distillation of the bridge in one round
/// (`bridge.distillation.serverSteps`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerDistillationStats {
    /// Steps run.
    pub steps: u32,
    /// Texts of the public pool.
    pub pool_texts: usize,
    /// The distillation loss, `T² KL(ensemble ‖ bridge)`, over the whole
    /// pool: of the averaged bridge, and of the distilled one.
    pub kl_before: f64,
    pub kl_after: f64,
    /// The loss of the last step's batch.
    pub last_batch_loss: f64,
    /// Seconds it took (loading the bridge and the pool included).
    pub seconds: f64,
}

impl RoundStats {
    /// The statistics of round `round` of `spec` before any artifact is read:
    /// the algorithm, the alignment rule (CMGA) and the quorum.
    pub fn of_round(spec: &FederatedTuneSpec, round: u32) -> Self {
        let algorithm = spec.aggregation.algorithm;
        RoundStats {
            algorithm: algorithm.as_str().to_string(),
            alignment: (algorithm == AggregationAlgorithm::Cmga).then(|| {
                match spec.aggregation.alignment {
                    AlignmentRule::Pcgrad => "pcgrad".to_string(),
                    AlignmentRule::Ties => "ties".to_string(),
                }
            }),
            round,
            quorum: spec.quorum(),
            robust: RobustStats::of(&spec.aggregation.robust),
            ..RoundStats::default()
        }
    }
}

/// The trainer's report of a round: participants, rejects, missing clients.
impl fmt::Display for RoundStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "round {}: aggregated {} clients ({} rejected, {} missing), {} bytes received",
            self.round,
            self.participants.len(),
            self.rejects.len(),
            self.missing.len(),
            self.bytes_received
        )?;
        for r in &self.rejects {
            writeln!(f, "  rejected {r:?}")?;
        }
        Ok(())
    }
}

/// One accepted update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Participant {
    /// Client name.
    pub client: String,
    /// Family key.
    pub family: String,
    /// Its self-reported `numExamples`.
    pub num_examples: u64,
    /// Its aggregation weight: `numExamples` capped by its partition size
    /// (when known) and by `robust.maxExamplesShare`.
    #[serde(default)]
    pub weight: u64,
    /// Its data file's size.
    pub bytes: u64,
    /// L2 norm of its update as received.
    pub update_norm: f64,
    /// Whether the update was clipped (to `maxUpdateNorm` or the adaptive bound).
    pub clipped: bool,
    /// The parts clipped by the adaptive bound (`shared`, `bridge`, `own`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clipped_parts: Vec<String>,
    /// Its self-reported accuracy on the global test split after local
    /// training (manifest metric `test_accuracy`), when finite and in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    /// Its self-reported test macro-F1 (`test_macro_f1`), when finite and in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_macro_f1: Option<f64>,
    /// Its self-reported accuracy on the global test split of the global
    /// model it received, before local training (`received_test_accuracy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_accuracy: Option<f64>,
    /// The same model's macro-F1 (`received_test_macro_f1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_macro_f1: Option<f64>,
}

/// One family's round.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FamilyStats {
    /// Participating clients.
    pub clients: Vec<String>,
    /// Their examples.
    pub examples: u64,
    /// The family's weight in the combination of shared updates (data
    /// share, or `1/F` with uniform weighting).
    pub weight: f64,
    /// L2 norm of the family's averaged update per part: `shared` (all
    /// slots, before harmonisation and alignment), `familyParts`, `head`,
    /// `lora`.
    pub update_norms: BTreeMap<String, f64>,
}

/// A pair of families and the cosine of their updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairCosine {
    /// First family key.
    pub a: String,
    /// Second family key.
    pub b: String,
    /// Cosine similarity (0 when either update is zero).
    pub cosine: f64,
}

/// One shared group (a DeMA slot: all its shared tensors flattened).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupStats {
    /// Group name (`shared.slot0`).
    pub group: String,
    /// Parameters in the group.
    pub parameters: usize,
    /// ‖G_f‖ per family before harmonisation.
    pub family_norms: BTreeMap<String, f64>,
    /// ‖G_f‖ after magnitude harmonisation (when it is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub harmonised_norms: Option<BTreeMap<String, f64>>,
    /// Pairwise cosines of the family updates before alignment.
    pub cosines_before: Vec<PairCosine>,
    /// Pairwise cosines after alignment.
    pub cosines_after: Vec<PairCosine>,
    /// Conflicts resolved in this group.
    pub conflicts_projected: u64,
    /// ‖Δ‖ of the combined update (before the server learning rate).
    pub combined_norm: f64,
}

/// Wall time of the round's phases, in seconds.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timing {
    /// Reading and verifying artifacts, accumulating updates.
    pub verify_seconds: f64,
    /// The algorithm's combination.
    pub aggregate_seconds: f64,
    /// Serialising and writing the global artifact.
    pub write_seconds: f64,
    /// Everything.
    pub total_seconds: f64,
}

/// The global manifest's quality metrics, from the participants'
/// self-reported test scores: `accuracy` and `macro_f1`, the unweighted
/// means over the participants that report one, and `accuracy.<family>`,
/// the same mean per family key (the definition of the local run report's
/// round accuracy): the models after local training. `previous_global_accuracy`,
/// `previous_global_macro_f1` and `previous_global_accuracy.<family>` are the
/// same means of what the participants measured on the model they received
/// (the previous round's global, before local training). A metric no
/// participant reports is left out (never NaN).
pub fn participant_metrics(participants: &[Participant]) -> BTreeMap<String, f64> {
    fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
        let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
        (n > 0).then(|| sum / n as f64)
    }
    type Score = fn(&Participant) -> Option<f64>;
    let groups: [(&str, Score, Score); 2] = [
        ("", |p| p.test_accuracy, |p| p.test_macro_f1),
        (
            "previous_global_",
            |p| p.received_accuracy,
            |p| p.received_macro_f1,
        ),
    ];
    let families: std::collections::BTreeSet<&str> =
        participants.iter().map(|p| p.family.as_str()).collect();
    let mut out = BTreeMap::new();
    for (prefix, accuracy, macro_f1) in groups {
        if let Some(v) = mean(participants.iter().filter_map(accuracy)) {
            out.insert(format!("{prefix}accuracy"), v);
        }
        if let Some(v) = mean(participants.iter().filter_map(macro_f1)) {
            out.insert(format!("{prefix}macro_f1"), v);
        }
        for family in &families {
            let values = participants
                .iter()
                .filter(|p| p.family == *family)
                .filter_map(accuracy);
            if let Some(v) = mean(values) {
                out.insert(format!("{prefix}accuracy.{family}"), v);
            }
        }
    }
    out
}

/// Pairwise cosines of `vectors` (families in order), upper triangle.
pub(crate) fn pairwise_cosines(names: &[&String], vectors: &[Vec<f64>]) -> Vec<PairCosine> {
    let mut out = Vec::new();
    for i in 0..vectors.len() {
        for j in i + 1..vectors.len() {
            out.push(PairCosine {
                a: names[i].clone(),
                b: names[j].clone(),
                cosine: super::array::cosine(&vectors[i], &vectors[j]),
            });
        }
    }
    out
}
