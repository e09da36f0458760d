//! Object storage, the trainer container, and artifact retention.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The object store that holds every round's artifacts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageSpec {
    /// `s3://bucket/prefix` (S3-compatible), or a local folder (`file://` URI
    /// or absolute path; relative paths are taken from the working directory
    /// of `heterotune run`). A cluster needs `s3://`.
    #[serde(default = "default_uri")]
    #[schemars(length(min = 1, max = 1024))]
    pub uri: String,
    /// S3 endpoint URL for non-AWS stores (MinIO, SeaweedFS, Ceph).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^\s]+$"))]
    pub endpoint: Option<String>,
    /// S3 region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket` instead of `bucket.endpoint`
    /// (needed by most self-hosted stores).
    #[serde(default)]
    pub force_path_style: bool,
    /// Secret with the S3 credentials (keys `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` unless renamed). Only ever referenced, never copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<SecretKeyRef>,
}

fn default_uri() -> String {
    "file://heterotune-runs".to_string()
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            uri: default_uri(),
            endpoint: None,
            region: None,
            force_path_style: false,
            credentials_secret: None,
        }
    }
}

impl StorageSpec {
    /// True when the store is S3-compatible.
    pub fn is_s3(&self) -> bool {
        self.uri.starts_with("s3://")
    }
}

/// A Secret holding S3 credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Secret name, in the FederatedTune's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the access key id.
    #[serde(default = "default_access_key")]
    pub access_key_id_key: String,
    /// Key of the secret access key.
    #[serde(default = "default_secret_key")]
    pub secret_access_key_key: String,
}

fn default_access_key() -> String {
    "AWS_ACCESS_KEY_ID".to_string()
}

fn default_secret_key() -> String {
    "AWS_SECRET_ACCESS_KEY".to_string()
}

/// The trainer container.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainerSpec {
    /// Image with `heterotune` and `heterotune-trainer` (see images/trainer.Dockerfile); defaults to the operator's configured image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// `Always`, `IfNotPresent` or `Never`.
    #[serde(default = "default_pull_policy")]
    #[schemars(regex(pattern = r"^(Always|IfNotPresent|Never)$"))]
    pub image_pull_policy: String,
    /// Service account of trainer and aggregation pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Let clients whose model fits no GPU profile run on CPU.
    #[serde(default = "super::defaults::yes")]
    pub allow_cpu: bool,
}

fn default_pull_policy() -> String {
    "IfNotPresent".to_string()
}

impl Default for TrainerSpec {
    fn default() -> Self {
        TrainerSpec {
            image: None,
            image_pull_policy: default_pull_policy(),
            service_account_name: None,
            allow_cpu: true,
        }
    }
}

/// Artifact retention.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetentionSpec {
    /// What deleting the FederatedTune does to its artifacts.
    #[serde(default)]
    pub on_delete: RetentionPolicy,
    /// Keep client artifacts of only the last N rounds (global artifacts are
    /// always kept); unset keeps all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub keep_client_rounds: Option<u32>,
}

/// Deletion policies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RetentionPolicy {
    /// Leave every artifact in the store.
    #[default]
    Retain,
    /// Delete client artifacts and private states, keep the global ones (the
    /// trained adapters).
    Compact,
    /// Delete the run's whole prefix.
    Delete,
}
