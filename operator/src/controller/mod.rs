//! The Kubernetes controller for `FederatedTune`, owning batch/v1 Jobs.
//!
//! Shaped like kube-rs's controller-rs, with the explicit steps of
//! stackable's zookeeper-operator and the pure round planner
//! ([`crate::protocol::planner`]) in the middle. [`reconcile`](reconcile::reconcile)
//! chains one module per step:
//!
//! * [`validate`]: the spec's rules (pure, once per generation);
//! * [`dereference`]: reads the run's Jobs (a reflector cache, [`job_facts`]),
//!   the store through [`RunStore`] and the models' shapes;
//! * [`decide`] (pure): placements ([`crate::sizing`]), the planner's
//!   [`Observation`](crate::protocol::planner::Observation) ([`observation`]) and
//!   actions, and the existing Jobs become Jobs to create ([`jobs`],
//!   [`names`]) and delete, the status ([`status`], [`client_status`]) and
//!   the Events ([`events`]);
//! * [`apply`] (I/O only): creates and deletes the Jobs;
//! * [`status`]: writes the status by server-side apply, publishes Events;
//! * [`cleanup`]: deletion runs the retention policy behind a finalizer.
//!
//! [`observe`] holds the [`RunStore`] trait (what the store says), an
//! in-memory implementation for tests and one over [`crate::protocol::store::Store`].
//!
//! Restart safety: nothing the controller needs lives only in its memory.
//! Rounds and commits come from the store; attempts, failures and the round
//! start come from the Jobs (kept at least as long as a round can last);
//! Job names are deterministic, so a repeated create meets `409 AlreadyExists`.

pub mod apply;
pub mod cleanup;
pub mod client_status;
pub mod context;
pub mod decide;
pub mod dereference;
pub mod error;
pub mod events;
pub mod http;
pub mod job_facts;
pub mod jobs;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod observation;
pub mod reconcile;
pub mod run;
pub mod status;
pub mod validate;

#[cfg(test)]
mod decide_tests;
#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use heterotune_crds::FederatedTune;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::{reflector, watcher, Controller, WatchStreamExt};
use kube::{Client, ResourceExt};

#[cfg(any(test, feature = "testing"))]
pub use crate::protocol::observe::MemoryRunStore;
pub use crate::protocol::observe::{ObjectRunStore, RunStore};
pub use context::{Context, JobConfig, OperatorConfig, ReconcileConfig, MANAGER};
pub use error::{Category, Error, Result};
pub use reconcile::{error_policy, reconcile, FINALIZER};

/// How the controller runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Watch one namespace (None: all).
    pub namespace: Option<String>,
    /// Reconciles in flight at once (0: unbounded).
    pub concurrency: u16,
    /// This replica's name in Events (the pod name).
    pub instance: Option<String>,
}

/// Runs the controller until `shutdown` resolves; in-flight reconciles
/// finish first. Errors when the CRD is not installed.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    store: Arc<dyn RunStore>,
    metrics: Arc<crate::controller::metrics::Metrics>,
    options: RunOptions,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let (fts, jobs_api): (Api<FederatedTune>, Api<Job>) = match &options.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    if let Err(e) = fts.list(&ListParams::default().limit(1)).await {
        anyhow::bail!(
            "cannot list FederatedTunes ({e}); is the CRD installed? (`heterotune crd | kubectl apply -f -` or the Helm chart)"
        );
    }
    let (reader, writer) = reflector::store::<Job>();
    let selector = format!("{}={}", names::LABEL_MANAGED_BY, MANAGER);
    let job_events = watcher(jobs_api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .modify(|j: &mut Job| j.managed_fields_mut().clear())
        .reflect(writer)
        .touched_objects();
    // The Jobs' pods, only to explain failures (OOMKilled, exit codes, the
    // log's last lines): a failing pod fails its Job, whose event triggers
    // the reconcile, so pod changes trigger nothing themselves.
    let pods_api: Api<Pod> = match &options.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (pod_reader, pod_writer) = reflector::store::<Pod>();
    let pod_watch = watcher(pods_api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .modify(|p: &mut Pod| {
            p.managed_fields_mut().clear();
            // Only the containers' states are read: drop the pod spec.
            p.spec = None;
        })
        .reflect(pod_writer)
        .for_each(|event| async move {
            if let Err(e) = event {
                tracing::debug!(error = %e, "pod watch");
            }
        });
    let pod_task = tokio::spawn(pod_watch);
    let ctx = Arc::new(
        Context::new(client, metrics, config, store, reader, options.instance)
            .with_pods(pod_reader),
    );
    tracing::info!(
        namespace = options.namespace.as_deref().unwrap_or("<all>"),
        "controller starting"
    );
    Controller::new(fts, watcher::Config::default().any_semantic())
        .owns_stream(job_events)
        .with_config(kube::runtime::controller::Config::default().concurrency(options.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(name = %obj.name, namespace = obj.namespace.as_deref().unwrap_or(""), "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile loop"),
            }
        })
        .await;
    pod_task.abort();
    tracing::info!("controller stopped");
    Ok(())
}
