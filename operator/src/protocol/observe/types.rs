//! The data of an observation: which run is looked at ([`RunRef`]), what the
//! store says about it ([`StoreObservation`] for the controller,
//! [`RunObservation`] with the report's [`RoundFacts`] for the local runner),
//! and the [`RunStore`] trait the controller observes through.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use heterotune_crds::layout::RunLayout;
use heterotune_crds::manifest::{ArtifactManifest, EvaluationResult};
use heterotune_crds::spec::{RetentionPolicy, StorageSpec};
use heterotune_crds::status::RoundSummary;

use crate::protocol::store::StoreError;

/// One run in its store.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRef {
    /// Where the store is.
    pub storage: StorageSpec,
    /// The run's keys (relative to the bucket root, storage prefix included).
    pub layout: RunLayout,
    /// Client names, in spec order.
    pub clients: Vec<String>,
    /// `spec.rounds` (no round beyond it is looked for).
    pub rounds: u32,
}

/// A committed client artifact.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CommitInfo {
    /// When its manifest was written (Unix seconds).
    pub committed_at: f64,
    /// Artifact size in bytes.
    pub bytes: u64,
}

/// A completed round, from its global manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletedRound {
    /// Accuracy, bytes, participants, rejects.
    pub summary: RoundSummary,
    /// When the global manifest was written (Unix seconds).
    pub completed_at: Option<f64>,
    /// The previous round's global model as this round's participants
    /// received it: mean accuracy and per family (`previous_global_*`).
    pub previous_global: Option<GlobalAccuracy>,
}

/// The accuracy of one round's global model: overall and per family.
pub type GlobalAccuracy = (f64, BTreeMap<String, f64>);

/// The store's view of a run: the controller's with round summaries
/// (`R` = [`CompletedRound`]), the local runner's with the report's facts
/// ([`RunObservation`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StoreObservation<R = CompletedRound> {
    /// Rounds `1..=completed_rounds` have a global manifest.
    pub completed_rounds: u32,
    /// Committed client artifacts of round `completed_rounds + 1`.
    pub committed: BTreeMap<String, CommitInfo>,
    /// Rounds after `since` (the caller's last known round) up to
    /// `completed_rounds`, oldest first (the controller keeps at most
    /// [`MAX_HISTORY`](heterotune_crds::status::MAX_HISTORY)).
    pub new_rounds: Vec<R>,
    /// When every round is complete: the clients' evaluations of the last
    /// round's global model, by client.
    pub evaluated: BTreeMap<String, EvaluationResult>,
}

impl<R> Default for StoreObservation<R> {
    fn default() -> Self {
        StoreObservation {
            completed_rounds: 0,
            committed: BTreeMap::new(),
            new_rounds: Vec::new(),
            evaluated: BTreeMap::new(),
        }
    }
}

/// One look at the store with the facts of each round completed since the
/// last look (what the run report is built from).
pub type RunObservation = StoreObservation<RoundFacts>;

/// A completed round as the store holds it: what the run report is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundFacts {
    /// The round.
    pub round: u32,
    /// Its global manifest (`None`: present but unreadable).
    pub global: Option<ArtifactManifest>,
    /// The manifests of its participants (every spec client with a
    /// manifest when the global manifest names none), in spec order; empty
    /// unless [`Look::client_manifests`] asked for them.
    pub clients: Vec<(String, ArtifactManifest)>,
}

/// What to read in one look at the store.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Look {
    /// The last completed round the caller already knows (a hint: a stale
    /// one falls back to a full look).
    pub since: u32,
    /// At most this many of the newly completed rounds (the newest).
    pub history: usize,
    /// Also read the participants' manifests of each newly completed round.
    pub client_manifests: bool,
}

/// What the controller needs from the object store.
pub trait RunStore: Send + Sync {
    /// Observes `run`. `since` is the last completed round the caller already
    /// knows (from status); implementations may start looking there, but must
    /// fall back to a full look when that round's global manifest is absent.
    fn observe<'a>(
        &'a self,
        run: &'a RunRef,
        since: u32,
    ) -> BoxFuture<'a, Result<StoreObservation, StoreError>>;

    /// The bytes of the `config.json` of the model at `uri`
    /// (`s3://bucket/prefix`), or `None` when it does not exist (parse them
    /// with `heterotune_crds::model::ModelFacts::from_bytes`).
    fn model_config<'a>(
        &'a self,
        storage: &'a StorageSpec,
        uri: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>>;

    /// Records the run's spec document (`<run>/spec.json`, what site agents
    /// check the spec they joined against) unless it already holds exactly
    /// `document`; true when it wrote.
    fn record_spec<'a>(
        &'a self,
        run: &'a RunRef,
        document: Vec<u8>,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Applies `spec.retention.onDelete` to the run's artifacts; returns how
    /// many objects were deleted.
    fn apply_retention<'a>(
        &'a self,
        run: &'a RunRef,
        policy: RetentionPolicy,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;
}
