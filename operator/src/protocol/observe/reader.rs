//! The store reads of the round protocol, shared by both executors: which
//! rounds are complete, which client artifacts are committed, what the
//! clients' evaluations say, and the manifests of newly completed rounds.
//!
//! Costs per look: one HEAD per round from `since` on (usually two), one
//! LIST of the current round's `clients/` folder, one GET per newly
//! committed client manifest (remembered afterwards) and one GET per newly
//! completed round's global manifest (plus its participants' manifests when
//! asked); once every round is complete, one LIST of the last round's
//! `evaluation/` folder and one GET per new result.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use heterotune_crds::layout::MANIFEST_FILE;
use heterotune_crds::manifest::{ArtifactManifest, EvaluationResult};

use super::manifest::{now_seconds, participants, unix_seconds};
use super::types::{CommitInfo, Look, RoundFacts, RunObservation, RunRef};
use crate::protocol::store::{Store, StoreError};

type Cache<T> = Mutex<HashMap<(String, u32), BTreeMap<String, T>>>;

/// Reads runs from their store, remembering what never changes once written
/// (client commits and evaluation results), by run directory and round.
#[derive(Debug, Default)]
pub struct RunReader {
    commits: Cache<CommitInfo>,
    evaluations: Cache<EvaluationResult>,
}

/// Reads and parses a manifest; `None` when absent or unreadable (one
/// larger than a record may be is not read: aggregation rejects it).
pub async fn read_manifest(
    store: &Store,
    key: &str,
) -> Result<Option<ArtifactManifest>, StoreError> {
    let Some(bytes) = record(store, key).await? else {
        return Ok(None);
    };
    Ok(ArtifactManifest::from_slice(&bytes).ok())
}

/// [`Store::get`], with a record that is too large logged and taken as
/// unreadable: a client's oversized upload must not stop the observer.
async fn record(store: &Store, key: &str) -> Result<Option<bytes::Bytes>, StoreError> {
    match store.get(key).await {
        Err(e @ StoreError::TooLarge { .. }) => {
            tracing::warn!(key, error = %e, "ignoring an oversized record");
            Ok(None)
        }
        other => other,
    }
}

impl RunReader {
    /// One look at `run` in `store`.
    pub async fn look(
        &self,
        store: &Store,
        run: &RunRef,
        look: Look,
    ) -> Result<RunObservation, StoreError> {
        let done = store
            .completed_rounds_from(&run.layout, look.since, run.rounds)
            .await?;
        let committed = if done < run.rounds {
            self.committed(store, run, done + 1).await?
        } else {
            BTreeMap::new()
        };
        let since = if look.since <= done { look.since } else { 0 };
        let history = u32::try_from(look.history).unwrap_or(u32::MAX);
        let first_new = (since + 1).max(done.saturating_sub(history) + 1);
        let mut new_rounds = Vec::new();
        for round in first_new..=done {
            let global = read_manifest(store, &run.layout.global_manifest(round)).await?;
            let clients = if look.client_manifests {
                client_manifests(store, run, round, global.as_ref()).await?
            } else {
                Vec::new()
            };
            new_rounds.push(RoundFacts {
                round,
                global,
                clients,
            });
        }
        let evaluated = if done == run.rounds && done > 0 {
            self.evaluations(store, run, done).await?
        } else {
            BTreeMap::new()
        };
        Ok(RunObservation {
            completed_rounds: done,
            committed,
            new_rounds,
            evaluated,
        })
    }

    /// The committed client artifacts of `round` (one LIST; each manifest
    /// read once, then remembered).
    async fn committed(
        &self,
        store: &Store,
        run: &RunRef,
        round: u32,
    ) -> Result<BTreeMap<String, CommitInfo>, StoreError> {
        let layout = &run.layout;
        let dir = format!("{}/clients", layout.round_dir(round));
        let keys = store.list(&dir).await?;
        let known = remembered(&self.commits, layout.run_dir(), round);
        let mut committed = BTreeMap::new();
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
                    let m = read_manifest(store, &key).await?;
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
        let mut commits = lock(&self.commits);
        commits.retain(|(dir, r), _| dir != layout.run_dir() || *r >= round);
        commits.insert((layout.run_dir().to_string(), round), committed.clone());
        Ok(committed)
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
        let mut known = remembered(&self.evaluations, layout.run_dir(), round);
        for key in store.list(&layout.evaluation_dir(round)).await? {
            let Some(client) = layout.evaluation_client(round, &key) else {
                continue;
            };
            if known.contains_key(client) || !run.clients.iter().any(|c| c == client) {
                continue;
            }
            let Some(bytes) = record(store, &key).await? else {
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
        lock(&self.evaluations).insert((layout.run_dir().to_string(), round), known.clone());
        Ok(known)
    }
}

/// What `cache` remembers of `round` of the run in `run_dir`.
fn remembered<T: Clone>(cache: &Cache<T>, run_dir: &str, round: u32) -> BTreeMap<String, T> {
    lock(cache)
        .get(&(run_dir.to_string(), round))
        .cloned()
        .unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The manifests of `round`'s participants (every spec client with one when
/// the global manifest names none), in spec order.
async fn client_manifests(
    store: &Store,
    run: &RunRef,
    round: u32,
    global: Option<&ArtifactManifest>,
) -> Result<Vec<(String, ArtifactManifest)>, StoreError> {
    let participants = global.map(participants).unwrap_or_default();
    let mut out = Vec::new();
    for client in &run.clients {
        if !participants.is_empty() && !participants.contains(client) {
            continue;
        }
        if let Some(m) = read_manifest(store, &run.layout.client_manifest(round, client)).await? {
            out.push((client.clone(), m));
        }
    }
    Ok(out)
}
