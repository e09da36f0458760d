//! The per-client part of the status (pure): each client's state in the
//! current round (or in the evaluation after the last one), its attempts,
//! its GPU profile and memory estimate, and why it failed.

use std::collections::{HashMap, HashSet};

use heterotune_crds::spec::FederatedTuneSpec;
use heterotune_crds::status::{ClientState, ClientStatus, FederatedTuneStatus};

use super::job_facts::{jobs_by_client, JobFacts};
use super::names::ROLE_EVALUATOR;
use super::observation::client_step;
use crate::protocol::planner::{ClientObservation, Observation};
use crate::sizing::{Placement, SizingError};

/// What a client status is computed from, besides the client.
pub struct ClientInputs<'a> {
    /// The spec.
    pub spec: &'a FederatedTuneSpec,
    /// The planner's observation.
    pub obs: &'a Observation,
    /// The run's Jobs.
    pub jobs: &'a [JobFacts],
    /// Every client's placement, in spec order.
    pub placements: &'a [Result<Placement, SizingError>],
    /// The status before this reconcile.
    pub previous: Option<&'a FederatedTuneStatus>,
    /// Whether rounds completed since the previous status.
    pub newly_completed: bool,
    /// Clients whose Job this reconcile starts.
    pub started: &'a [String],
}

/// The per-client status of the current round.
pub fn client_statuses(input: &ClientInputs) -> Vec<ClientStatus> {
    let obs = input.obs;
    let previous = input.previous;
    let (role, step_round) = client_step(input.spec, obs.completed_rounds);
    let evaluating = role == ROLE_EVALUATOR;
    let by_client = jobs_by_client(input.jobs, step_round, role);
    let before_by_name: HashMap<&str, &ClientStatus> = previous
        .map(|p| p.clients.iter().map(|c| (c.name.as_str(), c)).collect())
        .unwrap_or_default();
    let started: HashSet<&str> = input.started.iter().map(String::as_str).collect();
    let retries = input.spec.max_retries_per_client;
    let round = obs.completed_rounds + 1;
    obs.clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let before = before_by_name.get(c.name.as_str()).copied();
            let mut last_round = before.and_then(|b| b.last_round);
            if input.newly_completed {
                if let (Some(b), Some(p)) = (before, previous) {
                    if b.state == "Committed" && p.round < round {
                        last_round = Some(p.round);
                    }
                }
            }
            let just_started = started.contains(c.name.as_str());
            let mine = by_client.get(c.name.as_str()).map(Vec::as_slice);
            let attempts = mine.map_or(0, <[_]>::len) as u32 + u32::from(just_started);
            let state = client_state(c, evaluating, just_started, retries);
            let (profile, estimate, message) = match input.placements.get(i) {
                Some(Ok(p)) => (
                    Some(p.profile_name()),
                    p.estimated_bytes(),
                    matches!(
                        state,
                        ClientState::Failed | ClientState::Excluded | ClientState::EvaluationFailed
                    )
                    .then(|| last_failure(mine.unwrap_or(&[])))
                    .flatten(),
                ),
                Some(Err(e)) => (None, None, Some(e.to_string())),
                None => (None, None, None),
            };
            ClientStatus {
                name: c.name.clone(),
                state,
                attempts,
                last_round,
                gpu_profile: profile,
                estimated_memory_bytes: estimate,
                message,
            }
        })
        .collect()
}

/// A client's state: committed (or evaluated), training (or evaluating),
/// waiting for its site, failed, out of retries, or pending.
fn client_state(
    c: &ClientObservation,
    evaluating: bool,
    just_started: bool,
    retries: u32,
) -> ClientState {
    if c.committed {
        if evaluating {
            ClientState::Evaluated
        } else {
            ClientState::Committed
        }
    } else if c.running || just_started {
        if evaluating {
            ClientState::Evaluating
        } else {
            ClientState::Training
        }
    } else if c.remote && c.failed_attempts <= retries {
        ClientState::WaitingForSite
    } else if c.failed_attempts > retries {
        if evaluating {
            ClientState::EvaluationFailed
        } else {
            ClientState::Excluded
        }
    } else if c.failed_attempts > 0 {
        ClientState::Failed
    } else {
        ClientState::Pending
    }
}

/// The newest failed attempt among a client's Jobs, which explains a Failed
/// or Excluded client.
fn last_failure(jobs: &[&JobFacts]) -> Option<String> {
    jobs.iter()
        .filter(|j| j.failure.is_some())
        .max_by_key(|j| j.attempt)
        .and_then(|j| {
            j.failure
                .as_ref()
                .map(|f| format!("attempt {}: {f}", j.attempt))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A site's client is waiting for its site until it commits or runs
    /// out of retries (rejected artifacts); a local one is pending.
    #[test]
    fn a_site_client_waits_for_its_site() {
        let site = ClientObservation {
            name: "h".into(),
            remote: true,
            ..ClientObservation::default()
        };
        assert_eq!(
            client_state(&site, false, false, 1),
            ClientState::WaitingForSite
        );
        assert_eq!(
            client_state(&site, true, false, 1),
            ClientState::WaitingForSite
        );
        let committed = ClientObservation {
            committed: true,
            ..site.clone()
        };
        assert_eq!(client_state(&committed, false, false, 1), "Committed");
        let rejected = ClientObservation {
            failed_attempts: 2,
            ..site.clone()
        };
        assert_eq!(client_state(&rejected, false, false, 1), "Excluded");
        let local = ClientObservation {
            remote: false,
            ..site
        };
        assert_eq!(client_state(&local, false, false, 1), "Pending");
    }
}
