//! GPU sizing: how much memory one client's trainer needs, and where it runs.
//!
//! Pure functions, no I/O. The estimate follows what the trainer holds while
//! it trains one client (see `trainer/src/train.rs` and `adapters/dema.rs`):
//!
//! | part | bytes |
//! |---|---|
//! | frozen weights | `P · e` (`e`: bytes per element of `model.dtype`; `auto` below) |
//! | adapter state | `16 · A`: f32 weights, gradients and AdamW's two moments of the `A` trainable parameters |
//! | stored activations |  `W · act(b)`: the `W` layers above the first adapted layer keep their activations for the backward pass (+ DeMA's f32 copies on a CPU, below) |
//! | forward workspace | `act(max(b, b_eval))`: one layer in flight (training or evaluation batch) |
//! | frozen-prefix cache | the prefix output of every example the trainer prepares ([`DataProfile`]: examples × tokens × `d · e`), at most `prefixCache.maxMemoryMib`; that bound when the data is unknown |
//! | margin | `marginPercent` of the sum above (allocator fragmentation, small tensors) |
//! | runtime | a fixed overhead: CUDA context, cuBLAS workspace and kernels on a GPU; on a CPU the process with libtorch loaded, tokenizer and data ([`CPU_RUNTIME_MIB`]) |
//!
//! On a GPU, `act(b)` is the activation memory of one transformer layer
//! from Korthikanti et al., "Reducing Activation Recomputation in Large
//! Transformer Models" (2022), eq. 1: `s·b·d·(34 + 5·h·s/d)` bytes in a
//! 16-bit dtype, scaled by `e/2` (twice that in f32), what the CUDA caching
//! allocator holds (no GPU measurement yet: this follows the allocator's
//! rules). With `training.gradientCheckpointing` a layer keeps only its
//! input (`b·s·d·e`) and one layer is recomputed at a time.
//!
//! On a CPU the model is calibrated against the trainer's measured peak RSS
//! (`scripts/bench_memory.py`, docs/data/memory.json; the test in
//! `calibration.rs` holds every measured row to `measured ≤ estimate ≤ 1.25 ×
//! measured`): [`CpuActivations`] gives the bytes per `s·b·d` and `h·s²·b`
//! element a stored layer, the layer in flight and DeMA's f32 copies hold
//! ([`CPU_F32`]: libtorch's fused attention, no `s²` term; [`CPU_16BIT`]:
//! the eager attention with an f32 softmax, and an f32-sized copy of the
//! token embeddings measured beside the weights). Weights are `P · e` on both
//! targets: a float32 checkpoint is memory-mapped and borrowed as it is, a
//! converted one releases the mapped pages of each tensor it copied
//! (`trainer/src/models/weights.rs`). `s` is `maxSeqLength`, an upper
//! bound: the trainer pads each batch to its longest example.
//!
//! `dtype: auto` (the default) is resolved by the trainer on the device it
//! runs on (`heterotune_crds::dtype`). The estimate takes it as bfloat16 on
//! a GPU profile (`e = 2`): GPUs older than compute capability 8.0 run it in
//! float32 and need twice the weight and activation memory, so give their
//! clients `dtype: float32` or a profile sized for it. On a CPU placement it
//! is `sizing.cpu.autoDtype`: float32 by default, an upper bound of the
//! weights (the operator cannot see the node's CPU); `heterotune plan` sets
//! it to what the CPU it runs on picks.
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
//! With `spec.bridge` every client's trainer also loads the bridge's
//! backbone and trains DeMA adapters and a head on it ([`BridgeModel`]):
//! its parts (weights in its dtype, adapter state, activations, workspace,
//! its own prefix cache, margin) are added to the client's, the runtime is
//! counted once, and placement uses the sum (memory, and the parameters of
//! both backbones for the CPU rule). Its shape comes from the same sources
//! as a client's.
//!
//! Placement ([`place`]): explicit `clients[].resources` win; else a small
//! model (at most `cpu.maxParameters`, default 200 M, which covers the three
//! packaged models) runs on CPU when `trainer.allowCpu` is set and
//! `cpu.preferForSmallModels` is on; else the smallest configured GPU profile
//! whose per-GPU memory holds the estimate (the trainer uses one device, so
//! `gpusPerPod` does not divide the estimate); else CPU for a small model
//! when allowed; else [`SizingError::NoGpuProfileFits`].

mod bridge;
#[cfg(test)]
mod calibration;
mod cpu;
mod data;
mod estimate;
mod placement;
mod settings;
mod shape;
#[cfg(test)]
mod tests;

pub use bridge::BridgeModel;
pub use cpu::{CpuActivations, CPU_16BIT, CPU_F32};
pub use data::DataProfile;
pub use estimate::{
    estimate, layer_activation_bytes, model_parts, trainable_parameters, MemoryEstimate,
    ModelParts, Target, Workload,
};
pub use placement::{place, Placement};
pub use settings::{
    parse_quantity, quantity_mib, CpuPolicy, GpuProfile, SizingConfig, CPU_RUNTIME_MIB,
};
pub use shape::{
    adapted_layers, packaged_model, resolve_slots, window_depth, ModelShape, ShapeSource,
};

/// One mebibyte.
pub const MIB: u64 = 1024 * 1024;
/// One gibibyte.
pub const GIB: u64 = 1024 * MIB;

/// Why a shape or a placement could not be worked out.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SizingError {
    /// Nothing says how large the model is.
    #[error("the size of {uri} is unknown: the operator cannot read its config.json and it is not a packaged model; set spec.clients[{index}].model.parameters or spec.clients[{index}].resources")]
    UnknownModel { index: usize, uri: String },
    /// Nothing says how large the bridge model is.
    #[error("the size of the bridge model {uri} (spec.bridge.model.uri) is unknown: the operator cannot read its config.json and it is not a packaged model; set spec.bridge.model.parameters")]
    UnknownBridge { uri: String },
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
