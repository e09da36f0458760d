//! Step 3 of a reconcile, I/O only: carries out the decided [`JobIntents`]
//! against the API server (the spec ConfigMap, then the creates, then the
//! deletes). A create that meets `409 AlreadyExists` and a delete that meets
//! `404 NotFound` already happened, so a repeated reconcile is harmless.

use std::future::Future;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

use super::context::{Context, MANAGER};
use super::decide::JobIntents;
use super::error::{is_already_exists, is_not_found, kube, Result};
use super::jobs;
use super::names::{spec_config_map_name, LABEL_ROLE};
use super::run::Run;

/// Creates and deletes the Jobs of `intents`.
pub async fn apply(ctx: &Context, run: &Run<'_>, intents: JobIntents) -> Result<()> {
    if !intents.create.is_empty() {
        ensure_spec_config_map(ctx, run).await?;
        create_jobs(ctx, &run.namespace, intents.create).await?;
    }
    delete_jobs(ctx, &run.namespace, intents.cancel, "straggler").await?;
    delete_jobs(ctx, &run.namespace, intents.stale, "stale").await
}

/// Applies the spec ConfigMap when its content differs from what this
/// process last applied (after a restart: once).
async fn ensure_spec_config_map(ctx: &Context, run: &Run<'_>) -> Result<()> {
    let cm = jobs::spec_config_map(run);
    let hash = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_string(&cm.data)
            .unwrap_or_default()
            .hash(&mut h);
        h.finish()
    };
    if ctx.memory().applied_specs.get(&run.uid) == Some(&hash) {
        return Ok(());
    }
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &run.namespace);
    api.patch(
        &spec_config_map_name(&run.name),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map_err(kube("apply spec configmap"))?;
    ctx.memory().applied_specs.insert(run.uid.clone(), hash);
    Ok(())
}

/// Runs `call` on every item, `api_concurrency` calls in flight at once,
/// and stops at the first error.
async fn each<T, F, Fut>(ctx: &Context, items: Vec<T>, call: F) -> Result<()>
where
    F: FnMut(T) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let concurrency = ctx.config.reconcile.api_concurrency.max(1);
    futures::stream::iter(items)
        .map(call)
        .buffered(concurrency)
        .try_collect::<Vec<()>>()
        .await
        .map(|_| ())
}

/// Creates `jobs`; one that exists already was created before (by us,
/// before a restart or with a stale cache).
async fn create_jobs(ctx: &Context, namespace: &str, jobs: Vec<Job>) -> Result<()> {
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    each(ctx, jobs, |job| {
        let api = api.clone();
        async move {
            let role = job
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_ROLE))
                .cloned()
                .unwrap_or_default();
            match api.create(&PostParams::default(), &job).await {
                Ok(_) => {
                    ctx.metrics
                        .jobs_created
                        .with_label_values(&[role.as_str()])
                        .inc();
                    Ok(())
                }
                Err(e) if is_already_exists(&e) => Ok(()),
                Err(e) => Err(kube("create job")(e)),
            }
        }
    })
    .await
}

/// Deletes the Jobs `names` (counted under `reason`); one already gone is
/// fine.
async fn delete_jobs(
    ctx: &Context,
    namespace: &str,
    names: Vec<String>,
    reason: &str,
) -> Result<()> {
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    each(ctx, names, |name| {
        let api = api.clone();
        async move {
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {
                    ctx.metrics.jobs_deleted.with_label_values(&[reason]).inc();
                    Ok(())
                }
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(kube("delete job")(e)),
            }
        }
    })
    .await
}
