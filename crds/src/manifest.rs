//! The artifact manifest: the commit marker of every upload in the round
//! protocol, written last, after the data it describes.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Version of the manifest format written by this build.
pub const MANIFEST_SCHEMA_VERSION: u32 = 1;

/// Who wrote an artifact.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// A client's update for one round.
    Client,
    /// The aggregated state after one round.
    Global,
}

/// A tensor inside an artifact.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct TensorInfo {
    /// Name, e.g. `shared.slot0.experts.weight`.
    pub name: String,
    /// safetensors dtype name, e.g. `BF16`, `F32`.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
}

/// Digest of a stored file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct FileDigest {
    /// File name relative to the manifest's directory.
    pub path: String,
    /// Lower-case hex SHA-256 of the file's bytes.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// The manifest of one artifact.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactManifest {
    /// Format version ([`MANIFEST_SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// Client update or global state.
    pub kind: ArtifactKind,
    /// The run directory this artifact belongs to (guards against mixing runs).
    pub run: String,
    /// The round the artifact belongs to.
    pub round: u32,
    /// The global round the client started from (0: the initial state).
    pub base_round: u32,
    /// Client name (client artifacts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Model family (client artifacts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// The data file.
    pub artifact: FileDigest,
    /// The tensors in the data file.
    pub tensors: Vec<TensorInfo>,
    /// Training examples behind the update (the aggregation weight).
    #[serde(default)]
    pub num_examples: u64,
    /// Metrics: loss, accuracy, macro_f1, steps_per_second, peak_rss_bytes, ...
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Free-form statistics of the writer (aggregation: participants, rejects, cosines).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub stats: serde_json::Value,
    /// Version of the program that wrote the artifact.
    pub writer_version: String,
    /// Creation time (RFC 3339).
    pub created_at: String,
}

/// The current UTC time as RFC 3339, to the second (for `createdAt`).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// `secs` since the Unix epoch as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_by_hand() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_597_200), "2026-11-25T09:00:00Z");
    }
}
