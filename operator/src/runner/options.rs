//! What `heterotune run` takes ([`RunOptions`]), what it returns
//! ([`RunSummary`]) and how it fails ([`RunError`]).

use std::path::PathBuf;

use heterotune_crds::validate::Problems;

use super::lease::LeaseError;
use crate::execution::staging::StagingError;
use crate::input::spec_file::SpecFileError;
use crate::protocol::store::StoreError;
use crate::runner::report::Report;

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The FederatedTune file.
    pub spec_file: PathBuf,
    /// Trainers running at once.
    pub parallel: usize,
    /// libtorch threads per trainer.
    pub threads_per_trainer: usize,
    /// The `heterotune-trainer` binary.
    pub trainer: PathBuf,
    /// Local working folder (staged artifacts, private client state, caches).
    pub work_dir: PathBuf,
    /// Where the report is written locally (also uploaded to the store).
    pub report_dir: Option<PathBuf>,
    /// Machine-readable logs instead of progress bars.
    pub json: bool,
    /// Delete this run's artifacts and start over.
    pub fresh: bool,
    /// How often the run lease is renewed ([`super::lease`]).
    pub lease_heartbeat: std::time::Duration,
}

/// Runner errors: each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Spec(#[from] SpecFileError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("the run {run} in {store} was started with a different spec:\n{problems}\nuse --fresh to start it over, or give the FederatedTune another metadata.name")]
    SpecChanged {
        run: String,
        store: String,
        problems: Problems,
    },
    #[error("{0}")]
    Local(String),
    #[error("round {round} failed: {reason}: {message}")]
    Failed {
        round: u32,
        reason: &'static str,
        message: String,
    },
    #[error("interrupted: the run is resumable, run the same command again to continue")]
    Interrupted,
}

impl RunError {
    pub(super) fn local(what: impl Into<String>) -> Self {
        RunError::Local(what.into())
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub rounds: u32,
    pub report: Report,
    pub report_dir: PathBuf,
}
