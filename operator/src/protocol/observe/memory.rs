//! [`MemoryRunStore`]: a [`RunStore`] in memory, the test double of
//! [`ObjectRunStore`](super::ObjectRunStore) for the controller's tests and
//! `examples/reconcile_bench.rs`. Compiled only for tests and with the
//! `testing` feature.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use futures::future::BoxFuture;
use heterotune_crds::manifest::EvaluationResult;
use heterotune_crds::spec::{RetentionPolicy, StorageSpec};
use heterotune_crds::status::{RoundSummary, MAX_HISTORY};

use super::types::{
    CommitInfo, CompletedRound, GlobalAccuracy, RunRef, RunStore, StoreObservation,
};
use crate::protocol::store::StoreError;

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
    /// `spec.json` documents by run folder.
    specs: Mutex<HashMap<String, Vec<u8>>>,
}

impl MemoryRunStore {
    fn with_run<T>(&self, run_dir: &str, f: impl FnOnce(&mut MemRun) -> T) -> T {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        f(runs.entry(run_dir.to_string()).or_default())
    }

    /// The spec document recorded for the run in `run_dir`, if any.
    pub fn spec_document(&self, run_dir: &str) -> Option<Vec<u8>> {
        self.specs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(run_dir)
            .cloned()
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

    fn record_spec<'a>(
        &'a self,
        run: &'a RunRef,
        document: Vec<u8>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            self.check(&run.storage.uri)?;
            let mut specs = self.specs.lock().unwrap_or_else(|e| e.into_inner());
            let dir = run.layout.run_dir().to_string();
            if specs.get(&dir) == Some(&document) {
                return Ok(false);
            }
            specs.insert(dir, document);
            Ok(true)
        })
    }

    fn model_config<'a>(
        &'a self,
        storage: &'a StorageSpec,
        uri: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move {
            self.check(&storage.uri)?;
            Ok(self
                .models
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(uri.trim_end_matches('/'))
                .map(|v| v.to_string().into_bytes()))
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
