//! [`ObjectRunStore`]: the controller's [`RunStore`] over
//! [`crate::protocol::store::Store`], observing through the shared [`RunReader`].

use std::collections::HashMap;
use std::sync::Mutex;

use futures::future::BoxFuture;
use heterotune_crds::model::CONFIG_FILE;
use heterotune_crds::spec::{RetentionPolicy, StorageSpec};
use heterotune_crds::status::MAX_HISTORY;
use heterotune_crds::uri::{self, Location};

use super::manifest::completed_round;
use super::reader::RunReader;
use super::types::{Look, RunObservation, RunRef, RunStore, StoreObservation};
use crate::protocol::store::{Store, StoreError};

/// A [`RunStore`] over [`crate::protocol::store::Store`]: S3 with the operator's own
/// credentials (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` in its
/// environment) and the endpoint, region and addressing of each spec.
///
/// An observation costs what [`RunReader`] reads, with at most
/// [`MAX_HISTORY`] newly completed rounds and no client manifests.
#[derive(Default)]
pub struct ObjectRunStore {
    stores: Mutex<HashMap<String, Store>>,
    reader: RunReader,
}

/// The key prefix inside the bucket of a storage URI (`s3://b/runs` → `runs`).
pub fn storage_prefix(storage: &StorageSpec) -> String {
    match uri::resolve(&storage.uri) {
        Ok(Location::S3 { key, .. }) => key,
        _ => String::new(),
    }
}

/// The controller's part of a look: readable global manifests as round summaries.
fn store_observation(look: RunObservation) -> StoreObservation {
    StoreObservation {
        completed_rounds: look.completed_rounds,
        committed: look.committed,
        new_rounds: look
            .new_rounds
            .iter()
            .filter_map(|r| Some(completed_round(r.round, r.global.as_ref()?)))
            .collect(),
        evaluated: look.evaluated,
    }
}

/// How long one reconcile retries a store that does not answer.
const CONTROLLER_RETRY_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

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
        // The controller does not wait long inside a reconcile: a store that
        // does not answer marks the run degraded and the reconcile is retried
        // with its own backoff.
        let store = Store::from_spec(storage, std::path::Path::new("/nonexistent"))?
            .with_retry_budget(CONTROLLER_RETRY_BUDGET);
        stores.insert(key, store.clone());
        Ok(store)
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
            let look = Look {
                since,
                history: MAX_HISTORY,
                client_manifests: false,
            };
            Ok(store_observation(
                self.reader.look(&store, run, look).await?,
            ))
        })
    }

    fn record_spec<'a>(
        &'a self,
        run: &'a RunRef,
        document: Vec<u8>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let store = self.store(&run.storage)?;
            store
                .put_if_changed(&run.layout.spec_file(), document)
                .await
        })
    }

    fn model_config<'a>(
        &'a self,
        storage: &'a StorageSpec,
        uri: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
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
                CONFIG_FILE.to_string()
            } else {
                format!("{key}/{CONFIG_FILE}")
            };
            Ok(store.get(&config_key).await?.map(|b| b.to_vec()))
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::protocol::observe::manifest::participants;
    use bytes::Bytes;
    use heterotune_crds::layout::RunLayout;
    use heterotune_crds::manifest::{ArtifactKind, ArtifactManifest, FileDigest};

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
            client: client.map(str::to_string),
            artifact: FileDigest {
                path: "adapter.safetensors".into(),
                sha256: "00".into(),
                bytes: 123,
            },
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
            created_at: created.into(),
            ..ArtifactManifest::new(kind, "r", round, round - 1, "test")
        }
    }

    /// A run of 5 rounds in a local store: round 1 complete (client `a`
    /// took part), `b` committed in round 2, plus strangers and uncommitted data.
    async fn fixture(dir: &std::path::Path) -> (Store, RunRef) {
        let storage = StorageSpec {
            uri: format!("file://{}", dir.display()),
            ..StorageSpec::default()
        };
        let store = Store::from_spec(&storage, dir).expect("store");
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
            .put(
                &heterotune_crds::layout::data_key(&layout.client_dir(2, "a"), &"0".repeat(64))
                    .expect("key"),
                Bytes::from_static(b"x"),
            )
            .await
            .expect("put");
        put(
            layout.client_manifest(2, "zz"),
            manifest(ArtifactKind::Client, 2, Some("zz"), "2023-11-14T22:20:00Z"),
        )
        .await;
        let run = RunRef {
            storage,
            layout,
            clients: vec!["a".into(), "b".into()],
            rounds: 5,
        };
        (store, run)
    }

    #[tokio::test]
    async fn the_object_store_adapter_reads_rounds_commits_and_applies_retention() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, run) = fixture(dir.path()).await;
        let layout = run.layout.clone();
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

    #[tokio::test]
    async fn the_local_runners_look_has_every_new_round_and_its_participants() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, run) = fixture(dir.path()).await;
        let look = Look {
            since: 0,
            history: usize::MAX,
            client_manifests: true,
        };
        let facts = RunReader::default()
            .look(&store, &run, look)
            .await
            .expect("look");
        assert_eq!(facts.new_rounds.len(), 1);
        let clients = &facts.new_rounds[0].clients;
        assert_eq!(clients.len(), 1);
        assert_eq!(
            (clients[0].0.as_str(), clients[0].1.artifact.bytes),
            ("a", 123)
        );
        let facts = &facts.new_rounds[0];
        assert_eq!(facts.global.as_ref().map(|g| g.round), Some(1));
        // b took part in round 1 but has no manifest there.
        let global = facts.global.as_ref().expect("global");
        assert_eq!(participants(global), ["a", "b"]);
    }
}
