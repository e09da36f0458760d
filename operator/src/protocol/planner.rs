//! The round planner: observed state in, actions out, no I/O.
//!
//! Both executors (the local runner and the Kubernetes controller) observe
//! the run (the object store says which rounds are complete and which client
//! artifacts are committed; their own jobs say what is running and how often
//! it failed), ask [`plan`] what to do, and carry the actions out. Because
//! the decision is a pure function of the observation, a restarted executor
//! that observes the same store and jobs makes the same decision: it never
//! repeats a completed round and never counts a client twice.
//!
//! After the last round (with `spec.evaluation.afterLastRound`) comes the
//! evaluation phase: every client evaluates the final global model. The
//! observation's `clients` then describe the evaluations (committed = its
//! result is in the store), with the same retries and deadline as a round;
//! a client whose evaluation keeps failing is left out, never a failure of
//! the run.
//!
//! A remote client (`spec.clients[].site`) is run by its site's agent, not
//! by the executor: the planner never starts or cancels it, and waits for
//! its commit like a running trainer's, under the same quorum, deadline,
//! straggler cut-off and retry count (its rejected artifacts, as the store
//! shows them); the executor looks again every [`REMOTE_POLL_SECONDS`].

use heterotune_crds::spec::FederatedTuneSpec;
use heterotune_crds::status::Phase;

/// How often an executor looks at the store while a remote client's
/// commit is awaited (no process of its own ends to wake it).
pub const REMOTE_POLL_SECONDS: f64 = 2.0;

/// What an executor knows about one client in the current round (in the
/// evaluation phase: about its evaluation of the final global model).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientObservation {
    /// Client name (as in the spec).
    pub name: String,
    /// Its site's agent runs it (`spec.clients[].site`): never started here.
    pub remote: bool,
    /// Its artifact for the current round is committed (manifest present).
    pub committed: bool,
    /// A trainer for it is running now.
    pub running: bool,
    /// Failed attempts in the current round (crashes, timeouts, runs that
    /// ended without a committed artifact).
    pub failed_attempts: u32,
}

/// State of the current round's aggregation job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AggregationState {
    /// Not started in this round.
    #[default]
    NotStarted,
    /// Running now.
    Running,
    /// Its last attempt failed (the count is in [`Observation::aggregation_failures`]).
    Failed,
}

/// Everything the planner needs, gathered by an executor.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    /// Now, in seconds on the executor's clock.
    pub now: f64,
    /// Rounds whose global manifest exists (rounds 1..=completed_rounds).
    pub completed_rounds: u32,
    /// When the current round's first trainer started (None: not started).
    pub round_started_at: Option<f64>,
    /// When the current round first had a quorum of committed artifacts.
    pub quorum_reached_at: Option<f64>,
    /// One entry per spec client, in spec order.
    pub clients: Vec<ClientObservation>,
    /// The current round's aggregation.
    pub aggregation: AggregationState,
    /// Failed aggregation attempts in the current round.
    pub aggregation_failures: u32,
}

/// Why a run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// Fewer committed artifacts than `minClients` and no client left to wait for.
    QuorumNotMet,
    /// The round deadline passed below quorum.
    DeadlineExceeded,
    /// The aggregation failed more often than `maxRetriesPerClient` allows.
    AggregationFailed,
}

impl FailureReason {
    /// The condition reason (CamelCase, as Kubernetes conditions use).
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::QuorumNotMet => "QuorumNotMet",
            FailureReason::DeadlineExceeded => "DeadlineExceeded",
            FailureReason::AggregationFailed => "AggregationFailed",
        }
    }
}

/// Something the executor must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a trainer for `client` in `round` (attempt numbers start at 1).
    StartClient {
        client: String,
        round: u32,
        attempt: u32,
    },
    /// Stop a trainer that is no longer needed (its round is being aggregated).
    CancelClient { client: String, round: u32 },
    /// Record that `client` is out of `round` after exhausting its retries.
    ExcludeClient {
        client: String,
        round: u32,
        failures: u32,
    },
    /// Start the aggregation of `round` over exactly `participants`.
    StartAggregation {
        round: u32,
        participants: Vec<String>,
        attempt: u32,
    },
    /// Start `client`'s evaluation of the global model of `round` (the last).
    StartEvaluation {
        client: String,
        round: u32,
        attempt: u32,
    },
    /// Stop an evaluation that passed the deadline.
    CancelEvaluation { client: String, round: u32 },
    /// All rounds are complete (and evaluated, where the spec asks).
    Complete,
    /// The run cannot continue without a person.
    Fail {
        reason: FailureReason,
        message: String,
    },
}

/// The planner's decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The phase to report.
    pub phase: Phase,
    /// The round in progress (or the last one, when finished).
    pub round: u32,
    /// What to do now, in order.
    pub actions: Vec<Action>,
    /// Observe again after this many seconds at the latest (a deadline or a
    /// straggler wait ends then), in addition to any job event.
    pub requeue_after: Option<f64>,
}

/// Decides what to do next for `spec` given `obs`.
pub fn plan(spec: &FederatedTuneSpec, obs: &Observation) -> Plan {
    let rounds = spec.rounds;
    if obs.completed_rounds >= rounds {
        if spec.evaluation.after_last_round {
            return plan_evaluation(spec, obs);
        }
        return complete(rounds);
    }
    let round = obs.completed_rounds + 1;
    let retries = spec.max_retries_per_client;
    if obs.aggregation == AggregationState::Running {
        return Plan {
            phase: Phase::Aggregating,
            round,
            actions: Vec::new(),
            requeue_after: None,
        };
    }
    if obs.aggregation == AggregationState::Failed && obs.aggregation_failures > retries {
        return fail(
            round,
            FailureReason::AggregationFailed,
            format!(
                "the aggregation of round {round} failed {} times (maxRetriesPerClient is {retries})",
                obs.aggregation_failures
            ),
        );
    }
    let groups = Groups::of(obs, retries);
    let mut actions: Vec<Action> = groups
        .excluded
        .iter()
        .map(|c| Action::ExcludeClient {
            client: c.name.clone(),
            round,
            failures: c.failed_attempts,
        })
        .collect();
    let timing = RoundTiming::of(spec, obs);
    if let Some(plan) = close_round(spec, obs, &groups, &timing, round, &mut actions) {
        return plan;
    }
    if spec.suspend {
        return suspended(round, actions);
    }
    for c in &groups.pending {
        actions.push(Action::StartClient {
            client: c.name.clone(),
            round,
            attempt: c.failed_attempts + 1,
        });
    }
    let requeue_after = timing.next_wake(spec, obs, groups.committed.len());
    let requeue_after = poll_remote(requeue_after, !groups.waiting.is_empty());
    let idle = obs.completed_rounds == 0
        && obs.round_started_at.is_none()
        && obs
            .clients
            .iter()
            .all(|c| !c.committed && !c.running && c.failed_attempts == 0);
    Plan {
        phase: if idle && actions.is_empty() {
            Phase::Pending
        } else {
            Phase::Running
        },
        round,
        actions,
        requeue_after,
    }
}

/// The clients of the open round, by where each stands.
struct Groups<'a> {
    committed: Vec<&'a ClientObservation>,
    excluded: Vec<&'a ClientObservation>,
    running: Vec<&'a ClientObservation>,
    /// Remote clients whose site may still commit.
    waiting: Vec<&'a ClientObservation>,
    pending: Vec<&'a ClientObservation>,
}

impl<'a> Groups<'a> {
    fn of(obs: &'a Observation, retries: u32) -> Groups<'a> {
        let pick = |keep: &dyn Fn(&ClientObservation) -> bool| -> Vec<&'a ClientObservation> {
            obs.clients.iter().filter(|c| keep(c)).collect()
        };
        Groups {
            committed: pick(&|c| c.committed),
            excluded: pick(&|c| !c.committed && !c.running && c.failed_attempts > retries),
            running: pick(&|c| !c.committed && c.running),
            waiting: pick(&|c| waits_for_site(c, retries)),
            pending: pick(&|c| {
                !c.committed && !c.running && !c.remote && c.failed_attempts <= retries
            }),
        }
    }

    fn nothing_left(&self) -> bool {
        self.running.is_empty() && self.pending.is_empty() && self.waiting.is_empty()
    }
}

/// A remote client whose site may still commit (not committed, within its
/// retries).
fn waits_for_site(c: &ClientObservation, retries: u32) -> bool {
    c.remote && !c.committed && !c.running && c.failed_attempts <= retries
}

/// `requeue_after`, no later than the next look for a site's commit when
/// `waiting`.
fn poll_remote(requeue_after: Option<f64>, waiting: bool) -> Option<f64> {
    if !waiting {
        return requeue_after;
    }
    Some(requeue_after.map_or(REMOTE_POLL_SECONDS, |s| s.min(REMOTE_POLL_SECONDS)))
}

/// The open round's deadline, and whether it has passed.
struct RoundTiming {
    deadline: Option<f64>,
    past_deadline: bool,
}

impl RoundTiming {
    fn of(spec: &FederatedTuneSpec, obs: &Observation) -> RoundTiming {
        let deadline = obs
            .round_started_at
            .map(|t| t + f64::from(spec.round_deadline_seconds));
        RoundTiming {
            deadline,
            past_deadline: deadline.map(|d| obs.now >= d).unwrap_or(false),
        }
    }

    /// Seconds until the deadline or the end of the wait after quorum,
    /// whichever comes first.
    fn next_wake(
        &self,
        spec: &FederatedTuneSpec,
        obs: &Observation,
        committed: usize,
    ) -> Option<f64> {
        let mut wake: Vec<f64> = Vec::new();
        if let Some(d) = self.deadline {
            wake.push(d - obs.now);
        }
        if let (w, Some(t)) = (spec.wait_after_min_clients_seconds, obs.quorum_reached_at) {
            if w > 0 && committed >= spec.quorum() as usize {
                wake.push(t + f64::from(w) - obs.now);
            }
        }
        wake.into_iter().map(|s| s.max(0.0)).reduce(f64::min)
    }
}

/// Ends the open round when it can or must end: aggregation once quorum is
/// met and nothing more is worth waiting for, or failure when quorum can no
/// longer be met. `None`: the round goes on.
fn close_round(
    spec: &FederatedTuneSpec,
    obs: &Observation,
    groups: &Groups,
    timing: &RoundTiming,
    round: u32,
    actions: &mut Vec<Action>,
) -> Option<Plan> {
    let quorum = spec.quorum() as usize;
    let committed = groups.committed.len();
    if committed >= quorum {
        // An earlier aggregation attempt failed but may be retried: the
        // participants are the committed clients, as before.
        let retry_aggregation = obs.aggregation == AggregationState::Failed;
        let wait_over = match (spec.wait_after_min_clients_seconds, obs.quorum_reached_at) {
            (0, _) => false,
            (w, Some(t)) => obs.now >= t + f64::from(w),
            (_, None) => false,
        };
        if !(retry_aggregation || groups.nothing_left() || timing.past_deadline || wait_over) {
            return None;
        }
        if spec.suspend {
            return Some(suspended(round, std::mem::take(actions)));
        }
        for c in &groups.running {
            actions.push(Action::CancelClient {
                client: c.name.clone(),
                round,
            });
        }
        actions.push(Action::StartAggregation {
            round,
            participants: groups.committed.iter().map(|c| c.name.clone()).collect(),
            attempt: obs.aggregation_failures + 1,
        });
        return Some(Plan {
            phase: Phase::Aggregating,
            round,
            actions: std::mem::take(actions),
            requeue_after: None,
        });
    }
    if groups.nothing_left() {
        return Some(fail(
            round,
            FailureReason::QuorumNotMet,
            format!(
                "round {round}: {committed} of {} clients committed an artifact and none is left to wait for; minClients is {quorum}",
                obs.clients.len()
            ),
        ));
    }
    if timing.past_deadline {
        return Some(fail(
            round,
            FailureReason::DeadlineExceeded,
            format!(
                "round {round} passed its deadline ({} s) with {committed} of {quorum} required artifacts",
                spec.round_deadline_seconds,
            ),
        ));
    }
    None
}

fn complete(rounds: u32) -> Plan {
    Plan {
        phase: Phase::Succeeded,
        round: rounds,
        actions: vec![Action::Complete],
        requeue_after: None,
    }
}

/// The evaluation phase after the last round: start every client's
/// evaluation (retried like a trainer), complete once each is committed or
/// out of retries, or at the deadline (stopping what still runs).
fn plan_evaluation(spec: &FederatedTuneSpec, obs: &Observation) -> Plan {
    let round = spec.rounds;
    let retries = spec.max_retries_per_client;
    let deadline = obs
        .round_started_at
        .map(|t| t + f64::from(spec.round_deadline_seconds));
    let running: Vec<&ClientObservation> = obs
        .clients
        .iter()
        .filter(|c| !c.committed && c.running)
        .collect();
    if deadline.is_some_and(|d| obs.now >= d) {
        let mut actions: Vec<Action> = running
            .iter()
            .map(|c| Action::CancelEvaluation {
                client: c.name.clone(),
                round,
            })
            .collect();
        actions.push(Action::Complete);
        return Plan {
            phase: Phase::Succeeded,
            round,
            actions,
            requeue_after: None,
        };
    }
    let pending: Vec<&ClientObservation> = obs
        .clients
        .iter()
        .filter(|c| !c.committed && !c.running && !c.remote && c.failed_attempts <= retries)
        .collect();
    let waiting = obs.clients.iter().any(|c| waits_for_site(c, retries));
    if running.is_empty() && pending.is_empty() && !waiting {
        return complete(round);
    }
    if spec.suspend {
        return suspended(round, Vec::new());
    }
    Plan {
        phase: Phase::Evaluating,
        round,
        actions: pending
            .iter()
            .map(|c| Action::StartEvaluation {
                client: c.name.clone(),
                round,
                attempt: c.failed_attempts + 1,
            })
            .collect(),
        requeue_after: poll_remote(deadline.map(|d| (d - obs.now).max(0.0)), waiting),
    }
}

fn fail(round: u32, reason: FailureReason, message: String) -> Plan {
    Plan {
        phase: Phase::Failed,
        round,
        actions: vec![Action::Fail { reason, message }],
        requeue_after: None,
    }
}

fn suspended(round: u32, actions: Vec<Action>) -> Plan {
    Plan {
        phase: Phase::Suspended,
        round,
        actions,
        requeue_after: None,
    }
}

#[cfg(test)]
mod tests;
