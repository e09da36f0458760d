//! BERT-family encoders (all-MiniLM-L6-v2, paraphrase-MiniLM-L3-v2, BERT
//! base/large, ...): configuration, blocks and loading from Hugging Face
//! checkpoint names (`embeddings.*`, `encoder.layer.{i}.*`; a `bert.` prefix
//! is accepted and stripped).
//!
//! Matches `transformers.BertModel` in eval mode with absolute position
//! embeddings and token type 0 everywhere; the pooler is not loaded.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::config::{positive, Activation};
use super::encoder::{open_checkpoint, EncoderStack, LayerNames, LayerShape, StackShape};
use super::weights::{WeightStorage, Weights};
use super::{Backbone, BackboneInfo, Family, ProjectionDelta};
use crate::error::{Error, Result};

/// Hyper-parameters of a BERT encoder, as in Hugging Face's `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
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
    #[serde(default = "default_bert_act")]
    pub hidden_act: Activation,
    /// Number of learned positions.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Number of token types (segment ids).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// Only `absolute` is supported.
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
    /// Id of the padding token, if the checkpoint names one.
    #[serde(default)]
    pub pad_token_id: Option<i64>,
}

fn default_bert_act() -> Activation {
    Activation::Gelu
}
fn default_max_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}
fn default_position_type() -> String {
    "absolute".to_string()
}

impl BertConfig {
    /// Checks sizes and options this implementation relies on.
    ///
    /// # Errors
    /// [`Error::Model`] naming `path` and the offending field.
    pub fn validate(&self, path: &Path) -> Result<()> {
        positive(path, "vocab_size", self.vocab_size)?;
        positive(path, "hidden_size", self.hidden_size)?;
        positive(path, "num_hidden_layers", self.num_hidden_layers)?;
        positive(path, "num_attention_heads", self.num_attention_heads)?;
        positive(path, "intermediate_size", self.intermediate_size)?;
        positive(
            path,
            "max_position_embeddings",
            self.max_position_embeddings,
        )?;
        positive(path, "type_vocab_size", self.type_vocab_size)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::model(
                path,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(Error::model(
                path,
                format!(
                    "position_embedding_type `{}` is not supported (only `absolute`)",
                    self.position_embedding_type
                ),
            ));
        }
        Ok(())
    }
}

/// BERT's names of a layer's parts.
const BERT_LAYER: LayerNames = LayerNames {
    qkv: [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
    ],
    attention_output: "attention.output.dense",
    attention_norm: "attention.output.LayerNorm",
    intermediate: "intermediate.dense",
    output: "output.dense",
    output_norm: "output.LayerNorm",
};

/// A frozen BERT encoder.
#[derive(Debug)]
pub struct Bert {
    config: BertConfig,
    info: BackboneInfo,
    /// Its position table holds the positions plus the type-0 embedding.
    encoder: EncoderStack,
    /// Keeps memory-mapped weights alive; declared last so it drops last.
    _storage: WeightStorage,
}

impl Bert {
    /// Loads `dir/config.json` and `dir/model.safetensors` with weights in
    /// `kind` on `device`.
    ///
    /// # Errors
    /// [`Error::Model`] naming the file for a missing file, an unsupported or
    /// inconsistent configuration, or a missing / mis-shaped / non-float tensor.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (config, weights) = open_checkpoint(dir, device, kind, "bert.", BertConfig::validate)?;
        Self::from_weights(config, &weights)
    }

    /// Builds the encoder from an already parsed config and opened weights.
    ///
    /// # Errors
    /// As [`Bert::load`] for the tensors.
    pub fn from_weights(config: BertConfig, w: &Weights) -> Result<Self> {
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
        let mut encoder = EncoderStack::load(w, shape, &BERT_LAYER)?;
        let types = w.get(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, config.hidden_size],
        )?;
        encoder.position_embeddings = encoder.position_embeddings.f_add(&types.f_get(0)?)?;
        Ok(Self {
            info: encoder.info(Family::Bert, w),
            config,
            encoder,
            _storage: w.storage(),
        })
    }

    /// The configuration this encoder was built from.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }
}

impl Backbone for Bert {
    fn info(&self) -> &BackboneInfo {
        &self.info
    }

    /// Word + position + type-0 embeddings, then LayerNorm.
    ///
    /// # Panics
    /// When the sequence is longer than `max_position_embeddings`.
    fn embed(&self, input_ids: &Tensor) -> Tensor {
        let seq = input_ids.size().last().copied().unwrap_or(0);
        assert!(
            seq as usize <= self.config.max_position_embeddings,
            "sequence length {seq} exceeds max_position_embeddings {}",
            self.config.max_position_embeddings
        );
        let positions = self.encoder.position_embeddings.narrow(0, 0, seq);
        self.encoder.embed(input_ids, &positions)
    }

    /// Post-LN encoder layer with a key padding mask. `hidden` is first cast
    /// to the backbone's dtype (a no-op when it already has it).
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
        // Key padding mask, broadcast over heads and queries: true = attend.
        let keep = |batch, seq| attention_mask.ne(0).view([batch, 1, 1, seq]);
        self.encoder
            .layer("BERT", index, (hidden, attention_mask), keep, delta)
    }

    /// Identity: BERT's last LayerNorm is inside its last layer.
    fn final_norm(&self, hidden: &Tensor) -> Tensor {
        hidden.shallow_clone()
    }
}
