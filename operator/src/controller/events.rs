//! The Events of a reconcile: those that announce a change of status
//! (computed by pure functions) and their publication.

use std::collections::HashMap;

use heterotune_crds::status::{ClientStatus, Condition, FederatedTuneStatus, Phase};
use heterotune_crds::FederatedTune;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::Resource;

use super::context::Context;

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

/// A Normal Event.
pub fn normal(reason: &str, note: String) -> Announcement {
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
    let mut out = round_events(prev, next);
    out.extend(degraded_event(prev, next));
    out.extend(phase_events(prev, next));
    out.extend(client_events(prev, next));
    out
}

/// Rounds completed and global models evaluated since `prev`.
fn round_events(
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
    out
}

/// A new or changed Degraded condition (a warning), or its end.
fn degraded_event(
    prev: Option<&FederatedTuneStatus>,
    next: &FederatedTuneStatus,
) -> Option<Announcement> {
    let (pd, nd) = (cond(prev, "Degraded"), cond(Some(next), "Degraded"));
    match (pd, nd) {
        (_, Some(n))
            if n.status == "True"
                && pd.map(|p| (p.status.as_str(), p.reason.as_str()))
                    != Some(("True", n.reason.as_str())) =>
        {
            Some(warning(&n.reason, n.message.clone()))
        }
        (Some(p), Some(n)) if p.status == "True" && n.status != "True" => Some(normal(
            "Recovered",
            format!("no longer degraded ({})", p.reason),
        )),
        _ => None,
    }
}

/// A new phase (or a new round of the same phase), and the end of a suspension.
fn phase_events(
    prev: Option<&FederatedTuneStatus>,
    next: &FederatedTuneStatus,
) -> Vec<Announcement> {
    let mut out = Vec::new();
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
    out
}

/// Clients newly excluded from the round or failing their evaluation.
fn client_events(
    prev: Option<&FederatedTuneStatus>,
    next: &FederatedTuneStatus,
) -> Vec<Announcement> {
    let mut out = Vec::new();
    let before_by_name: HashMap<&str, &ClientStatus> = prev
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

/// Publishes `a` about `ft` (a failure is logged, never fatal).
pub async fn publish(ctx: &Context, ft: &FederatedTune, a: &Announcement) {
    let event = KubeEvent {
        type_: if a.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: a.reason.clone(),
        note: Some(a.note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &ft.object_ref(&())).await {
        tracing::warn!(reason = %a.reason, error = %e, "cannot publish event");
    }
}
