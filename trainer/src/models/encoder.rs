//! What BERT and MPNet share: the post-LN Transformer encoder layer
//! (self-attention + LayerNorm, feed-forward + LayerNorm), its LayerNorm,
//! and the stack of word and position tables, embedding LayerNorm and
//! layers ([`EncoderStack`]). The architectures differ in their checkpoint
//! names ([`LayerNames`]), their position ids and token types, and the
//! attention mask they hand to [`EncoderLayer::forward`]: BERT a key padding
//! mask, MPNet that mask folded into its relative position bias.

use std::path::Path;

use serde::de::DeserializeOwned;
use tch::{Device, Kind, Tensor};

use heterotune_crds::model::{ModelFacts, WEIGHTS_FILE};

use super::config::{typed, Activation};
use super::weights::Weights;
use super::{
    add_delta, attention, BackboneInfo, Family, FusedLinear, Linear, Projection, ProjectionDelta,
    TokenRows,
};
use crate::error::Result;

/// The typed, validated configuration in `dir` and its weights in `kind`
/// on `device`, with the task head's `prefix` (`bert.`, `mpnet.`) stripped.
///
/// # Errors
/// [`crate::Error::Model`] naming the file: missing file, invalid or
/// unsupported configuration (`validate`), unreadable weights.
pub(super) fn open_checkpoint<C: DeserializeOwned>(
    dir: &Path,
    device: Device,
    kind: Kind,
    prefix: &str,
    validate: impl FnOnce(&C, &Path) -> Result<()>,
) -> Result<(C, Weights)> {
    let facts = ModelFacts::read(dir)?;
    let config: C = typed(&facts)?;
    validate(&config, &facts.source)?;
    let mut weights = Weights::open(&dir.join(WEIGHTS_FILE), device, kind)?;
    weights.strip_prefix(prefix);
    Ok((config, weights))
}

/// LayerNorm over the last dimension.
#[derive(Debug)]
pub(super) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    size: i64,
}

impl LayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias` (`[size]`).
    pub(super) fn load(w: &Weights, prefix: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{prefix}.weight"), &[size])?,
            bias: w.get(&format!("{prefix}.bias"), &[size])?,
            eps,
            size: size as i64,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.size],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// Checkpoint names of a layer's parts, under `encoder.layer.{i}.`.
pub(super) struct LayerNames {
    /// Query, key and value projections.
    pub qkv: [&'static str; 3],
    /// Attention output projection.
    pub attention_output: &'static str,
    /// LayerNorm after attention.
    pub attention_norm: &'static str,
    /// Feed-forward input projection.
    pub intermediate: &'static str,
    /// Feed-forward output projection.
    pub output: &'static str,
    /// LayerNorm after the feed-forward block.
    pub output_norm: &'static str,
}

/// Sizes of a layer, from the architecture's configuration.
#[derive(Debug, Clone, Copy)]
pub(super) struct LayerShape {
    /// Width of the residual stream.
    pub hidden: usize,
    /// Width of the feed-forward block.
    pub intermediate: usize,
    /// Attention heads (divide `hidden`).
    pub heads: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// Feed-forward activation.
    pub act: Activation,
}

/// One encoder layer: self-attention + LayerNorm, FFN + LayerNorm.
#[derive(Debug)]
pub(super) struct EncoderLayer {
    /// Query, key and value, fused.
    qkv: FusedLinear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    shape: LayerShape,
}

impl EncoderLayer {
    /// Loads layer `index` under the architecture's `names`.
    pub(super) fn load(
        w: &Weights,
        names: &LayerNames,
        shape: LayerShape,
        index: usize,
    ) -> Result<Self> {
        let name = |part: &str| format!("encoder.layer.{index}.{part}");
        let (h, i, eps) = (shape.hidden, shape.intermediate, shape.eps);
        let qkv = names.qkv.map(name);
        Ok(Self {
            qkv: FusedLinear::load(w, &[(&qkv[0], h), (&qkv[1], h), (&qkv[2], h)], h, true)?,
            attention_output: Linear::load(w, &name(names.attention_output), h, h, true)?,
            attention_norm: LayerNorm::load(w, &name(names.attention_norm), h, eps)?,
            intermediate: Linear::load(w, &name(names.intermediate), h, i, true)?,
            output: Linear::load(w, &name(names.output), i, h, true)?,
            output_norm: LayerNorm::load(w, &name(names.output_norm), h, eps)?,
            shape,
        })
    }

    /// Runs the layer (it is layer `index` for `delta`) on `hidden`
    /// (`[batch, seq, hidden]`, in the backbone's dtype). `keep` is the
    /// attention mask [`attention`] takes: boolean (true = attend) or an
    /// additive float bias, broadcastable to `[batch, heads, seq, seq]`.
    /// Token-wise work runs on the real tokens of `attention_mask` only.
    pub(super) fn forward(
        &self,
        index: usize,
        hidden: &Tensor,
        attention_mask: &Tensor,
        keep: &Tensor,
        delta: Option<&dyn ProjectionDelta>,
    ) -> Tensor {
        let (batch, seq, width) = hidden.size3().expect("hidden must be [batch, seq, hidden]");
        let heads = self.shape.heads as i64;
        let rows = TokenRows::of(attention_mask);
        let hidden = &rows.pack(hidden);
        let [q, k, v]: [Tensor; 3] = self
            .qkv
            .forward(hidden)
            .into_iter()
            .zip([Projection::Query, Projection::Key, Projection::Value])
            .map(|(out, projection)| {
                let out = add_delta(out, hidden, delta, index, projection);
                rows.unpack(&out)
                    .view([batch, seq, heads, width / heads])
                    .transpose(1, 2)
            })
            .collect::<Vec<_>>()
            .try_into()
            .expect("three fused projections");
        let context = attention(&q, &k, &v, Some(keep), false)
            .transpose(1, 2)
            .reshape([batch, seq, width]);
        let attended =
            self.attention_output
                .project(&rows.pack(&context), delta, index, Projection::Output);
        let hidden = self.attention_norm.forward(&(attended + hidden));
        let inner = self.shape.act.apply(&self.intermediate.forward(&hidden));
        rows.unpack(
            &self
                .output_norm
                .forward(&(self.output.forward(&inner) + hidden)),
        )
    }
}

/// Sizes of an encoder, from the architecture's configuration.
#[derive(Debug, Clone, Copy)]
pub(super) struct StackShape {
    /// Token vocabulary.
    pub vocab: usize,
    /// Learned positions.
    pub positions: usize,
    /// Number of layers.
    pub layers: usize,
    /// Each layer's sizes.
    pub layer: LayerShape,
}

/// An encoder's word and position tables, embedding LayerNorm and layers.
#[derive(Debug)]
pub(super) struct EncoderStack {
    /// `[vocab, hidden]`.
    word_embeddings: Tensor,
    /// `[positions, hidden]` (BERT adds its type-0 embedding).
    pub position_embeddings: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
}

impl EncoderStack {
    /// Loads `embeddings.{word,position}_embeddings`, `embeddings.LayerNorm`
    /// and the layers under `names`.
    pub(super) fn load(w: &Weights, shape: StackShape, names: &LayerNames) -> Result<Self> {
        let h = shape.layer.hidden;
        Ok(Self {
            word_embeddings: w.get("embeddings.word_embeddings.weight", &[shape.vocab, h])?,
            position_embeddings: w.get(
                "embeddings.position_embeddings.weight",
                &[shape.positions, h],
            )?,
            embedding_norm: LayerNorm::load(w, "embeddings.LayerNorm", h, shape.layer.eps)?,
            layers: (0..shape.layers)
                .map(|i| EncoderLayer::load(w, names, shape.layer, i))
                .collect::<Result<Vec<_>>>()?,
        })
    }

    /// The backbone's shape facts once every tensor of `w` is loaded.
    pub(super) fn info(&self, family: Family, w: &Weights) -> BackboneInfo {
        let (vocab_size, hidden_size) = self
            .word_embeddings
            .size2()
            .map(|(v, h)| (v as usize, h as usize))
            .unwrap_or_default();
        BackboneInfo {
            family,
            hidden_size,
            num_layers: self.layers.len(),
            vocab_size,
            num_parameters: w.loaded_elements(),
        }
    }

    /// Word embeddings of `input_ids` plus `positions` (broadcastable), normed.
    pub(super) fn embed(&self, input_ids: &Tensor, positions: &Tensor) -> Tensor {
        let words = Tensor::embedding(&self.word_embeddings, input_ids, -1, false, false);
        self.embedding_norm.forward(&(words + positions))
    }

    /// Runs layer `index` on `hidden` cast to the backbone's dtype (adapters
    /// may hand back f32 while the backbone computes in bf16), with the
    /// attention mask `keep` makes from `(batch, seq)`.
    ///
    /// # Panics
    /// When `index` is out of range (naming the architecture `name`) or
    /// shapes disagree.
    pub(super) fn layer(
        &self,
        name: &str,
        index: usize,
        (hidden, attention_mask): (&Tensor, &Tensor),
        keep: impl FnOnce(i64, i64) -> Tensor,
        delta: Option<&dyn ProjectionDelta>,
    ) -> Tensor {
        let layer = self.layers.get(index).unwrap_or_else(|| {
            panic!(
                "layer {index} out of range: this {name} has {} layers",
                self.layers.len()
            )
        });
        let hidden = hidden.to_kind(self.word_embeddings.kind());
        let (batch, seq) = attention_mask.size2().expect("mask must be [batch, seq]");
        layer.forward(index, &hidden, attention_mask, &keep(batch, seq), delta)
    }
}
