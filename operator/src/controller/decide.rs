//! Step 2 of a reconcile, pure: from what was dereferenced, place the
//! clients ([`crate::sizing`]), plan the round ([`planner::plan`]) and turn
//! the planner's actions and the existing Jobs into intents: the Jobs to
//! create and to delete, the status to write, the Events to publish and how
//! the reconcile ends. No client, no I/O: the round logic of the controller
//! lives here and is unit-tested directly.

use std::collections::HashMap;
use std::time::Duration;

use heterotune_crds::spec::FederatedTuneSpec;
use heterotune_crds::status::{ArtifactLocations, ClientStatus, FederatedTuneStatus, Phase};
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::controller::Action;

use super::client_status::{client_statuses, ClientInputs};
use super::context::OperatorConfig;
use super::dereference::Dereferenced;
use super::error::{Error, Result};
use super::events::{normal, Announcement};
use super::job_facts::{active_jobs, JobFacts};
use super::jobs;
use super::names::{LABEL_ROLE, ROLE_EVALUATOR, ROLE_TRAINER};
use super::observation::observation;
use super::run::Run;
use super::status::{self, StatusInput, Trouble};
use crate::protocol::planner::{self, Action as PlanAction, Observation, Plan};
use crate::sizing::{self, BridgeModel, ModelShape, Placement, SizingError, Workload};

/// What the apply step does to the Jobs of the run, in this order.
#[derive(Debug, Clone, Default)]
pub struct JobIntents {
    /// Jobs to create (the spec ConfigMap is applied first).
    pub create: Vec<Job>,
    /// Running Jobs the planner no longer needs (stragglers), by name.
    pub cancel: Vec<String>,
    /// Running Jobs of rounds already over (hygiene), by name.
    pub stale: Vec<String>,
}

/// Everything a reconcile does after looking: the output of [`decide`].
#[derive(Debug, Clone)]
pub struct Decision {
    /// The planner's decision.
    pub plan: Plan,
    /// The Jobs to create and delete.
    pub jobs: JobIntents,
    /// The status to write.
    pub status: FederatedTuneStatus,
    /// Events beyond those of the status change (retries, cancellations).
    pub events: Vec<Announcement>,
    /// Why clients fit no GPU profile (nothing starts while any does not).
    pub unplaceable: Vec<String>,
    /// When the current round's first Job started (Unix seconds), if it has.
    pub round_started_at: Option<f64>,
}

impl Decision {
    /// How the reconcile ends once the intents are carried out: an error
    /// while a client fits nowhere; else wait for a change of a finished or
    /// suspended run, or look again when the planner asks, at the latest
    /// after `store_poll_seconds` (commits raise no Kubernetes event).
    pub fn outcome(&self, store_poll_seconds: u64) -> Result<Action> {
        if !self.unplaceable.is_empty() {
            return Err(Error::NoGpuProfileFits(self.unplaceable.join("; ")));
        }
        Ok(match self.plan.phase {
            Phase::Succeeded | Phase::Failed | Phase::Suspended => Action::await_change(),
            _ => {
                let poll = store_poll_seconds as f64;
                let after = self
                    .plan
                    .requeue_after
                    .map(|s| s.min(poll))
                    .unwrap_or(poll)
                    .max(1.0);
                Action::requeue(Duration::from_secs_f64(after))
            }
        })
    }
}

/// Decides everything about `run` from what `world` says (pure).
pub fn decide(run: &Run, world: &Dereferenced, config: &OperatorConfig) -> Decision {
    let spec = &run.ft.spec;
    let placements = placements(spec, &world.shapes, world.bridge.clone(), &config.sizing);
    let obs = observation(
        spec,
        &world.store,
        &world.jobs,
        world.now,
        opened_at(run, world),
    );
    let plan = planner::plan(spec, &obs);
    let actor = Actor {
        run,
        placements: &placements,
        jobs: &world.jobs,
        deadline: remaining_deadline(spec, &obs, world.now),
        config,
    };
    let acts = actor.act(&plan);
    let stale = stale_jobs(spec, &plan, &world.jobs, world.store.completed_rounds);
    let round_started_at = round_start(spec, &obs, &acts, world.now);
    let status = next_status(
        run,
        world,
        &obs,
        &plan,
        &placements,
        &acts,
        round_started_at,
    );
    Decision {
        plan,
        jobs: JobIntents {
            create: acts.create,
            cancel: acts.cancel,
            stale,
        },
        status,
        events: acts.events,
        unplaceable: acts.unplaceable,
        round_started_at,
    }
}

/// When the current step started: its oldest Job or what the previous
/// status recorded, else now when this reconcile starts its first Jobs or
/// when sites run some of its clients (their step opens when the operator
/// first sees it, as under `heterotune run`: without it, a step whose
/// clients are all sites' would never reach its deadline).
fn round_start(
    spec: &heterotune_crds::spec::FederatedTuneSpec,
    obs: &Observation,
    acts: &Acts,
    now: f64,
) -> Option<f64> {
    let sites = spec.clients.iter().any(|c| c.is_remote());
    obs.round_started_at
        .or_else(|| (!acts.started.is_empty() || sites).then_some(now))
}

/// When the step in progress opened, as the previous status recorded it
/// (`status.roundStartTime`); none once a round completed since (a new step).
fn opened_at(run: &Run, world: &Dereferenced) -> Option<f64> {
    if !world.store.new_rounds.is_empty() {
        return None;
    }
    run.ft
        .status
        .as_ref()
        .and_then(|s| s.round_start_time.as_deref())
        .and_then(crate::protocol::observe::unix_seconds)
}

/// Places every client (given the shapes of their models and of the
/// bridge's, which every client's trainer loads with `spec.bridge`).
pub fn placements(
    spec: &FederatedTuneSpec,
    shapes: &[Option<ModelShape>],
    bridge: Option<ModelShape>,
    config: &sizing::SizingConfig,
) -> Vec<Result<Placement, SizingError>> {
    let slots = sizing::resolve_slots(spec, shapes);
    let bridge = BridgeModel::of(spec, bridge);
    spec.clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let w = Workload::of(spec, i, slots);
            let allow_cpu = spec.trainer.allow_cpu;
            sizing::place(
                c,
                shapes[i].as_ref(),
                &w,
                bridge.as_ref(),
                allow_cpu,
                config,
                i,
            )
        })
        .collect()
}

/// Seconds left in the round for a Job created now.
pub fn remaining_deadline(spec: &FederatedTuneSpec, obs: &Observation, now: f64) -> i64 {
    let deadline = f64::from(spec.round_deadline_seconds);
    let left = match obs.round_started_at {
        Some(t) => t + deadline - now,
        None => deadline,
    };
    left.ceil().max(1.0) as i64
}

/// Hygiene outside the round logic: running Jobs of rounds already over.
/// Evaluations go once their global model is not the last any more (rounds
/// raised) or the run is finished.
pub fn stale_jobs(
    spec: &FederatedTuneSpec,
    plan: &Plan,
    jobs: &[JobFacts],
    completed_rounds: u32,
) -> Vec<String> {
    jobs.iter()
        .filter(|j| {
            j.active
                && if j.role == ROLE_EVALUATOR {
                    j.round < spec.rounds || plan.phase == Phase::Succeeded
                } else {
                    j.round <= completed_rounds
                }
        })
        .map(|j| j.name.clone())
        .collect()
}

/// What the planner's actions come to.
#[derive(Debug, Default)]
struct Acts {
    create: Vec<Job>,
    cancel: Vec<String>,
    unplaceable: Vec<String>,
    events: Vec<Announcement>,
    failure: Option<(String, String)>,
    /// Clients whose trainer or evaluator starts now.
    started: Vec<String>,
}

/// Turns planner actions into Jobs.
struct Actor<'a> {
    run: &'a Run<'a>,
    placements: &'a [Result<Placement, SizingError>],
    jobs: &'a [JobFacts],
    /// Seconds left in the round.
    deadline: i64,
    config: &'a OperatorConfig,
}

impl Actor<'_> {
    fn act(&self, plan: &Plan) -> Acts {
        let spec = &self.run.ft.spec;
        let index_of: HashMap<&str, usize> = spec
            .clients
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.as_str(), i))
            .collect();
        let mut acts = Acts::default();
        for action in &plan.actions {
            match action {
                PlanAction::StartClient {
                    client,
                    round,
                    attempt,
                }
                | PlanAction::StartEvaluation {
                    client,
                    round,
                    attempt,
                } => {
                    acts.started.push(client.clone());
                    let Some(&i) = index_of.get(client.as_str()) else {
                        continue;
                    };
                    let role = if matches!(action, PlanAction::StartEvaluation { .. }) {
                        ROLE_EVALUATOR
                    } else {
                        ROLE_TRAINER
                    };
                    self.start(&mut acts, i, role, *round, *attempt);
                }
                PlanAction::CancelClient { client, round } => {
                    acts.cancel
                        .extend(active_jobs(self.jobs, ROLE_TRAINER, *round, client))
                }
                PlanAction::CancelEvaluation { client, round } => {
                    acts.cancel
                        .extend(active_jobs(self.jobs, ROLE_EVALUATOR, *round, client))
                }
                PlanAction::ExcludeClient { .. } | PlanAction::Complete => {}
                PlanAction::StartAggregation {
                    round,
                    participants,
                    attempt,
                } => acts.create.push(jobs::aggregation_job(
                    self.run,
                    *round,
                    *attempt,
                    participants,
                    i64::from(spec.round_deadline_seconds),
                    &self.config.jobs,
                )),
                PlanAction::Fail { reason, message } => {
                    acts.failure = Some((reason.as_str().to_string(), message.clone()))
                }
            }
        }
        Self::hold_back(&mut acts);
        if !acts.cancel.is_empty() {
            acts.events.push(normal(
                "StragglersCancelled",
                format!("round {}: stopped {}", plan.round, acts.cancel.join(", ")),
            ));
        }
        acts
    }

    /// Adds client `index`'s Job of `role` (or why it fits nowhere).
    fn start(&self, acts: &mut Acts, index: usize, role: &'static str, round: u32, attempt: u32) {
        match &self.placements[index] {
            Ok(p) => {
                acts.create.push(jobs::client_job(
                    self.run,
                    index,
                    role,
                    round,
                    attempt,
                    p,
                    self.deadline,
                    &self.config.jobs,
                    &self.config.sizing.cpu.request,
                ));
                if attempt > 1 && role == ROLE_TRAINER {
                    let client = &self.run.ft.spec.clients[index].name;
                    acts.events.push(normal(
                        "ClientRetry",
                        format!("client {client}: attempt {attempt} of round {round}"),
                    ));
                }
            }
            Err(e) => {
                // One line for what every client shares (an unknown bridge).
                let why = e.to_string();
                if !acts.unplaceable.contains(&why) {
                    acts.unplaceable.push(why);
                }
            }
        }
    }

    /// Starts no client until every client fits somewhere: a partial round
    /// would only run into its deadline.
    fn hold_back(acts: &mut Acts) {
        if acts.unplaceable.is_empty() {
            return;
        }
        acts.started.clear();
        acts.create.retain(|j| {
            let role = j
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_ROLE))
                .map(String::as_str);
            role != Some(ROLE_TRAINER) && role != Some(ROLE_EVALUATOR)
        });
    }
}

/// The status after this reconcile.
fn next_status(
    run: &Run,
    world: &Dereferenced,
    obs: &Observation,
    plan: &Plan,
    placements: &[Result<Placement, SizingError>],
    acts: &Acts,
    round_started_at: Option<f64>,
) -> FederatedTuneStatus {
    let spec = &run.ft.spec;
    let prev = run.ft.status.as_ref();
    let store = &world.store;
    let clients = client_statuses(&ClientInputs {
        spec,
        obs,
        jobs: &world.jobs,
        placements,
        previous: prev,
        newly_completed: !store.new_rounds.is_empty(),
        started: &acts.started,
    });
    let held = !acts.unplaceable.is_empty();
    let latest_global = (store.completed_rounds > 0).then(|| {
        run.layout
            .global_manifest(store.completed_rounds.min(spec.rounds))
    });
    status::build(&StatusInput {
        previous: prev,
        spec,
        generation: run.ft.metadata.generation,
        now: world.now,
        // Blocked by sizing, a round that has not started is still Pending.
        phase: if held {
            prev.and_then(|p| p.phase).unwrap_or(Phase::Pending)
        } else {
            plan.phase
        },
        round: plan.round,
        completed_rounds: store.completed_rounds,
        trouble: trouble(&acts.unplaceable, &clients, plan.round),
        // A finished run keeps the last round's list, or the evaluations'.
        clients: if plan.phase == Phase::Succeeded && !spec.evaluation.after_last_round {
            Vec::new()
        } else {
            clients
        },
        new_rounds: &store.new_rounds,
        failure: acts.failure.clone(),
        artifacts: Some(ArtifactLocations {
            prefix: format!(
                "s3://{}/{}",
                bucket_of(&spec.storage.uri),
                run.layout.run_dir()
            ),
            latest_global,
        }),
        round_started_at,
        // Recorded once the evaluation phase is over (not while results
        // still arrive: the mean would move, and announce, with each).
        final_evaluation: (plan.phase == Phase::Succeeded)
            .then(|| heterotune_crds::manifest::mean_accuracy(store.evaluated.values()))
            .flatten(),
    })
}

/// Why the run is degraded: clients that fit nowhere, or clients out of
/// the round after their retries.
fn trouble(unplaceable: &[String], clients: &[ClientStatus], round: u32) -> Option<Trouble> {
    let excluded = clients.iter().filter(|c| c.state == "Excluded").count();
    if !unplaceable.is_empty() {
        Some(Trouble {
            reason: "NoGpuProfileFits".into(),
            message: unplaceable.join("; "),
        })
    } else if excluded > 0 {
        Some(Trouble {
            reason: "ClientsExcluded".into(),
            message: format!(
                "{excluded} client(s) excluded from round {round} after exhausting their retries"
            ),
        })
    } else {
        None
    }
}

fn bucket_of(uri: &str) -> String {
    uri.strip_prefix("s3://")
        .and_then(|r| r.split('/').next())
        .unwrap_or_default()
        .to_string()
}
