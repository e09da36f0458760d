//! Frozen pretrained backbones.
//!
//! Every architecture implements [`Backbone`], a layer-by-layer interface:
//! the trainer embeds the tokens, runs the layers one at a time (so DeMA can
//! act on the residual stream after any layer, and so a frozen prefix of
//! layers can be run once and cached), then applies the final norm.
//!
//! [`load_backbone`] reads a Hugging Face model directory (`config.json` +
//! `model.safetensors`) and picks the architecture: [`bert::Bert`] for
//! BERT-family encoders, [`mpnet::Mpnet`] for MPNet encoders,
//! [`llama::Llama`] for LLaMA-family decoders.

pub mod bert;
pub mod config;
mod encoder;
pub mod llama;
pub mod mpnet;
pub mod rope;
pub mod select;
pub mod weights;

use tch::{Kind, Tensor};

use crate::error::Result;

use weights::Weights;

/// Architecture family of a backbone: the API's one list of families.
pub use heterotune_crds::spec::ModelFamily as Family;
pub use select::{load_backbone, ModelConfig};

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
    /// input is `input` (`[..., in_features]`: the real tokens' rows
    /// `[tokens, in_features]` when the layer packs a padded batch, see
    /// [`TokenRows`]; in the backbone's dtype); the result must have the
    /// projection's output shape `[..., out_features]` and is cast to the
    /// backbone's dtype. Every row must be computed from its own input row.
    fn delta(&self, layer: usize, projection: Projection, input: &Tensor) -> Option<Tensor>;
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
        drop(loaded);
        // The parts now live in the fused copy: their mapped pages can go.
        for (prefix, _) in parts {
            w.release(&format!("{prefix}.weight"));
            w.release(&format!("{prefix}.bias"));
        }
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

/// The real (unpadded) tokens of a `[batch, seq]` mask as rows of the
/// flattened `[batch * seq, width]` activations. The layers run every
/// token-wise operation (projections, feed-forward, norms, LoRA deltas) on
/// the real rows only and lay them out padded just for attention: with
/// TREC's batches ~46 % of the positions are padding, so this removes that
/// share of the GEMM work without changing which examples share a batch.
/// Rows are independent in those operations, so the real rows' results are
/// the padded computation's (up to the GEMM's summation order); padded
/// positions come out as zeros.
pub(crate) struct TokenRows {
    /// Indices of the real rows; `None` when packing would not pay (no or
    /// little padding): then `pack`/`unpack` only reshape.
    index: Option<Tensor>,
    batch: i64,
    seq: i64,
}

/// Pack only when at least this share of the positions is padding.
const PACK_MIN_PADDING: f64 = 0.1;

impl TokenRows {
    /// The real rows of `attention_mask` (`[batch, seq]`, 1 = real token).
    pub(crate) fn of(attention_mask: &Tensor) -> Self {
        let (batch, seq) = attention_mask.size2().expect("mask must be [batch, seq]");
        let flat = attention_mask.reshape([-1]).ne(0);
        let real = flat.sum(Kind::Int64).int64_value(&[]);
        let total = batch * seq;
        let index = ((total - real) as f64 >= PACK_MIN_PADDING * total as f64)
            .then(|| flat.nonzero().squeeze_dim(1));
        TokenRows { index, batch, seq }
    }

    /// `[batch, seq, width]` → the real rows `[real, width]`.
    pub(crate) fn pack(&self, x: &Tensor) -> Tensor {
        let width = x.size().last().copied().unwrap_or(0);
        let flat = x.reshape([self.batch * self.seq, width]);
        match &self.index {
            Some(i) => flat.index_select(0, i),
            None => flat,
        }
    }

    /// The real rows `[real, width]` → `[batch, seq, width]`, zeros at padding.
    pub(crate) fn unpack(&self, rows: &Tensor) -> Tensor {
        let width = rows.size().last().copied().unwrap_or(0);
        let flat = match &self.index {
            Some(i) => Tensor::zeros([self.batch * self.seq, width], (rows.kind(), rows.device()))
                .index_copy(0, i, rows),
            None => rows.shallow_clone(),
        };
        flat.view([self.batch, self.seq, width])
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
        // An f32 adapter on a bf16 backbone: keep the projection's dtype.
        Some(extra) => out + extra.to_kind(input.kind()),
        None => out,
    }
}

/// Scaled dot-product attention of queries `[batch, heads, seq, head_dim]`
/// over keys and values `[batch, kv_heads, seq, head_dim]` (grouped-query
/// attention when `kv_heads < heads`: query head `h` reads key/value head
/// `h / (heads / kv_heads)`, as Hugging Face's `repeat_kv`). `keep`, when
/// given, is a 4-D mask broadcastable to `[batch, heads, seq, seq]` (its
/// second dimension 1 or `heads`): boolean (true = attend) or an additive
/// float bias (MPNet's relative position bias with its padding folded in
/// as the most negative f32); `causal` adds the causal mask. Returns
/// `[batch, heads, seq, head_dim]`.
///
/// f32/f64 use libtorch's fused SDPA kernel (the same call as Hugging Face's
/// default `sdpa` attention, so f32 results match it bit for bit). Other
/// dtypes (bf16, f16) use explicit matmuls with the softmax in f32, like
/// Hugging Face's eager attention: on CPU the fused kernel's bf16 backward is
/// several times slower than this.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, keep: Option<&Tensor>, causal: bool) -> Tensor {
    let heads = q.size()[1];
    let kv_heads = k.size()[1];
    if matches!(q.kind(), Kind::Float | Kind::Double) {
        // A float mask must have the queries' dtype.
        let keep = keep.map(|m| match m.kind() {
            Kind::Bool => m.shallow_clone(),
            _ => m.to_kind(q.kind()),
        });
        return Tensor::scaled_dot_product_attention(
            q,
            k,
            v,
            keep.as_ref(),
            0.0,
            causal,
            None,
            kv_heads != heads,
        );
    }
    attention_matmul(q, k, v, keep, causal)
}

/// [`attention`] with explicit matmuls and an f32 softmax (any dtype).
fn attention_matmul(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keep: Option<&Tensor>,
    causal: bool,
) -> Tensor {
    let (batch, heads, seq, head_dim) = q
        .size4()
        .expect("queries are [batch, heads, seq, head_dim]");
    let kv_heads = k.size()[1];
    let groups = heads / kv_heads;
    // [batch, kv_heads, groups * seq, head_dim]: each key/value head meets
    // its group of query heads in one batched matmul, without copying k, v.
    let grouped = q.reshape([batch, kv_heads, groups * seq, head_dim]);
    let mut scores = grouped
        .matmul(&k.transpose(-1, -2))
        .to_kind(Kind::Float)
        .view([batch, kv_heads, groups, seq, seq])
        * (head_dim as f64).powf(-0.5);
    let mut allowed: Option<Tensor> = None;
    if let Some(m) = keep {
        // [b, 1 | heads, s, s] -> [b, 1 | kv_heads, 1 | groups, s, s].
        let size = m.size();
        let m = if size[1] == heads && heads > 1 {
            m.reshape([size[0], kv_heads, groups, size[2], size[3]])
        } else {
            m.unsqueeze(1)
        };
        match m.kind() {
            Kind::Bool => allowed = Some(m),
            _ => scores += m.to_kind(Kind::Float),
        }
    }
    if causal {
        let tril = Tensor::ones([seq, seq], (Kind::Bool, q.device())).tril(0);
        allowed = Some(match allowed {
            Some(m) => m.logical_and(&tril),
            None => tril,
        });
    }
    let scores = match allowed {
        // The most negative f32 (not -inf): a row with no allowed key gets a
        // uniform average instead of NaN.
        Some(m) => scores.masked_fill(&m.logical_not(), f64::from(f32::MIN)),
        None => scores,
    };
    scores
        .softmax(-1, Kind::Float)
        .to_kind(q.kind())
        .view([batch, kv_heads, groups * seq, seq])
        .matmul(v)
        .view([batch, heads, seq, head_dim])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    #[test]
    fn token_rows_pack_the_real_tokens_and_unpack_with_zeros() {
        let mask = Tensor::from_slice(&[1i64, 1, 1, 0, 1, 0, 0, 0]).view([2, 4]);
        let x = randn(&[2, 4, 3]);
        let rows = TokenRows::of(&mask);
        let packed = rows.pack(&x);
        assert_eq!(packed.size(), [4, 3]);
        // Row order: batch-major, positions in order.
        let want = Tensor::cat(&[x.get(0).narrow(0, 0, 3), x.get(1).narrow(0, 0, 1)], 0);
        assert_eq!(
            f64::try_from((&packed - &want).abs().max()).unwrap_or(1.0),
            0.0
        );
        let back = rows.unpack(&packed);
        assert_eq!(back.size(), [2, 4, 3]);
        let real = mask.unsqueeze(-1).to_kind(Kind::Float);
        assert_eq!(
            f64::try_from((&back - &x * &real).abs().max()).unwrap_or(1.0),
            0.0
        );
        // Little padding (1 of 16 positions): not worth packing, only reshaped.
        let mut dense = vec![1i64; 16];
        dense[15] = 0;
        let rows = TokenRows::of(&Tensor::from_slice(&dense).view([2, 8]));
        let x = randn(&[2, 8, 3]);
        assert_eq!(rows.pack(&x).size(), [16, 3]);
        assert_eq!(rows.unpack(&rows.pack(&x)).size(), [2, 8, 3]);
    }

    /// The matmul path (used for bf16) equals the fused kernel in f32, with
    /// grouped heads, key masks, causal masks, both together, and an
    /// additive per-head bias.
    #[test]
    fn matmul_attention_matches_fused_kernel() {
        tch::manual_seed(3);
        let (b, t, d) = (2, 7, 8);
        for (heads, kv) in [(4, 4), (4, 2), (6, 1)] {
            let q = randn(&[b, heads, t, d]);
            let k = randn(&[b, kv, t, d]);
            let v = randn(&[b, kv, t, d]);
            let keys = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
                .view([b, t])
                .ne(0);
            let key_mask = keys.view([b, 1, 1, t]);
            let tril = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).tril(0);
            let both = tril.logical_and(&key_mask);
            // A per-head additive bias with the padded keys folded in (MPNet).
            let padding = keys.logical_not().to_kind(Kind::Float).view([b, 1, 1, t]);
            let bias = randn(&[1, heads, t, t]) + padding * f64::from(f32::MIN);
            for (keep, causal) in [
                (None, false),
                (None, true),
                (Some(&key_mask), false),
                (Some(&both), false),
                (Some(&key_mask), true),
                (Some(&bias), false),
            ] {
                let fused = attention(&q, &k, &v, keep, causal);
                let explicit = attention_matmul(&q, &k, &v, keep, causal);
                let diff = (fused - explicit).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "heads {heads}/{kv} causal {causal}: {diff}");
            }
        }
    }
}
