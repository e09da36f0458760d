//! What the object store says about a run, as the controller imports it: the
//! shared observation of [`crate::observe`] under its old path (the
//! [`RunStore`] trait, [`ObjectRunStore`], and for tests `MemoryRunStore`).
//! The Kubernetes side (Jobs → client observations) is in
//! [`reconcile`](super::reconcile).

#[cfg(any(test, feature = "testing"))]
pub use crate::observe::MemoryRunStore;
pub use crate::observe::{
    now_seconds, previous_global_from_manifest, storage_prefix, summary_from_manifest,
    unix_seconds, CommitInfo, CompletedRound, GlobalAccuracy, ObjectRunStore, RunRef, RunStore,
    StoreObservation,
};
