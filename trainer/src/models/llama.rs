//! LLaMA-family decoders (SmolLM2, TinyLlama, LLaMA 2/3, ...): configuration,
//! blocks and loading from Hugging Face checkpoint names (`model.embed_tokens`,
//! `model.layers.{i}.self_attn.q_proj`, ..., `model.norm`, `lm_head`).
//!
//! Matches `transformers.LlamaForCausalLM` in eval mode: RMSNorm, rotate-half
//! RoPE (default, `linear` or `llama3` scaling), grouped-query attention with
//! a causal mask, SwiGLU MLP, tied or separate output embeddings.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use heterotune_crds::model::{ModelFacts, WEIGHTS_FILE};

use super::config::{positive, typed, Activation};
use super::rope::RopeParameters;
use super::rope::{inverse_frequencies, rope_tables, RopeScaling, ROPE_TABLE_MAX};
use super::weights::{WeightStorage, Weights};
use super::{
    add_delta, attention, Backbone, BackboneInfo, Family, FusedLinear, Linear, Projection,
    ProjectionDelta, TokenRows,
};
use crate::error::{Error, Result};

/// One token id or several (`eos_token_id` may be a list).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The first id.
    pub fn first(&self) -> Option<u32> {
        match self {
            TokenIds::One(id) => Some(*id),
            TokenIds::Many(ids) => ids.first().copied(),
        }
    }
}

/// Hyper-parameters of a LLaMA decoder, as in Hugging Face's `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LlamaConfig {
    /// Size of the token vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to the
    /// number of query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Gate activation (`silu` for LLaMA).
    #[serde(default = "default_llama_act")]
    pub hidden_act: Activation,
    /// Context length the model was trained for.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// Base of the rotary frequencies (older configs keep it at top level).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Older name of `rope_parameters`.
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    /// RoPE parameters (transformers ≥ 5).
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Output projection shares the token embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Beginning-of-sequence token id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Padding token id, if any.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn default_llama_act() -> Activation {
    Activation::Silu
}
fn default_max_positions() -> usize {
    2048
}
fn default_rms_eps() -> f64 {
    1e-6
}

impl LlamaConfig {
    /// Number of key/value heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// RoPE base frequency (`rope_parameters.rope_theta`, else `rope_theta`,
    /// else 10 000).
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .or_else(|| self.rope_scaling.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10_000.0)
    }

    /// Checks sizes and options this implementation relies on.
    ///
    /// # Errors
    /// [`Error::Model`] naming `path` and the offending field.
    pub fn validate(&self, path: &Path) -> Result<()> {
        positive(path, "vocab_size", self.vocab_size)?;
        positive(path, "hidden_size", self.hidden_size)?;
        positive(path, "num_hidden_layers", self.num_hidden_layers)?;
        positive(path, "num_attention_heads", self.num_attention_heads)?;
        positive(path, "num_key_value_heads", self.num_kv_heads())?;
        positive(path, "head_dim", self.head_dim())?;
        positive(path, "intermediate_size", self.intermediate_size)?;
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(Error::model(
                path,
                format!(
                    "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    self.num_attention_heads,
                    self.num_kv_heads()
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::model(
                path,
                format!("head_dim {} must be even for RoPE", self.head_dim()),
            ));
        }
        if self.rope_theta() <= 0.0 {
            return Err(Error::model(path, "rope_theta must be positive"));
        }
        self.rope_scaling_kind(path)?;
        Ok(())
    }

    fn rope_scaling_kind(&self, path: &Path) -> Result<RopeScaling> {
        RopeScaling::of(
            self.rope_parameters.as_ref().or(self.rope_scaling.as_ref()),
            path,
        )
    }
}

/// RMSNorm with a learned scale; statistics in f32 as in Hugging Face.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
    size: i64,
}

impl RmsNorm {
    fn load(w: &Weights, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(name, &[size])?,
            eps,
            size: size as i64,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        if kind == Kind::Float {
            x.rms_norm([self.size], Some(&self.weight), self.eps)
        } else {
            let normed = x
                .to_kind(Kind::Float)
                .rms_norm([self.size], None::<&Tensor>, self.eps)
                .to_kind(kind);
            normed * &self.weight
        }
    }
}

/// One decoder layer.
#[derive(Debug)]
struct LlamaLayer {
    input_norm: RmsNorm,
    /// `self_attn.{q,k,v}_proj`, fused.
    qkv_proj: FusedLinear,
    o_proj: Linear,
    post_attention_norm: RmsNorm,
    /// `mlp.{gate,up}_proj`, fused.
    gate_up_proj: FusedLinear,
    down_proj: Linear,
}

impl LlamaLayer {
    fn load(w: &Weights, cfg: &LlamaConfig, index: usize) -> Result<Self> {
        let p = format!("model.layers.{index}");
        let h = cfg.hidden_size;
        let q = cfg.num_attention_heads * cfg.head_dim();
        let kv = cfg.num_kv_heads() * cfg.head_dim();
        let i = cfg.intermediate_size;
        let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
        Ok(Self {
            input_norm: RmsNorm::load(
                w,
                &format!("{p}.input_layernorm.weight"),
                h,
                cfg.rms_norm_eps,
            )?,
            qkv_proj: FusedLinear::load(
                w,
                &[
                    (&format!("{p}.self_attn.q_proj"), q),
                    (&format!("{p}.self_attn.k_proj"), kv),
                    (&format!("{p}.self_attn.v_proj"), kv),
                ],
                h,
                ab,
            )?,
            o_proj: Linear::load(w, &format!("{p}.self_attn.o_proj"), q, h, ab)?,
            post_attention_norm: RmsNorm::load(
                w,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                cfg.rms_norm_eps,
            )?,
            gate_up_proj: FusedLinear::load(
                w,
                &[
                    (&format!("{p}.mlp.gate_proj"), i),
                    (&format!("{p}.mlp.up_proj"), i),
                ],
                h,
                mb,
            )?,
            down_proj: Linear::load(w, &format!("{p}.mlp.down_proj"), i, h, mb)?,
        })
    }
}

/// A frozen LLaMA decoder.
#[derive(Debug)]
pub struct Llama {
    config: LlamaConfig,
    info: BackboneInfo,
    embed_tokens: Tensor,
    layers: Vec<LlamaLayer>,
    norm: RmsNorm,
    /// `None` when the output projection is tied to `embed_tokens`.
    lm_head: Option<Tensor>,
    inv_freq: Tensor,
    /// `[positions, head_dim]` cos / sin tables in the compute dtype.
    cos: Tensor,
    /// `[positions, head_dim]`, first half negated (see [`Llama::rope`]).
    sin_signed: Tensor,
    kind: Kind,
    /// Keeps memory-mapped weights alive; declared last so it drops last.
    _storage: WeightStorage,
}

impl Llama {
    /// Loads `dir/config.json` and `dir/model.safetensors` with weights in
    /// `kind` on `device`.
    ///
    /// # Errors
    /// [`Error::Model`] naming the file for a missing file, an unsupported or
    /// inconsistent configuration, or a missing / mis-shaped / non-float tensor.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let facts = ModelFacts::read(dir)?;
        let config: LlamaConfig = typed(&facts)?;
        config.validate(&facts.source)?;
        let weights = Weights::open(&dir.join(WEIGHTS_FILE), device, kind)?;
        Self::from_weights(config, &weights)
    }

    /// Builds the decoder from an already parsed config and opened weights.
    ///
    /// # Errors
    /// As [`Llama::load`] for the configuration and the tensors.
    pub fn from_weights(config: LlamaConfig, w: &Weights) -> Result<Self> {
        config.validate(w.path())?;
        let scaling = config.rope_scaling_kind(w.path())?;
        let (h, v) = (config.hidden_size, config.vocab_size);
        let embed_tokens = w.get("model.embed_tokens.weight", &[v, h])?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| LlamaLayer::load(w, &config, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(w, "model.norm.weight", h, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(w.get("lm_head.weight", &[v, h]).map_err(|e| {
                Error::model(
                    w.path(),
                    format!("{e}; config.json says tie_word_embeddings=false, so lm_head.weight is required"),
                )
            })?)
        };
        let device = w.device();
        let inv_freq = inverse_frequencies(config.head_dim(), config.rope_theta(), scaling, device);
        let table_len = config.max_position_embeddings.clamp(1, ROPE_TABLE_MAX);
        let (cos, sin_signed) = rope_tables(&inv_freq, 0, table_len as i64, w.kind());
        let info = BackboneInfo {
            family: Family::Llama,
            hidden_size: h,
            num_layers: config.num_hidden_layers,
            vocab_size: v,
            num_parameters: w.loaded_elements(),
        };
        Ok(Self {
            config,
            info,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            cos,
            sin_signed,
            kind: w.kind(),
            _storage: w.storage(),
        })
    }

    /// The configuration this decoder was built from.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Next-token logits `[batch, seq, vocab]` from final-normed hidden
    /// states (the output projection, tied to the token embeddings when the
    /// checkpoint ties them).
    pub fn lm_logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear(
            self.lm_head.as_ref().unwrap_or(&self.embed_tokens),
            None::<&Tensor>,
        )
    }

    /// Applies rotate-half RoPE to `x` (`[batch, heads, seq, head_dim]`):
    /// `x·cos + rotate_half(x)·sin`, where `rotate_half(x)·sin` is computed as
    /// `roll(x, head_dim/2)·sin_signed`.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin_signed: &Tensor) -> Tensor {
        let half = (self.config.head_dim() / 2) as i64;
        x * cos + x.roll([half], [-1]) * sin_signed
    }

    fn rope_for(&self, seq: i64) -> (Tensor, Tensor) {
        if seq <= self.cos.size()[0] {
            (
                self.cos.narrow(0, 0, seq),
                self.sin_signed.narrow(0, 0, seq),
            )
        } else {
            rope_tables(&self.inv_freq, 0, seq, self.kind)
        }
    }
}

/// Whether every row of `mask` (`[batch, seq]`) is ones followed by zeros.
fn is_right_padded(mask: &Tensor) -> bool {
    let seq = mask.size().last().copied().unwrap_or(0);
    if seq < 2 {
        return true;
    }
    let later = mask.narrow(1, 1, seq - 1).ne(0);
    let earlier = mask.narrow(1, 0, seq - 1).ne(0);
    // A real token after a padded one breaks right padding.
    later
        .logical_and(&earlier.logical_not())
        .any()
        .int64_value(&[])
        == 0
}

impl Backbone for Llama {
    fn info(&self) -> &BackboneInfo {
        &self.info
    }

    /// Token embeddings.
    fn embed(&self, input_ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false)
    }

    /// Pre-norm decoder layer: causal grouped-query attention with RoPE,
    /// then the SwiGLU MLP.
    ///
    /// `hidden` is first cast to the backbone's dtype (a no-op when it
    /// already has it). With right padding (the trainer's convention) the causal mask alone
    /// already keeps real tokens from seeing padding, so the padding mask is
    /// only materialised for other layouts.
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
        let layer = self.layers.get(index).unwrap_or_else(|| {
            panic!(
                "layer {index} out of range: this LLaMA has {} layers",
                self.layers.len()
            )
        });
        // Adapters may hand back f32 while the backbone computes in bf16.
        let hidden = &hidden.to_kind(self.kind);
        let (batch, seq, _) = hidden.size3().expect("hidden must be [batch, seq, hidden]");
        let heads = self.config.num_attention_heads as i64;
        let kv_heads = self.config.num_kv_heads() as i64;
        let head_dim = self.config.head_dim() as i64;
        // Token-wise work on the real tokens only; attention padded.
        let rows = TokenRows::of(attention_mask);
        let hidden = &rows.pack(hidden);

        let x = layer.input_norm.forward(hidden);
        let [q, k, v]: [Tensor; 3] = layer
            .qkv_proj
            .forward(&x)
            .into_iter()
            .zip([
                (Projection::Query, heads),
                (Projection::Key, kv_heads),
                (Projection::Value, kv_heads),
            ])
            .map(|(out, (projection, n))| {
                rows.unpack(&add_delta(out, &x, delta, index, projection))
                    .view([batch, seq, n, head_dim])
                    .transpose(1, 2)
            })
            .collect::<Vec<_>>()
            .try_into()
            .expect("three fused projections");
        let (cos, sin_signed) = self.rope_for(seq);
        let q = self.rope(&q, &cos, &sin_signed);
        let k = self.rope(&k, &cos, &sin_signed);

        let (mask, is_causal) = if is_right_padded(attention_mask) {
            (None, true)
        } else {
            let causal = Tensor::ones([seq, seq], (Kind::Bool, hidden.device())).tril(0);
            let keys = attention_mask.ne(0).view([batch, 1, 1, seq]);
            (Some(causal.logical_and(&keys)), false)
        };
        let context = attention(&q, &k, &v, mask.as_ref(), is_causal)
            .transpose(1, 2)
            .reshape([batch, seq, heads * head_dim]);
        let attended = layer
            .o_proj
            .project(&rows.pack(&context), delta, index, Projection::Output);
        let hidden = hidden + attended;

        let x = layer.post_attention_norm.forward(&hidden);
        let [gate, up]: [Tensor; 2] = layer
            .gate_up_proj
            .forward(&x)
            .try_into()
            .expect("two fused projections");
        let mlp = layer
            .down_proj
            .forward(&(self.config.hidden_act.apply(&gate) * up));
        rows.unpack(&(hidden + mlp))
    }

    /// `model.norm` (input cast to the backbone's dtype first).
    fn final_norm(&self, hidden: &Tensor) -> Tensor {
        self.norm.forward(&hidden.to_kind(self.kind))
    }
}
