//! `FederatedTune` status: the observed state, written by the operator with
//! server-side apply (and mirrored in the local runner's report).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most round summaries kept in status (older ones live in the store's report).
pub const MAX_HISTORY: usize = 50;

/// Observed state of a FederatedTune.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederatedTuneStatus {
    /// Coarse state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The round in progress (1-based), or the last one when finished.
    #[serde(default)]
    pub round: u32,
    /// Completed rounds as "done/total" (printed by kubectl).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Completed fraction of the run, 0-100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_percent: Option<f64>,
    /// Estimated completion time (RFC 3339), from the mean round duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_completion_time: Option<String>,
    /// Clients whose artifact for the current round is committed.
    #[serde(default)]
    pub ready_clients: u32,
    /// Mean global-test accuracy of the clients' models after their local
    /// training in the last completed round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_accuracy: Option<f64>,
    /// Mean global-test accuracy of the newest evaluated global
    /// (aggregated) model, and the round it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_global_accuracy: Option<f64>,
    /// The round of `lastGlobalAccuracy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_global_round: Option<u32>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded, Suspended, Complete, Failed (the
    /// Kubernetes condition convention: one per type).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["type"]
    ))]
    pub conditions: Vec<Condition>,
    /// Per-client state in the current round.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientStatus>,
    /// The last rounds, newest last (at most 50).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<RoundSummary>,
    /// Where the run's artifacts are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<ArtifactLocations>,
    /// When the first round started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// When the step in progress (`round`, or the final evaluation) opened
    /// (RFC 3339): its first Job's creation, or, for a step whose clients
    /// are all run by sites, when the operator first saw it open. The
    /// round deadline (`spec.roundDeadlineSeconds`) counts from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_start_time: Option<String>,
    /// When the run finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
}

/// Coarse state of a run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Accepted, nothing started yet.
    Pending,
    /// Clients are training.
    Running,
    /// The round's aggregation job is running.
    Aggregating,
    /// Every round is aggregated; clients evaluate the final global model.
    Evaluating,
    /// Paused by `spec.suspend`.
    Suspended,
    /// All rounds completed.
    Succeeded,
    /// Stopped by an error that needs a person (see the conditions).
    Failed,
}

/// A status condition, in the shape of Kubernetes'
/// `meta/v1.Condition` (status enum, RFC 3339 `lastTransitionTime`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Ready, Progressing, Degraded, Suspended, Complete or Failed.
    #[serde(rename = "type")]
    #[schemars(length(max = 316))]
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// Machine-readable cause in CamelCase, e.g. QuorumNotMet,
    /// DeadlineExceeded, NoGpuProfileFits, InvalidSpec, StorageUnavailable.
    #[schemars(length(max = 1024))]
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: Option<String>,
    /// The generation the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
}

/// The status of a condition.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// It does not.
    False,
    /// The operator cannot tell.
    Unknown,
}

impl ConditionStatus {
    /// `True` when `on`, else `False`.
    pub fn of(on: bool) -> ConditionStatus {
        if on {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        }
    }

    /// "True", "False" or "Unknown".
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

impl PartialEq<&str> for ConditionStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One client's state in the current round.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientStatus {
    /// Client name.
    pub name: String,
    /// Pending, Training, Committed, Failed (an attempt failed; retried),
    /// Excluded (out of retries this round), Evaluating, Evaluated or
    /// EvaluationFailed (the evaluation after the last round), or
    /// WaitingForSite (a `site` client whose agent has not committed yet).
    pub state: ClientState,
    /// Attempts in the current round.
    #[serde(default)]
    pub attempts: u32,
    /// Last round this client's artifact was aggregated in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_round: Option<u32>,
    /// The GPU profile chosen for this client ("cpu" for CPU-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_profile: Option<String>,
    /// Estimated trainer memory in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_memory_bytes: Option<u64>,
    /// Last error or note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A client's state in the current round, or in the evaluation after the
/// last one (set by the operator's `controller::client_status`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ClientState {
    /// No trainer started yet this round.
    Pending,
    /// Its trainer runs.
    Training,
    /// Its artifact for the round is committed.
    Committed,
    /// An attempt failed; it will be retried.
    Failed,
    /// Out of retries: left out of this round's aggregation.
    Excluded,
    /// It evaluates the final global model.
    Evaluating,
    /// Its evaluation of the final global model is committed.
    Evaluated,
    /// Its evaluation failed and is out of retries.
    EvaluationFailed,
    /// A `site` client (`spec.clients[].site`) whose agent has not
    /// committed yet: its own agent trains it, the operator starts nothing.
    WaitingForSite,
}

impl ClientState {
    /// Every state, in the order of a client's round.
    pub const ALL: [ClientState; 9] = [
        ClientState::Pending,
        ClientState::Training,
        ClientState::Committed,
        ClientState::Failed,
        ClientState::Excluded,
        ClientState::Evaluating,
        ClientState::Evaluated,
        ClientState::EvaluationFailed,
        ClientState::WaitingForSite,
    ];

    /// The state's name, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Pending => "Pending",
            ClientState::Training => "Training",
            ClientState::Committed => "Committed",
            ClientState::Failed => "Failed",
            ClientState::Excluded => "Excluded",
            ClientState::Evaluating => "Evaluating",
            ClientState::Evaluated => "Evaluated",
            ClientState::EvaluationFailed => "EvaluationFailed",
            ClientState::WaitingForSite => "WaitingForSite",
        }
    }
}

impl std::fmt::Display for ClientState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for ClientState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Summary of a completed round.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoundSummary {
    /// Round number (1-based).
    pub round: u32,
    /// Mean global-test accuracy of the participants' models after their
    /// local training in this round (personalised to each client's data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// The same, per model family.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub accuracy_by_family: BTreeMap<String, f64>,
    /// Mean global-test accuracy of this round's aggregated model as the
    /// clients receive it (`spec.evaluation`): known once the next round is
    /// aggregated, or after the final evaluation for the last round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_accuracy: Option<f64>,
    /// The same, per model family.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub global_accuracy_by_family: BTreeMap<String, f64>,
    /// Bytes uploaded by clients in this round.
    #[serde(default)]
    pub bytes_uploaded: u64,
    /// Wall time of the round in seconds.
    #[serde(default)]
    pub duration_seconds: f64,
    /// Clients aggregated.
    #[serde(default)]
    pub participants: u32,
    /// Artifacts rejected, by reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rejected: BTreeMap<String, u32>,
}

/// Where a run's artifacts are.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactLocations {
    /// The run's prefix in the store.
    pub prefix: String,
    /// The latest global manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_global: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_and_states_read_back_as_strings() {
        let c: Condition = serde_json::from_str(
            r#"{"type":"Ready","status":"Unknown","reason":"Starting","message":"","lastTransitionTime":"2026-01-02T03:04:05Z"}"#,
        )
        .expect("a condition");
        assert_eq!(c.status, ConditionStatus::Unknown);
        assert!(c.status == "Unknown");
        let bad =
            serde_json::from_str::<Condition>(r#"{"type":"Ready","status":"maybe","reason":"X"}"#);
        assert!(bad.is_err());
        let s: ClientStatus =
            serde_json::from_str(r#"{"name":"a","state":"EvaluationFailed"}"#).expect("a client");
        assert_eq!(s.state, ClientState::EvaluationFailed);
        assert_eq!(
            serde_json::to_value(s.state).expect("json"),
            "EvaluationFailed"
        );
        assert_eq!(s.state.to_string(), "EvaluationFailed");
    }
}
