//! Controller errors, each with a metric label and a category that tells
//! `error_policy` whether to wait for a spec change or to back off and retry.

use crate::protocol::store::StoreError;

/// Whether a person must act, or a retry may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// The object is wrong (invalid spec, nothing fits): wait for a change.
    User,
    /// The API server or the store failed: back off and retry.
    Transient,
}

/// Everything a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes {op} failed: {source}")]
    Kube {
        /// What was being done (`create job`, `patch status`, ...).
        op: &'static str,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The spec breaks a schema/CEL rule or a cluster-only rule.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// A client's model fits no GPU profile (or its size is unknown).
    #[error("{0}")]
    NoGpuProfileFits(String),
    /// The object store could not be read or written.
    #[error("object store unavailable: {0}")]
    Storage(#[source] StoreError),
    /// A Job with one of our names exists but belongs to something else.
    #[error("job {0} exists but is not owned by this FederatedTune (rename the FederatedTune or delete the job)")]
    NameConflict(String),
    /// The object lacks a namespace or UID (never from the API server).
    #[error("the object has no {0}")]
    MissingObjectKey(&'static str),
    /// Adding or removing the finalizer, or the reconcile inside it, failed.
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// A short label for the `heterotune_reconcile_errors_total` counter.
    pub fn metric_label(&self) -> &'static str {
        use kube::runtime::finalizer::Error as F;
        match self {
            Error::Kube { .. } => "kube_api",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::NoGpuProfileFits(_) => "no_gpu_profile_fits",
            Error::Storage(_) => "storage_unavailable",
            Error::NameConflict(_) => "name_conflict",
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::Finalizer(inner) => match inner.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.metric_label(),
                F::AddFinalizer(_) | F::RemoveFinalizer(_) => "finalizer_patch",
                F::UnnamedObject | F::InvalidFinalizer => "finalizer_invalid",
            },
        }
    }

    /// User error (wait for a spec change) or transient (back off).
    pub fn category(&self) -> Category {
        use kube::runtime::finalizer::Error as F;
        match self {
            Error::InvalidSpec(_)
            | Error::NoGpuProfileFits(_)
            | Error::NameConflict(_)
            | Error::MissingObjectKey(_) => Category::User,
            Error::Kube { .. } | Error::Storage(_) => Category::Transient,
            Error::Finalizer(inner) => match inner.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.category(),
                F::AddFinalizer(_) | F::RemoveFinalizer(_) => Category::Transient,
                F::UnnamedObject | F::InvalidFinalizer => Category::User,
            },
        }
    }
}

/// Results of the controller.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps a kube error with the operation it came from.
pub(crate) fn kube(op: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { op, source }
}

/// True for `409 AlreadyExists` (a create that someone, maybe we, already did).
pub(crate) fn is_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// True for `404 NotFound` (a delete of something already gone).
pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}
