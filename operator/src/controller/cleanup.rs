//! The deletion of a FederatedTune, behind the finalizer: applies
//! `spec.retention.onDelete` to its artifacts in the store, announces it,
//! and forgets the run. Its Jobs and spec ConfigMap go with their owner.

use heterotune_crds::spec::RetentionPolicy;
use heterotune_crds::FederatedTune;
use kube::runtime::controller::Action;
use kube::ResourceExt;

use super::context::Context;
use super::error::{Error, Result};
use super::events::{publish, Announcement};
use super::run::Run;

/// Annotation that skips the retention policy on deletion (when the store
/// is gone for good and deletion would otherwise wait forever).
pub const SKIP_RETENTION_ANNOTATION: &str = "heterotune.dev/skip-retention";

/// The Cleanup arm: applies `spec.retention.onDelete`, then lets the
/// finalizer go. Jobs and the spec ConfigMap go with their owner.
pub async fn cleanup(ft: &FederatedTune, ctx: &Context) -> Result<Action> {
    let run = Run::new(ft)?;
    let policy = ft.spec.retention.on_delete;
    let skip = ft
        .annotations()
        .get(SKIP_RETENTION_ANNOTATION)
        .map(String::as_str)
        == Some("true");
    let note = if policy == RetentionPolicy::Retain || skip || !ft.spec.storage.is_s3() {
        format!(
            "artifacts under {} are kept (retention {policy:?})",
            run.layout.run_dir()
        )
    } else {
        let removed = ctx
            .store
            .apply_retention(&run.store_ref(), policy)
            .await
            .map_err(Error::Storage)?;
        format!(
            "retention {policy:?}: removed {removed} object(s) under {}",
            run.layout.run_dir()
        )
    };
    let reason = match policy {
        RetentionPolicy::Delete if !skip => "ArtifactsDeleted",
        RetentionPolicy::Compact if !skip => "ArtifactsCompacted",
        _ => "ArtifactsRetained",
    };
    publish(
        ctx,
        ft,
        &Announcement {
            warning: false,
            reason: reason.into(),
            note,
        },
    )
    .await;
    ctx.metrics.forget(&run.namespace, &run.name);
    {
        let mut memory = ctx.memory();
        memory.applied_specs.remove(&run.uid);
        memory.failures.remove(&run.uid);
        memory.valid_generations.remove(&run.uid);
    }
    Ok(Action::await_change())
}
