//! Step 1 of a reconcile, the only one that reads: the run's Jobs (from the
//! controller's reflector caches, their pods explaining failures), the
//! store's view of the run through [`RunStore`](crate::protocol::observe::RunStore),
//! and the shape of every client's model and of the bridge's (remembered
//! between reconciles).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use heterotune_crds::model::{ModelFacts, CONFIG_FILE};
use heterotune_crds::spec::ModelSpec;
use k8s_openapi::api::core::v1::Pod;

use super::context::Context;
use super::error::{Error, Result};
use super::job_facts::{failure_reason, job_facts, JobFacts};
use super::names::LABEL_RUN_UID;
use super::run::Run;
use crate::protocol::observe::StoreObservation;
use crate::sizing::{self, ModelShape};

/// How long a model config that could not be read is remembered.
const SHAPE_MISS_TTL: f64 = 60.0;

/// What the cluster and the store say about a run: everything
/// the decide step needs.
#[derive(Debug, Clone)]
pub struct Dereferenced {
    /// The store's rounds, commits and evaluations.
    pub store: StoreObservation,
    /// The run's Jobs.
    pub jobs: Vec<JobFacts>,
    /// Every client's model shape, in spec order (`None`: unknown).
    pub shapes: Vec<Option<ModelShape>>,
    /// The bridge model's shape (`None`: no `spec.bridge`, or unknown).
    pub bridge: Option<ModelShape>,
    /// When they were read (Unix seconds).
    pub now: f64,
}

/// Records the run's spec document in the store for its sites to check
/// (`heterotune site` refuses to train a spec other than the one the run
/// records). The Jobs record it too, but a round whose clients are all
/// sites has no Job before its aggregation, and the sites would train it
/// unchecked. Not fatal: the next reconcile tries again.
async fn record_spec(ctx: &Context, run: &Run<'_>) {
    let document = serde_json::to_vec_pretty(&super::jobs::spec_document(run)).unwrap_or_default();
    if let Err(e) = ctx.store.record_spec(&run.store_ref(), document).await {
        tracing::warn!(run = %run.name, error = %e, "could not record spec.json for the run's sites");
    }
}

/// Reads what the decision needs; fails only when the store is unreadable
/// ([`Error::Storage`]).
pub async fn dereference(ctx: &Context, run: &Run<'_>) -> Result<Dereferenced> {
    let store = ctx
        .store
        .observe(&run.store_ref(), run.last_recorded_round())
        .await
        .map_err(Error::Storage)?;
    if run.ft.spec.clients.iter().any(|c| c.is_remote()) {
        record_spec(ctx, run).await;
    }
    let jobs = observe_jobs(ctx, &run.namespace, &run.uid);
    let now = ctx.now();
    let (shapes, bridge) = shapes(ctx, run).await;
    Ok(Dereferenced {
        store,
        jobs,
        shapes,
        bridge,
        now,
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

/// Looks up the shape of every client's model and of the bridge's
/// (config.json in the store, the packaged table, or `model.parameters`),
/// once per URI.
async fn shapes(ctx: &Context, run: &Run<'_>) -> (Vec<Option<ModelShape>>, Option<ModelShape>) {
    let spec = &run.ft.spec;
    let models: Vec<&ModelSpec> = spec
        .clients
        .iter()
        .map(|c| &c.model)
        .chain(spec.bridge.as_ref().map(|b| &b.model))
        .collect();
    let mut by_uri: BTreeMap<&str, Option<ModelShape>> = BTreeMap::new();
    for m in &models {
        if !by_uri.contains_key(m.uri.as_str()) {
            by_uri.insert(&m.uri, shape_at(ctx, run, &m.uri).await);
        }
    }
    let shape = |m: &ModelSpec| {
        by_uri.get(m.uri.as_str()).cloned().flatten().or_else(|| {
            m.parameters
                .map(|p| ModelShape::from_parameters(m.family, p))
        })
    };
    let shapes = spec.clients.iter().map(|c| shape(&c.model)).collect();
    (shapes, spec.bridge.as_ref().and_then(|b| shape(&b.model)))
}

/// The shape of the model at `uri` from the packaged table or its
/// config.json in the store, remembered between reconciles (a miss for
/// [`SHAPE_MISS_TTL`] seconds).
async fn shape_at(ctx: &Context, run: &Run<'_>, uri: &str) -> Option<ModelShape> {
    let now = ctx.now();
    let cached = ctx
        .memory()
        .shapes
        .get(uri)
        .filter(|(s, at)| s.is_some() || now - at < SHAPE_MISS_TTL)
        .map(|(s, _)| s.clone());
    if let Some(s) = cached {
        return s;
    }
    let mut found = sizing::packaged_model(uri);
    if found.is_none() && uri.starts_with("s3://") {
        match ctx.store.model_config(&run.ft.spec.storage, uri).await {
            Ok(Some(bytes)) => {
                match ModelFacts::from_bytes(Path::new(&format!("{uri}/{CONFIG_FILE}")), &bytes) {
                    Ok(facts) => found = Some(ModelShape::from_facts(&facts)),
                    Err(e) => tracing::warn!(uri, error = %e, "unusable model config"),
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(uri, error = %e, "cannot read the model config"),
        }
    }
    ctx.memory()
        .shapes
        .insert(uri.to_string(), (found.clone(), now));
    found
}
