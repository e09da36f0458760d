//! The error of reading a model folder or document.

use std::path::{Path, PathBuf};

/// A model folder or document that cannot be read, naming where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct ModelError {
    /// The file (or the folder) at fault.
    pub path: PathBuf,
    /// What is wrong and, where known, how to fix it.
    pub message: String,
}

impl ModelError {
    /// An error about `path`.
    pub fn new(path: &Path, message: impl Into<String>) -> ModelError {
        ModelError {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}
