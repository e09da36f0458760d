//! Setting a run up: the spec file checked, the run's place in the store
//! (a new run records its spec, a resumed one must match it), inputs staged,
//! round 0's global state, and the report of the rounds already done.

use std::path::PathBuf;
use std::time::Instant;

use heterotune_crds::layout::RunLayout;
use heterotune_crds::validate::{check_object, Problems};
use heterotune_crds::FederatedTune;
use serde_json::Value;
use tokio::sync::mpsc;

use super::executor::Runner;
use super::lease::Lease;
use super::options::{RunError, RunOptions};
use super::progress::Progress;
use super::schedule::Schedule;
use super::state::RoundState;
use super::summary;
use crate::execution::staging::{self, ModelFiles};
use crate::execution::trainer::{Children, TrainerCommand};
use crate::input::checks;
use crate::input::spec_file::{self, SpecFileError};
use crate::protocol::observe::{RunReader, RunRef};
use crate::protocol::store::Store;
use heterotune_crds::digest::sha256_hex;

impl Runner {
    /// Sets the run up (a resumed run's report holds its completed rounds).
    pub async fn start(opts: RunOptions) -> Result<Runner, RunError> {
        let started = Instant::now();
        let (ft, value) = load(&opts)?;
        let spec = ft.spec.clone();
        let name = ft.metadata.name.clone().unwrap_or_default();
        let namespace = ft
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let cwd = std::env::current_dir()
            .map_err(|e| RunError::local(format!("current directory: {e}")))?;
        let store = Store::from_spec(&spec.storage, &cwd)?;
        let layout = RunLayout::new(
            store.prefix(),
            &namespace,
            &name,
            &local_uid(&namespace, &name),
        );
        // One process drives a run: a second one refuses, naming the holder.
        let lease = Lease::acquire(&store, &layout, opts.lease_heartbeat).await?;
        if opts.fresh {
            let n = delete_run_but_lease(&store, &layout).await?;
            let _ = std::fs::remove_dir_all(opts.work_dir.join(layout.run_dir()));
            tracing::info!(
                run = layout.run_dir(),
                objects = n,
                "--fresh: deleted the previous run"
            );
        }
        record_spec(&store, &layout, &value).await?;

        let work = opts.work_dir.join(layout.run_dir());
        let spec_json = write_spec(&work, &value)?;
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
            spec: spec_json,
            threads: opts.threads_per_trainer,
            run: layout.run_dir().to_string(),
            staged,
            live_logs: false,
            time_cpu_dtype: true,
        };
        let progress = Progress::new(opts.json, spec.rounds, spec.clients.len());
        let report = summary::new_report(&ft, layout.run_dir());

        // Round 0: the initial global state every client starts from.
        staging::ensure_global(&store, &layout, &trainer, &work, 0).await?;
        let report_dir = opts
            .report_dir
            .clone()
            .unwrap_or_else(|| work.join("report"));
        let run = RunRef {
            storage: spec.storage.clone(),
            layout: layout.clone(),
            clients: spec.clients.iter().map(|c| c.name.clone()).collect(),
            rounds: spec.rounds,
        };
        let (exits, exited) = mpsc::unbounded_channel();
        let mut runner = Runner {
            opts,
            spec,
            store,
            layout,
            run,
            reader: RunReader::default(),
            work,
            trainer,
            progress,
            report,
            report_dir,
            started,
            earlier_seconds: 0.0,
            epoch: Instant::now(),
            completed: 0,
            facts: Default::default(),
            evaluated: Vec::new(),
            round: 1,
            state: RoundState::default(),
            schedule: Schedule::new(&ft.spec),
            children: Children::default(),
            exits,
            exited,
            lease: Some(lease),
        };
        // A resumed run: its completed rounds are in the store.
        runner.rebuild_report().await?;
        runner.epoch = Instant::now();
        Ok(runner)
    }
}

/// `--fresh`: deletes every object of the run but its lease; returns how many.
async fn delete_run_but_lease(store: &Store, layout: &RunLayout) -> Result<usize, RunError> {
    let lease_dir = format!("{}/", layout.lease_dir());
    let mut n = 0;
    for key in store.list(layout.run_dir()).await? {
        if !key.starts_with(&lease_dir) {
            store.delete(&key).await?;
            n += 1;
        }
    }
    Ok(n)
}

/// Creates the run's working folder and writes the spec the trainers read.
fn write_spec(work: &std::path::Path, value: &Value) -> Result<PathBuf, RunError> {
    std::fs::create_dir_all(work)
        .map_err(|e| RunError::local(format!("{}: {e}", work.display())))?;
    let spec_json = work.join("spec.json");
    std::fs::write(
        &spec_json,
        serde_json::to_vec_pretty(value).unwrap_or_default(),
    )
    .map_err(|e| RunError::local(format!("{}: {e}", spec_json.display())))?;
    Ok(spec_json)
}

/// A stable stand-in for the UID a cluster would give: local runs of the
/// same name resume the same run.
pub fn local_uid(namespace: &str, name: &str) -> String {
    let digest = sha256_hex(format!("local:{namespace}/{name}").as_bytes());
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
    if let Some(bytes) = store.get(&key).await? {
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
    }
    // A new run's spec, or a resumed run's new one (rounds may have grown).
    store
        .put(
            &key,
            serde_json::to_vec_pretty(value).unwrap_or_default().into(),
        )
        .await?;
    Ok(())
}
