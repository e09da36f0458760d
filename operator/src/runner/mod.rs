//! `heterotune run`: the whole federation on one machine.
//!
//! The local executor of the round protocol: it observes the store, asks the
//! pure [`planner`](crate::planner) what to do, and does it with local
//! `heterotune-trainer` processes (bounded parallelism). The store is the
//! only source of truth, so a killed runner (or trainer) resumes where the
//! store says it is: a round is done exactly when its global manifest
//! exists, and a client's round is done exactly when its manifest does.

mod process;
mod progress;
mod summary;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use heterotune_crds::layout::RunLayout;
use heterotune_crds::validate::{check_object, Problems};
use heterotune_crds::FederatedTune;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::checks;
use crate::planner::{self, Action, AggregationState, ClientObservation, Observation};
use crate::report::Report;
use crate::spec_file::{self, SpecFileError};
use crate::staging::{self, ModelFiles, StagingError};
use crate::store::{Store, StoreError};

pub use process::{ClientDirs, TrainerCommand};
use progress::Progress;
pub use summary::sha256_hex;

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The FederatedTune file.
    pub spec_file: PathBuf,
    /// Trainers running at once.
    pub parallel: usize,
    /// libtorch threads per trainer.
    pub threads_per_trainer: usize,
    /// The `heterotune-trainer` binary.
    pub trainer: PathBuf,
    /// Local working folder (staged artifacts, private client state, caches).
    pub work_dir: PathBuf,
    /// Where the report is written locally (also uploaded to the store).
    pub report_dir: Option<PathBuf>,
    /// Machine-readable logs instead of progress bars.
    pub json: bool,
    /// Delete this run's artifacts and start over.
    pub fresh: bool,
}

/// Runner errors: each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Spec(#[from] SpecFileError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error("the run {run} in {store} was started with a different spec:\n{problems}\nuse --fresh to start it over, or give the FederatedTune another metadata.name")]
    SpecChanged {
        run: String,
        store: String,
        problems: Problems,
    },
    #[error("{0}")]
    Local(String),
    #[error("round {round} failed: {reason}: {message}")]
    Failed {
        round: u32,
        reason: &'static str,
        message: String,
    },
    #[error("interrupted: the run is resumable, run the same command again to continue")]
    Interrupted,
}

impl RunError {
    fn local(what: impl Into<String>) -> Self {
        RunError::Local(what.into())
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub rounds: u32,
    pub report: Report,
    pub report_dir: PathBuf,
}

/// Client bookkeeping of the current round (in memory; the store decides
/// what is committed).
#[derive(Debug, Default, Clone)]
struct ClientRun {
    failed_attempts: u32,
    running: bool,
    last_error: Option<String>,
}

/// A stable stand-in for the UID a cluster would give: local runs of the
/// same name resume the same run.
pub fn local_uid(namespace: &str, name: &str) -> String {
    let digest = crate::runner::summary::sha256_hex(format!("local:{namespace}/{name}").as_bytes());
    digest[..8].to_string()
}

/// Loads, validates and checks the spec file.
fn load(opts: &RunOptions) -> Result<(FederatedTune, Value), RunError> {
    let (ft, value) = spec_file::read(&opts.spec_file)?;
    let problems = checks::check_local_references(&ft.spec);
    if !problems.is_empty() {
        return Err(SpecFileError::invalid(&opts.spec_file, Problems(problems)).into());
    }
    Ok((ft, value))
}

/// Checks the stored spec of a resumed run against this one with the CRD's
/// own transition rule (immutable fields), or records it for a new run.
async fn record_spec(store: &Store, layout: &RunLayout, value: &Value) -> Result<(), RunError> {
    let key = layout.spec_file();
    match store.get(&key).await? {
        Some(bytes) => {
            let mut old: Value = serde_json::from_slice(&bytes).map_err(|e| {
                RunError::local(format!("{key} in {} is not valid JSON: {e}", store.uri()))
            })?;
            old["status"] = serde_json::json!({"phase": "Running"});
            let mut new = value.clone();
            new["status"] = serde_json::json!({"phase": "Running"});
            let problems = check_object(&mut new, Some(&old));
            if !problems.is_empty() {
                return Err(RunError::SpecChanged {
                    run: layout.run_dir().to_string(),
                    store: store.uri().to_string(),
                    problems: Problems(problems),
                });
            }
            // Record the new spec (rounds may have grown).
            store
                .put(
                    &key,
                    serde_json::to_vec_pretty(value).unwrap_or_default().into(),
                )
                .await?;
            Ok(())
        }
        None => {
            store
                .put(
                    &key,
                    serde_json::to_vec_pretty(value).unwrap_or_default().into(),
                )
                .await?;
            Ok(())
        }
    }
}

/// Runs (or resumes) the federation the spec file describes.
pub async fn run(opts: RunOptions) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let (ft, value) = load(&opts)?;
    let spec = ft.spec.clone();
    let name = ft.metadata.name.clone().unwrap_or_default();
    let namespace = ft
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let cwd =
        std::env::current_dir().map_err(|e| RunError::local(format!("current directory: {e}")))?;
    let store = Store::from_spec(&spec.storage, &cwd)?;
    let layout = RunLayout::new(
        store.prefix(),
        &namespace,
        &name,
        &local_uid(&namespace, &name),
    );
    if opts.fresh {
        let n = store.delete_prefix(layout.run_dir()).await?;
        let _ = std::fs::remove_dir_all(opts.work_dir.join(layout.run_dir()));
        tracing::info!(
            run = layout.run_dir(),
            objects = n,
            "--fresh: deleted the previous run"
        );
    }
    record_spec(&store, &layout, &value).await?;

    let work = opts.work_dir.join(layout.run_dir());
    std::fs::create_dir_all(&work)
        .map_err(|e| RunError::local(format!("{}: {e}", work.display())))?;
    let spec_json = work.join("spec.json");
    std::fs::write(
        &spec_json,
        serde_json::to_vec_pretty(&value).unwrap_or_default(),
    )
    .map_err(|e| RunError::local(format!("{}: {e}", spec_json.display())))?;
    // s3:// models and datasets: copied here once (every client trains here).
    let staged = staging::stage_inputs(
        &spec,
        &spec.storage,
        &cwd,
        &opts.work_dir.join("staged"),
        |_| ModelFiles::All,
    )
    .await?;
    let trainer = TrainerCommand {
        binary: opts.trainer.clone(),
        spec: spec_json.clone(),
        threads: opts.threads_per_trainer,
        run: layout.run_dir().to_string(),
        staged,
        live_logs: false,
    };
    let progress = Progress::new(opts.json, spec.rounds, spec.clients.len());
    let mut report = summary::new_report(&ft, layout.run_dir());

    // Round 0: the initial global state every client starts from.
    staging::ensure_global(&store, &layout, &trainer, &work, 0).await?;

    // A resumed run: its completed rounds are in the store.
    summary::rebuild_from_store(&store, &layout, &spec, &mut report).await?;
    let report_dir = opts
        .report_dir
        .clone()
        .unwrap_or_else(|| work.join("report"));
    let (tx, mut rx) = mpsc::unbounded_channel::<process::ClientExit>();
    let mut round_started: Option<(u32, Instant)> = None;
    let mut quorum_reached_at: Option<f64> = None;
    let mut clients: BTreeMap<String, ClientRun> = BTreeMap::new();
    let mut excluded: Vec<String> = Vec::new();
    let mut aggregation_failures = 0u32;
    let mut children = process::Children::default();
    let epoch = Instant::now();

    let evaluate = spec.evaluation.after_last_round;
    loop {
        let completed = store.completed_rounds(&layout, spec.rounds).await?;
        // Rounds 1..=rounds, then (rounds + 1) the final evaluation.
        let round = completed + 1;
        // A new round: reset the per-round bookkeeping.
        if round_started.map(|(r, _)| r) != Some(round) && (round <= spec.rounds || evaluate) {
            if let Some((r, t)) = round_started {
                if r < round && r <= spec.rounds {
                    summary::record_round(
                        &store,
                        &layout,
                        &spec,
                        r,
                        t.elapsed().as_secs_f64(),
                        &excluded,
                        &mut report,
                    )
                    .await?;
                    report.total_seconds = started.elapsed().as_secs_f64();
                    report.status = "Running".into();
                    write_report(&report, &report_dir, &store, &layout).await;
                    progress.round_done(&report);
                }
            }
            clients = spec
                .clients
                .iter()
                .map(|c| (c.name.clone(), ClientRun::default()))
                .collect();
            excluded.clear();
            quorum_reached_at = None;
            aggregation_failures = 0;
            round_started = None;
            if round <= spec.rounds {
                progress.start_round(round);
            } else {
                progress.start_evaluation(spec.rounds);
            }
        }
        let committed = if round <= spec.rounds {
            store.committed_clients(&layout, &spec, round).await?
        } else if evaluate {
            let done = summary::evaluations(&store, &layout, &spec, spec.rounds).await?;
            spec.clients
                .iter()
                .map(|c| done.iter().any(|r| r.client == c.name))
                .collect()
        } else {
            vec![false; spec.clients.len()]
        };
        let committed_count = committed.iter().filter(|c| **c).count() as u32;
        let now = epoch.elapsed().as_secs_f64();
        if committed_count >= spec.quorum() && quorum_reached_at.is_none() {
            quorum_reached_at = Some(now);
        }
        let obs = Observation {
            now,
            completed_rounds: completed,
            round_started_at: round_started.map(|(_, t)| t.duration_since(epoch).as_secs_f64()),
            quorum_reached_at,
            clients: spec
                .clients
                .iter()
                .zip(&committed)
                .map(|(c, done)| {
                    let state = clients.get(&c.name).cloned().unwrap_or_default();
                    ClientObservation {
                        name: c.name.clone(),
                        committed: *done,
                        running: state.running,
                        failed_attempts: state.failed_attempts,
                    }
                })
                .collect(),
            aggregation: if aggregation_failures > 0 {
                AggregationState::Failed
            } else {
                AggregationState::NotStarted
            },
            aggregation_failures,
        };
        progress.clients(committed_count, children.len() as u32);
        let plan = planner::plan(&spec, &obs);
        let mut started_any = false;
        for action in plan.actions {
            match action {
                Action::Complete => {
                    if let Some((r, t)) = round_started.filter(|(r, _)| *r <= spec.rounds) {
                        summary::record_round(
                            &store,
                            &layout,
                            &spec,
                            r,
                            t.elapsed().as_secs_f64(),
                            &excluded,
                            &mut report,
                        )
                        .await?;
                        progress.round_done(&report);
                    }
                    if evaluate {
                        summary::record_evaluation(&store, &layout, &spec, &mut report).await?;
                        progress.evaluation_done(&report);
                    }
                    report.total_seconds = started.elapsed().as_secs_f64();
                    report.status = "Succeeded".into();
                    write_report(&report, &report_dir, &store, &layout).await;
                    progress.finish(&report);
                    return Ok(RunSummary {
                        rounds: spec.rounds,
                        report,
                        report_dir,
                    });
                }
                Action::Fail { reason, message } => {
                    children.kill_all();
                    report.status = format!("Failed ({})", reason.as_str());
                    report.total_seconds = started.elapsed().as_secs_f64();
                    write_report(&report, &report_dir, &store, &layout).await;
                    return Err(RunError::Failed {
                        round,
                        reason: reason.as_str(),
                        message,
                    });
                }
                Action::ExcludeClient {
                    client, failures, ..
                } => {
                    if !excluded.contains(&client) {
                        let why = clients
                            .get(&client)
                            .and_then(|c| c.last_error.clone())
                            .unwrap_or_default();
                        progress.note(&format!("round {round}: client {client} excluded after {failures} failed attempts: {why}"));
                        excluded.push(client);
                    }
                }
                Action::CancelClient { client, round }
                | Action::CancelEvaluation { client, round } => {
                    children.kill(&client);
                    if let Some(c) = clients.get_mut(&client) {
                        c.running = false;
                    }
                    progress.note(&format!(
                        "round {round}: client {client} cut off at the deadline"
                    ));
                }
                Action::StartClient {
                    client,
                    round,
                    attempt,
                } => {
                    if children.len() >= opts.parallel {
                        continue;
                    }
                    if round_started.is_none() {
                        round_started = Some((round, Instant::now()));
                    }
                    let global =
                        staging::ensure_global(&store, &layout, &trainer, &work, round - 1).await?;
                    let dirs = process::ClientDirs::new(&work, &client, round);
                    let child =
                        trainer.spawn_train(&client, round, attempt, &global, &dirs, tx.clone());
                    started_any |= track(&mut children, &mut clients, &client, child);
                }
                Action::StartEvaluation {
                    client,
                    round,
                    attempt,
                } => {
                    if children.len() >= opts.parallel {
                        continue;
                    }
                    if round_started.is_none() {
                        round_started = Some((round + 1, Instant::now()));
                    }
                    let global =
                        staging::ensure_global(&store, &layout, &trainer, &work, round).await?;
                    // The client's newest private state (after the last round it finished).
                    let dirs = process::ClientDirs::new(&work, &client, round + 1);
                    let out = work
                        .join("evaluation")
                        .join(format!("round-{round:04}"))
                        .join(format!("{}.json", heterotune_crds::uri::file_safe(&client)));
                    let child = trainer.spawn_eval(
                        &client,
                        round,
                        attempt,
                        &global,
                        &dirs,
                        &out,
                        tx.clone(),
                    );
                    started_any |= track(&mut children, &mut clients, &client, child);
                }
                Action::StartAggregation {
                    round,
                    participants,
                    attempt,
                } => {
                    progress.aggregating(round, participants.len());
                    let agg_start = Instant::now();
                    match staging::aggregate(&store, &layout, &work, &trainer, round, &participants)
                        .await
                    {
                        Ok(()) => {
                            summary::note_aggregation(
                                &mut report,
                                round,
                                agg_start.elapsed().as_secs_f64(),
                            );
                            // Retention is housekeeping: a failure is reported
                            // and retried after the next round, never fatal.
                            if let Some(keep) = spec.retention.keep_client_rounds {
                                match store.prune_client_rounds(&layout, round, keep).await {
                                    Ok(0) => {}
                                    Ok(n) => tracing::info!(
                                        round,
                                        keep,
                                        objects = n,
                                        "retention.keepClientRounds: removed old client artifacts"
                                    ),
                                    Err(e) => progress.note(&format!(
                                        "retention.keepClientRounds: could not prune: {e}"
                                    )),
                                }
                            }
                        }
                        Err(e) => {
                            aggregation_failures = attempt;
                            progress.note(&format!(
                                "round {round}: aggregation attempt {attempt} failed: {e}"
                            ));
                        }
                    }
                    started_any = true;
                }
            }
        }
        if started_any {
            continue;
        }
        // Wait for a trainer to finish, the next deadline, or Ctrl-C.
        let wait = plan.requeue_after.unwrap_or(3600.0).clamp(0.05, 3600.0);
        tokio::select! {
            exit = rx.recv() => {
                if let Some(exit) = exit {
                    children.remove(&exit.client);
                    let mut failed = None;
                    if exit.evaluation {
                        if exit.ok {
                            let key = layout.evaluation_result(exit.round, &exit.client);
                            match store.upload_file(&exit.out_dir, &key).await {
                                Ok(_) => progress.client_evaluated(&exit.client, &exit.summary),
                                Err(e) => failed = Some(e.to_string()),
                            }
                        } else {
                            failed = Some(exit.summary.clone());
                        }
                    } else if exit.ok && exit.round == round {
                        match store.upload_artifact(&exit.out_dir, &layout.client_dir(exit.round, &exit.client)).await {
                            Ok(_) => {
                                progress.client_done(&exit.client, &exit.summary);
                                let _ = std::fs::remove_dir_all(&exit.out_dir);
                            }
                            Err(e) => failed = Some(e.to_string()),
                        }
                    } else if !exit.ok {
                        failed = Some(exit.summary.clone());
                    }
                    if let Some(c) = clients.get_mut(&exit.client) {
                        c.running = false;
                        if let Some(why) = failed {
                            c.failed_attempts += 1;
                            let what = if exit.evaluation { "evaluation" } else { "attempt" };
                            progress.note(&format!("round {}: client {} {what} failed: {why}", exit.round, exit.client));
                            c.last_error = Some(why);
                        }
                    }
                }
            }
            _ = tokio::time::sleep(std::time::Duration::from_secs_f64(wait)) => {}
            _ = tokio::signal::ctrl_c() => {
                children.kill_all();
                progress.note("interrupted: stopping trainers");
                return Err(RunError::Interrupted);
            }
        }
    }
}

/// Records a trainer process that started (running) or could not start (a
/// failed attempt); true when it started.
fn track(
    children: &mut process::Children,
    clients: &mut BTreeMap<String, ClientRun>,
    client: &str,
    child: Result<tokio::sync::oneshot::Sender<()>, String>,
) -> bool {
    let state = clients.get_mut(client);
    match child {
        Ok(handle) => {
            children.insert(client.to_string(), handle);
            if let Some(c) = state {
                c.running = true;
            }
            true
        }
        Err(e) => {
            if let Some(c) = state {
                c.failed_attempts += 1;
                c.last_error = Some(e);
            }
            false
        }
    }
}

async fn write_report(report: &Report, dir: &Path, store: &Store, layout: &RunLayout) {
    match report.write(dir) {
        Ok(files) => {
            for file in files {
                if let (Ok(bytes), Some(name)) = (std::fs::read(&file), file.file_name()) {
                    let key = format!("{}/{}", layout.report_dir(), name.to_string_lossy());
                    if let Err(e) = store.put(&key, bytes.into()).await {
                        tracing::warn!(error = %e, "could not upload the report");
                    }
                }
            }
        }
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "could not write the report"),
    }
}
