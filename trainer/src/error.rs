//! The trainer library's error type. Every variant names the file or field
//! that is wrong and, where there is one, the fix.

use std::path::PathBuf;

/// Errors raised by the trainer library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model directory or checkpoint is missing something or is inconsistent.
    #[error("model {path}: {message}")]
    Model { path: PathBuf, message: String },
    /// A dataset file or its configuration is unusable.
    #[error("dataset {path}: {message}")]
    Data { path: PathBuf, message: String },
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration `{field}`: {message}")]
    Config { field: String, message: String },
    /// An aggregation round cannot complete: fewer client updates were
    /// accepted than the spec's quorum (`minClients`). Nothing was written.
    #[error("round {round}: quorum not met: {accepted} client update(s) accepted, {required} required ({summary})")]
    QuorumNotMet {
        round: u32,
        accepted: usize,
        required: u32,
        /// Rejected clients with their reasons, and missing clients.
        summary: String,
    },
    /// An error raised by libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The `--device` asked for cannot be used (the message names the fix).
    #[error("--device {0}")]
    Device(String),
    /// An error with what was being done when it happened.
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Result alias for the trainer library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::Model`] for `path`.
    pub fn model(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            message: message.into(),
        }
    }

    /// Builds an [`Error::Data`] for `path`.
    pub fn data(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            message: message.into(),
        }
    }

    /// Builds an [`Error::Config`] for `field`.
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Adds what was being done to an error ([`Error::Context`]).
pub trait Context<T> {
    /// Wraps the error, if any, in [`Error::Context`] with `context()`.
    fn context_with(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn context_with(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context(),
            source: Box::new(e),
        })
    }
}

impl From<heterotune_crds::model::SlotError> for Error {
    fn from(e: heterotune_crds::model::SlotError) -> Self {
        Error::config(e.field, e.message)
    }
}

impl From<heterotune_crds::model::ModelError> for Error {
    fn from(e: heterotune_crds::model::ModelError) -> Self {
        Error::Model {
            path: e.path,
            message: e.message,
        }
    }
}
