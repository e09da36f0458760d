//! The planner's [`Observation`] of the current round (pure): what the store
//! and the Jobs say about each client and about the aggregation.

use heterotune_crds::spec::FederatedTuneSpec;

use super::job_facts::{jobs_by_client, JobFacts};
use super::names::{ROLE_AGGREGATOR, ROLE_EVALUATOR, ROLE_TRAINER};
use crate::protocol::observe::StoreObservation;
use crate::protocol::planner::{AggregationState, ClientObservation, Observation};

/// What the clients are doing now: training in round `completed + 1`, or
/// (every round aggregated, `spec.evaluation.afterLastRound`) evaluating
/// the last round's global model.
pub(crate) fn client_step(spec: &FederatedTuneSpec, completed_rounds: u32) -> (&'static str, u32) {
    if completed_rounds >= spec.rounds && spec.evaluation.after_last_round {
        (ROLE_EVALUATOR, spec.rounds)
    } else {
        (ROLE_TRAINER, completed_rounds + 1)
    }
}

/// Builds the planner's observation of the current round (or of the
/// evaluation after the last one). The step started with its oldest Job,
/// else at `opened_at` (what the previous status recorded: a step whose
/// clients are all run by sites has no Job).
pub fn observation(
    spec: &FederatedTuneSpec,
    store: &StoreObservation,
    jobs: &[JobFacts],
    now: f64,
    opened_at: Option<f64>,
) -> Observation {
    let round = store.completed_rounds + 1;
    let (role, step_round) = client_step(spec, store.completed_rounds);
    let evaluating = role == ROLE_EVALUATOR;
    let in_round: Vec<&JobFacts> = jobs.iter().filter(|j| j.round == round).collect();
    let by_client = jobs_by_client(jobs, step_round, role);
    let clients = spec
        .clients
        .iter()
        .map(|c| {
            let committed = if evaluating {
                store.evaluated.contains_key(&c.name)
            } else {
                store.committed.contains_key(&c.name)
            };
            let mine = by_client
                .get(c.name.as_str())
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter();
            let running = mine.clone().any(|j| j.active);
            let failed = mine
                .filter(|j| !(j.active || (j.succeeded && committed)))
                .count() as u32;
            ClientObservation {
                name: c.name.clone(),
                remote: c.is_remote(),
                committed,
                running,
                failed_attempts: failed,
            }
        })
        .collect();
    let round_started_at = by_client
        .values()
        .flatten()
        .filter_map(|j| j.created)
        .reduce(f64::min)
        .or(opened_at);
    let quorum = spec.quorum() as usize;
    let mut times: Vec<f64> = store.committed.values().map(|c| c.committed_at).collect();
    times.sort_by(f64::total_cmp);
    let quorum_reached_at = (quorum > 0 && times.len() >= quorum).then(|| times[quorum - 1]);
    let aggs: Vec<&&JobFacts> = in_round
        .iter()
        .filter(|j| j.role == ROLE_AGGREGATOR)
        .collect();
    let agg_failures = aggs.iter().filter(|j| !j.active).count() as u32;
    let aggregation = if aggs.iter().any(|j| j.active) {
        AggregationState::Running
    } else if agg_failures > 0 {
        AggregationState::Failed
    } else {
        AggregationState::NotStarted
    };
    Observation {
        now,
        completed_rounds: store.completed_rounds,
        round_started_at,
        quorum_reached_at,
        clients,
        aggregation,
        aggregation_failures: agg_failures,
    }
}
