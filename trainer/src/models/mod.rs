//! Frozen pretrained backbones.
//!
//! Every architecture implements [`Backbone`], a layer-by-layer interface:
//! the trainer embeds the tokens, runs the layers one at a time (so DeMA can
//! act on the residual stream after any layer, and so a frozen prefix of
//! layers can be run once and cached), then applies the final norm.
//!
//! [`load_backbone`] reads a Hugging Face model directory (`config.json` +
//! `model.safetensors`) and picks the architecture: [`bert::Bert`] for
//! BERT-family encoders, [`llama::Llama`] for LLaMA-family decoders.

pub mod bert;
pub mod config;
pub mod llama;
pub mod weights;

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use config::RawConfig;
use weights::Weights;

/// Architecture family of a backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// BERT-style encoder (all-MiniLM-L6-v2, paraphrase-MiniLM-L3-v2, ...).
    Bert,
    /// LLaMA-style decoder (SmolLM2, LLaMA, ...).
    Llama,
}

/// Shape facts every backbone exposes.
#[derive(Debug, Clone, PartialEq)]
pub struct BackboneInfo {
    /// Architecture family.
    pub family: Family,
    /// Width of the residual stream (the hidden states' last dimension).
    pub hidden_size: usize,
    /// Number of layers [`Backbone::layer`] accepts.
    pub num_layers: usize,
    /// Size of the model's token vocabulary.
    pub vocab_size: usize,
    /// Total number of backbone parameters (frozen).
    pub num_parameters: usize,
}

/// A frozen backbone, run layer by layer.
///
/// Shapes: `input_ids` and `attention_mask` are `[batch, seq]` int64 (mask is
/// 1 for real tokens, 0 for padding; padding is on the right); hidden states
/// are `[batch, seq, hidden]` in the backbone's compute dtype. Outputs at
/// padded positions are unspecified (finite, but not meaningful): pool with
/// the mask.
pub trait Backbone: Send {
    /// Shape facts of this backbone.
    fn info(&self) -> &BackboneInfo;
    /// Token (and, for BERT, position + type + LayerNorm) embeddings.
    fn embed(&self, input_ids: &Tensor) -> Tensor;
    /// Runs layer `index` (0-based) on `hidden`. `delta`, when given, adds
    /// trainable updates to the layer's attention projections (LoRA).
    fn layer(
        &self,
        index: usize,
        hidden: &Tensor,
        attention_mask: &Tensor,
        delta: Option<&dyn ProjectionDelta>,
    ) -> Tensor;
    /// Final normalisation after the last layer (LLaMA's `model.norm`; identity for BERT).
    fn final_norm(&self, hidden: &Tensor) -> Tensor;

    /// Runs the whole backbone: embeddings, every layer, final norm.
    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        let mut hidden = self.embed(input_ids);
        for index in 0..self.info().num_layers {
            hidden = self.layer(index, &hidden, attention_mask, None);
        }
        self.final_norm(&hidden)
    }

    /// The embeddings followed by the output of every layer
    /// (`num_layers + 1` tensors, the last one before [`Backbone::final_norm`]).
    fn hidden_states(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Vec<Tensor> {
        let mut states = Vec::with_capacity(self.info().num_layers + 1);
        states.push(self.embed(input_ids));
        for index in 0..self.info().num_layers {
            let next = self.layer(index, &states[index], attention_mask, None);
            states.push(next);
        }
        states
    }
}

/// An attention projection inside a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    /// Query projection (BERT `attention.self.query`, LLaMA `self_attn.q_proj`).
    Query,
    /// Key projection (`key`, `k_proj`).
    Key,
    /// Value projection (`value`, `v_proj`).
    Value,
    /// Attention output projection (`attention.output.dense`, `o_proj`).
    Output,
}

/// Extra trainable low-rank updates on attention projections (LoRA and its
/// heterogeneous variants). `delta` returns the term to add to the
/// projection's output for `input`, or `None` when that projection is not
/// adapted in that layer.
pub trait ProjectionDelta {
    /// The term to add to projection `projection` of layer `layer`, whose
    /// input is `input` (`[batch, seq, in_features]`); the result must have
    /// the projection's output shape `[batch, seq, out_features]`.
    fn delta(&self, layer: usize, projection: Projection, input: &Tensor) -> Option<Tensor>;
}

/// Loads the backbone in `dir` (`config.json` + `model.safetensors`), with
/// frozen weights in `dtype` on `device`. The architecture comes from
/// `model_type` (`bert`, `llama`) or `architectures`; every size is read from
/// `config.json`, so any checkpoint of these families loads.
///
/// # Errors
/// [`crate::Error::Model`] naming the file: missing `config.json` or
/// `model.safetensors`, unknown `model_type`, unsupported option, missing
/// tensor, shape mismatch (expected vs found), non-float tensor.
pub fn load_backbone(dir: &Path, device: Device, dtype: Kind) -> Result<Box<dyn Backbone>> {
    let family = RawConfig::read(dir)?.family()?;
    Ok(match family {
        Family::Bert => Box::new(bert::Bert::load(dir, device, dtype)?),
        Family::Llama => Box::new(llama::Llama::load(dir, device, dtype)?),
    })
}

/// A frozen affine map `x Wᵀ + b` with a checkpoint's `[out, in]` weight.
#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{prefix}.weight` (`[out, in]`) and, when `bias`, `{prefix}.bias`.
    fn load(
        w: &Weights,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[out_features, in_features])?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out_features])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }

    /// `forward(input)` plus the caller's delta for this projection, if any.
    fn project(
        &self,
        input: &Tensor,
        delta: Option<&dyn ProjectionDelta>,
        layer: usize,
        projection: Projection,
    ) -> Tensor {
        add_delta(self.forward(input), input, delta, layer, projection)
    }
}

/// Projections of one input (q/k/v, gate/up) stored as a single `[Σ out, in]`
/// matrix, so one GEMM computes them all; the outputs are views of its
/// result. Each part is loaded and checked under its own checkpoint name.
#[derive(Debug)]
struct FusedLinear {
    linear: Linear,
    sizes: Vec<i64>,
}

impl FusedLinear {
    /// Loads `{prefix}.weight` (and `.bias`) for each `(prefix, out_features)`.
    fn load(w: &Weights, parts: &[(&str, usize)], in_features: usize, bias: bool) -> Result<Self> {
        let loaded = parts
            .iter()
            .map(|(prefix, out)| Linear::load(w, prefix, in_features, *out, bias))
            .collect::<Result<Vec<_>>>()?;
        let weights: Vec<&Tensor> = loaded.iter().map(|l| &l.weight).collect();
        let weight = Tensor::f_cat(&weights, 0)?;
        let bias = if bias {
            let biases: Vec<&Tensor> = loaded.iter().filter_map(|l| l.bias.as_ref()).collect();
            Some(Tensor::f_cat(&biases, 0)?)
        } else {
            None
        };
        Ok(Self {
            linear: Linear { weight, bias },
            sizes: parts.iter().map(|(_, out)| *out as i64).collect(),
        })
    }

    /// The parts' outputs, in load order.
    fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        self.linear.forward(x).split_with_sizes(&self.sizes, -1)
    }
}

/// Adds the caller's delta for `projection` to `out`, if it adapts it.
fn add_delta(
    out: Tensor,
    input: &Tensor,
    delta: Option<&dyn ProjectionDelta>,
    layer: usize,
    projection: Projection,
) -> Tensor {
    match delta.and_then(|d| d.delta(layer, projection, input)) {
        Some(extra) => out + extra,
        None => out,
    }
}
