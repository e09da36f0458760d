//! Local training settings.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How each client trains in a round.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainingSpec {
    /// Optimiser steps per client per round.
    #[serde(default = "default_local_steps")]
    #[schemars(range(min = 1, max = 1000000))]
    pub local_steps: u32,
    /// Examples per step.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 4096))]
    pub batch_size: u32,
    /// AdamW learning rate of the adapters.
    #[serde(default = "default_learning_rate")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub learning_rate: f64,
    /// AdamW learning rate of the classification head.
    #[serde(default = "default_head_learning_rate")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub head_learning_rate: f64,
    /// AdamW weight decay (not applied to biases).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub weight_decay: f64,
    /// Linear learning-rate warm-up steps at the start of each round.
    #[serde(default)]
    #[schemars(range(max = 1000000))]
    pub warmup_steps: u32,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    #[serde(default = "default_max_grad_norm")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub max_grad_norm: f64,
    /// Tokens per example after truncation.
    #[serde(default = "default_max_seq_length")]
    #[schemars(range(min = 4, max = 8192))]
    pub max_seq_length: u32,
    /// Training seed (batch order, adapter initialisation).
    #[serde(default)]
    pub seed: u64,
    /// Recompute activations in the backward pass instead of storing them.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// How token states become one vector for the classification head.
    #[serde(default)]
    pub pooling: Pooling,
    /// Examples per evaluation batch.
    #[serde(default = "default_eval_batch_size")]
    #[schemars(range(min = 1, max = 4096))]
    pub eval_batch_size: u32,
    /// Cache the frozen layers below the first adapted layer.
    #[serde(default)]
    pub prefix_cache: PrefixCacheSpec,
    /// Correct the cross-entropy on the client's own data for its label
    /// skew (logit adjustment): see [`LogitAdjustment`].
    #[serde(default)]
    pub logit_adjustment: LogitAdjustment,
}

fn default_local_steps() -> u32 {
    20
}
fn default_batch_size() -> u32 {
    16
}
fn default_learning_rate() -> f64 {
    3e-3
}
fn default_head_learning_rate() -> f64 {
    1e-2
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_max_seq_length() -> u32 {
    32
}
fn default_eval_batch_size() -> u32 {
    64
}

impl Default for TrainingSpec {
    fn default() -> Self {
        TrainingSpec {
            local_steps: default_local_steps(),
            batch_size: default_batch_size(),
            learning_rate: default_learning_rate(),
            head_learning_rate: default_head_learning_rate(),
            weight_decay: 0.0,
            warmup_steps: 0,
            max_grad_norm: default_max_grad_norm(),
            max_seq_length: default_max_seq_length(),
            seed: 0,
            gradient_checkpointing: false,
            pooling: Pooling::default(),
            eval_batch_size: default_eval_batch_size(),
            prefix_cache: PrefixCacheSpec::default(),
            logit_adjustment: LogitAdjustment::default(),
        }
    }
}

/// Pooling of token states for the classification head. Mean pooling is the
/// default for encoders and decoders alike: last-token pooling lost 6-8
/// accuracy points on SmolLM2 in the reference measurements.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Pooling {
    /// Mean over real (unpadded) tokens.
    #[default]
    Mean,
    /// The last real token (the usual choice for causal decoders).
    LastToken,
}

/// Label-skew correction of the training loss (logit adjustment, Menon et
/// al. 2021; FedLC). A client whose data holds mostly one class learns that
/// class's prior along with the task, and a model fitted to one class says
/// that class for everything it sees: on the federation's test set, and to
/// the others through the pool ensemble and mutual distillation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LogitAdjustment {
    /// Plain cross-entropy on the client's labels.
    #[default]
    None,
    /// Cross-entropy on `logits + log π_client − log π_federation`, over the
    /// classes the client holds (a class it has no example of is left out of
    /// the softmax), with `π_client` the client's label shares and
    /// `π_federation` the federation's (from the global when the run
    /// exchanges a pool ensemble, uniform before and otherwise): the model's
    /// own logits then predict under the federation's label prior, not the
    /// client's. Evaluation and the exchanged predictions use the plain
    /// logits.
    ClientPrior,
}

/// The frozen-prefix activation cache: the layers below the first adapted
/// layer see the same inputs every epoch, so their output is computed once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrefixCacheSpec {
    /// Use the cache.
    #[serde(default = "super::defaults::yes")]
    pub enabled: bool,
    /// Memory bound of the cache; examples beyond it are recomputed.
    #[serde(default = "default_cache_mib")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_memory_mib: u32,
}

fn default_cache_mib() -> u32 {
    2048
}

impl Default for PrefixCacheSpec {
    fn default() -> Self {
        PrefixCacheSpec {
            enabled: true,
            max_memory_mib: default_cache_mib(),
        }
    }
}
