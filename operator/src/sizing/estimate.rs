//! The memory estimate of one client's trainer (the table in the module
//! docs of `sizing`).

use heterotune_crds::spec::{
    AdapterKind, Dtype, FederatedTuneSpec, LayerSelectionSpec, ModelFamily, ModelSpec,
};

use serde::Serialize;

use super::cpu::CpuActivations;
use super::data::DataProfile;
use super::settings::SizingConfig;
use super::shape::{adapted_layers, ModelShape};
use super::MIB;

/// The training settings that matter for memory, for one client.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Backbone dtype as the spec says (`auto` is sized per target:
    /// [`Workload::on`]).
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
    /// The examples the trainer prepares, when known (else the cache is
    /// counted at its bound).
    pub data: Option<DataProfile>,
}

impl Workload {
    /// The workload of client `index` of `spec`, with `slots` resolved.
    pub fn of(spec: &FederatedTuneSpec, index: usize, slots: u64) -> Workload {
        let client = &spec.clients[index];
        let rank = client.lora_rank.unwrap_or(spec.adapter.rank);
        Workload::of_model(spec, &client.model, spec.adapter.kind, rank, slots)
    }

    /// The workload of backbone `model` of `spec` with `adapter` of `rank`
    /// over `slots` slots: the batch, sequence, classes and cache are the
    /// run's, the dtype and layer selection the model's (else
    /// `adapter.layers`).
    pub fn of_model(
        spec: &FederatedTuneSpec,
        model: &ModelSpec,
        adapter: AdapterKind,
        rank: u32,
        slots: u64,
    ) -> Workload {
        let t = &spec.training;
        Workload {
            dtype: model.dtype,
            batch_size: u64::from(t.batch_size),
            eval_batch_size: u64::from(t.eval_batch_size),
            seq_len: u64::from(t.max_seq_length),
            adapter,
            rank: u64::from(rank),
            experts: u64::from(spec.adapter.experts),
            slots,
            layers: model
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
            data: None,
        }
    }
}

impl Workload {
    /// This workload with the examples its trainer prepares.
    pub fn with_data(self, data: Option<DataProfile>) -> Workload {
        Workload { data, ..self }
    }

    /// This workload as sized on `target`: `auto` is bfloat16 on a GPU (what
    /// the trainer picks at compute capability 8.0 and above) and
    /// `sizing.cpu.autoDtype` on a CPU (float32 by default, an upper bound:
    /// the operator cannot see the node's CPU).
    pub fn on(&self, target: Target, config: &SizingConfig) -> Workload {
        let dtype = match (self.dtype, target) {
            (Dtype::Auto, Target::Gpu) => Dtype::Bfloat16,
            (Dtype::Auto, Target::Cpu) => config.cpu.auto_dtype,
            (dtype, _) => dtype,
        };
        Workload {
            dtype,
            ..self.clone()
        }
    }
}

/// One backbone's parts of a memory estimate (bytes): everything but the
/// runtime, which a process pays once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelParts {
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
    /// The margin on the parts above.
    pub margin: u64,
}

impl ModelParts {
    /// The bytes of every part.
    pub fn total(&self) -> u64 {
        self.weights
            + self.adapter_state
            + self.activations
            + self.workspace
            + self.prefix_cache
            + self.margin
    }
}

/// The memory estimate of one client's trainer, by part (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryEstimate {
    /// The client's own model.
    #[serde(flatten)]
    pub own: ModelParts,
    /// The bridge model (`spec.bridge`) the trainer loads next to it.
    pub bridge: Option<ModelParts>,
    /// Fixed runtime overhead of the target (once per trainer).
    pub runtime: u64,
    /// Everything.
    pub total: u64,
}

impl MemoryEstimate {
    /// This estimate with `bridge`'s parts added (the runtime stays one).
    pub fn with_bridge(self, bridge: ModelParts) -> MemoryEstimate {
        MemoryEstimate {
            bridge: Some(bridge),
            total: self.own.total() + bridge.total() + self.runtime,
            ..self
        }
    }

    /// Frozen weights of every backbone the trainer loads.
    pub fn weights(&self) -> u64 {
        self.own.weights + self.bridge.map_or(0, |b| b.weights)
    }
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

/// Estimates the memory of one client's trainer on `target`, its own model
/// alone ([`MemoryEstimate::with_bridge`] adds a bridge).
pub fn estimate(
    shape: &ModelShape,
    w: &Workload,
    config: &SizingConfig,
    target: Target,
) -> MemoryEstimate {
    let own = model_parts(shape, w, config, target);
    let runtime = match target {
        Target::Gpu => config.gpu_runtime_overhead,
        Target::Cpu => config.cpu_runtime_overhead,
    };
    MemoryEstimate {
        own,
        bridge: None,
        runtime,
        total: own.total() + runtime,
    }
}

/// The parts of one backbone trained with `w` on `target` (the table in the
/// module docs of `sizing`, all but the runtime).
pub fn model_parts(
    shape: &ModelShape,
    w: &Workload,
    config: &SizingConfig,
    target: Target,
) -> ModelParts {
    let w = &w.on(target, config);
    let e = w.dtype.bytes();
    let cpu = CpuActivations::of(w.dtype);
    let weights = shape.parameters * e
        + match target {
            Target::Gpu => 0,
            Target::Cpu => cpu.embedding * shape.vocab_size * shape.hidden_size,
        };
    let trainable = trainable_parameters(shape, w);
    let adapter_state = 16 * trainable;
    let adapted = adapted_layers(shape.num_layers, w.slots, &w.layers);
    let first = adapted
        .first()
        .copied()
        .unwrap_or(shape.num_layers.saturating_sub(1));
    // DeMA acts on a layer's output: the backward pass stops above the first
    // adapted layer. LoRA acts inside it: that layer is in the backward pass
    // (the trainer's frozen prefix, `trainer/src/train.rs`).
    let frozen = match w.adapter {
        AdapterKind::Dema => first + 1,
        AdapterKind::Lora => first,
    };
    let backprop_layers = shape.num_layers.saturating_sub(frozen);
    let widest = w.batch_size.max(w.eval_batch_size);
    let (s, d, h) = (w.seq_len, shape.hidden_size, shape.num_heads);
    let causal = shape.family == ModelFamily::Llama;
    let (per_layer, workspace) = match target {
        Target::Gpu => (
            layer_activation_bytes(shape, w, w.batch_size),
            layer_activation_bytes(shape, w, widest),
        ),
        Target::Cpu => (
            cpu.stored_layer(w.batch_size, s, d, h, causal),
            cpu.workspace_layer(widest, s, d, h, causal),
        ),
    };
    let tokens = w.batch_size * s * d;
    let activations = if w.gradient_checkpointing {
        backprop_layers * tokens * e + per_layer
    } else {
        backprop_layers * per_layer
    };
    let dema = match (target, w.adapter) {
        (Target::Cpu, AdapterKind::Dema) => cpu.dema * tokens * adapted.len() as u64,
        _ => 0,
    };
    let activations = activations + dema;
    let prefix_cache = match &w.data {
        Some(data) => {
            data.prefix_cache_bytes(shape.hidden_size, e, w.seq_len, w.prefix_cache_bytes)
        }
        None => w.prefix_cache_bytes,
    };
    let sum = weights + adapter_state + activations + workspace + prefix_cache;
    ModelParts {
        trainable_parameters: trainable,
        weights,
        adapter_state,
        activations,
        workspace,
        prefix_cache,
        margin: (sum * config.margin_percent).div_ceil(100),
    }
}
