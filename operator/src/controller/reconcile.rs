//! The controller's entry points. One reconcile is a short chain of steps,
//! each in its own module:
//!
//! 1. [`validate`](super::validate::check) the spec (pure, once per generation);
//! 2. [`dereference`](super::dereference::dereference): read the run's Jobs,
//!    the store's view of the run and the models' shapes;
//! 3. [`decide`](super::decide::decide) (pure): placements, the planner's
//!    actions and the existing Jobs become Jobs to create and delete, the
//!    status and the Events;
//! 4. [`apply`](super::apply::apply) (I/O only): carry out the Job intents;
//! 5. [`status`](super::status::write): write the status by server-side
//!    apply, publish the Events, update the metrics.
//!
//! An invalid spec or an unreadable store stops the chain after step 1 or 2
//! with a Degraded status. Deletion runs [`cleanup`](super::cleanup::cleanup)
//! behind the finalizer.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use heterotune_crds::FederatedTune;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::ResourceExt;

use super::apply;
use super::cleanup::cleanup;
use super::context::Context;
use super::decide::decide;
use super::dereference::dereference;
use super::error::{Category, Error, Result};
use super::run::Run;
use super::status;
use super::validate;

/// The finalizer that applies `spec.retention.onDelete` before deletion.
pub const FINALIZER: &str = "heterotune.dev/artifacts";

/// Reconciles one FederatedTune (the controller's entry point).
pub async fn reconcile(ft: Arc<FederatedTune>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    if ctx.jobs.wait_until_ready().now_or_never().is_none() {
        // The Job cache has not finished its first list: acting now could
        // misjudge the round (creates would only meet 409s, but status would flicker).
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let ns = ft.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
    let uid = ft.uid().unwrap_or_default();
    let api: Api<FederatedTune> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, ft, |event| async {
        match event {
            Finalizer::Apply(ft) => reconcile_run(&ft, &ctx).await,
            Finalizer::Cleanup(ft) => cleanup(&ft, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok() {
        ctx.memory().failures.remove(&uid);
    }
    result
}

/// What to do after a failed reconcile: user errors wait for a change of the
/// object; transient ones are retried with exponential backoff.
pub fn error_policy(ft: Arc<FederatedTune>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error.metric_label());
    match error.category() {
        Category::User => {
            tracing::info!(name = %ft.name_any(), error = %error, "waiting for a change of the FederatedTune");
            Action::await_change()
        }
        Category::Transient => {
            let uid = ft.uid().unwrap_or_default();
            let n = {
                let mut memory = ctx.memory();
                let n = memory.failures.entry(uid).or_insert(0);
                *n = n.saturating_add(1);
                *n
            };
            let cfg = &ctx.config.reconcile;
            let delay = cfg
                .error_backoff_seconds
                .saturating_mul(1u64 << (n - 1).min(16))
                .min(cfg.error_backoff_max_seconds);
            tracing::warn!(name = %ft.name_any(), error = %error, retry_in_s = delay, "reconcile failed");
            Action::requeue(Duration::from_secs(delay))
        }
    }
}

/// The finalizer's Apply arm (everything but deletion): the chain of steps.
async fn reconcile_run(ft: &FederatedTune, ctx: &Context) -> Result<Action> {
    let run = Run::new(ft)?;
    let looked = async {
        validate::check(ctx, &run)?;
        dereference(ctx, &run).await
    };
    let world = match looked.await {
        Ok(world) => world,
        Err(e) => return Err(status::degrade(ctx, &run, e).await),
    };
    let decision = decide(&run, &world, &ctx.config);
    let outcome = decision.outcome(ctx.config.reconcile.store_poll_seconds);
    apply::apply(ctx, &run, decision.jobs).await?;
    status::record_metrics(ctx, &run, &decision.status, decision.round_started_at);
    status::write(ctx, ft, decision.status, decision.events).await?;
    outcome
}
