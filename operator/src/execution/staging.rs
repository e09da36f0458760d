//! Copies between the object store and a local work folder around trainer
//! processes, shared by the local runner (`heterotune run`) and the cluster
//! pods (`heterotune job`):
//!
//! * inputs: `s3://` models and datasets the spec names are copied to local
//!   folders once and listed in a `HETEROTUNE_STAGED` file, so the trainer
//!   (which never talks to object storage) finds them while the spec keeps
//!   its URIs (family keys and manifests do not change);
//! * the previous round's global artifact (round 0 is made by
//!   `heterotune-trainer init` when missing: it is a pure function of the
//!   spec, so two writers racing produce the same tensors);
//! * an aggregation: the participants' artifacts in, the global out (data,
//!   then the manifest that completes the round).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use heterotune_crds::layout::{RunLayout, MANIFEST_FILE};
use heterotune_crds::model::CONFIG_FILE;
use heterotune_crds::spec::{FederatedTuneSpec, StorageSpec};
use heterotune_crds::uri::{self, Location};

use super::trainer::TrainerCommand;
use crate::protocol::commit::{self, Commit};
use crate::protocol::store::{Store, StoreError};

/// File that marks a staged folder as complete.
const COMPLETE_MARKER: &str = ".heterotune-staged";

/// Staging errors: each names what is missing and where.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{field}: {message}")]
    Input { field: String, message: String },
    #[error("{path}: {source}")]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the global artifact of round {round} is missing from {store} ({key}): round {next} cannot start before round {round} is aggregated")]
    MissingGlobal {
        round: u32,
        next: u32,
        store: String,
        key: String,
    },
    #[error("{0}")]
    Trainer(String),
}

fn local_err(path: &Path) -> impl FnOnce(std::io::Error) -> StagingError + '_ {
    move |source| StagingError::Local {
        path: path.to_path_buf(),
        source,
    }
}

/// Which parts of each client's model to stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFiles {
    /// Every file (the client trains it).
    All,
    /// Only `config.json` (enough to size adapters and slots).
    Config,
}

/// A store per bucket for `s3://` inputs, with the run's endpoint, region,
/// addressing and credentials.
struct Buckets<'a> {
    storage: &'a StorageSpec,
    base: &'a Path,
    open: BTreeMap<String, Store>,
}

impl Buckets<'_> {
    fn get(&mut self, bucket: &str) -> Result<&Store, StoreError> {
        if !self.open.contains_key(bucket) {
            let spec = StorageSpec {
                uri: format!("s3://{bucket}"),
                ..self.storage.clone()
            };
            let store = Store::from_spec(&spec, self.base)?;
            self.open.insert(bucket.to_string(), store);
        }
        Ok(&self.open[bucket])
    }
}

/// A local folder name for `uri`: its last path segment plus a hash, so two
/// URIs never share a folder.
fn folder_for(uri: &str) -> String {
    let key = uri::staging_key(uri);
    let clean = uri::file_safe(key.rsplit('/').next().unwrap_or("input"));
    let hash = heterotune_crds::digest::sha256_hex(key.as_bytes());
    format!("{}-{}", &hash[..12], clean)
}

/// Stages the spec's `s3://` inputs under `dir`: the models of the clients
/// `models` selects (all files for `ModelFiles::All`, else `config.json`),
/// and every dataset file. Returns the `HETEROTUNE_STAGED` file to hand the
/// trainer, or `None` when nothing is in object storage. Folders already
/// staged (complete) are reused.
pub async fn stage_inputs(
    spec: &FederatedTuneSpec,
    storage: &StorageSpec,
    base: &Path,
    dir: &Path,
    models: impl Fn(usize) -> ModelFiles,
) -> Result<Option<PathBuf>, StagingError> {
    let mut buckets = Buckets {
        storage,
        base,
        open: BTreeMap::new(),
    };
    let mut staged: BTreeMap<String, PathBuf> = BTreeMap::new();
    // Models: the widest need of any client using the same URI wins.
    let mut wanted: BTreeMap<&str, (ModelFiles, String)> = BTreeMap::new();
    for (i, c) in spec.clients.iter().enumerate() {
        let need = models(i);
        let field = format!("spec.clients[{i}].model.uri");
        let entry = wanted
            .entry(uri::staging_key(&c.model.uri))
            .or_insert((need, field));
        if need == ModelFiles::All {
            entry.0 = ModelFiles::All;
        }
    }
    if let Some(bridge) = &spec.bridge {
        let need = bridge_files(spec, &models);
        let entry = wanted
            .entry(uri::staging_key(&bridge.model.uri))
            .or_insert((need, "spec.bridge.model.uri".into()));
        if need == ModelFiles::All {
            entry.0 = ModelFiles::All;
        }
    }
    for (model_uri, (need, field)) in wanted {
        if let Some(local) = stage_model(&mut buckets, model_uri, need, field, dir).await? {
            staged.insert(model_uri.to_string(), local);
        }
    }
    stage_datasets(spec, &mut buckets, dir, &mut staged).await?;
    if staged.is_empty() {
        return Ok(None);
    }
    let file = dir.join("staged.json");
    std::fs::create_dir_all(dir).map_err(local_err(dir))?;
    let json = serde_json::to_vec_pretty(&staged).map_err(|e| StagingError::Input {
        field: "staged inputs".into(),
        message: e.to_string(),
    })?;
    std::fs::write(&file, json).map_err(local_err(&file))?;
    Ok(Some(file))
}

/// What of the bridge's model to stage: every client's trainer runs it, so
/// it needs what the neediest client needs; the aggregator runs it too when
/// it distils the bridge (`bridge.distillation.serverSteps`), so then all
/// of it, whatever the clients need.
fn bridge_files(spec: &FederatedTuneSpec, models: impl Fn(usize) -> ModelFiles) -> ModelFiles {
    let distils = spec
        .bridge
        .as_ref()
        .is_some_and(|b| b.distillation.server_steps > 0);
    if distils || (0..spec.clients.len()).any(|i| models(i) == ModelFiles::All) {
        ModelFiles::All
    } else {
        ModelFiles::Config
    }
}

/// Stages one `s3://` model under `dir/models` (`None` for a local model).
async fn stage_model(
    buckets: &mut Buckets<'_>,
    model_uri: &str,
    need: ModelFiles,
    field: String,
    dir: &Path,
) -> Result<Option<PathBuf>, StagingError> {
    let Ok(Location::S3 { bucket, key }) = uri::resolve(model_uri) else {
        return Ok(None);
    };
    let local = dir.join("models").join(folder_for(model_uri));
    let marker = local.join(COMPLETE_MARKER);
    let have_all = marker.is_file();
    let store = buckets.get(&bucket)?;
    match need {
        ModelFiles::All if !have_all => {
            let partial = local.with_extension("partial");
            let _ = std::fs::remove_dir_all(&partial);
            let n = store.download_prefix(&key, &partial).await?;
            if n == 0 || !partial.join(CONFIG_FILE).is_file() {
                return Err(StagingError::Input {
                    field,
                    message: format!(
                        "{model_uri} holds no model (no config.json under s3://{bucket}/{key}/): \
                         upload the Hugging Face model folder there"
                    ),
                });
            }
            std::fs::write(partial.join(COMPLETE_MARKER), b"").map_err(local_err(&partial))?;
            let _ = std::fs::remove_dir_all(&local);
            std::fs::rename(&partial, &local).map_err(local_err(&local))?;
        }
        ModelFiles::Config if !have_all && !local.join(CONFIG_FILE).is_file() => {
            let config_key = format!("{key}/{CONFIG_FILE}");
            if !store
                .download_file(&config_key, &local.join(CONFIG_FILE))
                .await?
            {
                return Err(StagingError::Input {
                    field,
                    message: format!(
                        "{model_uri} has no config.json (s3://{bucket}/{config_key}): upload the \
                         Hugging Face model folder there"
                    ),
                });
            }
        }
        _ => {}
    }
    Ok(Some(local))
}

/// Stages the `s3://` dataset files (the task's and the per-client shards)
/// under `dir/data`, recording each in `staged`.
async fn stage_datasets(
    spec: &FederatedTuneSpec,
    buckets: &mut Buckets<'_>,
    dir: &Path,
    staged: &mut BTreeMap<String, PathBuf>,
) -> Result<(), StagingError> {
    let mut files: Vec<(String, String)> = vec![(
        spec.task.dataset.uri.clone(),
        "spec.task.dataset.uri".to_string(),
    )];
    // A site's data lives at the site: never staged by the coordinator.
    for (i, c) in spec.clients.iter().enumerate() {
        if let Some(data) = c.data.as_ref().filter(|_| !c.is_remote()) {
            files.push((data.uri.clone(), format!("spec.clients[{i}].data.uri")));
        }
    }
    for (file_uri, field) in files {
        let Ok(Location::S3 { bucket, key }) = uri::resolve(&file_uri) else {
            continue;
        };
        let name = key.rsplit('/').next().unwrap_or("data").to_string();
        let local = dir.join("data").join(folder_for(&file_uri)).join(name);
        if !local.is_file() {
            let store = buckets.get(&bucket)?;
            if !store.download_file(&key, &local).await? {
                return Err(StagingError::Input {
                    field,
                    message: format!("{file_uri} does not exist in the store"),
                });
            }
        }
        staged.insert(uri::staging_key(&file_uri).to_string(), local);
    }
    Ok(())
}

/// The local folder of the global artifact of `round` under `work` (what
/// [`ensure_global`] fills).
pub fn global_dir(work: &Path, round: u32) -> PathBuf {
    work.join(format!("round-{round:04}/global"))
}

/// The local folder holding the global artifact of `round` under `work`,
/// downloaded when it is not there yet. Round 0 is initialised (and
/// committed) when the store does not have it; a writer that lost the
/// race to commit it uses the winner's.
pub async fn ensure_global(
    store: &Store,
    layout: &RunLayout,
    trainer: &TrainerCommand,
    work: &Path,
    round: u32,
) -> Result<PathBuf, StagingError> {
    let local = global_dir(work, round);
    if local.join(MANIFEST_FILE).is_file() {
        return Ok(local);
    }
    let _ = std::fs::remove_dir_all(&local);
    let key = layout.global_dir(round);
    if commit::download_artifact(store, &key, &local, u64::MAX).await? {
        return Ok(local);
    }
    if round > 0 {
        return Err(StagingError::MissingGlobal {
            round,
            next: round + 1,
            store: store.uri().to_string(),
            key,
        });
    }
    trainer.init(&local).await.map_err(StagingError::Trainer)?;
    if let Some(note) = commit::commit_artifact(store, &local, &key, None)
        .await?
        .second_writer_note("the initial global state")
    {
        tracing::info!("{note}");
        let _ = std::fs::remove_dir_all(&local);
        if !commit::download_artifact(store, &key, &local, u64::MAX).await? {
            return Err(StagingError::MissingGlobal {
                round,
                next: round + 1,
                store: store.uri().to_string(),
                key,
            });
        }
    }
    Ok(local)
}

/// Stages the participants' artifacts of `round` (each client's data at
/// most `max_artifact_bytes`, `spec.aggregation.maxArtifactBytes`, plus the
/// one byte that shows verification it is too large), runs the aggregation
/// and commits the global artifact (data, then the manifest that completes
/// the round, create-only). A writer that lost the race to commit it drops
/// its own global (the next round downloads the winner's).
pub async fn aggregate(
    store: &Store,
    layout: &RunLayout,
    work: &Path,
    trainer: &TrainerCommand,
    round: u32,
    participants: &[String],
    max_artifact_bytes: u64,
) -> Result<Commit, StagingError> {
    let stage = work.join("aggregate");
    let _ = std::fs::remove_dir_all(&stage);
    for client in participants {
        let dir = stage.join(format!("round-{round:04}/clients/{client}"));
        commit::download_artifact(
            store,
            &layout.client_dir(round, client),
            &dir,
            max_artifact_bytes,
        )
        .await?;
    }
    let previous = ensure_global(store, layout, trainer, work, round - 1).await?;
    let out = global_dir(work, round);
    let _ = std::fs::remove_dir_all(&out);
    trainer
        .aggregate(&stage, round, &previous, &out)
        .await
        .map_err(StagingError::Trainer)?;
    let done = commit::commit_artifact(store, &out, &layout.global_dir(round), None).await?;
    if matches!(done, Commit::AlreadyCommitted { .. }) {
        let _ = std::fs::remove_dir_all(&out);
    }
    let _ = std::fs::remove_dir_all(&stage);
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The aggregator stages only config.json of the clients' models, and
    /// all of the bridge's when it distils the bridge.
    #[test]
    fn the_bridge_is_staged_whole_for_an_aggregator_that_distils_it() {
        let spec = |steps: u32| {
            let yaml = format!(
                r#"
apiVersion: heterotune.dev/v1alpha1
kind: FederatedTune
metadata: {{ name: t }}
spec:
  clients:
    - {{ name: a, model: {{ family: bert, uri: "s3://b/models/m" }} }}
  task: {{ dataset: {{ uri: "s3://b/d.jsonl" }}, labels: [neg, pos], splits: {{ pool: 0.1 }} }}
  aggregation: {{ algorithm: fedavg }}
  bridge: {{ model: {{ family: bert, uri: "s3://b/models/l3" }}, distillation: {{ serverSteps: {steps} }} }}
"#
            );
            heterotune_crds::validate::parse_federated_tune(&yaml)
                .expect("valid")
                .spec
        };
        let aggregator = |_| ModelFiles::Config;
        assert_eq!(bridge_files(&spec(0), aggregator), ModelFiles::Config);
        assert_eq!(bridge_files(&spec(20), aggregator), ModelFiles::All);
        assert_eq!(bridge_files(&spec(0), |_| ModelFiles::All), ModelFiles::All);
    }

    #[test]
    fn staging_folders_are_distinct_and_plain() {
        let a = folder_for("s3://b/models/MiniLM-L6/");
        let b = folder_for("s3://b/other/MiniLM-L6");
        assert_ne!(a, b);
        assert!(a.ends_with("-MiniLM-L6"), "{a}");
        assert_eq!(a, folder_for("s3://b/models/MiniLM-L6"));
        let odd = folder_for("s3://b/x y/ä");
        assert!(odd
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
    }
}
