//! Joining a run: the agent's options and errors, the shared spec and the
//! site's local copy of it (its own data, its own checkpoint), the run's
//! place in the store, and the check that the coordinator's spec is the
//! one the site joined.

use std::path::{Path, PathBuf};
use std::time::Duration;

use heterotune_crds::layout::RunLayout;
use heterotune_crds::spec::PartitionStrategy;
use heterotune_crds::uri;
use heterotune_crds::validate::{validate_value, Problems};
use heterotune_crds::FederatedTune;
use serde_json::{json, Value};

use crate::execution::staging::{self, ModelFiles, StagingError};
use crate::execution::trainer::TrainerCommand;
use crate::input::checks;
use crate::input::spec_file::{self, SpecFileError};
use crate::protocol::store::{Store, StoreError};
use crate::runner::local_uid;

/// How a site agent runs.
#[derive(Debug, Clone)]
pub struct SiteOptions {
    /// The FederatedTune the coordinator runs (metadata.uid for a cluster
    /// run; a local run's is derived from namespace and name).
    pub spec_file: PathBuf,
    /// The site's client in `spec.clients` (it must have `site`).
    pub client: String,
    /// The site's work folder: staged inputs, the client's private state,
    /// caches, logs.
    pub work: PathBuf,
    /// The `heterotune-trainer` binary.
    pub trainer: PathBuf,
    /// libtorch threads.
    pub threads: usize,
    /// `cpu`, `cuda` or `auto`.
    pub device: String,
    /// The site's own data file, replacing the client's `data.uri`.
    pub data_uri: Option<String>,
    /// A local copy of the client's `s3://` checkpoint, used instead of
    /// downloading it.
    pub model_dir: Option<PathBuf>,
    /// The shortest and the longest wait between looks at the store.
    pub poll: (Duration, Duration),
    /// Run even when the site's key can read other clients' uploads.
    pub allow_unconfined_credentials: bool,
}

/// Site agent errors: each names the input and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error(transparent)]
    Spec(#[from] SpecFileError),
    #[error("--client {client}: {message}")]
    Client { client: String, message: String },
    #[error("{flag}: {message}")]
    Override { flag: &'static str, message: String },
    #[error("the run {run} in {store} was started with a spec other than {file} (it differs in {fields}): this site refuses to train for it; get the coordinator's spec and start the agent again")]
    SpecChanged {
        run: String,
        store: String,
        file: PathBuf,
        fields: String,
    },
    #[error("the global artifact of round {round} in {store} ({key}) fails verification: {message}; the site does not train on it (tell the coordinator)")]
    Untrusted {
        round: u32,
        store: String,
        key: String,
        message: String,
    },
    #[error("this site's store key can read another client's upload ({key} in {store}): a key that reads other sites' updates can learn about their data. Confine it to this site's prefix (docs/sites.md has bucket policies for AWS and MinIO), or pass --allow-unconfined-credentials where every party may read every upload")]
    Unconfined { key: String, store: String },
    #[error(
        "{what} failed {attempts} times (maxRetriesPerClient is {retries}); the last error: {last}"
    )]
    Exhausted {
        what: String,
        attempts: u32,
        retries: u32,
        last: String,
    },
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
    /// The trainer failed (its last log lines).
    #[error("{0}")]
    Trainer(String),
}

impl SiteError {
    /// A failure another attempt may not repeat (the trainer, the local
    /// disk, staging); the others need a person.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SiteError::Trainer(_) | SiteError::Local { .. } | SiteError::Staging(_)
        )
    }
}

fn local(path: &Path) -> impl FnOnce(std::io::Error) -> SiteError + '_ {
    move |source| SiteError::Local {
        path: path.to_path_buf(),
        source,
    }
}

/// A site joined to one run.
pub(super) struct Site {
    pub opts: SiteOptions,
    /// The shared spec, as the coordinator runs it.
    pub ft: FederatedTune,
    pub store: Store,
    pub layout: RunLayout,
    /// This run's folder under the site's work folder.
    pub work: PathBuf,
    pub trainer: TrainerCommand,
}

/// What the store showed of the site key's reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Confinement {
    /// Reading another client's upload was refused.
    Confined,
    /// Nothing to try yet (no other upload, or listing refused), or a
    /// folder store (no keys).
    Unknown,
}

impl Site {
    /// Whether the site's key is confined to its own uploads, as far as the
    /// store shows in `round` and the round before: another client's upload
    /// there is looked at (a HEAD, no data read); refused means confined,
    /// and one that answers is [`SiteError::Unconfined`]. A folder store has
    /// no keys to confine: [`Confinement::Unknown`].
    pub async fn confinement(&self, round: u32) -> Result<Confinement, SiteError> {
        if !self.store.is_bucket() {
            return Ok(Confinement::Unknown);
        }
        for r in (round.saturating_sub(1).max(1)..=round).rev() {
            let clients = format!("{}/clients/", self.layout.round_dir(r));
            let own = format!("{}/", self.layout.client_dir(r, &self.opts.client));
            let keys = match self.store.list(&clients).await {
                Ok(keys) => keys,
                Err(e) if e.is_permission_denied() => return Ok(Confinement::Unknown),
                Err(e) => return Err(e.into()),
            };
            let Some(other) = keys.into_iter().find(|k| !k.starts_with(&own)) else {
                continue;
            };
            return match self.store.exists(&other).await {
                Ok(true) => Err(SiteError::Unconfined {
                    key: other,
                    store: self.store.uri().to_string(),
                }),
                Ok(false) => Ok(Confinement::Unknown),
                Err(e) if e.is_permission_denied() => Ok(Confinement::Confined),
                Err(e) => Err(e.into()),
            };
        }
        Ok(Confinement::Unknown)
    }

    /// Reads the spec, checks the client is this site's, writes the site's
    /// local copy (its data) and stages its inputs.
    pub async fn join(opts: SiteOptions) -> Result<Site, SiteError> {
        let (ft, value) = spec_file::read(&opts.spec_file)?;
        let index = site_client(&ft, &opts.client)?;
        let meta = &ft.metadata;
        let name = meta.name.clone().unwrap_or_default();
        let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
        let uid = meta
            .uid
            .clone()
            .unwrap_or_else(|| local_uid(&namespace, &name));
        let cwd = std::env::current_dir().map_err(local(Path::new(".")))?;
        let store = Store::from_spec(&ft.spec.storage, &cwd)?;
        let layout = RunLayout::new(store.prefix(), &namespace, &name, &uid);
        let work = opts.work.join(layout.run_dir());
        std::fs::create_dir_all(&work).map_err(local(&work))?;
        let mine = local_copy(&opts, &value, index)?;
        let spec_json = work.join("spec.json");
        let text = serde_json::to_vec_pretty(&mine.1).unwrap_or_default();
        std::fs::write(&spec_json, text).map_err(local(&spec_json))?;
        let staged = stage(&opts, &mine.0, index, &cwd).await?;
        let trainer = TrainerCommand {
            binary: opts.trainer.clone(),
            spec: spec_json,
            threads: opts.threads,
            run: layout.run_dir().to_string(),
            staged,
            live_logs: false,
            time_cpu_dtype: true,
        };
        Ok(Site {
            opts,
            ft,
            store,
            layout,
            work,
            trainer,
        })
    }

    /// Whether the run has recorded its spec (`false`: not yet), refusing
    /// one that differs from the spec this site joined.
    pub async fn spec_recorded(&self) -> Result<bool, SiteError> {
        let key = self.layout.spec_file();
        let Some(bytes) = self.store.get(&key).await? else {
            return Ok(false);
        };
        let changed = |fields: String| SiteError::SpecChanged {
            run: self.layout.run_dir().to_string(),
            store: self.store.uri().to_string(),
            file: self.opts.spec_file.clone(),
            fields,
        };
        let mut stored: Value = serde_json::from_slice(&bytes)
            .map_err(|e| changed(format!("everything ({key} is not JSON: {e})")))?;
        let theirs = validate_value(&mut stored, None)
            .map_err(|p| changed(format!("everything ({key} is not a valid spec: {p})")))?;
        if theirs.spec == self.ft.spec {
            return Ok(true);
        }
        Err(changed(differing_fields(&self.ft, &theirs)))
    }
}

/// The index of `client` in the spec, which must be a site's client.
fn site_client(ft: &FederatedTune, client: &str) -> Result<usize, SiteError> {
    let err = |message: String| SiteError::Client {
        client: client.to_string(),
        message,
    };
    let clients = &ft.spec.clients;
    let index = clients
        .iter()
        .position(|c| c.name == client)
        .ok_or_else(|| {
            let names: Vec<&str> = clients.iter().map(|c| c.name.as_str()).collect();
            err(format!("not in spec.clients ({})", names.join(", ")))
        })?;
    if !clients[index].is_remote() {
        return Err(err(format!(
            "spec.clients[{index}] has no site: the coordinator starts it itself; add `site: {{ name: <your site> }}` to it in the spec both sides use"
        )));
    }
    Ok(index)
}

/// The site's copy of the spec (typed and as JSON): its client runs here
/// (no `site`), on its own data when `--data` names it.
fn local_copy(
    opts: &SiteOptions,
    value: &Value,
    index: usize,
) -> Result<(FederatedTune, Value), SiteError> {
    let mut copy = value.clone();
    let client = &mut copy["spec"]["clients"][index];
    if let Some(obj) = client.as_object_mut() {
        obj.remove("site");
    }
    if let Some(data) = &opts.data_uri {
        client["data"] = json!({ "uri": data });
    }
    let ft =
        validate_value(&mut copy, None).map_err(|p| SpecFileError::invalid(&opts.spec_file, p))?;
    if opts.data_uri.is_some() && ft.spec.task.partition.strategy != PartitionStrategy::Shards {
        return Err(SiteError::Override {
            flag: "--data",
            message: "the spec's task.partition.strategy is not shards, so clients train on partitions of task.dataset and a site's own file is not read: use partition strategy shards".into(),
        });
    }
    let problems = checks::check_local_references(&ft.spec);
    if !problems.is_empty() {
        return Err(SpecFileError::invalid(&opts.spec_file, Problems(problems)).into());
    }
    Ok((ft, copy))
}

/// Stages the spec's `s3://` inputs for this site's client (its model in
/// full unless `--model` names a local copy, the others' config.json).
async fn stage(
    opts: &SiteOptions,
    ft: &FederatedTune,
    index: usize,
    cwd: &Path,
) -> Result<Option<PathBuf>, SiteError> {
    let spec = &ft.spec;
    let model_uri = &spec.clients[index].model.uri;
    let own = if opts.model_dir.is_some() {
        if !matches!(uri::resolve(model_uri), Ok(uri::Location::S3 { .. })) {
            return Err(SiteError::Override {
                flag: "--model",
                message: format!(
                    "spec.clients[{index}].model.uri is {model_uri}, not s3://: the site reads that path itself (the URI names the model family, so it cannot change); put the checkpoint there"
                ),
            });
        }
        ModelFiles::Config
    } else {
        ModelFiles::All
    };
    let dir = opts.work.join("staged");
    let models = |i| if i == index { own } else { ModelFiles::Config };
    let staged = staging::stage_inputs(spec, &spec.storage, cwd, &dir, models).await?;
    let Some(model_dir) = &opts.model_dir else {
        return Ok(staged);
    };
    let file = staged.unwrap_or_else(|| dir.join("staged.json"));
    let mut map: serde_json::Map<String, Value> = std::fs::read(&file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    map.insert(
        uri::staging_key(model_uri).to_string(),
        json!(model_dir.display().to_string()),
    );
    std::fs::create_dir_all(&dir).map_err(local(&dir))?;
    let text = serde_json::to_vec_pretty(&map).unwrap_or_default();
    std::fs::write(&file, text).map_err(local(&file))?;
    Ok(Some(file))
}

/// The top-level spec fields in which `a` and `b` differ.
fn differing_fields(a: &FederatedTune, b: &FederatedTune) -> String {
    let (a, b) = (json!(a.spec), json!(b.spec));
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return "spec".into();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let fields: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("spec.{k}"))
        .collect();
    if fields.is_empty() {
        "spec".into()
    } else {
        fields.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
apiVersion: heterotune.dev/v1alpha1
kind: FederatedTune
metadata: { name: t }
spec:
  clients:
    - { name: here, model: { family: bert, uri: "/m" } }
    - { name: there, model: { family: bert, uri: "/m" }, site: { name: clinic } }
  task: { dataset: { uri: "/d.jsonl" }, labels: [neg, pos] }
"#;

    fn parsed() -> (FederatedTune, Value) {
        let mut value = heterotune_crds::validate::parse_document(SPEC).expect("parses");
        let ft = validate_value(&mut value, None).expect("valid");
        (ft, value)
    }

    fn opts() -> SiteOptions {
        SiteOptions {
            spec_file: "spec.yaml".into(),
            client: "there".into(),
            work: "work".into(),
            trainer: "trainer".into(),
            threads: 1,
            device: "cpu".into(),
            data_uri: None,
            model_dir: None,
            poll: (Duration::from_secs(1), Duration::from_secs(2)),
            allow_unconfined_credentials: false,
        }
    }

    #[test]
    fn only_a_site_client_is_run_by_a_site() {
        let (ft, _) = parsed();
        assert_eq!(site_client(&ft, "there").expect("a site client"), 1);
        let e = site_client(&ft, "here")
            .expect_err("a local client")
            .to_string();
        assert!(e.contains("has no site") && e.contains("site: {"), "{e}");
        let e = site_client(&ft, "nobody").expect_err("unknown").to_string();
        assert!(e.contains("here, there"), "{e}");
    }

    /// `--data` replaces the client's data only where the spec reads it
    /// (partition shards); the site's copy runs its client here.
    #[test]
    fn the_sites_copy_runs_its_client_here_on_its_own_data() {
        let (_, value) = parsed();
        let mut o = opts();
        o.data_uri = Some("/site/own.jsonl".into());
        let e = local_copy(&o, &value, 1)
            .expect_err("dirichlet")
            .to_string();
        assert!(e.starts_with("--data:") && e.contains("shards"), "{e}");
        let mut shards = value.clone();
        shards["spec"]["task"]["partition"] = json!({"strategy": "shards"});
        for c in shards["spec"]["clients"].as_array_mut().expect("clients") {
            c["data"] = json!({"uri": "/elsewhere.jsonl"});
        }
        // The files do not exist here: the copy is built, then its checks
        // name the site's own file.
        let e = local_copy(&o, &shards, 1)
            .expect_err("no such file")
            .to_string();
        assert!(e.contains("spec.clients[1].data.uri"), "{e}");
        assert!(!e.contains("spec.clients[1].site"), "{e}");
    }

    #[test]
    fn a_changed_spec_names_what_differs() {
        let (ft, mut value) = parsed();
        value["spec"]["rounds"] = json!(7);
        value["spec"]["training"] = json!({"localSteps": 3});
        let other = validate_value(&mut value, None).expect("valid");
        assert_eq!(differing_fields(&ft, &other), "spec.rounds, spec.training");
        assert_eq!(differing_fields(&ft, &ft), "spec");
    }
}
