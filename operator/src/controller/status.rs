//! The status a reconcile writes, computed by pure functions from what it
//! observed and decided, and the Events that announce what changed.

use heterotune_crds::spec::FederatedTuneSpec;
use heterotune_crds::status::{
    ArtifactLocations, ClientStatus, Condition, FederatedTuneStatus, Phase, RoundSummary,
    MAX_HISTORY,
};

use super::observe::{CompletedRound, GlobalAccuracy};

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
    super::observe::unix_seconds(text)
}

fn condition(type_: &str, on: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if on { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        last_transition_time: None,
        observed_generation: None,
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
    let progressing = match (phase, blocking) {
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
    };
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
        completion_time,
    }
}

/// An Event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// Event reason.
    pub reason: String,
    /// Event note.
    pub note: String,
}

fn normal(reason: &str, note: String) -> Announcement {
    Announcement {
        warning: false,
        reason: reason.into(),
        note,
    }
}

fn warning(reason: &str, note: String) -> Announcement {
    Announcement {
        warning: true,
        reason: reason.into(),
        note,
    }
}

fn cond<'a>(s: Option<&'a FederatedTuneStatus>, t: &str) -> Option<&'a Condition> {
    s.and_then(|s| s.conditions.iter().find(|c| c.type_ == t))
}

/// The Events for the change from `prev` to `next`.
pub fn announcements(
    prev: Option<&FederatedTuneStatus>,
    next: &FederatedTuneStatus,
) -> Vec<Announcement> {
    let mut out = Vec::new();
    let last_round = prev
        .and_then(|p| p.history.last())
        .map(|h| h.round)
        .unwrap_or(0);
    for h in next.history.iter().filter(|h| h.round > last_round) {
        let acc = h
            .accuracy
            .map(|a| format!(", accuracy {a:.4}"))
            .unwrap_or_default();
        out.push(normal(
            "RoundCompleted",
            format!(
                "round {} completed with {} participants{acc}",
                h.round, h.participants
            ),
        ));
    }
    let prev_global = prev.and_then(|p| p.last_global_accuracy.zip(p.last_global_round));
    let next_global = next.last_global_accuracy.zip(next.last_global_round);
    if let Some((a, round)) = next_global.filter(|g| Some(*g) != prev_global) {
        out.push(normal(
            "GlobalModelEvaluated",
            format!("the global model of round {round}: accuracy {a:.4}"),
        ));
    }
    let (pd, nd) = (cond(prev, "Degraded"), cond(Some(next), "Degraded"));
    match (pd, nd) {
        (_, Some(n))
            if n.status == "True"
                && pd.map(|p| (p.status.as_str(), p.reason.as_str()))
                    != Some(("True", n.reason.as_str())) =>
        {
            out.push(warning(&n.reason, n.message.clone()))
        }
        (Some(p), Some(n)) if p.status == "True" && n.status != "True" => out.push(normal(
            "Recovered",
            format!("no longer degraded ({})", p.reason),
        )),
        _ => {}
    }
    let prev_phase = prev.and_then(|p| p.phase);
    let phase_changed = prev_phase != next.phase;
    let round_changed = prev.map(|p| p.round) != Some(next.round);
    match next.phase {
        Some(Phase::Running) if phase_changed || round_changed => out.push(normal(
            "RoundStarted",
            format!("round {} started", next.round),
        )),
        Some(Phase::Aggregating) if phase_changed || round_changed => out.push(normal(
            "Aggregating",
            format!("round {}: aggregation started", next.round),
        )),
        Some(Phase::Evaluating) if phase_changed => out.push(normal(
            "Evaluating",
            format!(
                "round {}: clients evaluate the final global model",
                next.round
            ),
        )),
        Some(Phase::Suspended) if phase_changed => {
            out.push(normal("Suspended", "spec.suspend is true".into()))
        }
        Some(Phase::Succeeded) if phase_changed => out.push(normal(
            "Succeeded",
            next.progress.clone().unwrap_or_default(),
        )),
        Some(Phase::Failed) if phase_changed => {
            let f = cond(Some(next), "Failed");
            out.push(warning(
                f.map(|c| c.reason.as_str()).unwrap_or("Failed"),
                f.map(|c| c.message.clone()).unwrap_or_default(),
            ))
        }
        _ => {}
    }
    if prev_phase == Some(Phase::Suspended)
        && next.phase != Some(Phase::Suspended)
        && !matches!(next.phase, Some(Phase::Failed))
    {
        out.push(normal("Resumed", "spec.suspend is false".into()));
    }
    let before_by_name: std::collections::HashMap<&str, &ClientStatus> = prev
        .map(|p| p.clients.iter().map(|c| (c.name.as_str(), c)).collect())
        .unwrap_or_default();
    for c in &next.clients {
        let before = before_by_name.get(c.name.as_str()).copied();
        let (reason, what) = match c.state.as_str() {
            "Excluded" => ("ClientExcluded", format!("is out of round {}", next.round)),
            "EvaluationFailed" => (
                "EvaluationFailed",
                format!(
                    "could not evaluate the global model of round {} (the global accuracy leaves it out)",
                    next.round
                ),
            ),
            _ => continue,
        };
        if before.map(|b| b.state.as_str()) != Some(c.state.as_str()) {
            out.push(warning(
                reason,
                format!(
                    "client {} {what} after {} failed attempts{}",
                    c.name,
                    c.attempts,
                    c.message
                        .as_deref()
                        .map(|m| format!(" (last: {m})"))
                        .unwrap_or_default()
                ),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
