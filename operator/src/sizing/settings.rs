//! Operator-wide sizing settings (Helm `sizing` values): GPU profiles, the
//! CPU policy, margins, and Kubernetes memory quantities.

use std::collections::BTreeMap;

use heterotune_crds::spec::{Dtype, Toleration};
use serde::{Deserialize, Serialize};

use super::{GIB, MIB};

/// Operator-wide sizing settings (Helm `sizing` values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SizingConfig {
    /// GPU profiles, in any order (the smallest that fits is chosen).
    #[serde(default)]
    pub gpu_profiles: Vec<GpuProfile>,
    /// CPU placement.
    #[serde(default)]
    pub cpu: CpuPolicy,
    /// Margin on the estimate, in percent.
    #[serde(default = "default_margin")]
    pub margin_percent: u64,
    /// Fixed GPU runtime overhead (CUDA context, cuBLAS workspace, kernels).
    #[serde(default = "default_gpu_overhead", with = "quantity")]
    pub gpu_runtime_overhead: u64,
    /// Fixed runtime overhead of a CPU trainer: the process with libtorch
    /// loaded, tokenizer, data, allocator (calibrated against
    /// `scripts/bench_memory.py`, docs/data/memory.json).
    #[serde(default = "default_cpu_overhead", with = "quantity")]
    pub cpu_runtime_overhead: u64,
    /// Host memory of a GPU trainer besides the staged weights (the CUDA
    /// libraries and the host side of the runtime).
    #[serde(default = "default_gpu_host_overhead", with = "quantity")]
    pub gpu_host_overhead: u64,
}

fn default_margin() -> u64 {
    10
}
fn default_gpu_overhead() -> u64 {
    GIB
}
fn default_cpu_overhead() -> u64 {
    CPU_RUNTIME_MIB * MIB
}
fn default_gpu_host_overhead() -> u64 {
    512 * MIB
}

/// The default CPU runtime overhead in MiB: the trainer process with
/// libtorch loaded and no model measures 114 MiB; the rest is its
/// tokenizer, data and allocator (fitted to docs/data/memory.json).
pub const CPU_RUNTIME_MIB: u64 = 180;

impl Default for SizingConfig {
    fn default() -> Self {
        SizingConfig {
            gpu_profiles: Vec::new(),
            cpu: CpuPolicy::default(),
            margin_percent: default_margin(),
            gpu_runtime_overhead: default_gpu_overhead(),
            cpu_runtime_overhead: default_cpu_overhead(),
            gpu_host_overhead: default_gpu_host_overhead(),
        }
    }
}

/// A kind of GPU node (Helm `sizing.gpuProfiles[]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuProfile {
    /// Name shown in status (`l4-24gb`).
    pub name: String,
    /// Memory of one GPU: bytes, or a quantity such as `24Gi`.
    #[serde(with = "quantity")]
    pub memory: u64,
    /// Extended resource to request (`nvidia.com/gpu`, or a MIG slice such as
    /// `nvidia.com/mig-3g.40gb`).
    #[serde(default = "default_gpu_resource")]
    pub resource_name: String,
    /// GPUs requested per pod.
    #[serde(default = "one")]
    pub gpus_per_pod: u32,
    /// Node labels of this kind of node.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for its taints.
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// CPU request of a pod on this profile.
    #[serde(default = "default_gpu_pod_cpu")]
    pub cpu: String,
}

fn default_gpu_resource() -> String {
    "nvidia.com/gpu".to_string()
}
fn one() -> u32 {
    1
}
fn default_gpu_pod_cpu() -> String {
    "4".to_string()
}

/// CPU placement policy (Helm `sizing.cpu`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CpuPolicy {
    /// Largest model (parameters) that may train on CPU.
    #[serde(default = "default_cpu_max_parameters")]
    pub max_parameters: u64,
    /// Put small models on CPU even when a GPU profile would fit.
    #[serde(default = "yes")]
    pub prefer_for_small_models: bool,
    /// CPU request of a CPU trainer pod.
    #[serde(default = "default_cpu_request")]
    pub request: String,
    /// What `dtype: auto` is sized as on a CPU: `float32` (the default, an
    /// upper bound: the operator cannot see a node's CPU) or `bfloat16`
    /// when every CPU node has bf16 units (`heterotune plan` sets it from
    /// the CPU it runs on).
    #[serde(default = "default_cpu_auto_dtype")]
    pub auto_dtype: Dtype,
}

fn default_cpu_max_parameters() -> u64 {
    200_000_000
}
fn yes() -> bool {
    true
}
fn default_cpu_request() -> String {
    "2".to_string()
}
fn default_cpu_auto_dtype() -> Dtype {
    Dtype::Float32
}

impl Default for CpuPolicy {
    fn default() -> Self {
        CpuPolicy {
            max_parameters: default_cpu_max_parameters(),
            prefer_for_small_models: true,
            request: default_cpu_request(),
            auto_dtype: default_cpu_auto_dtype(),
        }
    }
}

/// Parses a Kubernetes memory quantity (`24Gi`, `512M`, `1e9`, `1073741824`) into bytes.
pub fn parse_quantity(text: &str) -> Option<u64> {
    let t = text.trim();
    let suffixes: [(&str, f64); 12] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (number, factor) = suffixes
        .iter()
        .find_map(|(s, f)| t.strip_suffix(s).map(|n| (n, *f)))
        .unwrap_or((t, 1.0));
    let value: f64 = number.parse().ok()?;
    (value.is_finite() && value >= 0.0).then(|| (value * factor).ceil() as u64)
}

/// Formats bytes as a Kubernetes quantity, rounded up to whole MiB.
pub fn quantity_mib(bytes: u64) -> String {
    format!("{}Mi", bytes.div_ceil(MIB))
}

/// serde for memory sizes given as a number of bytes or a quantity string.
mod quantity {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(n),
            Raw::S(s) => super::parse_quantity(&s).ok_or_else(|| {
                serde::de::Error::custom(format!("{s:?} is not a memory quantity (e.g. 24Gi)"))
            }),
        }
    }
}
