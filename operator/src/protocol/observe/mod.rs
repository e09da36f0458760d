//! One observation of the round protocol for both executors: what the
//! object store says about a run, turned into the planner's facts and the
//! report's.
//!
//! * [`types`]: [`RunRef`] (the run looked at), [`StoreObservation`] (the
//!   controller's view), [`RunObservation`] and [`RoundFacts`] (the local
//!   runner's view, with what the report is built from), the [`RunStore`]
//!   trait the controller observes through.
//! * [`reader`]: [`RunReader`], the store reads both executors share.
//! * [`manifest`]: what a global manifest records (round summaries,
//!   participants, the previous round's global accuracy) and manifest times.
//! * [`object`]: [`ObjectRunStore`], the controller's [`RunStore`] over the
//!   object store.
//! * `memory` (tests and the `testing` feature): `MemoryRunStore`, the
//!   controller's store in memory.
//!
//! The Kubernetes side (Jobs → client observations) stays in
//! [`crate::controller`]; the local runner adds its processes in
//! [`crate::runner`].

pub mod manifest;
#[cfg(any(test, feature = "testing"))]
pub mod memory;
pub mod object;
pub mod reader;
pub mod types;

pub use manifest::{
    completed_round, now_seconds, participants, previous_global_from_manifest,
    summary_from_manifest, unix_seconds,
};
#[cfg(any(test, feature = "testing"))]
pub use memory::MemoryRunStore;
pub use object::{storage_prefix, ObjectRunStore};
pub use reader::RunReader;
pub use types::{
    CommitInfo, CompletedRound, GlobalAccuracy, Look, RoundFacts, RunObservation, RunRef, RunStore,
    StoreObservation,
};
