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
    /// Per `h·s²·b` element, kept and in flight, of a causal (LLaMA)
    /// attention: its boolean masks and their combination.
    pub causal_attention: u64,
}

/// Float32: libtorch's fused attention keeps no `s²` matrices; 57 bytes
/// per `s·b·d` element is about 14 f32 tensors of the layer's shape.
pub const CPU_F32: CpuActivations = CpuActivations {
    stored: 57,
    attention_stored: 0,
    workspace: 7,
    attention_workspace: 0,
    dema: 50,
    embedding: 0,
    causal_attention: 0,
};

/// 16-bit dtypes: the eager attention keeps an f32 softmax, its 16-bit
/// copy and the mask, and runs f32 `s²` matrices without gradients; DeMA
/// upcasts each adapted layer's output to f32 and back. The measured peaks
/// also hold about an f32-sized share of the token-embedding table beyond
/// the converted weights (`3·V·d` bytes): measured, not yet traced to its
/// source in the trainer.
pub const CPU_16BIT: CpuActivations = CpuActivations {
    stored: 12,
    attention_stored: 22,
    workspace: 36,
    attention_workspace: 8,
    dema: 80,
    embedding: 3,
    causal_attention: 28,
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

    /// Bytes one layer keeps for the backward pass at batch `b` (`causal`:
    /// a LLaMA layer).
    pub fn stored_layer(&self, b: u64, s: u64, d: u64, h: u64, causal: bool) -> u64 {
        self.stored * s * b * d + self.attention(self.attention_stored, causal) * h * s * s * b
    }

    /// Bytes of one layer in flight without gradients at batch `b`.
    pub fn workspace_layer(&self, b: u64, s: u64, d: u64, h: u64, causal: bool) -> u64 {
        self.workspace * s * b * d
            + self.attention(self.attention_workspace, causal) * h * s * s * b
    }

    fn attention(&self, bytes: u64, causal: bool) -> u64 {
        bytes + if causal { self.causal_attention } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_bit_pays_for_the_eager_attention() {
        // MiniLM at batch 16, 32 tokens: f32 57·32·16·384 = 11,206,656;
        // bf16 12·32·16·384 + 22·12·32²·16 = 2,359,296 + 4,325,376.
        assert_eq!(CPU_F32.stored_layer(16, 32, 384, 12, false), 11_206_656);
        let bf16 = CpuActivations::of(Dtype::Bfloat16);
        assert_eq!(bf16.stored_layer(16, 32, 384, 12, false), 6_684_672);
        // A causal layer adds 28·h·s²·b: 28·12·32²·16 = 5,505,024.
        assert_eq!(bf16.stored_layer(16, 32, 384, 12, true), 12_189_696);
        assert_eq!(CpuActivations::of(Dtype::Float32), CPU_F32);
    }
}
