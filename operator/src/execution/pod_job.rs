//! `heterotune job`: what a trainer or aggregation pod runs.
//!
//! The trainer binary works on local folders only; a pod's job stages what
//! it needs from the object store into its scratch folder, runs the trainer
//! and commits the result, the same way the local runner does:
//!
//! * `train`: the spec's `s3://` inputs (this client's model in full, the
//!   others' `config.json`), the previous global artifact (round 0 is
//!   initialised when missing), and the client's newest private state
//!   (`<run>/private/<client>/`), then training; then the new private state,
//!   then the adapter, then its manifest (the commit, create-only: a
//!   duplicate pod that loses the race exits 0 naming the winner);
//! * `aggregate`: the participants' artifacts and the previous global, then
//!   the aggregation, then the global artifact (data, then the manifest that
//!   completes the round), then `spec.retention.keepClientRounds`;
//! * `evaluate`: after the last round, the client's model, the data, the
//!   last global artifact and the client's newest private state, then the
//!   evaluation on the global test set, then its result
//!   (`round-NNNN/evaluation/<client>.json`, one object: the commit).
//!
//! Both are idempotent: a job whose result is already committed (a pod that
//! died after its upload, a duplicate from a restarted operator) exits 0
//! without doing anything again.

use std::path::{Path, PathBuf};

use heterotune_crds::digest::sha256_hex;
use heterotune_crds::layout::{latest_state_before, parse_state_name, state_file_name, RunLayout};
use heterotune_crds::FederatedTune;

use super::trainer::{ClientDirs, TrainerCommand};
use crate::execution::staging::{self, ModelFiles, StagingError};
use crate::input::spec_file::{self, SpecFileError};
use crate::protocol::commit::{self, Commit};
use crate::protocol::observe::reader::read_manifest;
use crate::protocol::store::{Store, StoreError};

/// Where and how a job runs.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// The FederatedTune document (the operator's ConfigMap: apiVersion,
    /// kind, metadata with name, namespace and uid, and the spec).
    pub spec_file: PathBuf,
    /// The pod's scratch folder.
    pub work: PathBuf,
    /// The `heterotune-trainer` binary.
    pub trainer: PathBuf,
    /// libtorch threads (the CPUs this container may use).
    pub threads: usize,
}

/// What a job did.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// Trained and committed; bytes uploaded (adapter and manifest).
    Trained { bytes: u64 },
    /// Aggregated and committed the round's global artifact.
    Aggregated { pruned: usize },
    /// Evaluated the global model and committed the result.
    Evaluated { accuracy: f64 },
    /// The result was already committed, by `by` (another writer: this
    /// job's copy, if any, was discarded).
    AlreadyCommitted { by: String },
    /// The round was already aggregated (nothing left to do).
    RoundComplete,
}

impl std::fmt::Display for JobOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobOutcome::Trained { bytes } => write!(f, "committed ({bytes} bytes uploaded)"),
            JobOutcome::Aggregated { pruned } => write!(
                f,
                "global artifact committed ({pruned} old client objects pruned)"
            ),
            JobOutcome::Evaluated { accuracy } => write!(
                f,
                "evaluation committed (global test accuracy {accuracy:.4})"
            ),
            JobOutcome::AlreadyCommitted { by } => {
                write!(f, "already committed by {by}: nothing to do")
            }
            JobOutcome::RoundComplete => {
                f.write_str("the round is already aggregated: nothing to do")
            }
        }
    }
}

/// Job errors: each names the input and the fix.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Spec(#[from] SpecFileError),
    #[error("{file}: {field} is missing: the spec document needs the FederatedTune's metadata.name, metadata.namespace and metadata.uid (the operator's ConfigMap has them)")]
    MissingMetadata { file: PathBuf, field: &'static str },
    #[error("{flag}: {message}")]
    Argument { flag: &'static str, message: String },
    #[error("{path}: {source}")]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error("round {round}: the aggregation rejected the artifacts of {clients}: set aside, they train again within maxRetriesPerClient; {error}")]
    SetAside {
        round: u32,
        clients: String,
        error: StagingError,
    },
}

/// The run a job belongs to.
struct Loaded {
    ft: FederatedTune,
    /// The spec document as read (what `<run>/spec.json` records).
    value: serde_json::Value,
    layout: RunLayout,
    store: Store,
    /// The validated spec (defaults applied) handed to the trainer.
    spec_json: PathBuf,
    /// What relative local paths in the spec are relative to.
    base: PathBuf,
}

fn load(opts: &JobOptions) -> Result<Loaded, JobError> {
    let file = &opts.spec_file;
    let (ft, value) = spec_file::read(file)?;
    let missing = |field| JobError::MissingMetadata {
        file: file.clone(),
        field,
    };
    let meta = &ft.metadata;
    let name = meta.name.clone().ok_or_else(|| missing("metadata.name"))?;
    let namespace = meta
        .namespace
        .clone()
        .ok_or_else(|| missing("metadata.namespace"))?;
    let uid = meta.uid.clone().ok_or_else(|| missing("metadata.uid"))?;
    std::fs::create_dir_all(&opts.work).map_err(|e| JobError::Local {
        path: opts.work.clone(),
        source: e,
    })?;
    // A folder store (a local try-out; clusters use s3://) is relative to
    // the current directory, as for `heterotune run`.
    let base = std::env::current_dir().unwrap_or_else(|_| opts.work.clone());
    let store = Store::from_spec(&ft.spec.storage, &base)?;
    let layout = RunLayout::new(store.prefix(), &namespace, &name, &uid);
    let spec_json = opts.work.join("spec.json");
    std::fs::write(
        &spec_json,
        serde_json::to_vec_pretty(&value).unwrap_or_default(),
    )
    .map_err(|e| JobError::Local {
        path: spec_json.clone(),
        source: e,
    })?;
    Ok(Loaded {
        ft,
        value,
        layout,
        store,
        spec_json,
        base,
    })
}

fn check_round(ft: &FederatedTune, round: u32) -> Result<(), JobError> {
    if round == 0 || round > ft.spec.rounds {
        return Err(JobError::Argument {
            flag: "--round",
            message: format!(
                "{round} is not a round of this run: use 1 to {} (spec.rounds)",
                ft.spec.rounds
            ),
        });
    }
    Ok(())
}

fn client_index(ft: &FederatedTune, client: &str, flag: &'static str) -> Result<usize, JobError> {
    ft.spec
        .clients
        .iter()
        .position(|c| c.name == client)
        .ok_or_else(|| JobError::Argument {
            flag,
            message: format!(
                "no client {client:?} in spec.clients ({})",
                ft.spec
                    .clients
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

/// Stages the spec's `s3://` inputs (`models` says which files of each
/// client's model) into the work folder and returns the trainer command
/// that finds them.
async fn staged_trainer(
    opts: &JobOptions,
    run: &Loaded,
    models: impl Fn(usize) -> ModelFiles,
) -> Result<TrainerCommand, JobError> {
    let spec = &run.ft.spec;
    let staged = staging::stage_inputs(
        spec,
        &spec.storage,
        &run.base,
        &opts.work.join("staged"),
        models,
    )
    .await?;
    Ok(TrainerCommand {
        binary: opts.trainer.clone(),
        spec: run.spec_json.clone(),
        threads: opts.threads,
        run: run.layout.run_dir().to_string(),
        staged,
        live_logs: true,
        time_cpu_dtype: false,
    })
}

/// What a client's own pod stages: its model in full, the others'
/// `config.json` (slots, initial state).
fn own_model(index: usize) -> impl Fn(usize) -> ModelFiles {
    move |i| {
        if i == index {
            ModelFiles::All
        } else {
            ModelFiles::Config
        }
    }
}

/// Trains `client` for `round` on `device` and commits its artifact.
pub async fn train(
    opts: &JobOptions,
    client: &str,
    round: u32,
    device: &str,
) -> Result<JobOutcome, JobError> {
    let run = load(opts)?;
    record_spec(&run).await?;
    check_round(&run.ft, round)?;
    let index = client_index(&run.ft, client, "--client")?;
    let (store, layout) = (&run.store, &run.layout);
    if store.exists(&layout.global_manifest(round)).await? {
        return Ok(JobOutcome::RoundComplete);
    }
    if let Some(done) = commit::committed_by(store, &layout.client_manifest(round, client)).await? {
        return Ok(JobOutcome::AlreadyCommitted { by: done.writer() });
    }
    let trainer = staged_trainer(opts, &run, own_model(index)).await?;
    let global = staging::ensure_global(store, layout, &trainer, &opts.work, round - 1).await?;

    // The private state: the newest one saved before this round.
    let (state_in, names) = stage_private_state(&run, client, round, &opts.work).await?;
    let state_dir = opts.work.join("state");
    let dirs = ClientDirs {
        out: opts.work.join(format!("round-{round:04}/out")),
        state_in,
        state_out: state_dir.join(state_file_name(round)),
        cache: opts.work.join("prefix-cache"),
        log: opts.work.join("trainer.log"),
    };
    let summary = trainer
        .train(client, round, device, &global, &dirs)
        .await
        .map_err(StagingError::Trainer)?;
    print!("{summary}");
    // The private state before the commit, under its digest, which the
    // committed manifest names: a committed artifact always has the state it
    // was trained into, and a duplicate pod that loses the commit cannot
    // replace it (its state lands under another key and is never read).
    if dirs.state_out.is_file() {
        let state = commit::read_local(&dirs.state_out)?;
        let sha = sha256_hex(&state);
        store
            .put(&layout.client_state(client, round, &sha), state.into())
            .await?;
        commit::stamp_private_state(&dirs.out, &sha)?;
    }
    let key_dir = layout.client_dir(round, client);
    let bytes = match commit::commit_artifact(store, &dirs.out, &key_dir, Some(&global)).await? {
        Commit::Created { bytes } => bytes,
        done => return Ok(JobOutcome::AlreadyCommitted { by: done.writer() }),
    };
    // Older states are never read again.
    let private = layout.private_dir(client);
    for name in names {
        if latest_state_before([name.as_str()], round).is_some() {
            if let Err(e) = store.delete(&format!("{private}/{name}")).await {
                tracing::warn!(error = %e, "could not delete an old private state");
            }
        }
    }
    Ok(JobOutcome::Trained { bytes })
}

/// Records the run's spec in the store (`<run>/spec.json`, as `heterotune
/// run` does) when it is missing or differs, so that a site's agent checks
/// the spec it joined against the operator's run (docs/sites.md). Every job
/// writes the same document of its generation; the operator's admission
/// rules have already checked how it may change.
async fn record_spec(run: &Loaded) -> Result<(), JobError> {
    let bytes = serde_json::to_vec_pretty(&run.value).unwrap_or_default();
    run.store
        .put_if_changed(&run.layout.spec_file(), bytes)
        .await?;
    Ok(())
}

/// Downloads `client`'s newest private state saved before `round` into
/// `work/state/`; returns its local path (none before the client's first
/// round) and the names of every state in the store.
///
/// Of a round's states, the one its committed client manifest names
/// (`privateStateSha256`) counts; a round whose manifest names none (an
/// older run) takes its undigested state. Where the manifest is gone
/// (retention pruned it, or the round was never committed: the client was
/// cut off) a round's only state is taken as before, and of several (a
/// duplicate pod's among them) none: the client resumes from an older one.
async fn stage_private_state(
    run: &Loaded,
    client: &str,
    round: u32,
    work: &Path,
) -> Result<(Option<PathBuf>, Vec<String>), JobError> {
    let (store, layout) = (&run.store, &run.layout);
    let private = layout.private_dir(client);
    let names = store.file_names(&private).await?;
    let mut by_round: std::collections::BTreeMap<u32, Vec<(Option<&str>, &str)>> =
        std::collections::BTreeMap::new();
    for name in &names {
        if let Some((r, sha)) = parse_state_name(name).filter(|(r, _)| *r < round) {
            by_round.entry(r).or_default().push((sha, name));
        }
    }
    for (&from, states) in by_round.iter().rev() {
        let manifest = read_manifest(store, &layout.client_manifest(from, client)).await?;
        let chosen = match manifest.as_ref().map(|m| m.private_state_sha256.as_deref()) {
            Some(Some(sha)) => states
                .iter()
                .find(|(s, _)| s.is_some_and(|s| s.eq_ignore_ascii_case(sha))),
            Some(None) => states.iter().find(|(s, _)| s.is_none()),
            None => match states.as_slice() {
                [only] => Some(only),
                _ => None,
            },
        };
        let Some(&(sha, name)) = chosen else {
            tracing::warn!(
                client,
                from,
                states = states.len(),
                "no private state of this round is the committed one: resuming from an older one"
            );
            continue;
        };
        let local = work.join("state").join(name);
        let key = format!("{private}/{name}");
        if !store.download_file(&key, &local).await? {
            return Err(StoreError::Config {
                uri: store.uri().to_string(),
                message: format!("{key} disappeared while staging it"),
            }
            .into());
        }
        if let Some(sha) = sha {
            let got = sha256_hex(&commit::read_local(&local)?);
            if !got.eq_ignore_ascii_case(sha) {
                return Err(StoreError::Config {
                    uri: store.uri().to_string(),
                    message: format!(
                        "{key} is damaged (its sha256 is {got}): delete it, and the client \
                         resumes from its previous state"
                    ),
                }
                .into());
            }
        }
        tracing::info!(client, round, from, "resuming from the private state");
        return Ok((Some(local), names));
    }
    Ok((None, names))
}

/// Evaluates `client` on the global model of `round` (the last) on
/// `device` and commits the result.
pub async fn evaluate(
    opts: &JobOptions,
    client: &str,
    round: u32,
    device: &str,
) -> Result<JobOutcome, JobError> {
    let run = load(opts)?;
    record_spec(&run).await?;
    if round != run.ft.spec.rounds {
        return Err(JobError::Argument {
            flag: "--round",
            message: format!(
                "{round}: the evaluation is of the last round's global model, {} (spec.rounds)",
                run.ft.spec.rounds
            ),
        });
    }
    let index = client_index(&run.ft, client, "--client")?;
    let (store, layout) = (&run.store, &run.layout);
    let key = layout.evaluation_result(round, client);
    if store.exists(&key).await? {
        return Ok(JobOutcome::AlreadyCommitted {
            by: "an earlier evaluation".into(),
        });
    }
    if !store.exists(&layout.global_manifest(round)).await? {
        return Err(JobError::Argument {
            flag: "--round",
            message: format!(
                "round {round} is not aggregated yet ({} has no {}): the evaluation runs after the last aggregation",
                store.uri(),
                layout.global_manifest(round)
            ),
        });
    }
    let trainer = staged_trainer(opts, &run, own_model(index)).await?;
    let global = staging::ensure_global(store, layout, &trainer, &opts.work, round).await?;
    let (state_in, _) = stage_private_state(&run, client, round + 1, &opts.work).await?;
    let out = opts.work.join(format!("evaluation-round-{round:04}.json"));
    let stdout = trainer
        .evaluate(
            client,
            device,
            &global,
            state_in.as_deref(),
            &opts.work.join("prefix-cache"),
            &out,
        )
        .await
        .map_err(StagingError::Trainer)?;
    print!("{stdout}");
    let result: heterotune_crds::manifest::EvaluationResult =
        serde_json::from_slice(&std::fs::read(&out).map_err(|e| JobError::Local {
            path: out.clone(),
            source: e,
        })?)
        .map_err(|e| {
            StagingError::Trainer(format!(
                "the trainer's evaluation {} is not readable: {e}",
                out.display()
            ))
        })?;
    if !store.create_file(&out, &key).await? {
        return Ok(JobOutcome::AlreadyCommitted {
            by: "a concurrent evaluation".into(),
        });
    }
    Ok(JobOutcome::Evaluated {
        accuracy: result.accuracy,
    })
}

/// Aggregates `round` over `participants` and commits the global artifact.
/// When the quorum fails because artifacts were rejected, those are set
/// aside (as the local runner does) before the Job fails, so that their
/// clients train again within their retries and the next attempt
/// aggregates what they commit.
pub async fn aggregate(
    opts: &JobOptions,
    round: u32,
    attempt: u32,
    participants: &[String],
) -> Result<JobOutcome, JobError> {
    let run = load(opts)?;
    record_spec(&run).await?;
    check_round(&run.ft, round)?;
    if participants.is_empty() {
        return Err(JobError::Argument {
            flag: "--participants",
            message: "empty: name the clients whose artifacts to aggregate".into(),
        });
    }
    for p in participants {
        client_index(&run.ft, p, "--participants")?;
    }
    let (store, layout, spec) = (&run.store, &run.layout, &run.ft.spec);
    if store.exists(&layout.global_manifest(round)).await? {
        return Ok(JobOutcome::RoundComplete);
    }
    let trainer = staged_trainer(opts, &run, |_| ModelFiles::Config).await?;
    let done = match staging::aggregate(
        store,
        layout,
        &opts.work,
        &trainer,
        round,
        participants,
        spec.aggregation.max_artifact_bytes,
    )
    .await
    {
        Ok(done) => done,
        Err(error) => {
            let text = error.to_string();
            let outcome =
                commit::set_aside_rejected(store, layout, round, participants, &text, attempt)
                    .await;
            let mut aside = Vec::new();
            for (client, result) in outcome {
                match result {
                    Ok(()) => aside.push(client),
                    Err(e) => tracing::warn!(
                        round,
                        client,
                        error = %e,
                        "could not set a rejected artifact aside"
                    ),
                }
            }
            if aside.is_empty() {
                return Err(error.into());
            }
            return Err(JobError::SetAside {
                round,
                clients: aside.join(", "),
                error,
            });
        }
    };
    if let Commit::AlreadyCommitted { .. } = done {
        return Ok(JobOutcome::AlreadyCommitted { by: done.writer() });
    }
    // The round is committed: retention is housekeeping, never a failure of
    // the Job (the next round's aggregation prunes what this one could not).
    let pruned = match spec.retention.keep_client_rounds {
        Some(keep) => match store.prune_client_rounds(layout, round, keep).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "retention.keepClientRounds: could not prune");
                0
            }
        },
        None => 0,
    };
    Ok(JobOutcome::Aggregated { pruned })
}

/// The trainer binary next to `exe`, else `heterotune-trainer` on `PATH`.
pub fn default_trainer(exe: &Path) -> PathBuf {
    let sibling = exe.with_file_name("heterotune-trainer");
    if sibling.is_file() {
        return sibling;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("heterotune-trainer"))
                .find(|p| p.is_file())
        })
        .unwrap_or(sibling)
}
