//! The Kubernetes controller for `FederatedTune`, owning batch/v1 Jobs.
//!
//! Shaped like kube-rs's controller-rs, with stackable's explicit steps and
//! the pure round planner ([`crate::planner`]) in the middle:
//!
//! * [`reconcile`](reconcile::reconcile): validate → observe (the Jobs of the
//!   run from a reflector cache, the store through [`RunStore`]) → size
//!   ([`crate::sizing`]) → [`crate::planner::plan`] → apply (create trainer
//!   and aggregation Jobs, delete stragglers) → status by server-side apply →
//!   Events; deletion runs the retention policy behind a finalizer.
//! * [`jobs`]: the desired Jobs and ConfigMap, built by pure functions.
//! * [`status`]: the status and its Events, computed by pure functions.
//! * [`observe`]: the [`RunStore`] trait (what the store says), an in-memory
//!   implementation for tests and one over [`crate::store::Store`].
//!
//! Restart safety: nothing the controller needs lives only in its memory.
//! Rounds and commits come from the store; attempts, failures and the round
//! start come from the Jobs (kept at least as long as a round can last);
//! Job names are deterministic, so a repeated create meets `409 AlreadyExists`.

pub mod context;
pub mod error;
pub mod jobs;
pub mod observe;
pub mod reconcile;
pub mod status;

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

pub use context::{Context, JobConfig, OperatorConfig, ReconcileConfig, MANAGER};
pub use error::{Category, Error, Result};
#[cfg(any(test, feature = "testing"))]
pub use observe::MemoryRunStore;
pub use observe::{ObjectRunStore, RunStore};
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
    metrics: Arc<crate::metrics::Metrics>,
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
    let selector = format!("{}={}", jobs::LABEL_MANAGED_BY, MANAGER);
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
