//! Step 1 of a reconcile, the only one that reads: the run's Jobs (from the
//! controller's reflector caches, their pods explaining failures), the
//! store's view of the run through [`RunStore`](crate::protocol::observe::RunStore),
//! and the shape of every client's model (remembered between reconciles).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use heterotune_crds::model::{ModelFacts, CONFIG_FILE};
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
    /// When they were read (Unix seconds).
    pub now: f64,
}

/// Reads what the decision needs; fails only when the store is unreadable
/// ([`Error::Storage`]).
pub async fn dereference(ctx: &Context, run: &Run<'_>) -> Result<Dereferenced> {
    let store = ctx
        .store
        .observe(&run.store_ref(), run.last_recorded_round())
        .await
        .map_err(Error::Storage)?;
    let jobs = observe_jobs(ctx, &run.namespace, &run.uid);
    let now = ctx.now();
    let shapes = shapes(ctx, run).await;
    Ok(Dereferenced {
        store,
        jobs,
        shapes,
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

/// Looks up the shape of every client's model (config.json in the store,
/// the packaged table, or `model.parameters`), once per URI.
async fn shapes(ctx: &Context, run: &Run<'_>) -> Vec<Option<ModelShape>> {
    let spec = &run.ft.spec;
    let now = ctx.now();
    let mut by_uri: BTreeMap<String, Option<ModelShape>> = BTreeMap::new();
    for c in &spec.clients {
        let uri = c.model.uri.clone();
        if by_uri.contains_key(&uri) {
            continue;
        }
        let cached = ctx
            .memory()
            .shapes
            .get(&uri)
            .filter(|(s, at)| s.is_some() || now - at < SHAPE_MISS_TTL)
            .map(|(s, _)| s.clone());
        let shape = match cached {
            Some(s) => s,
            None => {
                let mut found = sizing::packaged_model(&uri);
                if found.is_none() && uri.starts_with("s3://") {
                    match ctx.store.model_config(&spec.storage, &uri).await {
                        Ok(Some(bytes)) => match ModelFacts::from_bytes(
                            Path::new(&format!("{uri}/{CONFIG_FILE}")),
                            &bytes,
                        ) {
                            Ok(facts) => found = Some(ModelShape::from_facts(&facts)),
                            Err(e) => tracing::warn!(uri, error = %e, "unusable model config"),
                        },
                        Ok(None) => {}
                        Err(e) => tracing::warn!(uri, error = %e, "cannot read the model config"),
                    }
                }
                ctx.memory()
                    .shapes
                    .insert(uri.clone(), (found.clone(), now));
                found
            }
        };
        by_uri.insert(uri, shape);
    }
    spec.clients
        .iter()
        .map(|c| {
            by_uri.get(&c.model.uri).cloned().flatten().or_else(|| {
                c.model
                    .parameters
                    .map(|p| ModelShape::from_parameters(c.model.family, p))
            })
        })
        .collect()
}
