//! The last step of a reconcile: the status, computed by pure functions from
//! what was observed and decided, written by server-side apply together with
//! the Events of the change and the run's metrics.

use heterotune_crds::spec::FederatedTuneSpec;
use heterotune_crds::status::{
    ArtifactLocations, ClientStatus, Condition, ConditionStatus, FederatedTuneStatus, Phase,
    RoundSummary, MAX_HISTORY,
};

use heterotune_crds::FederatedTune;
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;

use super::context::{Context, MANAGER};
use super::error::{kube, Error, Result};
use super::events::{announcements, publish, Announcement};
use super::run::Run;
use crate::controller::metrics::RunProgress;
use crate::protocol::observe::{CompletedRound, GlobalAccuracy};

/// Condition types, in the order they are written.
pub const CONDITION_TYPES: &[&str] = &[
    "Ready",
    "Progressing",
    "Degraded",
    "Suspended",
    "Complete",
    "Failed",
];

/// Why a run is degraded (the condition reason and message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trouble {
    /// `InvalidSpec`, `NoGpuProfileFits`, `StorageUnavailable`, `ClientsExcluded`.
    pub reason: String,
    /// Detail (field paths for InvalidSpec).
    pub message: String,
}

/// Everything the status is computed from.
#[derive(Debug, Clone)]
pub struct StatusInput<'a> {
    /// The status before this reconcile.
    pub previous: Option<&'a FederatedTuneStatus>,
    /// The spec.
    pub spec: &'a FederatedTuneSpec,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// Now (Unix seconds).
    pub now: f64,
    /// Phase decided by the planner (or kept, when the spec is invalid).
    pub phase: Phase,
    /// The current round.
    pub round: u32,
    /// Rounds with a global manifest.
    pub completed_rounds: u32,
    /// Per-client state (empty keeps the previous list).
    pub clients: Vec<ClientStatus>,
    /// Rounds completed since the previous status.
    pub new_rounds: &'a [CompletedRound],
    /// Why the run is degraded, if it is.
    pub trouble: Option<Trouble>,
    /// Why the run failed (reason, message), if it did.
    pub failure: Option<(String, String)>,
    /// Where the artifacts are.
    pub artifacts: Option<ArtifactLocations>,
    /// When the current round's first trainer started.
    pub round_started_at: Option<f64>,
    /// The clients' evaluations of the last round's global model, once
    /// there are any.
    pub final_evaluation: Option<GlobalAccuracy>,
}

/// RFC 3339 (seconds precision) of Unix seconds.
pub fn rfc3339(seconds: f64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(seconds.floor() as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn parse(text: &str) -> Option<f64> {
    crate::protocol::observe::unix_seconds(text)
}

fn condition(type_: &str, on: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: ConditionStatus::of(on),
        reason: reason.to_string(),
        message,
        last_transition_time: None,
        observed_generation: None,
    }
}

/// The Progressing condition: blocked by `blocking`, or what the phase is doing.
fn progressing(input: &StatusInput, blocking: Option<&Trouble>) -> Condition {
    let spec = input.spec;
    let failure = input.failure.as_ref();
    match (input.phase, blocking) {
        (_, Some(t)) => condition("Progressing", false, &t.reason, t.message.clone()),
        (Phase::Pending, None) => {
            condition("Progressing", true, "Starting", "starting round 1".into())
        }
        (Phase::Running, None) => condition(
            "Progressing",
            true,
            "RoundInProgress",
            format!(
                "round {} of {}: clients are training",
                input.round, spec.rounds
            ),
        ),
        (Phase::Aggregating, None) => condition(
            "Progressing",
            true,
            "Aggregating",
            format!("round {} of {}: aggregating", input.round, spec.rounds),
        ),
        (Phase::Evaluating, None) => condition(
            "Progressing",
            true,
            "Evaluating",
            format!(
                "all {} rounds aggregated: clients evaluate the final global model",
                spec.rounds
            ),
        ),
        (Phase::Suspended, None) => condition(
            "Progressing",
            false,
            "Suspended",
            "spec.suspend is true".into(),
        ),
        (Phase::Succeeded, None) => condition(
            "Progressing",
            false,
            "AllRoundsCompleted",
            format!("{} rounds completed", spec.rounds),
        ),
        (Phase::Failed, None) => {
            let (r, m) = failure
                .cloned()
                .unwrap_or_else(|| ("Failed".into(), String::new()));
            condition("Progressing", false, &r, m)
        }
    }
}

/// The six conditions for a phase and its troubles.
pub fn conditions(input: &StatusInput) -> Vec<Condition> {
    let phase = input.phase;
    let spec = input.spec;
    let trouble = input.trouble.as_ref();
    let failure = input.failure.as_ref();
    let blocking = trouble.filter(|t| t.reason != "ClientsExcluded");
    let ready = match (blocking, failure) {
        (Some(t), _) => condition("Ready", false, &t.reason, t.message.clone()),
        (None, Some((r, m))) => condition("Ready", false, r, m.clone()),
        (None, None) => condition(
            "Ready",
            true,
            "Reconciled",
            "the operator is driving the run".into(),
        ),
    };
    let progressing = progressing(input, blocking);
    let degraded = match trouble {
        Some(t) => condition("Degraded", true, &t.reason, t.message.clone()),
        None => condition("Degraded", false, "AsExpected", String::new()),
    };
    let suspended = if spec.suspend {
        condition(
            "Suspended",
            true,
            "Suspended",
            "spec.suspend is true: no new jobs start; running ones finish".into(),
        )
    } else {
        condition("Suspended", false, "NotSuspended", String::new())
    };
    let complete = if phase == Phase::Succeeded {
        condition(
            "Complete",
            true,
            "AllRoundsCompleted",
            format!("{} rounds completed", spec.rounds),
        )
    } else {
        condition(
            "Complete",
            false,
            "RoundsRemaining",
            format!(
                "{} of {} rounds completed",
                input.completed_rounds.min(spec.rounds),
                spec.rounds
            ),
        )
    };
    let failed = match failure {
        Some((r, m)) if phase == Phase::Failed => condition("Failed", true, r, m.clone()),
        _ => condition("Failed", false, "NoFailure", String::new()),
    };
    vec![ready, progressing, degraded, suspended, complete, failed]
}

/// Carries `lastTransitionTime` over from `previous` where a condition's
/// status did not change; stamps `now` and the generation otherwise.
fn stamp(
    mut next: Vec<Condition>,
    previous: Option<&FederatedTuneStatus>,
    now: f64,
    generation: Option<i64>,
) -> Vec<Condition> {
    for c in &mut next {
        let old = previous.and_then(|p| p.conditions.iter().find(|o| o.type_ == c.type_));
        c.last_transition_time = match old {
            Some(o) if o.status == c.status => o.last_transition_time.clone(),
            _ => Some(rfc3339(now)),
        };
        c.observed_generation = generation;
    }
    next
}

/// The new round history: the previous one, then `new_rounds` (durations
/// filled from completion times when the aggregator did not record them),
/// newest last, at most [`MAX_HISTORY`]. A new round's record of the
/// previous round's global model fills that round's `globalAccuracy`.
pub fn history(
    previous: &[RoundSummary],
    new_rounds: &[CompletedRound],
    start_time: Option<f64>,
) -> Vec<RoundSummary> {
    let last = previous.last().map(|h| h.round).unwrap_or(0);
    let mut out: Vec<RoundSummary> = previous.to_vec();
    let mut prev_done: Option<f64> = None;
    for r in new_rounds {
        if r.summary.round <= last {
            prev_done = r.completed_at;
            continue;
        }
        let mut s = r.summary.clone();
        if s.duration_seconds <= 0.0 {
            let base = prev_done.or(if s.round == 1 { start_time } else { None });
            if let (Some(b), Some(done)) = (base, r.completed_at) {
                s.duration_seconds = (done - b).max(0.0);
            }
        }
        prev_done = r.completed_at;
        if let Some(g) = &r.previous_global {
            if let Some(before) = out.iter_mut().find(|h| h.round + 1 == s.round) {
                set_global(before, g);
            }
        }
        out.push(s);
    }
    let excess = out.len().saturating_sub(MAX_HISTORY);
    out.drain(..excess);
    out
}

fn set_global(summary: &mut RoundSummary, (mean, by_family): &GlobalAccuracy) {
    summary.global_accuracy = Some(*mean);
    summary.global_accuracy_by_family = by_family.clone();
}

/// Builds the new status.
pub fn build(input: &StatusInput) -> FederatedTuneStatus {
    let prev = input.previous;
    let spec = input.spec;
    let start = prev.and_then(|p| p.start_time.clone()).or_else(|| {
        (input.phase != Phase::Pending || input.round_started_at.is_some())
            .then(|| rfc3339(input.round_started_at.unwrap_or(input.now)))
    });
    let mut history = history(
        prev.map(|p| p.history.as_slice()).unwrap_or(&[]),
        input.new_rounds,
        start.as_deref().and_then(parse),
    );
    if let Some(g) = &input.final_evaluation {
        if let Some(last) = history.iter_mut().find(|h| h.round == spec.rounds) {
            set_global(last, g);
        }
    }
    let newest_global = history
        .iter()
        .rev()
        .find_map(|h| h.global_accuracy.map(|a| (a, h.round)));
    let done = input.completed_rounds.min(spec.rounds);
    let finished = matches!(input.phase, Phase::Succeeded | Phase::Failed);
    let completion_time = if finished {
        prev.and_then(|p| p.completion_time.clone())
            .or_else(|| Some(rfc3339(input.now)))
    } else {
        None
    };
    let durations: Vec<f64> = history
        .iter()
        .map(|h| h.duration_seconds)
        .filter(|d| *d > 0.0)
        .collect();
    let eta = if finished || durations.is_empty() || done >= spec.rounds {
        None
    } else {
        let mean = durations.iter().sum::<f64>() / durations.len() as f64;
        let base = input
            .round_started_at
            .unwrap_or((input.now / 60.0).floor() * 60.0);
        Some(rfc3339(base + mean * f64::from(spec.rounds - done)))
    };
    let clients = if input.clients.is_empty() {
        prev.map(|p| p.clients.clone()).unwrap_or_default()
    } else {
        input.clients.clone()
    };
    let ready = clients.iter().filter(|c| c.state == "Committed").count() as u32;
    let conditions = stamp(conditions(input), prev, input.now, input.generation);
    FederatedTuneStatus {
        phase: Some(input.phase),
        round: input.round,
        progress: Some(format!("{done}/{}", spec.rounds)),
        progress_percent: Some(
            ((f64::from(done) / f64::from(spec.rounds.max(1))) * 1000.0).round() / 10.0,
        ),
        estimated_completion_time: eta,
        ready_clients: ready,
        last_accuracy: history.iter().rev().find_map(|h| h.accuracy),
        last_global_accuracy: newest_global.map(|g| g.0),
        last_global_round: newest_global.map(|g| g.1),
        observed_generation: input.generation,
        conditions,
        clients,
        history,
        artifacts: input.artifacts.clone(),
        start_time: start,
        round_start_time: input
            .round_started_at
            .filter(|_| {
                !matches!(
                    input.phase,
                    Phase::Succeeded | Phase::Failed | Phase::Suspended
                )
            })
            .map(rfc3339),
        completion_time,
    }
}

/// A status that keeps the previous phase and round and reports `trouble`.
pub fn troubled(run: &Run, now: f64, trouble: Trouble) -> FederatedTuneStatus {
    let prev = run.ft.status.as_ref();
    build(&StatusInput {
        previous: prev,
        spec: &run.ft.spec,
        generation: run.ft.metadata.generation,
        now,
        phase: prev.and_then(|p| p.phase).unwrap_or(Phase::Pending),
        round: prev.map(|p| p.round).unwrap_or(0),
        completed_rounds: run.last_recorded_round(),
        clients: Vec::new(),
        new_rounds: &[],
        trouble: Some(trouble),
        failure: None,
        artifacts: prev.and_then(|p| p.artifacts.clone()),
        round_started_at: None,
        final_evaluation: None,
    })
}

/// The Degraded condition an error before the decision shows: an invalid
/// spec or an unreadable store (other errors leave the status alone).
pub fn trouble_of(error: &Error) -> Option<Trouble> {
    let (reason, message) = match error {
        Error::InvalidSpec(message) => ("InvalidSpec", message.clone()),
        Error::Storage(e) => ("StorageUnavailable", e.to_string()),
        _ => return None,
    };
    Some(Trouble {
        reason: reason.into(),
        message,
    })
}

/// Reports `error` (from the validate or dereference step) as a troubled
/// status and hands it back, or the error of writing that status.
pub async fn degrade(ctx: &Context, run: &Run<'_>, error: Error) -> Error {
    let Some(trouble) = trouble_of(&error) else {
        return error;
    };
    match write(ctx, run.ft, troubled(run, ctx.now(), trouble), Vec::new()).await {
        Ok(_) => error,
        Err(e) => e,
    }
}

/// Writes `next` with server-side apply unless it equals the current status,
/// then publishes the Events of the change and `extra`. Returns whether it
/// wrote.
pub async fn write(
    ctx: &Context,
    ft: &FederatedTune,
    next: FederatedTuneStatus,
    extra: Vec<Announcement>,
) -> Result<bool> {
    let prev = ft.status.as_ref();
    let changed = prev != Some(&next);
    if changed {
        let api: Api<FederatedTune> =
            Api::namespaced(ctx.client.clone(), &ft.namespace().unwrap_or_default());
        let patch = serde_json::json!({
            "apiVersion": heterotune_crds::API_VERSION,
            "kind": heterotune_crds::KIND,
            "status": next,
        });
        api.patch_status(
            &ft.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(kube("patch status"))?;
    }
    let mut all = announcements(prev, &next);
    all.extend(extra);
    for a in &all {
        publish(ctx, ft, a).await;
    }
    Ok(changed)
}

/// Updates the run's metrics from the status about to be written and the
/// start of the round in progress (Unix seconds).
/// Per-family figures keyed by the family's readable name
/// (`FederatedTuneSpec::family_label`) for metric labels; a key the spec
/// does not know stays as it is.
fn by_label(
    spec: &heterotune_crds::spec::FederatedTuneSpec,
    by_key: &std::collections::BTreeMap<String, f64>,
) -> std::collections::BTreeMap<String, f64> {
    let labels: std::collections::BTreeMap<String, String> = (0..spec.clients.len())
        .map(|i| (spec.family_key(i), spec.family_label(i)))
        .collect();
    by_key
        .iter()
        .map(|(k, v)| (labels.get(k).cloned().unwrap_or_else(|| k.clone()), *v))
        .collect()
}

pub fn record_metrics(
    ctx: &Context,
    run: &Run,
    next: &FederatedTuneStatus,
    round_started_at: Option<f64>,
) {
    let m = &ctx.metrics;
    let spec = &run.ft.spec;
    let phase = next.phase.unwrap_or(Phase::Pending);
    let in_round = matches!(phase, Phase::Running | Phase::Aggregating);
    m.set_progress(
        &run.namespace,
        &run.name,
        &RunProgress {
            phase,
            round: next.round,
            planned_rounds: spec.rounds,
            completed_rounds: next.history.last().map_or(0, |h| h.round),
            round_deadline_seconds: spec.round_deadline_seconds,
            round_started_at: round_started_at.filter(|_| in_round),
        },
    );
    let last_known = run.last_recorded_round();
    for h in next.history.iter().filter(|h| h.round > last_known) {
        m.round_completed(
            &run.namespace,
            &run.name,
            (h.duration_seconds > 0.0).then_some(h.duration_seconds),
            h.bytes_uploaded,
            &h.rejected,
            h.accuracy,
            &by_label(spec, &h.accuracy_by_family),
        );
    }
    if let Some(g) = next.last_global_accuracy {
        let by_family = next
            .history
            .iter()
            .rev()
            .find(|h| h.global_accuracy.is_some())
            .map(|h| by_label(spec, &h.global_accuracy_by_family))
            .unwrap_or_default();
        m.set_global_accuracy(&run.namespace, &run.name, g, &by_family);
    }
    let mut counts: Vec<(&str, i64)> = crate::controller::metrics::CLIENT_STATES
        .iter()
        .map(|s| (*s, 0))
        .collect();
    for c in &next.clients {
        if let Some(entry) = counts.iter_mut().find(|(s, _)| c.state == *s) {
            entry.1 += 1;
        }
    }
    m.set_clients(&run.namespace, &run.name, &counts);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_gauge_counts_every_client_state() {
        let states: Vec<&str> = heterotune_crds::status::ClientState::ALL
            .iter()
            .map(|s| s.as_str())
            .collect();
        assert_eq!(crate::controller::metrics::CLIENT_STATES, states.as_slice());
    }

    #[test]
    fn history_is_bounded_and_durations_are_filled() {
        let prev: Vec<RoundSummary> = (1..=MAX_HISTORY as u32).map(summary).collect();
        let new = [CompletedRound {
            summary: summary(MAX_HISTORY as u32 + 1),
            completed_at: Some(100.0),
            previous_global: None,
        }];
        let h = history(&prev, &new, None);
        assert_eq!(h.len(), MAX_HISTORY);
        assert_eq!(h.first().map(|s| s.round), Some(2));
        assert_eq!(h.last().map(|s| s.round), Some(MAX_HISTORY as u32 + 1));
        let two = [
            CompletedRound {
                summary: summary(1),
                completed_at: Some(160.0),
                previous_global: None,
            },
            CompletedRound {
                summary: summary(2),
                completed_at: Some(250.0),
                previous_global: Some((0.7, [("L6".to_string(), 0.8)].into_iter().collect())),
            },
        ];
        let h = history(&[], &two, Some(100.0));
        assert_eq!(
            h.iter().map(|s| s.duration_seconds).collect::<Vec<_>>(),
            vec![60.0, 90.0]
        );
        // Round 2's participants measured round 1's global model.
        assert_eq!(h[0].global_accuracy, Some(0.7));
        assert_eq!(h[0].global_accuracy_by_family.get("L6"), Some(&0.8));
        assert_eq!(h[1].global_accuracy, None);
        // The same when round 2 arrives in a later reconcile.
        let h = history(&[summary(1)], &two, Some(100.0));
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].global_accuracy, Some(0.7));
    }

    fn summary(round: u32) -> RoundSummary {
        RoundSummary {
            round,
            accuracy: Some(0.5),
            accuracy_by_family: Default::default(),
            global_accuracy: None,
            global_accuracy_by_family: Default::default(),
            bytes_uploaded: 10,
            duration_seconds: 0.0,
            participants: 2,
            rejected: Default::default(),
        }
    }

    #[test]
    fn rfc3339_is_seconds_precision() {
        assert_eq!(rfc3339(1_700_000_000.7), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn metric_family_labels_are_model_names() {
        let spec: heterotune_crds::spec::FederatedTuneSpec = serde_json::from_str(
            r#"{"clients": [{"name": "a", "model": {"family": "bert", "uri": "cache://models/all-MiniLM-L6-v2"}}],
                "task": {"dataset": {"uri": "/d.jsonl"}, "labels": ["x", "z"]}}"#,
        )
        .expect("spec");
        let mut by_key = std::collections::BTreeMap::new();
        by_key.insert(spec.family_key(0), 0.5);
        by_key.insert("unknown.abcdef".to_string(), 0.25);
        let labelled = by_label(&spec, &by_key);
        assert_eq!(labelled.get("all-MiniLM-L6-v2"), Some(&0.5));
        assert_eq!(labelled.get("unknown.abcdef"), Some(&0.25));
    }
}
