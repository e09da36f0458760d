//! GPU sizing: how much memory one client's trainer needs, and where it runs.
//!
//! Pure functions, no I/O. The estimate follows what the trainer holds while
//! it trains one client (see `trainer/src/train.rs` and `adapters/dema.rs`):
//!
//! | part | bytes |
//! |---|---|
//! | frozen weights | `P · e` (`e`: bytes per element of `model.dtype`) |
//! | adapter state | `16 · A`: f32 weights, gradients and AdamW's two moments of the `A` trainable parameters |
//! | stored activations | `W · act(b)`: the `W` layers above the first adapted layer keep their activations for the backward pass |
//! | forward workspace | `act(max(b, b_eval))`: one layer in flight (training or evaluation batch) |
//! | frozen-prefix cache | `prefixCache.maxMemoryMib` when enabled (the trainer keeps it on the device and fills it up to that bound) |
//! | margin | `marginPercent` of the sum above (allocator fragmentation, small tensors) |
//! | runtime | a fixed overhead: CUDA context, cuBLAS workspace and kernels on a GPU; process, tokenizer and data on a CPU |
//!
//! `act(b)` is the activation memory of one transformer layer from Korthikanti
//! et al., "Reducing Activation Recomputation in Large Transformer Models"
//! (2022), eq. 1: `s·b·d·(34 + 5·h·s/d)` bytes in a 16-bit dtype, scaled by
//! `e/2` (twice that in f32). With `training.gradientCheckpointing` a layer
//! keeps only its input (`b·s·d·e`) and one layer is recomputed at a time.
//!
//! `A` (DeMA): shared `S·(K·(r²+r) + K·r + K)` + family-specific `2·r·d` per
//! adapted layer + the head `d·C + C`. LoRA: `4·r·d` per adapted layer (query
//! and value projections) + the head. The adapted layers follow the trainer's
//! slot map (`floor(j·S/n)` over the window of `n` layers).
//!
//! The model's shape comes, in this order, from its `config.json` (read from
//! the store by the controller), from the table of packaged models
//! ([`packaged_model`]), or from `clients[].model.parameters` with the
//! LLaMA-like aspect ratio `L = d/128` (so `P ≈ 12·L·d² = 3·d³/32`).
//!
//! Placement ([`place`]): explicit `clients[].resources` win; else a small
//! model (at most `cpu.maxParameters`, default 200 M, which covers the three
//! packaged models) runs on CPU when `trainer.allowCpu` is set and
//! `cpu.preferForSmallModels` is on; else the smallest configured GPU profile
//! whose per-GPU memory holds the estimate (the trainer uses one device, so
//! `gpusPerPod` does not divide the estimate); else CPU for a small model
//! when allowed; else [`SizingError::NoGpuProfileFits`].

use std::collections::BTreeMap;

use heterotune_crds::model::facts::{bert_parameters, llama_parameters};
use heterotune_crds::model::{slots, LayerSelection, ModelFacts, SlotMap};
use heterotune_crds::spec::{
    AdapterKind, ClientSpec, Dtype, FederatedTuneSpec, LayerSelectionSpec, ModelFamily, Toleration,
};
use serde::{Deserialize, Serialize};

/// One mebibyte.
pub const MIB: u64 = 1024 * 1024;
/// One gibibyte.
pub const GIB: u64 = 1024 * MIB;

/// Where a model's shape came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ShapeSource {
    /// The checkpoint's `config.json`.
    Config,
    /// The table of packaged models.
    Packaged,
    /// `clients[].model.parameters` with an assumed aspect ratio.
    Parameters,
}

/// The shape of a backbone, as far as memory is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelShape {
    /// Architecture family.
    pub family: ModelFamily,
    /// Parameters the trainer loads (BERT without the pooler; LLaMA with
    /// `lm_head` when it is not tied).
    pub parameters: u64,
    /// Hidden size `d`.
    pub hidden_size: u64,
    /// Layers `L`.
    pub num_layers: u64,
    /// Attention heads `h`.
    pub num_heads: u64,
    /// Vocabulary size.
    pub vocab_size: u64,
    /// MLP width.
    pub intermediate_size: u64,
    /// Where the numbers came from.
    pub source: ShapeSource,
}

/// Why a shape or a placement could not be worked out.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SizingError {
    /// `config.json` lacks a field or has an unknown `model_type`.
    #[error("model config: {0}")]
    Config(String),
    /// Nothing says how large the model is.
    #[error("the size of {uri} is unknown: the operator cannot read its config.json and it is not a packaged model; set spec.clients[{index}].model.parameters or spec.clients[{index}].resources")]
    UnknownModel { index: usize, uri: String },
    /// The estimate exceeds every GPU profile and CPU is not an option.
    #[error("client {client} needs about {} of accelerator memory but the largest GPU profile{} has {}{}", human_bytes(*needed), largest_name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default(), human_bytes(*largest), cpu_note)]
    NoGpuProfileFits {
        client: String,
        needed: u64,
        largest: u64,
        largest_name: Option<String>,
        cpu_note: String,
    },
}

/// Formats bytes as GiB/MiB for messages.
pub fn human_bytes(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{:.0} MiB", bytes as f64 / MIB as f64)
    }
}

impl ModelShape {
    /// Reads the shape from a Hugging Face `config.json`.
    pub fn from_config_json(config: &serde_json::Value) -> Result<ModelShape, SizingError> {
        let facts = ModelFacts::from_value(std::path::Path::new("config.json"), config.clone())
            .map_err(|e| SizingError::Config(e.message))?;
        Ok(ModelShape::from_facts(&facts))
    }

    /// The shape of a model whose facts were read.
    pub fn from_facts(facts: &ModelFacts) -> ModelShape {
        ModelShape {
            family: facts.family,
            parameters: facts.parameters(),
            hidden_size: facts.hidden_size,
            num_layers: facts.num_layers,
            num_heads: facts.num_heads,
            vocab_size: facts.vocab_size,
            intermediate_size: facts.intermediate_size,
            source: ShapeSource::Config,
        }
    }

    /// A shape from a parameter count alone: `L = d/128` and `P = 3·d³/32`
    /// (LLaMA-7B gives d = 4211, L = 33 against the real 4096 and 32), with
    /// 64-dimensional heads, `i = 8d/3` and a 32000-token vocabulary.
    pub fn from_parameters(family: ModelFamily, parameters: u64) -> ModelShape {
        let d = ((parameters as f64) * 32.0 / 3.0).cbrt().round().max(64.0) as u64;
        let layers = (d / 128).max(1);
        ModelShape {
            family,
            parameters,
            hidden_size: d,
            num_layers: layers,
            num_heads: (d / 64).max(1),
            vocab_size: 32000,
            intermediate_size: 8 * d / 3,
            source: ShapeSource::Parameters,
        }
    }
}

/// The shapes of the models `scripts/setup.sh` packages, by the last path
/// segment of `cache://models/<name>` (or any URI ending in that name).
pub fn packaged_model(uri: &str) -> Option<ModelShape> {
    let name = uri
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    let (family, d, layers, heads, i, vocab) = match name {
        "all-MiniLM-L6-v2" => (ModelFamily::Bert, 384, 6, 12, 1536, 30522),
        "paraphrase-MiniLM-L3-v2" => (ModelFamily::Bert, 384, 3, 12, 1536, 30522),
        "SmolLM2-135M" | "SmolLM2-135M-Instruct" => (ModelFamily::Llama, 576, 30, 9, 1536, 49152),
        _ => return None,
    };
    let parameters = match family {
        ModelFamily::Bert => bert_parameters(d, layers, i, vocab, 512, 2),
        ModelFamily::Llama => llama_parameters(d, layers, heads, 3, 64, i, vocab, true),
    };
    Some(ModelShape {
        family,
        parameters,
        hidden_size: d,
        num_layers: layers,
        num_heads: heads,
        vocab_size: vocab,
        intermediate_size: i,
        source: ShapeSource::Packaged,
    })
}

/// The adapted layers of a model with `num_layers` layers: the trainer's
/// slot map ([`SlotMap::lenient`]: an estimate never fails on settings the
/// checks reject).
pub fn adapted_layers(num_layers: u64, slots: u64, selection: &LayerSelectionSpec) -> Vec<u64> {
    SlotMap::lenient(num_layers as usize, slots as usize, selection)
        .into_iter()
        .map(|l| l as u64)
        .collect()
}

/// Depth of the layer-selection window of a client (what bounds `slots`).
pub fn window_depth(num_layers: u64, selection: &LayerSelectionSpec) -> u64 {
    LayerSelection::from_spec(selection, num_layers as usize).window_depth(num_layers as usize)
        as u64
}

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
    /// Fixed CPU runtime overhead (process, tokenizer, data).
    #[serde(default = "default_cpu_overhead", with = "quantity")]
    pub cpu_runtime_overhead: u64,
}

fn default_margin() -> u64 {
    10
}
fn default_gpu_overhead() -> u64 {
    GIB
}
fn default_cpu_overhead() -> u64 {
    512 * MIB
}

impl Default for SizingConfig {
    fn default() -> Self {
        SizingConfig {
            gpu_profiles: Vec::new(),
            cpu: CpuPolicy::default(),
            margin_percent: default_margin(),
            gpu_runtime_overhead: default_gpu_overhead(),
            cpu_runtime_overhead: default_cpu_overhead(),
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

impl Default for CpuPolicy {
    fn default() -> Self {
        CpuPolicy {
            max_parameters: default_cpu_max_parameters(),
            prefer_for_small_models: true,
            request: default_cpu_request(),
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

/// The training settings that matter for memory, for one client.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Backbone dtype.
    pub dtype: Dtype,
    /// Training batch.
    pub batch_size: u64,
    /// Evaluation batch.
    pub eval_batch_size: u64,
    /// Tokens per example.
    pub seq_len: u64,
    /// Adapter type.
    pub adapter: AdapterKind,
    /// Rank r (DeMA) or the client's LoRA rank.
    pub rank: u64,
    /// Experts K.
    pub experts: u64,
    /// Slots S (resolved).
    pub slots: u64,
    /// Layer selection in force for this client.
    pub layers: LayerSelectionSpec,
    /// Classes C.
    pub num_classes: u64,
    /// Recompute activations.
    pub gradient_checkpointing: bool,
    /// Frozen-prefix cache bound in bytes (0 when disabled).
    pub prefix_cache_bytes: u64,
}

impl Workload {
    /// The workload of client `index` of `spec`, with `slots` resolved.
    pub fn of(spec: &FederatedTuneSpec, index: usize, slots: u64) -> Workload {
        let client = &spec.clients[index];
        let t = &spec.training;
        Workload {
            dtype: client.model.dtype,
            batch_size: u64::from(t.batch_size),
            eval_batch_size: u64::from(t.eval_batch_size),
            seq_len: u64::from(t.max_seq_length),
            adapter: spec.adapter.kind,
            rank: u64::from(client.lora_rank.unwrap_or(spec.adapter.rank)),
            experts: u64::from(spec.adapter.experts),
            slots,
            layers: client
                .model
                .adapted_layers
                .clone()
                .unwrap_or_else(|| spec.adapter.layers.clone()),
            num_classes: spec.task.labels.len() as u64,
            gradient_checkpointing: t.gradient_checkpointing,
            prefix_cache_bytes: if t.prefix_cache.enabled {
                u64::from(t.prefix_cache.max_memory_mib) * MIB
            } else {
                0
            },
        }
    }
}

/// A memory estimate, by part (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryEstimate {
    /// Trainable adapter + head parameters.
    pub trainable_parameters: u64,
    /// Frozen weights.
    pub weights: u64,
    /// Adapter weights, gradients and AdamW moments.
    pub adapter_state: u64,
    /// Activations kept for the backward pass.
    pub activations: u64,
    /// One layer in flight.
    pub workspace: u64,
    /// Frozen-prefix cache bound.
    pub prefix_cache: u64,
    /// The margin.
    pub margin: u64,
    /// Fixed runtime overhead of the target.
    pub runtime: u64,
    /// Everything.
    pub total: u64,
}

/// Where a memory estimate applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Accelerator memory of one GPU.
    Gpu,
    /// Host memory of a CPU-only trainer.
    Cpu,
}

/// Trainable parameters of a client: adapters and the classification head.
pub fn trainable_parameters(shape: &ModelShape, w: &Workload) -> u64 {
    let (d, r, k) = (shape.hidden_size, w.rank, w.experts);
    let adapted = adapted_layers(shape.num_layers, w.slots, &w.layers).len() as u64;
    let head = d * w.num_classes + w.num_classes;
    match w.adapter {
        AdapterKind::Dema => {
            let shared = w.slots * (k * (r * r + r) + k * r + k);
            shared + 2 * r * d * adapted + head
        }
        AdapterKind::Lora => 4 * r * d * adapted + head,
    }
}

/// Activation bytes of one layer at batch `b` (Korthikanti et al., eq. 1, scaled to the dtype).
pub fn layer_activation_bytes(shape: &ModelShape, w: &Workload, b: u64) -> u64 {
    let (s, d, h) = (w.seq_len, shape.hidden_size, shape.num_heads);
    (34 * s * b * d + 5 * h * s * s * b) * w.dtype.bytes() / 2
}

/// Estimates the memory of one client's trainer on `target`.
pub fn estimate(
    shape: &ModelShape,
    w: &Workload,
    config: &SizingConfig,
    target: Target,
) -> MemoryEstimate {
    let e = w.dtype.bytes();
    let weights = shape.parameters * e;
    let trainable = trainable_parameters(shape, w);
    let adapter_state = 16 * trainable;
    let adapted = adapted_layers(shape.num_layers, w.slots, &w.layers);
    let first = adapted
        .first()
        .copied()
        .unwrap_or(shape.num_layers.saturating_sub(1));
    let backprop_layers = shape.num_layers.saturating_sub(first + 1);
    let per_layer = layer_activation_bytes(shape, w, w.batch_size);
    let activations = if w.gradient_checkpointing {
        backprop_layers * w.batch_size * w.seq_len * shape.hidden_size * e + per_layer
    } else {
        backprop_layers * per_layer
    };
    let workspace = layer_activation_bytes(shape, w, w.batch_size.max(w.eval_batch_size));
    let sum = weights + adapter_state + activations + workspace + w.prefix_cache_bytes;
    let margin = (sum * config.margin_percent).div_ceil(100);
    let runtime = match target {
        Target::Gpu => config.gpu_runtime_overhead,
        Target::Cpu => config.cpu_runtime_overhead,
    };
    MemoryEstimate {
        trainable_parameters: trainable,
        weights,
        adapter_state,
        activations,
        workspace,
        prefix_cache: w.prefix_cache_bytes,
        margin,
        runtime,
        total: sum + margin + runtime,
    }
}

/// Where a client's trainer runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// On one GPU of `profile`.
    Gpu {
        /// The chosen profile.
        profile: GpuProfile,
        /// Accelerator memory estimate.
        estimate: MemoryEstimate,
        /// Host memory to request (weights staged on the host + runtime).
        host_memory: u64,
    },
    /// On CPU.
    Cpu {
        /// Host memory estimate.
        estimate: MemoryEstimate,
    },
    /// As `clients[].resources` says (no estimate applied).
    Explicit {
        /// The estimate for information, when the shape is known.
        estimate: Option<MemoryEstimate>,
    },
}

impl Placement {
    /// The profile name reported in status (`cpu` for CPU-only, `explicit`).
    pub fn profile_name(&self) -> String {
        match self {
            Placement::Gpu { profile, .. } => profile.name.clone(),
            Placement::Cpu { .. } => "cpu".to_string(),
            Placement::Explicit { .. } => "explicit".to_string(),
        }
    }

    /// The memory estimate reported in status.
    pub fn estimated_bytes(&self) -> Option<u64> {
        match self {
            Placement::Gpu { estimate, .. } | Placement::Cpu { estimate } => Some(estimate.total),
            Placement::Explicit { estimate } => estimate.map(|e| e.total),
        }
    }

    /// The trainer's `--device`.
    pub fn device(&self) -> &'static str {
        match self {
            Placement::Gpu { .. } => "cuda",
            Placement::Cpu { .. } => "cpu",
            Placement::Explicit { .. } => "auto",
        }
    }
}

/// Resolves `adapter.slots`: the spec's value, or the shallowest client's
/// window depth (what the trainer does). `shapes[i]` is client i's shape.
pub fn resolve_slots(spec: &FederatedTuneSpec, shapes: &[Option<ModelShape>]) -> u64 {
    let depths = shapes.iter().enumerate().filter_map(|(i, shape)| {
        let shape = shape.as_ref()?;
        Some(window_depth(shape.num_layers, spec.layer_selection(i)) as usize)
    });
    slots::resolve_slots(spec.adapter.slots, depths) as u64
}

/// Chooses where client `client` runs.
pub fn place(
    client: &ClientSpec,
    shape: Option<&ModelShape>,
    workload: &Workload,
    allow_cpu: bool,
    config: &SizingConfig,
    index: usize,
) -> Result<Placement, SizingError> {
    if client.resources.is_some() {
        return Ok(Placement::Explicit {
            estimate: shape.map(|s| estimate(s, workload, config, Target::Gpu)),
        });
    }
    let shape = shape.ok_or_else(|| SizingError::UnknownModel {
        index,
        uri: client.model.uri.clone(),
    })?;
    let small = allow_cpu && shape.parameters <= config.cpu.max_parameters;
    let cpu = || Placement::Cpu {
        estimate: estimate(shape, workload, config, Target::Cpu),
    };
    if small && config.cpu.prefer_for_small_models {
        return Ok(cpu());
    }
    let gpu = estimate(shape, workload, config, Target::Gpu);
    let mut profiles: Vec<&GpuProfile> = config.gpu_profiles.iter().collect();
    profiles.sort_by_key(|p| (p.memory, p.gpus_per_pod));
    if let Some(profile) = profiles.iter().find(|p| p.memory >= gpu.total) {
        return Ok(Placement::Gpu {
            profile: (*profile).clone(),
            estimate: gpu,
            host_memory: gpu.weights + config.cpu_runtime_overhead,
        });
    }
    if small {
        return Ok(cpu());
    }
    let largest = profiles.last();
    let cpu_note = if !allow_cpu {
        " (spec.trainer.allowCpu is false)".to_string()
    } else {
        format!(
            " (CPU training is limited to models of at most {} parameters; this one has {})",
            config.cpu.max_parameters, shape.parameters
        )
    };
    Err(SizingError::NoGpuProfileFits {
        client: client.name.clone(),
        needed: gpu.total,
        largest: largest.map(|p| p.memory).unwrap_or(0),
        largest_name: largest.map(|p| p.name.clone()),
        cpu_note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use heterotune_crds::spec::LayerSelectionMode;

    /// A spec with `clients` (name, family, uri, dtype) and `extra` YAML under `spec:`.
    fn spec(clients: &[(&str, &str, &str, &str)], extra: &str) -> FederatedTuneSpec {
        let list: String = clients
            .iter()
            .map(|(n, f, u, d)| {
                format!(
                    "    - name: {n}\n      model: {{ family: {f}, uri: \"{u}\", dtype: {d} }}\n"
                )
            })
            .collect();
        let yaml = format!(
            "apiVersion: heterotune.dev/v1alpha1\nkind: FederatedTune\nmetadata: {{ name: t }}\nspec:\n  clients:\n{list}  task:\n    dataset: {{ uri: \"s3://d/x.jsonl\" }}\n    labels: [ABBR, DESC, ENTY, HUM, LOC, NUM]\n{extra}"
        );
        heterotune_crds::validate::parse_federated_tune(&yaml)
            .expect("valid test spec")
            .spec
    }

    fn profiles() -> SizingConfig {
        let json = serde_json::json!({
            "gpuProfiles": [
                { "name": "a100-80gb", "memory": "80Gi", "nodeSelector": { "gpu": "a100-80" } },
                { "name": "l4-24gb", "memory": "24Gi", "nodeSelector": { "gpu": "l4" },
                  "tolerations": [{ "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" }] },
                { "name": "a100-40gb", "memory": 42949672960u64 }
            ]
        });
        serde_json::from_value(json).expect("valid sizing config")
    }

    const MINILM_L6: &str = r#"{"model_type":"bert","hidden_size":384,"intermediate_size":1536,"num_hidden_layers":6,
        "num_attention_heads":12,"vocab_size":30522,"max_position_embeddings":512,"type_vocab_size":2}"#;
    const LLAMA_7B: &str = r#"{"model_type":"llama","hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,
        "num_attention_heads":32,"num_key_value_heads":32,"vocab_size":32000,"tie_word_embeddings":false}"#;
    const LLAMA_13B: &str = r#"{"model_type":"llama","hidden_size":5120,"intermediate_size":13824,"num_hidden_layers":40,
        "num_attention_heads":40,"num_key_value_heads":40,"vocab_size":32000,"tie_word_embeddings":false}"#;

    fn shape(json: &str) -> ModelShape {
        ModelShape::from_config_json(&serde_json::from_str(json).expect("json")).expect("shape")
    }

    #[test]
    fn parameter_counts_match_the_model_cards() {
        // all-MiniLM-L6-v2: embeddings (30522 + 512 + 2)·384 + 2·384 = 11,918,592;
        // a layer 4·(384² + 384) + 2·384·1536 + 1536 + 384 + 4·384 = 1,774,464; 6 layers.
        // 22,565,376 without the 147,840-parameter pooler the trainer does not load
        // (the card's 22.7 M counts it).
        let l6 = shape(MINILM_L6);
        assert_eq!(l6.parameters, 11_918_592 + 6 * 1_774_464);
        assert_eq!(l6.parameters, 22_565_376);
        assert_eq!(
            packaged_model("cache://models/all-MiniLM-L6-v2").map(|s| s.parameters),
            Some(22_565_376)
        );
        // paraphrase-MiniLM-L3-v2: 11,918,592 + 3 · 1,774,464 = 17,241,984 (17.2 M).
        assert_eq!(
            packaged_model("cache://models/paraphrase-MiniLM-L3-v2").map(|s| s.parameters),
            Some(17_241_984)
        );
        // SmolLM2-135M: embeddings 49152·576 = 28,311,552; a layer: q 576·576, k and v
        // 576·192 (3 kv heads of 64), o 576·576, MLP 3·576·1536, 2 norms = 3,540,096;
        // 30 layers, final norm 576, tied head: 134,515,008 (134.5 M).
        let smol = packaged_model("s3://models/SmolLM2-135M-Instruct").expect("packaged");
        assert_eq!(smol.parameters, 28_311_552 + 30 * 3_540_096 + 576);
        assert_eq!(smol.parameters, 134_515_008);
        // LLaMA-7B: 32000·4096 (embeddings) + 32·(4·4096² + 3·4096·11008 + 2·4096)
        // + 4096 (norm) + 32000·4096 (untied head) = 6,738,415,616.
        assert_eq!(shape(LLAMA_7B).parameters, 6_738_415_616);
        // LLaMA-13B: 2·32000·5120 + 40·(4·5120² + 3·5120·13824 + 2·5120) + 5120 = 13,015,864,320.
        assert_eq!(shape(LLAMA_13B).parameters, 13_015_864_320);
    }

    #[test]
    fn adapted_layers_follow_the_trainer_slot_map() {
        let ends = LayerSelectionSpec::default();
        assert_eq!(adapted_layers(30, 3, &ends), vec![9, 19, 29]);
        assert_eq!(adapted_layers(6, 3, &ends), vec![1, 3, 5]);
        assert_eq!(adapted_layers(3, 3, &ends), vec![0, 1, 2]);
        assert_eq!(adapted_layers(32, 3, &ends), vec![10, 21, 31]);
        let top = LayerSelectionSpec {
            mode: LayerSelectionMode::TopWindow,
            window: Some(6),
            every_layer_in_group: false,
        };
        assert_eq!(adapted_layers(30, 3, &top), vec![25, 27, 29]);
    }

    /// Every valid setting up to 40 layers: the estimate's adapted layers
    /// are exactly the trainer's slot map, and the slot count it resolves
    /// is the depth the trainer's check accepts.
    #[test]
    fn sizing_and_trainer_share_one_slot_map() {
        for layers in 1..=40u64 {
            for window in 1..=layers {
                for every in [false, true] {
                    let spec = LayerSelectionSpec {
                        mode: LayerSelectionMode::TopWindow,
                        window: Some(window as u32),
                        every_layer_in_group: every,
                    };
                    let sel = LayerSelection::from_spec(&spec, layers as usize);
                    assert_eq!(window_depth(layers, &spec), window);
                    for slots in 1..=window {
                        let map = SlotMap::new(layers as usize, slots as usize, sel, every)
                            .expect("valid settings");
                        let trainer: Vec<u64> = map
                            .adapted_layers()
                            .iter()
                            .map(|&(l, _)| l as u64)
                            .collect();
                        assert_eq!(adapted_layers(layers, slots, &spec), trainer);
                    }
                    assert!(
                        SlotMap::new(layers as usize, window as usize + 1, sel, every).is_err()
                    );
                }
            }
        }
    }

    #[test]
    fn minilm_l6_estimate_by_hand() {
        // Defaults: f32, batch 16, eval batch 64, 32 tokens, DeMA r 8, K 4, S 3, 6 classes,
        // prefix cache 2048 MiB.
        let s = spec(
            &[("a", "bert", "cache://models/all-MiniLM-L6-v2", "float32")],
            "",
        );
        let w = Workload::of(&s, 0, 3);
        let e = estimate(&shape(MINILM_L6), &w, &SizingConfig::default(), Target::Cpu);
        // trainable: shared 3·(4·(64+8) + 4·8 + 4) = 972; family 2·8·384·3 = 18,432;
        // head 384·6 + 6 = 2,310.
        assert_eq!(e.trainable_parameters, 972 + 18_432 + 2_310);
        assert_eq!(e.weights, 22_565_376 * 4);
        assert_eq!(e.adapter_state, 16 * 21_714);
        // act(16) = (34·32·16·384 + 5·12·32²·16)·4/2 = (6,684,672 + 983,040)·2 = 15,335,424;
        // adapted 1, 3, 5: layers 2..=5 keep activations.
        assert_eq!(e.activations, 4 * 15_335_424);
        // workspace act(64) = (34·32·64·384 + 5·12·32²·64)·2 = 61,341,696
        assert_eq!(e.workspace, 61_341_696);
        assert_eq!(e.prefix_cache, 2048 * MIB);
        let sum = 90_261_504 + 347_424 + 61_341_696 + 61_341_696 + 2_147_483_648u64;
        assert_eq!(sum, 2_360_775_968);
        // margin: ceil(10 %) = 236,077,597; CPU runtime 512 MiB.
        assert_eq!(e.total, 2_360_775_968 + 236_077_597 + 536_870_912);
        assert_eq!(e.total, 3_133_724_477);
    }

    #[test]
    fn minilm_l3_estimate_by_hand() {
        let s = spec(
            &[(
                "a",
                "bert",
                "cache://models/paraphrase-MiniLM-L3-v2",
                "float32",
            )],
            "",
        );
        let shape = packaged_model(&s.clients[0].model.uri).expect("packaged");
        let e = estimate(
            &shape,
            &Workload::of(&s, 0, 3),
            &SizingConfig::default(),
            Target::Cpu,
        );
        // Adapted 0, 1, 2: layers 1 and 2 keep activations (2 · 15,335,424).
        assert_eq!(e.activations, 30_670_848);
        // 68,967,936 + 347,424 + 30,670,848 + 61,341,696 + 2,147,483,648 = 2,308,811,552;
        // margin 230,881,156; runtime 536,870,912.
        assert_eq!(e.total, 2_308_811_552 + 230_881_156 + 536_870_912);
    }

    #[test]
    fn smollm2_estimate_by_hand_and_cpu_placement() {
        let s = spec(
            &[(
                "a",
                "llama",
                "cache://models/SmolLM2-135M-Instruct",
                "float32",
            )],
            "",
        );
        let shape = packaged_model(&s.clients[0].model.uri).expect("packaged");
        let w = Workload::of(&s, 0, 3);
        let e = estimate(&shape, &w, &SizingConfig::default(), Target::Cpu);
        // trainable: 972 + 2·8·576·3 (27,648) + 576·6 + 6 (3,462) = 32,082.
        assert_eq!(e.trainable_parameters, 32_082);
        // act(16) = (34·32·16·576 + 5·9·32²·16)·2 = (10,027,008 + 737,280)·2 = 21,528,576;
        // adapted 9, 19, 29: 20 layers keep activations.
        assert_eq!(e.activations, 20 * 21_528_576);
        // act(64) = (40,108,032 + 2,949,120)·2 = 86,114,304
        assert_eq!(e.workspace, 86_114_304);
        // 538,060,032 + 513,312 + 430,571,520 + 86,114,304 + 2,147,483,648 = 3,202,742,816
        assert_eq!(e.total, 3_202_742_816 + 320_274_282 + 536_870_912);
        // 134.5 M parameters ≤ 200 M: CPU by default, even with GPU profiles.
        let p = place(&s.clients[0], Some(&shape), &w, true, &profiles(), 0).expect("placed");
        assert_eq!(p.profile_name(), "cpu");
        assert_eq!(p.estimated_bytes(), Some(4_059_888_010));
    }

    fn llama_workload(checkpointing: bool) -> (FederatedTuneSpec, Workload) {
        let extra = format!(
            "  training: {{ batchSize: 8, evalBatchSize: 8, maxSeqLength: 512, gradientCheckpointing: {checkpointing}, prefixCache: {{ enabled: false }} }}\n  adapter: {{ rank: 16, experts: 4, slots: 3 }}\n"
        );
        let s = spec(
            &[("big", "llama", "s3://models/llama-7b", "bfloat16")],
            &extra,
        );
        let w = Workload::of(&s, 0, 3);
        (s, w)
    }

    #[test]
    fn llama_7b_estimate_by_hand_picks_the_40gb_profile() {
        let (s, w) = llama_workload(false);
        let shape = shape(LLAMA_7B);
        let e = estimate(&shape, &w, &SizingConfig::default(), Target::Gpu);
        // bf16 weights: 6,738,415,616 · 2.
        assert_eq!(e.weights, 13_476_831_232);
        // trainable: 3·(4·(256+16) + 4·16 + 4) = 3,468; 2·16·4096·3 = 393,216; 4096·6 + 6 = 24,582.
        assert_eq!(e.trainable_parameters, 421_266);
        // act(8) = 34·512·8·4096 + 5·32·512²·8 = 570,425,344 + 335,544,320 = 905,969,664 (bf16);
        // adapted 10, 21, 31: 21 layers keep activations.
        assert_eq!(e.activations, 21 * 905_969_664);
        assert_eq!(e.workspace, 905_969_664);
        // 13,476,831,232 + 6,740,256 + 19,025,362,944 + 905,969,664 = 33,414,904,096;
        // margin 3,341,490,410; GPU runtime 1 GiB: 37,830,136,330 bytes (35.2 GiB).
        assert_eq!(e.total, 33_414_904_096 + 3_341_490_410 + 1_073_741_824);
        let p = place(&s.clients[0], Some(&shape), &w, true, &profiles(), 0).expect("placed");
        assert_eq!(p.profile_name(), "a100-40gb");
        match p {
            Placement::Gpu { host_memory, .. } => {
                assert_eq!(host_memory, 13_476_831_232 + 512 * MIB)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn gradient_checkpointing_moves_llama_7b_to_a_24gb_gpu() {
        let (s, w) = llama_workload(true);
        let shape = shape(LLAMA_7B);
        let e = estimate(&shape, &w, &SizingConfig::default(), Target::Gpu);
        // 21 layer inputs 8·512·4096·2 = 33,554,432 each, plus one recomputed layer.
        assert_eq!(e.activations, 21 * 33_554_432 + 905_969_664);
        // 13,483,571,488 + 1,610,612,736 + 905,969,664 = 16,000,153,888; margin 1,600,015,389.
        assert_eq!(e.total, 16_000_153_888 + 1_600_015_389 + 1_073_741_824);
        let p = place(&s.clients[0], Some(&shape), &w, true, &profiles(), 0).expect("placed");
        assert_eq!(p.profile_name(), "l4-24gb");
    }

    #[test]
    fn llama_13b_needs_80gb_and_fits_nothing_smaller() {
        let (s, w) = llama_workload(false);
        let shape = shape(LLAMA_13B);
        let e = estimate(&shape, &w, &SizingConfig::default(), Target::Gpu);
        // act(8) = 34·512·8·5120 + 5·40·512²·8 = 713,031,680 + 419,430,400 = 1,132,462,080;
        // adapted 13, 26, 39: 26 layers keep activations.
        assert_eq!(e.activations, 26 * 1_132_462_080);
        // trainable 3,468 + 2·16·5120·3 + 5120·6 + 6 = 525,714
        assert_eq!(e.trainable_parameters, 525_714);
        // 26,031,728,640 + 8,411,424 + 29,444,014,080 + 1,132,462,080 = 56,616,616,224;
        // margin 5,661,661,623; + 1 GiB: 63,352,019,671 bytes (59.0 GiB).
        assert_eq!(e.total, 56_616_616_224 + 5_661_661_623 + 1_073_741_824);
        let p = place(&s.clients[0], Some(&shape), &w, true, &profiles(), 0).expect("placed");
        assert_eq!(p.profile_name(), "a100-80gb");
        let mut small = profiles();
        small.gpu_profiles.retain(|p| p.name != "a100-80gb");
        let err = place(&s.clients[0], Some(&shape), &w, true, &small, 0).expect_err("too large");
        let text = err.to_string();
        assert!(
            text.contains("needs about 59.0 GiB")
                && text.contains("(a100-40gb) has 40.0 GiB")
                && text.contains("200000000"),
            "{text}"
        );
    }

    #[test]
    fn cpu_rules_and_explicit_resources() {
        let s = spec(
            &[("a", "bert", "cache://models/all-MiniLM-L6-v2", "float32")],
            "",
        );
        let shape = shape(MINILM_L6);
        let w = Workload::of(&s, 0, 3);
        // allowCpu false and no profiles: a clear error.
        let err = place(
            &s.clients[0],
            Some(&shape),
            &w,
            false,
            &SizingConfig::default(),
            0,
        )
        .expect_err("no fit");
        assert!(matches!(err, SizingError::NoGpuProfileFits { .. }));
        assert!(err.to_string().contains("allowCpu is false"), "{err}");
        // allowCpu false with profiles: the smallest GPU (24 GiB).
        let p = place(&s.clients[0], Some(&shape), &w, false, &profiles(), 0).expect("gpu");
        assert_eq!(p.profile_name(), "l4-24gb");
        // Not preferring CPU: GPU when one fits, CPU as the fallback.
        let mut cfg = profiles();
        cfg.cpu.prefer_for_small_models = false;
        assert_eq!(
            place(&s.clients[0], Some(&shape), &w, true, &cfg, 0)
                .expect("gpu")
                .profile_name(),
            "l4-24gb"
        );
        cfg.gpu_profiles.clear();
        assert_eq!(
            place(&s.clients[0], Some(&shape), &w, true, &cfg, 0)
                .expect("cpu")
                .profile_name(),
            "cpu"
        );
        // Unknown size.
        let err = place(&s.clients[0], None, &w, true, &cfg, 2).expect_err("unknown");
        assert!(
            err.to_string().contains("spec.clients[2].model.parameters"),
            "{err}"
        );
        // Explicit resources win.
        let mut c = s.clients[0].clone();
        c.resources = Some(Default::default());
        assert_eq!(
            place(&c, None, &w, false, &cfg, 0)
                .expect("explicit")
                .profile_name(),
            "explicit"
        );
    }

    #[test]
    fn shapes_from_parameters_and_quantities() {
        let s = ModelShape::from_parameters(ModelFamily::Llama, 6_738_415_616);
        // cbrt(6,738,415,616 · 32/3) = 4158; L = 4158/128 = 32.
        assert_eq!((s.hidden_size, s.num_layers, s.num_heads), (4158, 32, 64));
        assert_eq!(parse_quantity("24Gi"), Some(24 * GIB));
        assert_eq!(parse_quantity("512M"), Some(512_000_000));
        assert_eq!(parse_quantity("1073741824"), Some(GIB));
        assert_eq!(parse_quantity("lots"), None);
        assert_eq!(quantity_mib(GIB + 1), "1025Mi");
        let spec2 = spec(
            &[
                ("a", "llama", "cache://models/SmolLM2-135M", "float32"),
                (
                    "b",
                    "bert",
                    "cache://models/paraphrase-MiniLM-L3-v2",
                    "float32",
                ),
            ],
            "",
        );
        let shapes: Vec<Option<ModelShape>> = spec2
            .clients
            .iter()
            .map(|c| packaged_model(&c.model.uri))
            .collect();
        assert_eq!(resolve_slots(&spec2, &shapes), 3);
        let bad = ModelShape::from_config_json(
            &serde_json::json!({"model_type":"gpt2","hidden_size":1,"num_hidden_layers":1,"num_attention_heads":1,"vocab_size":1}),
        );
        assert!(matches!(bad, Err(SizingError::Config(_))));
    }
}
