//! Why a client artifact was rejected ([`RejectReason`], with stable
//! labels) and the record of a reject ([`Reject`]); the checks themselves
//! are in `verify.rs`.

use serde::{Deserialize, Serialize};

/// Why a client artifact was rejected. [`RejectReason::label`] is stable:
/// use it as a metric label (`heterotune_artifacts_rejected_total{reason=...}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The manifest could not be read (not a file, too large, I/O error).
    ManifestUnreadable,
    /// The manifest is not a valid artifact manifest (or names a data file
    /// outside its directory).
    ManifestInvalid,
    /// The manifest is not a client manifest.
    WrongKind,
    /// The manifest's schema version is not the one this build reads.
    UnsupportedSchema,
    /// The manifest belongs to another run.
    WrongRun,
    /// The manifest belongs to another round.
    WrongRound,
    /// The update was trained from another global state than the previous round's.
    StaleBase,
    /// The manifest names another client than its directory.
    ClientMismatch,
    /// The client is not in the spec.
    UnknownClient,
    /// The manifest's family is not the family of the client's model.
    FamilyMismatch,
    /// The manifest's `numExamples` (the aggregation weight) is 0 or above
    /// [`MAX_EXAMPLES`].
    InvalidExamples,
    /// The artifact is larger than `aggregation.maxArtifactBytes`.
    TooLarge,
    /// The data file is missing, a link or not a regular file.
    NotAFile,
    /// The data file's size differs from the manifest's (truncated upload).
    SizeMismatch,
    /// The data file's sha256 differs from the manifest's.
    ChecksumMismatch,
    /// The data file is not valid safetensors.
    MalformedData,
    /// The manifest's tensor list differs from the data file's header.
    ManifestTensorsMismatch,
    /// An expected tensor is absent.
    MissingTensor,
    /// A tensor the spec does not imply for this client is present.
    UnexpectedTensor,
    /// A tensor is not BF16.
    WrongDtype,
    /// A tensor's shape differs from the expected one.
    WrongShape,
    /// A value is NaN or infinite.
    NonFinite,
    /// The update's norm exceeds `maxUpdateNorm` (with `normBoundAction: reject`).
    NormExceeded,
}

impl RejectReason {
    /// Every reason, in declaration order.
    pub const ALL: [RejectReason; 23] = [
        RejectReason::ManifestUnreadable,
        RejectReason::ManifestInvalid,
        RejectReason::WrongKind,
        RejectReason::UnsupportedSchema,
        RejectReason::WrongRun,
        RejectReason::WrongRound,
        RejectReason::StaleBase,
        RejectReason::ClientMismatch,
        RejectReason::UnknownClient,
        RejectReason::FamilyMismatch,
        RejectReason::InvalidExamples,
        RejectReason::TooLarge,
        RejectReason::NotAFile,
        RejectReason::SizeMismatch,
        RejectReason::ChecksumMismatch,
        RejectReason::MalformedData,
        RejectReason::ManifestTensorsMismatch,
        RejectReason::MissingTensor,
        RejectReason::UnexpectedTensor,
        RejectReason::WrongDtype,
        RejectReason::WrongShape,
        RejectReason::NonFinite,
        RejectReason::NormExceeded,
    ];

    /// Stable snake_case label (metrics, stats, logs).
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::ManifestUnreadable => "manifest_unreadable",
            RejectReason::ManifestInvalid => "manifest_invalid",
            RejectReason::WrongKind => "wrong_kind",
            RejectReason::UnsupportedSchema => "unsupported_schema",
            RejectReason::WrongRun => "wrong_run",
            RejectReason::WrongRound => "wrong_round",
            RejectReason::StaleBase => "stale_base",
            RejectReason::ClientMismatch => "client_mismatch",
            RejectReason::UnknownClient => "unknown_client",
            RejectReason::FamilyMismatch => "family_mismatch",
            RejectReason::InvalidExamples => "invalid_examples",
            RejectReason::TooLarge => "too_large",
            RejectReason::NotAFile => "not_a_file",
            RejectReason::SizeMismatch => "size_mismatch",
            RejectReason::ChecksumMismatch => "checksum_mismatch",
            RejectReason::MalformedData => "malformed_data",
            RejectReason::ManifestTensorsMismatch => "manifest_tensors_mismatch",
            RejectReason::MissingTensor => "missing_tensor",
            RejectReason::UnexpectedTensor => "unexpected_tensor",
            RejectReason::WrongDtype => "wrong_dtype",
            RejectReason::WrongShape => "wrong_shape",
            RejectReason::NonFinite => "non_finite",
            RejectReason::NormExceeded => "norm_exceeded",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A rejected artifact: never aggregated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reject {
    /// The client directory's name (the claimed client).
    pub client: String,
    /// Why.
    pub reason: RejectReason,
    /// Human-readable detail (never contains tensor values).
    pub detail: String,
    /// Bytes of the data file that were read before rejecting (0 if none).
    pub bytes: u64,
}

/// Builds the [`Reject`]s of one client directory.
pub(crate) struct Rejecter<'a> {
    /// The client directory's name.
    pub client: &'a str,
    /// Bytes of the data file read so far.
    pub bytes: u64,
}

impl Rejecter<'_> {
    /// The reject of this client for `reason`.
    pub fn reject(&self, reason: RejectReason, detail: impl Into<String>) -> Reject {
        Reject {
            client: self.client.to_string(),
            reason,
            detail: detail.into(),
            bytes: self.bytes,
        }
    }
}
