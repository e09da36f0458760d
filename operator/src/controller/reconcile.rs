//! One reconcile, in explicit steps: validate (pure) → observe the store and
//! the Jobs → size the clients (pure) → [`planner::plan`] (pure) → carry out
//! its actions → write status with server-side apply → publish Events.
//!
//! Every decision about rounds is the planner's; this module only turns the
//! cluster and the store into an [`Observation`] and the planner's
//! [`PlanAction`]s into API calls.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt, TryStreamExt};
use heterotune_crds::spec::RetentionPolicy;
use heterotune_crds::status::{ArtifactLocations, ClientStatus, FederatedTuneStatus, Phase};
use heterotune_crds::validate::{check_object, Problem, ProblemKind};
use heterotune_crds::FederatedTune;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::{Resource, ResourceExt};

use super::context::{Context, MANAGER};
use super::error::{is_already_exists, is_not_found, kube, Category, Error, Result};
use super::jobs::{
    self, Run, LABEL_ATTEMPT, LABEL_CLIENT, LABEL_ROLE, LABEL_ROUND, LABEL_RUN_UID,
    ROLE_AGGREGATOR, ROLE_EVALUATOR, ROLE_TRAINER,
};
use super::observe::{RunRef, StoreObservation};
use super::status::{self, Announcement, StatusInput, Trouble};
use crate::planner::{
    self, Action as PlanAction, AggregationState, ClientObservation, Observation, Plan,
};
use crate::sizing::{self, ModelShape, Placement, Workload};

/// The finalizer that applies `spec.retention.onDelete` before deletion.
pub const FINALIZER: &str = "heterotune.dev/artifacts";
/// Annotation that skips the retention policy on deletion (when the store
/// is gone for good and deletion would otherwise wait forever).
pub const SKIP_RETENTION_ANNOTATION: &str = "heterotune.dev/skip-retention";
/// How long a model config that could not be read is remembered.
const SHAPE_MISS_TTL: f64 = 60.0;

/// Reconciles one FederatedTune (the controller's entry point).
pub async fn reconcile(ft: Arc<FederatedTune>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    if ctx.jobs.wait_until_ready().now_or_never().is_none() {
        // The Job cache has not finished its first list: acting now could
        // misjudge the round (creates would only meet 409s, but status would flicker).
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let ns = ft.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
    let uid = ft.uid().unwrap_or_default();
    let api: Api<FederatedTune> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, ft, |event| async {
        match event {
            Finalizer::Apply(ft) => apply(&ft, &ctx).await,
            Finalizer::Cleanup(ft) => cleanup(&ft, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok() {
        ctx.memory().failures.remove(&uid);
    }
    result
}

/// What to do after a failed reconcile: user errors wait for a change of the
/// object; transient ones are retried with exponential backoff.
pub fn error_policy(ft: Arc<FederatedTune>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error.metric_label());
    match error.category() {
        Category::User => {
            tracing::info!(name = %ft.name_any(), error = %error, "waiting for a change of the FederatedTune");
            Action::await_change()
        }
        Category::Transient => {
            let uid = ft.uid().unwrap_or_default();
            let n = {
                let mut memory = ctx.memory();
                let n = memory.failures.entry(uid).or_insert(0);
                *n = n.saturating_add(1);
                *n
            };
            let cfg = &ctx.config.reconcile;
            let delay = cfg
                .error_backoff_seconds
                .saturating_mul(1u64 << (n - 1).min(16))
                .min(cfg.error_backoff_max_seconds);
            tracing::warn!(name = %ft.name_any(), error = %error, retry_in_s = delay, "reconcile failed");
            Action::requeue(Duration::from_secs(delay))
        }
    }
}

/// Cluster-level checks on top of the CRD's own: the schema and CEL rules
/// (what the API server enforced when the object was written, evaluated
/// again in case the CRD and the operator disagree) and that a cluster run
/// stores its artifacts in `s3://`.
pub fn validate(ft: &FederatedTune) -> Vec<Problem> {
    let mut value = match serde_json::to_value(ft) {
        Ok(v) => v,
        Err(e) => {
            return vec![Problem {
                path: "spec".into(),
                kind: ProblemKind::Type,
                message: e.to_string(),
            }]
        }
    };
    if let Some(map) = value.as_object_mut() {
        map.remove("status");
        if let Some(meta) = map.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.retain(|k, _| k == "name" || k == "namespace");
        }
    }
    let mut problems = check_object(&mut value, None);
    if !ft.spec.storage.is_s3() {
        problems.push(Problem {
            path: "spec.storage.uri".into(),
            kind: ProblemKind::Rule,
            message: format!(
                "is {:?}: a cluster run needs s3:// storage (local folders exist on one machine only)",
                ft.spec.storage.uri
            ),
        });
    }
    problems
}

fn problems_message(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A Job of the run, as the planner needs it.
#[derive(Debug, Clone)]
pub struct JobFacts {
    /// Job name.
    pub name: String,
    /// `trainer` or `aggregator`.
    pub role: String,
    /// Round label.
    pub round: u32,
    /// Client label (trainers).
    pub client: Option<String>,
    /// Attempt label.
    pub attempt: u32,
    /// Still running (not finished, not being deleted).
    pub active: bool,
    /// Finished successfully.
    pub succeeded: bool,
    /// Creation time (Unix seconds).
    pub created: Option<f64>,
    /// Why it failed, when it did (see [`failure_reason`]).
    pub failure: Option<String>,
}

/// Longest failure text kept in a client's status message.
const MAX_FAILURE: usize = 400;

/// Why a failed Job failed, in one line: its pod's container termination
/// (`OOMKilled`, the exit code and the last lines of the log, which the
/// container reports through `FallbackToLogsOnError`) or else the Job's
/// `Failed` condition (`DeadlineExceeded`, ...). `None` for Jobs that did
/// not fail.
pub fn failure_reason(job: &Job, pods: &[Arc<Pod>]) -> Option<String> {
    let status = job.status.as_ref()?;
    let condition = status.conditions.as_ref().and_then(|cs| {
        cs.iter()
            .find(|c| c.type_ == "Failed" && c.status == "True")
    });
    if condition.is_none() && status.failed.unwrap_or(0) == 0 {
        return None;
    }
    let name = job.metadata.name.as_deref();
    let uid = job.metadata.uid.as_deref();
    let mine = |p: &&Arc<Pod>| {
        let by_owner = uid.is_some()
            && p.metadata
                .owner_references
                .as_ref()
                .is_some_and(|o| o.iter().any(|r| Some(r.uid.as_str()) == uid));
        let by_label = p.metadata.labels.as_ref().is_some_and(|l| {
            ["batch.kubernetes.io/job-name", "job-name"]
                .iter()
                .any(|k| l.get(*k).map(String::as_str) == name)
        });
        by_owner || by_label
    };
    let terminated = pods
        .iter()
        .filter(mine)
        .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .find(|t| t.exit_code != 0);
    let text = match (terminated, condition) {
        (Some(t), _) => {
            let reason = t.reason.as_deref().unwrap_or("Error");
            let hint = if reason == "OOMKilled" {
                ": out of memory; raise the client's memory (spec.clients[].resources or a larger \
                 GPU profile) or lower training.batchSize / maxSeqLength"
                    .to_string()
            } else {
                t.message
                    .as_deref()
                    .map(|m| {
                        let lines: Vec<&str> = m.lines().filter(|l| !l.trim().is_empty()).collect();
                        format!(": {}", lines[lines.len().saturating_sub(2)..].join(" | "))
                    })
                    .unwrap_or_default()
            };
            format!("{reason} (exit {}){hint}", t.exit_code)
        }
        (None, Some(c)) => format!(
            "{}{}",
            c.reason.as_deref().unwrap_or("Failed"),
            c.message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ),
        (None, None) => "Failed".to_string(),
    };
    Some(if text.len() > MAX_FAILURE {
        let mut end = MAX_FAILURE;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &text[..end])
    } else {
        text
    })
}

/// Reads a Job's labels and state.
pub fn job_facts(job: &Job) -> Option<JobFacts> {
    let labels = job.metadata.labels.as_ref()?;
    let round = labels.get(LABEL_ROUND)?.parse().ok()?;
    let status = job.status.as_ref();
    let has = |t: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .map(|cs| cs.iter().any(|c| c.type_ == t && c.status == "True"))
            .unwrap_or(false)
    };
    let succeeded = has("Complete") || status.and_then(|s| s.succeeded).unwrap_or(0) > 0;
    let failed = has("Failed") || status.and_then(|s| s.failed).unwrap_or(0) > 0;
    let deleting = job.metadata.deletion_timestamp.is_some();
    Some(JobFacts {
        name: job.name_any(),
        role: labels.get(LABEL_ROLE)?.clone(),
        round,
        client: labels.get(LABEL_CLIENT).cloned(),
        attempt: labels
            .get(LABEL_ATTEMPT)
            .and_then(|a| a.parse().ok())
            .unwrap_or(1),
        active: !succeeded && !failed && !deleting,
        succeeded,
        created: job
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_millisecond() as f64 / 1000.0),
        failure: None,
    })
}

/// The Jobs of run `uid` in `namespace`, from the controller's caches (the
/// pods of failed Jobs explain their failure).
pub fn observe_jobs(ctx: &Context, namespace: &str, uid: &str) -> Vec<JobFacts> {
    let of_run = |labels: Option<&BTreeMap<String, String>>| {
        labels
            .and_then(|l| l.get(LABEL_RUN_UID))
            .map(String::as_str)
            == Some(uid)
    };
    let jobs = ctx.jobs.state_filter(|j| {
        j.metadata.namespace.as_deref() == Some(namespace) && of_run(j.metadata.labels.as_ref())
    });
    let mut pods: Option<Vec<Arc<Pod>>> = None;
    jobs.iter()
        .filter_map(|j| {
            let mut facts = job_facts(j)?;
            if !facts.active && !facts.succeeded {
                let pods = pods.get_or_insert_with(|| {
                    ctx.pods.state_filter(|p| {
                        p.metadata.namespace.as_deref() == Some(namespace)
                            && of_run(p.metadata.labels.as_ref())
                    })
                });
                facts.failure = failure_reason(j, pods);
            }
            Some(facts)
        })
        .collect()
}

/// The client Jobs of `role` in `round`, by client.
fn jobs_by_client<'j>(
    jobs: &'j [JobFacts],
    round: u32,
    role: &str,
) -> HashMap<&'j str, Vec<&'j JobFacts>> {
    let mut map: HashMap<&str, Vec<&JobFacts>> = HashMap::new();
    for j in jobs.iter().filter(|j| j.round == round && j.role == role) {
        if let Some(c) = j.client.as_deref() {
            map.entry(c).or_default().push(j);
        }
    }
    map
}

/// Names of `client`'s active Jobs of `role` in `round`.
fn active_jobs<'j>(
    jobs: &'j [JobFacts],
    role: &'j str,
    round: u32,
    client: &'j str,
) -> impl Iterator<Item = String> + 'j {
    jobs.iter()
        .filter(move |j| {
            j.active && j.role == role && j.round == round && j.client.as_deref() == Some(client)
        })
        .map(|j| j.name.clone())
}

/// What the clients are doing now: training in round `completed + 1`, or
/// (every round aggregated, `spec.evaluation.afterLastRound`) evaluating
/// the last round's global model.
fn client_step(run: &Run, completed_rounds: u32) -> (&'static str, u32) {
    let spec = &run.ft.spec;
    if completed_rounds >= spec.rounds && spec.evaluation.after_last_round {
        (ROLE_EVALUATOR, spec.rounds)
    } else {
        (ROLE_TRAINER, completed_rounds + 1)
    }
}

/// Builds the planner's observation of the current round (or of the
/// evaluation after the last one).
pub fn observation(
    run: &Run,
    store: &StoreObservation,
    jobs: &[JobFacts],
    now: f64,
) -> Observation {
    let spec = &run.ft.spec;
    let round = store.completed_rounds + 1;
    let (role, step_round) = client_step(run, store.completed_rounds);
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
        .reduce(f64::min);
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

/// Looks up the shape of every client's model (config.json in the store,
/// the packaged table, or `model.parameters`), once per URI.
async fn shapes(ctx: &Context, run: &Run<'_>) -> Vec<Option<ModelShape>> {
    let spec = &run.ft.spec;
    let now = ctx.now();
    let mut by_uri: BTreeMap<String, Option<ModelShape>> = BTreeMap::new();
    for c in &spec.clients {
        let uri = c.model.uri.clone();
        if by_uri.contains_key(&uri) {
            continue;
        }
        let cached = ctx
            .memory()
            .shapes
            .get(&uri)
            .filter(|(s, at)| s.is_some() || now - at < SHAPE_MISS_TTL)
            .map(|(s, _)| s.clone());
        let shape = match cached {
            Some(s) => s,
            None => {
                let mut found = sizing::packaged_model(&uri);
                if found.is_none() && uri.starts_with("s3://") {
                    match ctx.store.model_config(&spec.storage, &uri).await {
                        Ok(Some(cfg)) => match sizing::ModelShape::from_config_json(&cfg) {
                            Ok(s) => found = Some(s),
                            Err(e) => tracing::warn!(uri, error = %e, "unusable model config"),
                        },
                        Ok(None) => {}
                        Err(e) => tracing::warn!(uri, error = %e, "cannot read the model config"),
                    }
                }
                ctx.memory()
                    .shapes
                    .insert(uri.clone(), (found.clone(), now));
                found
            }
        };
        by_uri.insert(uri, shape);
    }
    spec.clients
        .iter()
        .map(|c| {
            by_uri.get(&c.model.uri).cloned().flatten().or_else(|| {
                c.model
                    .parameters
                    .map(|p| ModelShape::from_parameters(c.model.family, p))
            })
        })
        .collect()
}

/// Places every client (pure, given the shapes).
pub fn placements(
    run: &Run,
    shapes: &[Option<ModelShape>],
    config: &sizing::SizingConfig,
) -> Vec<Result<Placement, sizing::SizingError>> {
    let spec = &run.ft.spec;
    let slots = sizing::resolve_slots(spec, shapes);
    spec.clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let w = Workload::of(spec, i, slots);
            sizing::place(c, shapes[i].as_ref(), &w, spec.trainer.allow_cpu, config, i)
        })
        .collect()
}

/// The per-client status of the current round.
fn client_statuses(
    run: &Run,
    obs: &Observation,
    jobs: &[JobFacts],
    placements: &[Result<Placement, sizing::SizingError>],
    previous: Option<&FederatedTuneStatus>,
    newly_completed: bool,
    started: &[String],
) -> Vec<ClientStatus> {
    let (role, step_round) = client_step(run, obs.completed_rounds);
    let evaluating = role == ROLE_EVALUATOR;
    let by_client = jobs_by_client(jobs, step_round, role);
    let before_by_name: HashMap<&str, &ClientStatus> = previous
        .map(|p| p.clients.iter().map(|c| (c.name.as_str(), c)).collect())
        .unwrap_or_default();
    let started: HashSet<&str> = started.iter().map(String::as_str).collect();
    let spec = &run.ft.spec;
    let retries = spec.max_retries_per_client;
    let round = obs.completed_rounds + 1;
    obs.clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let before = before_by_name.get(c.name.as_str()).copied();
            let mut last_round = before.and_then(|b| b.last_round);
            if newly_completed {
                if let (Some(b), Some(p)) = (before, previous) {
                    if b.state == "Committed" && p.round < round {
                        last_round = Some(p.round);
                    }
                }
            }
            let just_started = started.contains(c.name.as_str());
            let attempts =
                by_client.get(c.name.as_str()).map_or(0, Vec::len) as u32 + u32::from(just_started);
            let state = if c.committed {
                if evaluating {
                    "Evaluated"
                } else {
                    "Committed"
                }
            } else if c.running || just_started {
                if evaluating {
                    "Evaluating"
                } else {
                    "Training"
                }
            } else if c.failed_attempts > retries {
                if evaluating {
                    "EvaluationFailed"
                } else {
                    "Excluded"
                }
            } else if c.failed_attempts > 0 {
                "Failed"
            } else {
                "Pending"
            };
            // The newest failed attempt explains a Failed or Excluded client.
            let last_failure = || {
                by_client
                    .get(c.name.as_str())
                    .and_then(|js| {
                        js.iter()
                            .filter(|j| j.failure.is_some())
                            .max_by_key(|j| j.attempt)
                    })
                    .and_then(|j| {
                        j.failure
                            .as_ref()
                            .map(|f| format!("attempt {}: {f}", j.attempt))
                    })
            };
            let (profile, estimate, message) = match placements.get(i) {
                Some(Ok(p)) => (
                    Some(p.profile_name()),
                    p.estimated_bytes(),
                    matches!(state, "Failed" | "Excluded" | "EvaluationFailed")
                        .then(last_failure)
                        .flatten(),
                ),
                Some(Err(e)) => (None, None, Some(e.to_string())),
                None => (None, None, None),
            };
            ClientStatus {
                name: c.name.clone(),
                state: state.to_string(),
                attempts,
                last_round,
                gpu_profile: profile,
                estimated_memory_bytes: estimate,
                message,
            }
        })
        .collect()
}

async fn publish(ctx: &Context, ft: &FederatedTune, a: &Announcement) {
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

/// Writes `next` with server-side apply unless it equals the current status,
/// then publishes the Events of the change. Returns whether it wrote.
async fn write_status(
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
    let mut all = status::announcements(prev, &next);
    all.extend(extra);
    for a in &all {
        publish(ctx, ft, a).await;
    }
    Ok(changed)
}

/// A status that keeps the previous phase and round and reports `trouble`.
fn troubled_status(run: &Run, ctx: &Context, trouble: Trouble) -> FederatedTuneStatus {
    let prev = run.ft.status.as_ref();
    status::build(&StatusInput {
        previous: prev,
        spec: &run.ft.spec,
        generation: run.ft.metadata.generation,
        now: ctx.now(),
        phase: prev.and_then(|p| p.phase).unwrap_or(Phase::Pending),
        round: prev.map(|p| p.round).unwrap_or(0),
        completed_rounds: prev
            .and_then(|p| p.history.last())
            .map(|h| h.round)
            .unwrap_or(0),
        clients: Vec::new(),
        new_rounds: &[],
        trouble: Some(trouble),
        failure: None,
        artifacts: prev.and_then(|p| p.artifacts.clone()),
        round_started_at: None,
        final_evaluation: None,
    })
}

fn run_ref(run: &Run) -> RunRef {
    RunRef {
        storage: run.ft.spec.storage.clone(),
        layout: run.layout.clone(),
        clients: run.ft.spec.clients.iter().map(|c| c.name.clone()).collect(),
        rounds: run.ft.spec.rounds,
    }
}

/// Applies the spec ConfigMap when its content differs from what this
/// process last applied (after a restart: once).
async fn ensure_spec_config_map(ctx: &Context, run: &Run<'_>) -> Result<()> {
    let cm = jobs::spec_config_map(run);
    let hash = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_string(&cm.data)
            .unwrap_or_default()
            .hash(&mut h);
        h.finish()
    };
    if ctx.memory().applied_specs.get(&run.uid) == Some(&hash) {
        return Ok(());
    }
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &run.namespace);
    api.patch(
        &jobs::spec_config_map_name(&run.name),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map_err(kube("apply spec configmap"))?;
    ctx.memory().applied_specs.insert(run.uid.clone(), hash);
    Ok(())
}

async fn create_jobs(ctx: &Context, namespace: &str, jobs: Vec<Job>) -> Result<()> {
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let concurrency = ctx.config.reconcile.api_concurrency.max(1);
    futures::stream::iter(jobs)
        .map(|job| {
            let api = api.clone();
            async move {
                let role = job
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_ROLE))
                    .cloned()
                    .unwrap_or_default();
                match api.create(&PostParams::default(), &job).await {
                    Ok(_) => {
                        ctx.metrics
                            .jobs_created
                            .with_label_values(&[role.as_str()])
                            .inc();
                        Ok(())
                    }
                    // Created before (by us, before a restart or with a stale cache).
                    Err(e) if is_already_exists(&e) => Ok(()),
                    Err(e) => Err(Error::Kube {
                        op: "create job",
                        source: e,
                    }),
                }
            }
        })
        .buffered(concurrency)
        .try_collect::<Vec<()>>()
        .await
        .map(|_| ())
}

async fn delete_jobs(
    ctx: &Context,
    namespace: &str,
    names: Vec<String>,
    reason: &str,
) -> Result<()> {
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let concurrency = ctx.config.reconcile.api_concurrency.max(1);
    futures::stream::iter(names)
        .map(|name| {
            let api = api.clone();
            async move {
                match api.delete(&name, &DeleteParams::background()).await {
                    Ok(_) => {
                        ctx.metrics.jobs_deleted.with_label_values(&[reason]).inc();
                        Ok(())
                    }
                    Err(e) if is_not_found(&e) => Ok(()),
                    Err(e) => Err(Error::Kube {
                        op: "delete job",
                        source: e,
                    }),
                }
            }
        })
        .buffered(concurrency)
        .try_collect::<Vec<()>>()
        .await
        .map(|_| ())
}

/// Seconds left in the round for a Job created now.
fn remaining_deadline(run: &Run, obs: &Observation, now: f64) -> i64 {
    let deadline = f64::from(run.ft.spec.round_deadline_seconds);
    let left = match obs.round_started_at {
        Some(t) => t + deadline - now,
        None => deadline,
    };
    left.ceil().max(1.0) as i64
}

/// The Apply arm: everything but deletion.
async fn apply(ft: &FederatedTune, ctx: &Context) -> Result<Action> {
    let run = Run::new(ft)?;
    let spec = &ft.spec;
    let prev = ft.status.as_ref();

    // 1. Validate (pure; once per generation).
    let generation = ft.metadata.generation.unwrap_or(0);
    let known_valid = ctx.memory().valid_generations.get(&run.uid) == Some(&generation);
    let problems = if known_valid {
        Vec::new()
    } else {
        validate(ft)
    };
    if problems.is_empty() && !known_valid {
        ctx.memory()
            .valid_generations
            .insert(run.uid.clone(), generation);
    }
    if !problems.is_empty() {
        let message = problems_message(&problems);
        let next = troubled_status(
            &run,
            ctx,
            Trouble {
                reason: "InvalidSpec".into(),
                message: message.clone(),
            },
        );
        write_status(ctx, ft, next, Vec::new()).await?;
        return Err(Error::InvalidSpec(message));
    }

    // 2. Observe the store and the Jobs.
    let since = prev
        .and_then(|p| p.history.last())
        .map(|h| h.round)
        .unwrap_or(0);
    let store = match ctx.store.observe(&run_ref(&run), since).await {
        Ok(o) => o,
        Err(e) => {
            let next = troubled_status(
                &run,
                ctx,
                Trouble {
                    reason: "StorageUnavailable".into(),
                    message: e.to_string(),
                },
            );
            write_status(ctx, ft, next, Vec::new()).await?;
            return Err(Error::Storage(e));
        }
    };
    let jobs = observe_jobs(ctx, &run.namespace, &run.uid);
    let now = ctx.now();

    // 3. Size the clients (pure once the shapes are known).
    let shapes = shapes(ctx, &run).await;
    let placements = placements(&run, &shapes, &ctx.config.sizing);

    // 4. Plan (pure).
    let obs = observation(&run, &store, &jobs, now);
    let plan: Plan = planner::plan(spec, &obs);

    // 5. Carry out the actions.
    let mut unplaceable: Vec<String> = Vec::new();
    let mut to_create: Vec<Job> = Vec::new();
    let mut to_cancel: Vec<String> = Vec::new();
    let mut extra: Vec<Announcement> = Vec::new();
    let mut failure: Option<(String, String)> = None;
    let deadline = remaining_deadline(&run, &obs, now);
    let index_of: HashMap<&str, usize> = spec
        .clients
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.as_str(), i))
        .collect();
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
                let Some(&i) = index_of.get(client.as_str()) else {
                    continue;
                };
                let role = if matches!(action, PlanAction::StartEvaluation { .. }) {
                    ROLE_EVALUATOR
                } else {
                    ROLE_TRAINER
                };
                match &placements[i] {
                    Ok(p) => {
                        to_create.push(jobs::client_job(
                            &run,
                            i,
                            role,
                            *round,
                            *attempt,
                            p,
                            deadline,
                            &ctx.config.jobs,
                            &ctx.config.sizing.cpu.request,
                        ));
                        if *attempt > 1 && role == ROLE_TRAINER {
                            extra.push(Announcement {
                                warning: false,
                                reason: "ClientRetry".into(),
                                note: format!(
                                    "client {client}: attempt {attempt} of round {round}"
                                ),
                            });
                        }
                    }
                    Err(e) => unplaceable.push(e.to_string()),
                }
            }
            PlanAction::CancelClient { client, round } => {
                to_cancel.extend(active_jobs(&jobs, ROLE_TRAINER, *round, client));
            }
            PlanAction::CancelEvaluation { client, round } => {
                to_cancel.extend(active_jobs(&jobs, ROLE_EVALUATOR, *round, client));
            }
            PlanAction::ExcludeClient { .. } | PlanAction::Complete => {}
            PlanAction::StartAggregation {
                round,
                participants,
                attempt,
            } => {
                to_create.push(jobs::aggregation_job(
                    &run,
                    *round,
                    *attempt,
                    participants,
                    i64::from(spec.round_deadline_seconds),
                    &ctx.config.jobs,
                ));
            }
            PlanAction::Fail { reason, message } => {
                failure = Some((reason.as_str().to_string(), message.clone()))
            }
        }
    }
    let started: Vec<String> = if unplaceable.is_empty() {
        plan.actions
            .iter()
            .filter_map(|a| match a {
                PlanAction::StartClient { client, .. }
                | PlanAction::StartEvaluation { client, .. } => Some(client.clone()),
                _ => None,
            })
            .collect()
    } else {
        Vec::new()
    };
    if !unplaceable.is_empty() {
        // Start nothing until every client fits somewhere: a partial round
        // would only run into its deadline.
        to_create.retain(|j| {
            let role = j
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_ROLE))
                .map(String::as_str);
            role != Some(ROLE_TRAINER) && role != Some(ROLE_EVALUATOR)
        });
    }
    if !to_cancel.is_empty() {
        extra.push(Announcement {
            warning: false,
            reason: "StragglersCancelled".into(),
            note: format!("round {}: stopped {}", plan.round, to_cancel.join(", ")),
        });
    }
    // Hygiene outside the round logic: Jobs of finished rounds still running.
    let stale: Vec<String> = jobs
        .iter()
        .filter(|j| {
            j.active
                && if j.role == ROLE_EVALUATOR {
                    // Evaluations of a global model that is not the last any more
                    // (rounds raised), or of a finished run.
                    j.round < spec.rounds || plan.phase == Phase::Succeeded
                } else {
                    j.round <= store.completed_rounds
                }
        })
        .map(|j| j.name.clone())
        .collect();
    if !to_create.is_empty() {
        ensure_spec_config_map(ctx, &run).await?;
        create_jobs(ctx, &run.namespace, to_create).await?;
    }
    delete_jobs(ctx, &run.namespace, to_cancel, "straggler").await?;
    delete_jobs(ctx, &run.namespace, stale, "stale").await?;

    // 6. Status and Events.
    let clients = client_statuses(
        &run,
        &obs,
        &jobs,
        &placements,
        prev,
        !store.new_rounds.is_empty(),
        &started,
    );
    let excluded = clients.iter().filter(|c| c.state == "Excluded").count();
    let trouble = if !unplaceable.is_empty() {
        Some(Trouble {
            reason: "NoGpuProfileFits".into(),
            message: unplaceable.join("; "),
        })
    } else if excluded > 0 {
        Some(Trouble {
            reason: "ClientsExcluded".into(),
            message: format!(
                "{excluded} client(s) excluded from round {} after exhausting their retries",
                plan.round
            ),
        })
    } else {
        None
    };
    let round_started_at = obs.round_started_at.or_else(|| {
        plan.actions
            .iter()
            .any(|a| {
                matches!(
                    a,
                    PlanAction::StartClient { .. } | PlanAction::StartEvaluation { .. }
                )
            })
            .then_some(now)
            .filter(|_| unplaceable.is_empty())
    });
    let latest_global = (store.completed_rounds > 0).then(|| {
        run.layout
            .global_manifest(store.completed_rounds.min(spec.rounds))
    });
    let next = status::build(&StatusInput {
        previous: prev,
        spec,
        generation: ft.metadata.generation,
        now,
        // Blocked by sizing, a round that has not started is still Pending.
        phase: if unplaceable.is_empty() {
            plan.phase
        } else {
            prev.and_then(|p| p.phase).unwrap_or(Phase::Pending)
        },
        round: plan.round,
        completed_rounds: store.completed_rounds,
        // A finished run keeps the last round's list, or the evaluations'.
        clients: if plan.phase == Phase::Succeeded && !spec.evaluation.after_last_round {
            Vec::new()
        } else {
            clients
        },
        new_rounds: &store.new_rounds,
        trouble,
        failure,
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
    });
    record_metrics(ctx, &run, &next);
    write_status(ctx, ft, next, extra).await?;

    if !unplaceable.is_empty() {
        return Err(Error::NoGpuProfileFits(unplaceable.join("; ")));
    }
    Ok(match plan.phase {
        Phase::Succeeded | Phase::Failed | Phase::Suspended => Action::await_change(),
        _ => {
            let poll = ctx.config.reconcile.store_poll_seconds as f64;
            let after = plan
                .requeue_after
                .map(|s| s.min(poll))
                .unwrap_or(poll)
                .max(1.0);
            Action::requeue(Duration::from_secs_f64(after))
        }
    })
}

fn bucket_of(uri: &str) -> String {
    uri.strip_prefix("s3://")
        .and_then(|r| r.split('/').next())
        .unwrap_or_default()
        .to_string()
}

fn record_metrics(ctx: &Context, run: &Run, next: &FederatedTuneStatus) {
    let m = &ctx.metrics;
    let last_known = run
        .ft
        .status
        .as_ref()
        .and_then(|p| p.history.last())
        .map(|h| h.round)
        .unwrap_or(0);
    for h in next.history.iter().filter(|h| h.round > last_known) {
        m.round_completed(
            &run.namespace,
            &run.name,
            (h.duration_seconds > 0.0).then_some(h.duration_seconds),
            h.bytes_uploaded,
            &h.rejected,
            h.accuracy,
            &h.accuracy_by_family,
        );
    }
    if let Some(g) = next.last_global_accuracy {
        let by_family = next
            .history
            .iter()
            .rev()
            .find(|h| h.global_accuracy.is_some())
            .map(|h| h.global_accuracy_by_family.clone())
            .unwrap_or_default();
        m.set_global_accuracy(&run.namespace, &run.name, g, &by_family);
    }
    let mut counts: Vec<(&str, i64)> = crate::metrics::CLIENT_STATES
        .iter()
        .map(|s| (*s, 0))
        .collect();
    for c in &next.clients {
        if let Some(entry) = counts.iter_mut().find(|(s, _)| *s == c.state) {
            entry.1 += 1;
        }
    }
    m.set_clients(&run.namespace, &run.name, &counts);
}

/// The Cleanup arm: applies `spec.retention.onDelete`, then lets the
/// finalizer go. Jobs and the spec ConfigMap go with their owner.
async fn cleanup(ft: &FederatedTune, ctx: &Context) -> Result<Action> {
    let run = Run::new(ft)?;
    let policy = ft.spec.retention.on_delete;
    let skip = ft
        .annotations()
        .get(SKIP_RETENTION_ANNOTATION)
        .map(String::as_str)
        == Some("true");
    let note = if policy == RetentionPolicy::Retain || skip || !ft.spec.storage.is_s3() {
        format!(
            "artifacts under {} are kept (retention {policy:?})",
            run.layout.run_dir()
        )
    } else {
        let removed = ctx
            .store
            .apply_retention(&run_ref(&run), policy)
            .await
            .map_err(Error::Storage)?;
        format!(
            "retention {policy:?}: removed {removed} object(s) under {}",
            run.layout.run_dir()
        )
    };
    let reason = match policy {
        RetentionPolicy::Delete if !skip => "ArtifactsDeleted",
        RetentionPolicy::Compact if !skip => "ArtifactsCompacted",
        _ => "ArtifactsRetained",
    };
    publish(
        ctx,
        ft,
        &Announcement {
            warning: false,
            reason: reason.into(),
            note,
        },
    )
    .await;
    ctx.metrics.forget(&run.namespace, &run.name);
    {
        let mut memory = ctx.memory();
        memory.applied_specs.remove(&run.uid);
        memory.failures.remove(&run.uid);
        memory.valid_generations.remove(&run.uid);
    }
    Ok(Action::await_change())
}
