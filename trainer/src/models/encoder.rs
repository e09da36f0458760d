//! The post-LN Transformer encoder layer that BERT and MPNet share
//! (self-attention + LayerNorm, feed-forward + LayerNorm), and its
//! LayerNorm. The architectures differ only in their checkpoint names
//! ([`LayerNames`]) and in the attention mask they hand to
//! [`EncoderLayer::forward`]: BERT a key padding mask, MPNet that mask
//! folded into its relative position bias.

use tch::Tensor;

use super::config::Activation;
use super::weights::Weights;
use super::{add_delta, attention, FusedLinear, Linear, Projection, ProjectionDelta, TokenRows};
use crate::error::Result;

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

/// Layer `index` of `layers`, panicking with the architecture's `name`
/// when it is out of range.
pub(super) fn layer_at<'a>(
    layers: &'a [EncoderLayer],
    index: usize,
    name: &str,
) -> &'a EncoderLayer {
    layers.get(index).unwrap_or_else(|| {
        panic!(
            "layer {index} out of range: this {name} has {} layers",
            layers.len()
        )
    })
}
