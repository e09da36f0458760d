//! One participant: its model (family, weights, dtype), its data, and where it runs.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::adapter::LayerSelectionSpec;

/// A federation participant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.site) || (!has(self.resources) && !has(self.nodeSelector) && !has(self.tolerations))",
        "message": "a client with site runs at its own site (heterotune site): resources, nodeSelector and tolerations size the operator's pods and do not apply",
        "fieldPath": ".site",
        "reason": "FieldValueForbidden"
    }
]))]
pub struct ClientSpec {
    /// Unique name: a DNS-1123 label of at most 40 characters, so that job
    /// and pod names derived from it stay within Kubernetes limits.
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// The client's frozen backbone.
    pub model: ModelSpec,

    /// The client's data, when it is not a partition of `task.dataset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<ClientDataSpec>,

    /// Explicit resources for this client's trainer, overriding the operator's
    /// estimate from the model size (for example `nvidia.com/gpu: "1"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ClientResources>,

    /// Node labels the client's trainer pods must match (merged over the
    /// chosen GPU profile's selector).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations for the client's trainer pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,

    /// LoRA rank of this client (heterogeneous ranks for `hetlora` and
    /// `flexlora`); defaults to `adapter.rank`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub lora_rank: Option<u32>,

    /// Set when the client runs at a site of its own (another cluster or
    /// organisation): the site's `heterotune site` agent pulls each round's
    /// global from the store and commits its artifact there; the operator
    /// and `heterotune run` start no trainer for it (docs/sites.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<SiteSpec>,
}

impl ClientSpec {
    /// True when a `heterotune site` agent runs this client, not the executor.
    pub fn is_remote(&self) -> bool {
        self.site.is_some()
    }
}

/// The site that runs a remote client.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SiteSpec {
    /// The site (organisation or cluster) that runs the client, for status
    /// and reports: a DNS-1123 label of at most 63 characters.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// Architecture family of a backbone. Clients of one family share a hidden
/// size only if their checkpoints do; DeMA's shared part is family-agnostic.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ModelFamily {
    /// BERT-style encoders (all-MiniLM-L6-v2, paraphrase-MiniLM-L3-v2, BERT-base, ...).
    Bert,
    /// LLaMA-style decoders (SmolLM2, TinyLlama, LLaMA-2/3, ...).
    Llama,
    /// MPNet encoders with a shared relative position bias (all-mpnet-base-v2, ...).
    Mpnet,
}

impl ModelFamily {
    /// The name used in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFamily::Bert => "bert",
            ModelFamily::Llama => "llama",
            ModelFamily::Mpnet => "mpnet",
        }
    }
}

/// Numeric type the frozen backbone is held and run in.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// Chosen by the trainer for the device it runs on: bfloat16 where the
    /// device computes it natively (a CPU with AVX512-BF16 or AMX-BF16, a
    /// CUDA GPU of compute capability 8.0 or more), float32 elsewhere
    /// ([`crate::dtype`]).
    #[default]
    Auto,
    /// 32-bit float: exact, and the fast choice on CPUs without bf16 units.
    Float32,
    /// bfloat16: half the memory; fast on GPUs and on CPUs with bf16 units,
    /// emulated (several times slower) on other CPUs.
    Bfloat16,
    /// IEEE half precision.
    Float16,
}

impl Dtype {
    /// Bytes per element; for `auto`, the most it may choose (float32's 4).
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::Auto | Dtype::Float32 => 4,
            Dtype::Bfloat16 | Dtype::Float16 => 2,
        }
    }

    /// The name used in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Auto => "auto",
            Dtype::Float32 => "float32",
            Dtype::Bfloat16 => "bfloat16",
            Dtype::Float16 => "float16",
        }
    }
}

/// A client's backbone.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelSpec {
    /// Architecture family; must match the checkpoint's `config.json`.
    pub family: ModelFamily,

    /// Where the Hugging Face layout checkpoint (config.json,
    /// model.safetensors, tokenizer.json) lives: `cache://models/NAME` (the
    /// HeteroTune model cache, filled by scripts/setup.sh), an absolute path
    /// or `file://` URI, or `s3://bucket/prefix` in the run's object store.
    #[schemars(
        length(min = 1, max = 1024),
        regex(pattern = r"^(cache://|file://|s3://|/).+")
    )]
    pub uri: String,

    /// Numeric type of the frozen backbone; `auto` (the default) lets the
    /// trainer choose bfloat16 or float32 for the device it runs on.
    #[serde(default)]
    pub dtype: Dtype,

    /// Which layers carry adapters; defaults to `adapter.layers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapted_layers: Option<LayerSelectionSpec>,

    /// Parameter count of the backbone, for GPU sizing when the operator
    /// cannot read the checkpoint's config (read from config.json otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub parameters: Option<u64>,
}

/// A client's own data.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientDataSpec {
    /// A dataset file that belongs to this client alone (same format and
    /// fields as `task.dataset`), required when `task.partition.strategy` is
    /// `shards`.
    #[schemars(
        length(min = 1, max = 1024),
        regex(pattern = r"^(cache://|file://|s3://|/).+")
    )]
    pub uri: String,
}

/// Compute resources of a client's trainer pod, in Kubernetes quantity
/// notation (`cpu: "2"`, `memory: 8Gi`, `nvidia.com/gpu: "1"`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientResources {
    /// Minimum resources the pod is scheduled with.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    /// Maximum resources the pod may use.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// A pod toleration (the same fields as Kubernetes' core/v1 Toleration).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Toleration {
    /// Taint key to tolerate; empty with operator Exists matches all taints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `Exists` or `Equal` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(Exists|Equal)$"))]
    pub operator: Option<String>,
    /// Taint value to match with `Equal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`; empty matches all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(NoSchedule|PreferNoSchedule|NoExecute)?$"))]
    pub effect: Option<String>,
    /// How long a `NoExecute` taint is tolerated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<i64>,
}
