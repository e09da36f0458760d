//! MPNet encoders (all-mpnet-base-v2, ...): configuration, the relative
//! position bias and loading from Hugging Face checkpoint names
//! (`embeddings.*`, `encoder.layer.{i}.attention.attn.{q,k,v,o}`,
//! `encoder.relative_attention_bias.weight`; an `mpnet.` prefix is accepted
//! and stripped).
//!
//! Matches `transformers.MPNetModel` in eval mode: word + position
//! embeddings (positions from the ids as RoBERTa: the running count of
//! non-padding tokens after the padding id 1; no token types), LayerNorm,
//! then post-LN layers (the layer BERT has, [`super::encoder`]) whose
//! attention scores all get the same relative position bias (T5's
//! bidirectional buckets, `max_distance` 128). transformers computes that
//! bias once per forward in `MPNetEncoder`; here it is computed once at load
//! for every sequence length up to the model's limit, and each layer reads
//! the `[heads, seq, seq]` corner it needs. The pooler is not loaded.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::config::{positive, Activation};
use super::encoder::{open_checkpoint, EncoderStack, LayerNames, LayerShape, StackShape};
use super::weights::{WeightStorage, Weights};
use super::{Backbone, BackboneInfo, Family, ProjectionDelta};
use crate::error::{Error, Result};

/// The padding id MPNet's embeddings assume (transformers hard-codes it):
/// position ids count from `PADDING_IDX + 1`.
pub const PADDING_IDX: i64 = 1;
/// Largest relative distance with its own buckets (transformers' default).
const MAX_DISTANCE: i64 = 128;
/// Buckets transformers' `MPNetEncoder.compute_position_bias` uses, whatever
/// `relative_attention_num_buckets` says (the table's other rows go unused).
const NUM_BUCKETS: i64 = 32;

/// Hyper-parameters of an MPNet encoder, as in Hugging Face's `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MpnetConfig {
    /// Size of the token vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads (divides `hidden_size`).
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Feed-forward activation (`gelu` = exact erf GELU).
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    /// Number of learned positions (two more than the longest sequence).
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// Rows of the relative position bias table (at least 32: transformers
    /// always uses 32 buckets).
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
}

fn default_act() -> Activation {
    Activation::Gelu
}
fn default_max_positions() -> usize {
    514
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn default_buckets() -> usize {
    32
}

impl MpnetConfig {
    /// Checks sizes this implementation relies on.
    ///
    /// # Errors
    /// [`Error::Model`] naming `path` and the offending field.
    pub fn validate(&self, path: &Path) -> Result<()> {
        positive(path, "vocab_size", self.vocab_size)?;
        positive(path, "hidden_size", self.hidden_size)?;
        positive(path, "num_hidden_layers", self.num_hidden_layers)?;
        positive(path, "num_attention_heads", self.num_attention_heads)?;
        positive(path, "intermediate_size", self.intermediate_size)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::model(
                path,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.max_position_embeddings <= PADDING_IDX as usize + 1 {
            return Err(Error::model(
                path,
                "`max_position_embeddings` must exceed 2 (positions start after the padding id 1)",
            ));
        }
        if self.relative_attention_num_buckets < NUM_BUCKETS as usize {
            return Err(Error::model(
                path,
                format!(
                    "`relative_attention_num_buckets` {} is below the {NUM_BUCKETS} buckets MPNet uses",
                    self.relative_attention_num_buckets
                ),
            ));
        }
        Ok(())
    }

    /// The longest sequence the position table covers.
    pub fn max_sequence(&self) -> usize {
        self.max_position_embeddings - PADDING_IDX as usize - 1
    }
}

/// MPNet's names of a layer's parts.
const MPNET_LAYER: LayerNames = LayerNames {
    qkv: ["attention.attn.q", "attention.attn.k", "attention.attn.v"],
    attention_output: "attention.attn.o",
    attention_norm: "attention.LayerNorm",
    intermediate: "intermediate.dense",
    output: "output.dense",
    output_norm: "output.LayerNorm",
};

/// transformers' `MPNetEncoder.relative_position_bucket` (T5's
/// bidirectional buckets), with its f32 arithmetic, so boundary distances
/// (16, 32, 64) fall in the same bucket.
pub fn relative_position_bucket(relative: &Tensor, num_buckets: i64, max_distance: i64) -> Tensor {
    let n = -relative;
    let half = num_buckets / 2;
    let sign = n.lt(0).to_kind(Kind::Int64) * half;
    let n = n.abs();
    let max_exact = half / 2;
    let is_small = n.lt(max_exact);
    let log_ratio = (n.to_kind(Kind::Float) / max_exact as f64).log()
        / (max_distance as f64 / max_exact as f64).ln()
        * (half - max_exact) as f64;
    let large = (log_ratio.to_kind(Kind::Int64) + max_exact).clamp_max(half - 1);
    sign + n.where_self(&is_small, &large)
}

/// The bias every layer adds to its attention scores, `[heads, len, len]`
/// in f32: `table` (`[buckets, heads]`) at the bucket of `key − query`.
fn position_bias(table: &Tensor, len: i64) -> Tensor {
    let positions = Tensor::arange(len, (Kind::Int64, table.device()));
    let relative = positions.unsqueeze(0) - positions.unsqueeze(1);
    let bucket = relative_position_bucket(&relative, NUM_BUCKETS, MAX_DISTANCE);
    Tensor::embedding(table, &bucket, -1, false, false)
        .permute([2, 0, 1])
        .contiguous()
}

/// A frozen MPNet encoder.
#[derive(Debug)]
pub struct Mpnet {
    config: MpnetConfig,
    info: BackboneInfo,
    encoder: EncoderStack,
    /// The relative position bias for the longest sequence, `[heads, n, n]` f32.
    position_bias: Tensor,
    /// Keeps memory-mapped weights alive; declared last so it drops last.
    _storage: WeightStorage,
}

impl Mpnet {
    /// Loads `dir/config.json` and `dir/model.safetensors` with weights in
    /// `kind` on `device`.
    ///
    /// # Errors
    /// [`Error::Model`] naming the file for a missing file, an unsupported or
    /// inconsistent configuration, or a missing / mis-shaped / non-float tensor.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (config, weights) =
            open_checkpoint(dir, device, kind, "mpnet.", MpnetConfig::validate)?;
        Self::from_weights(config, &weights)
    }

    /// Builds the encoder from an already parsed config and opened weights.
    ///
    /// # Errors
    /// As [`Mpnet::load`] for the tensors.
    pub fn from_weights(config: MpnetConfig, w: &Weights) -> Result<Self> {
        let shape = StackShape {
            vocab: config.vocab_size,
            positions: config.max_position_embeddings,
            layers: config.num_hidden_layers,
            layer: LayerShape {
                hidden: config.hidden_size,
                intermediate: config.intermediate_size,
                heads: config.num_attention_heads,
                eps: config.layer_norm_eps,
                act: config.hidden_act,
            },
        };
        let encoder = EncoderStack::load(w, shape, &MPNET_LAYER)?;
        let table = w.get_as(
            "encoder.relative_attention_bias.weight",
            &[
                config.relative_attention_num_buckets,
                config.num_attention_heads,
            ],
            Kind::Float,
        )?;
        Ok(Self {
            info: encoder.info(Family::Mpnet, w),
            position_bias: position_bias(&table, config.max_sequence() as i64),
            config,
            encoder,
            _storage: w.storage(),
        })
    }

    /// The configuration this encoder was built from.
    pub fn config(&self) -> &MpnetConfig {
        &self.config
    }
}

impl Backbone for Mpnet {
    fn info(&self) -> &BackboneInfo {
        &self.info
    }

    /// Word + position embeddings, then LayerNorm. Position ids come from
    /// the ids as transformers' `create_position_ids_from_input_ids`: real
    /// tokens count 2, 3, ...; padding tokens (id 1) get position 1.
    ///
    /// # Panics
    /// When the sequence is longer than `max_position_embeddings − 2`.
    fn embed(&self, input_ids: &Tensor) -> Tensor {
        let seq = input_ids.size().last().copied().unwrap_or(0);
        assert!(
            seq as usize <= self.config.max_sequence(),
            "sequence length {seq} exceeds max_position_embeddings {} - 2",
            self.config.max_position_embeddings
        );
        let real = input_ids.ne(PADDING_IDX).to_kind(Kind::Int64);
        let positions = real.cumsum(-1, Kind::Int64) * &real + PADDING_IDX;
        let table = &self.encoder.position_embeddings;
        let positions = Tensor::embedding(table, &positions, -1, false, false);
        self.encoder.embed(input_ids, &positions)
    }

    /// Post-LN encoder layer whose attention scores get the relative
    /// position bias, with the padded keys at the most negative f32 (as
    /// transformers' extended attention mask). `hidden` is first cast to the
    /// backbone's dtype (a no-op when it already has it).
    ///
    /// # Panics
    /// When `index >= num_layers` or shapes disagree.
    fn layer(
        &self,
        index: usize,
        hidden: &Tensor,
        attention_mask: &Tensor,
        delta: Option<&dyn ProjectionDelta>,
    ) -> Tensor {
        let keep = |batch, seq| {
            let padding = attention_mask.eq(0).to_kind(Kind::Float);
            let bias = self.position_bias.narrow(1, 0, seq).narrow(2, 0, seq);
            bias.unsqueeze(0) + padding.view([batch, 1, 1, seq]) * f64::from(f32::MIN)
        };
        self.encoder
            .layer("MPNet", index, (hidden, attention_mask), keep, delta)
    }

    /// Identity: MPNet's last LayerNorm is inside its last layer.
    fn final_norm(&self, hidden: &Tensor) -> Tensor {
        hidden.shallow_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets of transformers' `relative_position_bucket(key - query, 32, 128)`
    /// for these relative positions (printed by transformers 4.x).
    #[test]
    fn buckets_match_transformers() {
        let relative: Vec<i64> = vec![
            -200, -128, -100, -64, -33, -32, -31, -17, -16, -15, -9, -8, -7, -1, 0, 1, 7, 8, 9, 15,
            16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 200, 511,
        ];
        let got = relative_position_bucket(&Tensor::from_slice(&relative), 32, 128);
        let got = Vec::<i64>::try_from(got).expect("ints");
        assert_eq!(got, BUCKETS_FROM_TRANSFORMERS);
    }

    const BUCKETS_FROM_TRANSFORMERS: [i64; 33] = [
        15, 15, 15, 14, 12, 12, 11, 10, 10, 9, 8, 8, 7, 1, 0, 17, 23, 24, 24, 25, 26, 26, 27, 28,
        28, 29, 30, 30, 31, 31, 31, 31, 31,
    ];
}
