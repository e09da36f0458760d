//! The activation model of a CPU trainer, fitted to its measured peak RSS
//! (`scripts/bench_memory.py`, docs/data/memory.json; held by the test in
//! `calibration.rs`).

use heterotune_crds::spec::Dtype;

/// Bytes per element of what a CPU trainer holds beyond `P · e`, for one
/// dtype width. Elements: `s·b·d` (tokens × width), `h·s²·b` (attention
/// matrices, `s = maxSeqLength`) and `V·d` (the token-embedding table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuActivations {
    /// Per `s·b·d` element of a layer kept for the backward pass.
    pub stored: u64,
    /// Per `h·s²·b` element of a layer kept for the backward pass.
    pub attention_stored: u64,
    /// Per `s·b·d` element of the one layer in flight without gradients.
    pub workspace: u64,
    /// Per `h·s²·b` element of that layer.
    pub attention_workspace: u64,
    /// Per `s·b·d` element per adapted layer, with DeMA.
    pub dema: u64,
    /// Per `V·d` element of the token embeddings, on top of the weights.
    pub embedding: u64,
}

/// Float32: libtorch's fused attention keeps no `s²` matrices; 58 bytes
/// per `s·b·d` element is about 15 f32 tensors of the layer's shape, and a
/// pass without gradients frees as it goes.
pub const CPU_F32: CpuActivations = CpuActivations {
    stored: 58,
    attention_stored: 0,
    workspace: 0,
    attention_workspace: 0,
    dema: 50,
    embedding: 0,
};

/// 16-bit dtypes: the eager attention keeps an f32 softmax and its 16-bit
/// copy, and runs several f32 `s²` matrices at once without gradients;
/// DeMA upcasts each adapted layer's output to f32 and back. The measured
/// peaks also hold about an f32 copy of the token-embedding table
/// (`V·d·4` bytes) beyond the converted weights: measured, not yet traced
/// to its source in the trainer.
pub const CPU_16BIT: CpuActivations = CpuActivations {
    stored: 20,
    attention_stored: 4,
    workspace: 4,
    attention_workspace: 40,
    dema: 74,
    embedding: 4,
};

impl CpuActivations {
    /// The model for a backbone in `dtype` (`auto` resolved before).
    pub fn of(dtype: Dtype) -> CpuActivations {
        if dtype.bytes() == 4 {
            CPU_F32
        } else {
            CPU_16BIT
        }
    }

    /// Bytes one layer keeps for the backward pass at batch `b`.
    pub fn stored_layer(&self, b: u64, s: u64, d: u64, h: u64) -> u64 {
        self.stored * s * b * d + self.attention_stored * h * s * s * b
    }

    /// Bytes of one layer in flight without gradients at batch `b`.
    pub fn workspace_layer(&self, b: u64, s: u64, d: u64, h: u64) -> u64 {
        self.workspace * s * b * d + self.attention_workspace * h * s * s * b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_bit_pays_for_the_eager_attention() {
        // MiniLM at batch 16, 32 tokens: f32 58·32·16·384 = 11,403,264;
        // bf16 20·32·16·384 + 4·12·32²·16 = 3,932,160 + 786,432.
        assert_eq!(CPU_F32.stored_layer(16, 32, 384, 12), 11_403_264);
        assert_eq!(
            CpuActivations::of(Dtype::Bfloat16).stored_layer(16, 32, 384, 12),
            4_718_592
        );
        assert_eq!(CpuActivations::of(Dtype::Float32), CPU_F32);
    }
}
