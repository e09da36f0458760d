//! Reading a FederatedTune file (YAML or JSON) the way every command does:
//! parsed, checked against the CRD's schema and CEL rules, defaults applied.

use std::path::{Path, PathBuf};

use heterotune_crds::bounded::{read_text, MAX_SPEC_BYTES};
use heterotune_crds::validate::{parse_document, validate_value, Problems};
use heterotune_crds::FederatedTune;
use serde_json::Value;

/// Why a spec file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecFileError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Every problem, each with its field path.
    #[error("{file}: {} problem(s):\n{problems}", problems.0.len())]
    Invalid { file: PathBuf, problems: Problems },
}

impl SpecFileError {
    /// `problems` found in `file` beyond the schema (files, references).
    pub fn invalid(file: &Path, problems: Problems) -> Self {
        SpecFileError::Invalid {
            file: file.to_path_buf(),
            problems,
        }
    }
}

/// Reads and validates `file`; returns the object and its document with
/// defaults applied.
pub fn read(file: &Path) -> Result<(FederatedTune, Value), SpecFileError> {
    let text = read_text(file, MAX_SPEC_BYTES).map_err(|e| SpecFileError::Read {
        file: file.to_path_buf(),
        source: e,
    })?;
    let invalid = |problems| SpecFileError::invalid(file, problems);
    let mut value = parse_document(&text).map_err(invalid)?;
    let ft = validate_value(&mut value, None).map_err(invalid)?;
    Ok((ft, value))
}
