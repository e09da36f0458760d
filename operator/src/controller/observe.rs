//! What the object store says about a run: the controller's only view of
//! the round protocol's artifacts, behind the [`RunStore`] trait so that the
//! controller is tested against [`MemoryRunStore`] and runs against
//! [`ObjectRunStore`] (the lead's [`crate::store::Store`] over `object_store`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use futures::future::BoxFuture;
use heterotune_crds::layout::{RunLayout, MANIFEST_FILE};
use heterotune_crds::manifest::{ArtifactManifest, EvaluationResult};
use heterotune_crds::spec::{RetentionPolicy, StorageSpec};
use heterotune_crds::status::{RoundSummary, MAX_HISTORY};
use heterotune_crds::uri::{self, Location};

use crate::store::{Store, StoreError};

/// One run in its store.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRef {
    /// Where the store is.
    pub storage: StorageSpec,
    /// The run's keys (relative to the bucket root, storage prefix included).
    pub layout: RunLayout,
    /// Client names, in spec order.
    pub clients: Vec<String>,
    /// `spec.rounds` (no round beyond it is looked for).
    pub rounds: u32,
}

/// A committed client artifact.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CommitInfo {
    /// When its manifest was written (Unix seconds).
    pub committed_at: f64,
    /// Artifact size in bytes.
    pub bytes: u64,
}

/// A completed round, from its global manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletedRound {
    /// Accuracy, bytes, participants, rejects.
    pub summary: RoundSummary,
    /// When the global manifest was written (Unix seconds).
    pub completed_at: Option<f64>,
    /// The previous round's global model as this round's participants
    /// received it: mean accuracy and per family (`previous_global_*`).
    pub previous_global: Option<GlobalAccuracy>,
}

/// The accuracy of one round's global model: overall and per family.
pub type GlobalAccuracy = (f64, BTreeMap<String, f64>);

/// The store's view of a run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoreObservation {
    /// Rounds `1..=completed_rounds` have a global manifest.
    pub completed_rounds: u32,
    /// Committed client artifacts of round `completed_rounds + 1`.
    pub committed: BTreeMap<String, CommitInfo>,
    /// Rounds after `since` (the caller's last known round) up to
    /// `completed_rounds`, oldest first, at most [`MAX_HISTORY`].
    pub new_rounds: Vec<CompletedRound>,
    /// When every round is complete: the clients' evaluations of the last
    /// round's global model, by client.
    pub evaluated: BTreeMap<String, EvaluationResult>,
}

/// What the controller needs from the object store.
pub trait RunStore: Send + Sync {
    /// Observes `run`. `since` is the last completed round the caller already
    /// knows (from status); implementations may start looking there, but must
    /// fall back to a full look when that round's global manifest is absent.
    fn observe<'a>(
        &'a self,
        run: &'a RunRef,
        since: u32,
    ) -> BoxFuture<'a, Result<StoreObservation, StoreError>>;

    /// The `config.json` of the model at `uri` (`s3://bucket/prefix`), or
    /// `None` when it does not exist.
    fn model_config<'a>(
        &'a self,
        storage: &'a StorageSpec,
        uri: &'a str,
    ) -> BoxFuture<'a, Result<Option<serde_json::Value>, StoreError>>;

    /// Applies `spec.retention.onDelete` to the run's artifacts; returns how
    /// many objects were deleted.
    fn apply_retention<'a>(
        &'a self,
        run: &'a RunRef,
        policy: RetentionPolicy,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;
}

/// Parses an RFC 3339 time into Unix seconds.
pub fn unix_seconds(text: &str) -> Option<f64> {
    text.parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond() as f64 / 1000.0)
}

/// A round summary from a global manifest as the aggregator writes it
/// (`heterotune-trainer aggregate`): `metrics.accuracy`,
/// `metrics["accuracy.<family>"]` and `metrics.round_seconds`, and in
/// `stats`: `participants` (a list), `rejectCounts` (`{reason: count}`),
/// `bytesReceived` and `bytesRejected`.
pub fn summary_from_manifest(round: u32, m: &ArtifactManifest) -> RoundSummary {
    let finite = |k: &str| m.metrics.get(k).copied().filter(|v| v.is_finite());
    let by_family = m
        .metrics
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("accuracy.")?.to_string(), *v)))
        .filter(|(_, v)| v.is_finite())
        .collect();
    let stats = &m.stats;
    let count = |k: &str| stats.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let rejected = stats
        .get("rejectCounts")
        .and_then(|v| v.as_object())
        .map(|o| {
            o.iter()
                .map(|(reason, n)| (reason.clone(), n.as_u64().unwrap_or(0) as u32))
                .collect()
        })
        .unwrap_or_default();
    RoundSummary {
        round,
        accuracy: finite("accuracy"),
        accuracy_by_family: by_family,
        global_accuracy: None,
        global_accuracy_by_family: BTreeMap::new(),
        bytes_uploaded: count("bytesReceived") + count("bytesRejected"),
        duration_seconds: finite("round_seconds").unwrap_or(0.0),
        participants: stats
            .get("participants")
            .and_then(|v| v.as_array())
            .map_or(0, |a| a.len() as u32),
        rejected,
    }
}

/// The previous round's global accuracy a global manifest records
/// (`metrics.previous_global_accuracy` and `previous_global_accuracy.<family>`).
pub fn previous_global_from_manifest(m: &ArtifactManifest) -> Option<GlobalAccuracy> {
    let mean = m
        .metrics
        .get("previous_global_accuracy")
        .copied()
        .and_then(heterotune_crds::manifest::valid_score)?;
    let by_family = m
        .metrics
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("previous_global_accuracy.")?.to_string(), *v)))
        .filter_map(|(k, v)| heterotune_crds::manifest::valid_score(v).map(|v| (k, v)))
        .collect();
    Some((mean, by_family))
}

/// The key prefix inside the bucket of a storage URI (`s3://b/runs` → `runs`).
pub fn storage_prefix(storage: &StorageSpec) -> String {
    match uri::resolve(&storage.uri) {
        Ok(Location::S3 { key, .. }) => key,
        _ => String::new(),
    }
}

// ---------------------------------------------------------------------------
// In memory (tests, benchmarks)

#[derive(Debug, Default, Clone)]
struct MemRun {
    completed: BTreeMap<u32, CompletedRound>,
    committed: BTreeMap<u32, BTreeMap<String, CommitInfo>>,
    evaluated: BTreeMap<u32, BTreeMap<String, EvaluationResult>>,
}

/// A [`RunStore`] in memory, for tests and benchmarks. Runs are keyed by
/// their run directory ([`RunLayout::run_dir`]).
#[derive(Debug, Default)]
pub struct MemoryRunStore {
    runs: Mutex<HashMap<String, MemRun>>,
    models: Mutex<HashMap<String, serde_json::Value>>,
    unavailable: Mutex<Option<String>>,
    retention: Mutex<Vec<(String, RetentionPolicy)>>,
    observations: Mutex<u64>,
}

impl MemoryRunStore {
    fn with_run<T>(&self, run_dir: &str, f: impl FnOnce(&mut MemRun) -> T) -> T {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        f(runs.entry(run_dir.to_string()).or_default())
    }

    /// Commits `client`'s artifact of `round` at time `at`.
    pub fn commit(&self, run_dir: &str, round: u32, client: &str, at: f64) {
        self.with_run(run_dir, |r| {
            r.committed.entry(round).or_default().insert(
                client.to_string(),
                CommitInfo {
                    committed_at: at,
                    bytes: 1000,
                },
            );
        });
    }

    /// Writes the global manifest of `round`.
    pub fn complete_round(&self, run_dir: &str, summary: RoundSummary, at: f64) {
        self.complete_round_with(run_dir, summary, at, None);
    }

    /// Writes the global manifest of `round`, recording what its
    /// participants measured on the previous round's global model.
    pub fn complete_round_with(
        &self,
        run_dir: &str,
        summary: RoundSummary,
        at: f64,
        previous_global: Option<GlobalAccuracy>,
    ) {
        self.with_run(run_dir, |r| {
            r.completed.insert(
                summary.round,
                CompletedRound {
                    summary,
                    completed_at: Some(at),
                    previous_global,
                },
            );
        });
    }

    /// Writes a client's evaluation of a round's global model.
    pub fn evaluate(&self, run_dir: &str, result: EvaluationResult) {
        self.with_run(run_dir, |r| {
            r.evaluated
                .entry(result.global_round)
                .or_default()
                .insert(result.client.clone(), result);
        });
    }

    /// Makes every call fail with `message` (or work again with `None`).
    pub fn set_unavailable(&self, message: Option<&str>) {
        *self.unavailable.lock().unwrap_or_else(|e| e.into_inner()) = message.map(str::to_string);
    }

    /// Registers a model's config.json.
    pub fn put_model_config(&self, uri: &str, config: serde_json::Value) {
        self.models
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uri.trim_end_matches('/').to_string(), config);
    }

    /// The retention calls so far (run directory, policy).
    pub fn retention_calls(&self) -> Vec<(String, RetentionPolicy)> {
        self.retention
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many times `observe` was called.
    pub fn observations(&self) -> u64 {
        *self.observations.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, uri: &str) -> Result<(), StoreError> {
        match self
            .unavailable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(m) => Err(StoreError::Config {
                uri: uri.to_string(),
                message: m.clone(),
            }),
            None => Ok(()),
        }
    }
}

impl RunStore for MemoryRunStore {
    fn observe<'a>(
        &'a self,
        run: &'a RunRef,
        since: u32,
    ) -> BoxFuture<'a, Result<StoreObservation, StoreError>> {
        Box::pin(async move {
            self.check(&run.storage.uri)?;
            *self.observations.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            Ok(self.with_run(run.layout.run_dir(), |r| {
                let mut done = 0;
                while done < run.rounds && r.completed.contains_key(&(done + 1)) {
                    done += 1;
                }
                let since = if since <= done { since } else { 0 };
                let first_new = (since + 1).max(done.saturating_sub(MAX_HISTORY as u32) + 1);
                StoreObservation {
                    completed_rounds: done,
                    committed: r.committed.get(&(done + 1)).cloned().unwrap_or_default(),
                    new_rounds: (first_new..=done)
                        .filter_map(|n| r.completed.get(&n).cloned())
                        .collect(),
                    evaluated: if done == run.rounds {
                        r.evaluated.get(&done).cloned().unwrap_or_default()
                    } else {
                        BTreeMap::new()
                    },
                }
            }))
        })
    }

    fn model_config<'a>(
        &'a self,
        storage: &'a StorageSpec,
        uri: &'a str,
    ) -> BoxFuture<'a, Result<Option<serde_json::Value>, StoreError>> {
        Box::pin(async move {
            self.check(&storage.uri)?;
            Ok(self
                .models
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(uri.trim_end_matches('/'))
                .cloned())
        })
    }

    fn apply_retention<'a>(
        &'a self,
        run: &'a RunRef,
        policy: RetentionPolicy,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            self.check(&run.storage.uri)?;
            self.retention
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((run.layout.run_dir().to_string(), policy));
            let removed = self.with_run(run.layout.run_dir(), |r| match policy {
                RetentionPolicy::Retain => 0,
                RetentionPolicy::Compact => {
                    let n = r.committed.values().map(|c| c.len() as u64).sum();
                    r.committed.clear();
                    n
                }
                RetentionPolicy::Delete => {
                    let n = r.committed.values().map(|c| c.len() as u64).sum::<u64>()
                        + r.completed.len() as u64
                        + r.evaluated.values().map(|e| e.len() as u64).sum::<u64>();
                    *r = MemRun::default();
                    n
                }
            });
            Ok(removed)
        })
    }
}

// ---------------------------------------------------------------------------
// Over the object store

/// A [`RunStore`] over [`crate::store::Store`]: S3 with the operator's own
/// credentials (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` in its
/// environment) and the endpoint, region and addressing of each spec.
///
/// Costs per observation: one HEAD per round from `since` on (usually two),
/// one LIST of the current round's `clients/` folder, one GET per newly
/// committed client manifest (remembered afterwards) and one GET per newly
/// completed round's global manifest; once every round is complete, one
/// LIST of the last round's `evaluation/` folder and one GET per new result.
#[derive(Default)]
pub struct ObjectRunStore {
    stores: Mutex<HashMap<String, Store>>,
    commits: Mutex<HashMap<(String, u32), BTreeMap<String, CommitInfo>>>,
    evaluations: Mutex<HashMap<(String, u32), BTreeMap<String, EvaluationResult>>>,
}

impl ObjectRunStore {
    fn store(&self, storage: &StorageSpec) -> Result<Store, StoreError> {
        let key = format!(
            "{}|{:?}|{:?}|{}",
            storage.uri, storage.endpoint, storage.region, storage.force_path_style
        );
        let mut stores = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = stores.get(&key) {
            return Ok(s.clone());
        }
        let store = Store::from_spec(storage, std::path::Path::new("/nonexistent"))?;
        stores.insert(key, store.clone());
        Ok(store)
    }

    /// The evaluations of `round`'s global model (one LIST; each result
    /// read once, then remembered).
    async fn evaluations(
        &self,
        store: &Store,
        run: &RunRef,
        round: u32,
    ) -> Result<BTreeMap<String, EvaluationResult>, StoreError> {
        let layout = &run.layout;
        let cache_key = (layout.run_dir().to_string(), round);
        let mut known = self
            .evaluations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&cache_key)
            .cloned()
            .unwrap_or_default();
        for key in store.list(&layout.evaluation_dir(round)).await? {
            let Some(client) = layout.evaluation_client(round, &key) else {
                continue;
            };
            if known.contains_key(client) || !run.clients.iter().any(|c| c == client) {
                continue;
            }
            let Some(bytes) = store.get(&key).await? else {
                continue;
            };
            match serde_json::from_slice::<EvaluationResult>(&bytes) {
                Ok(r)
                    if r.client == client
                        && r.global_round == round
                        && r.run == layout.run_dir() =>
                {
                    known.insert(client.to_string(), r);
                }
                Ok(_) => tracing::warn!(
                    key,
                    "ignoring an evaluation of another client, round or run"
                ),
                Err(e) => tracing::warn!(key, error = %e, "ignoring an unreadable evaluation"),
            }
        }
        self.evaluations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cache_key, known.clone());
        Ok(known)
    }

    async fn read_manifest(
        store: &Store,
        key: &str,
    ) -> Result<Option<ArtifactManifest>, StoreError> {
        let Some(bytes) = store.get(key).await? else {
            return Ok(None);
        };
        Ok(ArtifactManifest::from_slice(&bytes).ok())
    }
}

impl RunStore for ObjectRunStore {
    fn observe<'a>(
        &'a self,
        run: &'a RunRef,
        since: u32,
    ) -> BoxFuture<'a, Result<StoreObservation, StoreError>> {
        Box::pin(async move {
            let store = self.store(&run.storage)?;
            let layout = &run.layout;
            let mut done = if since > 0
                && since <= run.rounds
                && store.exists(&layout.global_manifest(since)).await?
            {
                since
            } else {
                0
            };
            while done < run.rounds && store.exists(&layout.global_manifest(done + 1)).await? {
                done += 1;
            }
            let round = done + 1;
            let mut committed = BTreeMap::new();
            if done < run.rounds {
                let dir = format!("{}/clients", layout.round_dir(round));
                let keys = store.list(&dir).await?;
                let known = self
                    .commits
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&(layout.run_dir().to_string(), round))
                    .cloned()
                    .unwrap_or_default();
                for key in keys {
                    let Some(client) = key
                        .strip_prefix(&format!("{dir}/"))
                        .and_then(|rest| rest.strip_suffix(&format!("/{MANIFEST_FILE}")))
                    else {
                        continue;
                    };
                    if !run.clients.iter().any(|c| c == client) {
                        continue;
                    }
                    let info = match known.get(client) {
                        Some(i) => *i,
                        None => {
                            let m = Self::read_manifest(&store, &key).await?;
                            CommitInfo {
                                committed_at: m
                                    .as_ref()
                                    .and_then(|m| unix_seconds(&m.created_at))
                                    .unwrap_or_else(now_seconds),
                                bytes: m.map(|m| m.artifact.bytes).unwrap_or(0),
                            }
                        }
                    };
                    committed.insert(client.to_string(), info);
                }
                let mut commits = self.commits.lock().unwrap_or_else(|e| e.into_inner());
                commits.retain(|(dir, r), _| dir != layout.run_dir() || *r >= round);
                commits.insert((layout.run_dir().to_string(), round), committed.clone());
            }
            let since = if since <= done { since } else { 0 };
            let first_new = (since + 1).max(done.saturating_sub(MAX_HISTORY as u32) + 1);
            let mut new_rounds = Vec::new();
            for r in first_new..=done {
                if let Some(m) = Self::read_manifest(&store, &layout.global_manifest(r)).await? {
                    new_rounds.push(CompletedRound {
                        summary: summary_from_manifest(r, &m),
                        completed_at: unix_seconds(&m.created_at),
                        previous_global: previous_global_from_manifest(&m),
                    });
                }
            }
            let evaluated = if done == run.rounds && done > 0 {
                self.evaluations(&store, run, done).await?
            } else {
                BTreeMap::new()
            };
            Ok(StoreObservation {
                completed_rounds: done,
                committed,
                new_rounds,
                evaluated,
            })
        })
    }

    fn model_config<'a>(
        &'a self,
        storage: &'a StorageSpec,
        uri: &'a str,
    ) -> BoxFuture<'a, Result<Option<serde_json::Value>, StoreError>> {
        Box::pin(async move {
            let Ok(Location::S3 { bucket, key }) = uri::resolve(uri) else {
                return Ok(None);
            };
            let model_storage = StorageSpec {
                uri: format!("s3://{bucket}"),
                ..storage.clone()
            };
            let store = self.store(&model_storage)?;
            let config_key = if key.is_empty() {
                "config.json".to_string()
            } else {
                format!("{key}/config.json")
            };
            Ok(store
                .get(&config_key)
                .await?
                .and_then(|b| serde_json::from_slice(&b).ok()))
        })
    }

    fn apply_retention<'a>(
        &'a self,
        run: &'a RunRef,
        policy: RetentionPolicy,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let store = self.store(&run.storage)?;
            let run_dir = run.layout.run_dir();
            match policy {
                RetentionPolicy::Retain => Ok(0),
                RetentionPolicy::Delete => Ok(store.delete_prefix(run_dir).await? as u64),
                RetentionPolicy::Compact => {
                    let mut dirs: Vec<String> = store
                        .list(run_dir)
                        .await?
                        .into_iter()
                        .filter_map(|k| {
                            k.find("/clients/")
                                .map(|i| k[..i + "/clients".len()].to_string())
                        })
                        .collect();
                    dirs.dedup();
                    // The clients' private states go with their artifacts.
                    dirs.push(format!("{run_dir}/private"));
                    let mut n = 0;
                    for dir in dirs {
                        n += store.delete_prefix(&dir).await? as u64;
                    }
                    Ok(n)
                }
            }
        })
    }
}

/// Now, in Unix seconds.
pub fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use heterotune_crds::manifest::{ArtifactKind, FileDigest};

    fn manifest(
        kind: ArtifactKind,
        round: u32,
        client: Option<&str>,
        created: &str,
    ) -> ArtifactManifest {
        let mut metrics = BTreeMap::new();
        metrics.insert("accuracy".to_string(), 0.8);
        metrics.insert("accuracy.bert".to_string(), 0.75);
        metrics.insert("round_seconds".to_string(), 42.0);
        ArtifactManifest {
            schema_version: 1,
            kind,
            run: "r".into(),
            round,
            base_round: round - 1,
            client: client.map(str::to_string),
            family: None,
            artifact: FileDigest {
                path: "adapter.safetensors".into(),
                sha256: "00".into(),
                bytes: 123,
            },
            tensors: vec![],
            num_examples: 10,
            metrics,
            // As `heterotune-trainer aggregate` writes them (RoundStats).
            stats: serde_json::json!({
                "participants": [{ "client": "a" }, { "client": "b" }],
                "rejects": [{ "client": "c", "reason": "norm_bound" }],
                "rejectCounts": { "norm_bound": 1 },
                "bytesReceived": 200,
                "bytesRejected": 46
            }),
            writer_version: "test".into(),
            created_at: created.into(),
        }
    }

    #[tokio::test]
    async fn the_object_store_adapter_reads_rounds_commits_and_applies_retention() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = StorageSpec {
            uri: format!("file://{}", dir.path().display()),
            ..StorageSpec::default()
        };
        let store = Store::from_spec(&storage, dir.path()).expect("store");
        let layout = RunLayout::new("", "ns", "ft", "0f1e2d3c-aaaa");
        let put = |key: String, m: ArtifactManifest| {
            let store = store.clone();
            async move {
                store
                    .put(&key, Bytes::from(serde_json::to_vec(&m).expect("json")))
                    .await
                    .expect("put")
            }
        };
        put(
            layout.global_manifest(1),
            manifest(ArtifactKind::Global, 1, None, "2023-11-14T22:13:20Z"),
        )
        .await;
        put(
            layout.client_manifest(1, "a"),
            manifest(ArtifactKind::Client, 1, Some("a"), "2023-11-14T22:00:00Z"),
        )
        .await;
        put(
            layout.client_manifest(2, "b"),
            manifest(ArtifactKind::Client, 2, Some("b"), "2023-11-14T22:20:00Z"),
        )
        .await;
        // Data without a manifest is not a commit; strangers are ignored.
        store
            .put(&layout.client_adapter(2, "a"), Bytes::from_static(b"x"))
            .await
            .expect("put");
        put(
            layout.client_manifest(2, "zz"),
            manifest(ArtifactKind::Client, 2, Some("zz"), "2023-11-14T22:20:00Z"),
        )
        .await;
        let run = RunRef {
            storage,
            layout: layout.clone(),
            clients: vec!["a".into(), "b".into()],
            rounds: 5,
        };
        let rs = ObjectRunStore::default();
        let obs = rs.observe(&run, 0).await.expect("observe");
        assert_eq!(obs.completed_rounds, 1);
        assert_eq!(obs.committed.keys().collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(obs.committed["b"].committed_at, 1_700_000_400.0);
        assert_eq!(obs.committed["b"].bytes, 123);
        let s = &obs.new_rounds[0].summary;
        assert_eq!(
            (s.round, s.accuracy, s.participants, s.bytes_uploaded),
            (1, Some(0.8), 2, 246)
        );
        assert_eq!(s.accuracy_by_family.get("bert"), Some(&0.75));
        assert_eq!(s.rejected.get("norm_bound"), Some(&1));
        assert_eq!(s.duration_seconds, 42.0);
        assert_eq!(obs.new_rounds[0].completed_at, Some(1_700_000_000.0));
        // Known rounds are not read again; a stale hint falls back to a full look.
        assert!(rs
            .observe(&run, 1)
            .await
            .expect("observe")
            .new_rounds
            .is_empty());
        assert_eq!(
            rs.observe(&run, 4).await.expect("observe").completed_rounds,
            1
        );

        assert_eq!(
            rs.apply_retention(&run, RetentionPolicy::Retain)
                .await
                .expect("retain"),
            0
        );
        // Compact: client folders (3 manifests + 1 adapter) go, the global manifest stays.
        assert_eq!(
            rs.apply_retention(&run, RetentionPolicy::Compact)
                .await
                .expect("compact"),
            4
        );
        assert!(store
            .exists(&layout.global_manifest(1))
            .await
            .expect("exists"));
        assert_eq!(
            rs.apply_retention(&run, RetentionPolicy::Delete)
                .await
                .expect("delete"),
            1
        );
        assert!(store.list(layout.run_dir()).await.expect("list").is_empty());
    }
}
