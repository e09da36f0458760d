//! The classification head: pooling over tokens, then a linear layer.
//!
//! Mean pooling over the unmasked tokens is the default for encoders and
//! decoders alike: with last-token pooling the reference prototype lost 6-8
//! points on SmolLM2. Tensor names (family-specific, like DeMA's down/up):
//! `head.weight` `[C, d]` and `head.bias` `[C]`, under the given path.

use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use crate::adapters::dema::{init_var, InitDist};
use crate::error::{Error, Result};

/// How the token states are reduced to one vector per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Pooling {
    /// Mean over the tokens whose attention-mask entry is 1 (default).
    #[default]
    Mean,
    /// The last unmasked token (padding on the right).
    LastToken,
}

impl Pooling {
    /// Pools `hidden` `[batch, seq, d]` (any float dtype) under
    /// `attention_mask` `[batch, seq]` (1 = token, 0 = padding) into
    /// `[batch, d]` f32. A row with no unmasked token pools to zeros (mean)
    /// or to its first position (last token).
    pub fn pool(self, hidden: &Tensor, attention_mask: &Tensor) -> Tensor {
        let x = hidden.to_kind(Kind::Float);
        match self {
            Pooling::Mean => {
                let mask = attention_mask.to_kind(Kind::Float).unsqueeze(-1); // [b, t, 1]
                let sum = (x * &mask).sum_dim_intlist(1, false, Kind::Float);
                let count = mask.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0);
                sum / count
            }
            Pooling::LastToken => {
                let last =
                    (attention_mask
                        .to_kind(Kind::Int64)
                        .sum_dim_intlist(1, false, Kind::Int64)
                        - 1)
                    .clamp_min(0); // [b]
                let d = x.size()[2];
                let index = last.view([-1, 1, 1]).expand([-1, 1, d], false);
                x.gather(1, &index, false).squeeze_dim(1)
            }
        }
    }
}

/// Linear classifier over pooled token states.
#[derive(Debug)]
pub struct ClassifierHead {
    weight: Tensor,
    bias: Tensor,
    pooling: Pooling,
    names: Vec<String>,
}

impl ClassifierHead {
    /// Creates `path / "head"` with `weight` `[num_classes, hidden_size]`
    /// ~ U(±1/√d) (PyTorch's `nn.Linear` bound) and a zero bias, in f32,
    /// from init seed 0, with mean pooling.
    pub fn new(path: &nn::Path, hidden_size: usize, num_classes: usize) -> Result<Self> {
        Self::new_seeded(path, hidden_size, num_classes, 0)
    }

    /// As [`ClassifierHead::new`] with init seed `seed` (ChaCha8 keyed by
    /// the tensor name, like DeMA's, so it is device-independent).
    pub fn new_seeded(
        path: &nn::Path,
        hidden_size: usize,
        num_classes: usize,
        seed: u64,
    ) -> Result<Self> {
        if hidden_size == 0 {
            return Err(Error::config("head.hiddenSize", "must be at least 1"));
        }
        if num_classes == 0 {
            return Err(Error::config("head.numClasses", "must be at least 1"));
        }
        let head = path.sub("head");
        let bound = 1.0 / (hidden_size as f64).sqrt();
        let weight = init_var(
            &head,
            "weight",
            "head.weight",
            &[num_classes, hidden_size],
            InitDist::Uniform { bound },
            seed,
        )?;
        let bias = init_var(
            &head,
            "bias",
            "head.bias",
            &[num_classes],
            InitDist::Zeros,
            seed,
        )?;
        Ok(ClassifierHead {
            weight,
            bias,
            pooling: Pooling::Mean,
            names: vec![head.path("weight"), head.path("bias")],
        })
    }

    /// Uses `pooling` instead of the default mean pooling.
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// The pooling in use.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Full var-store names of the head's tensors (weight, bias).
    pub fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    /// Number of classes `C`.
    pub fn num_classes(&self) -> usize {
        self.bias.numel()
    }

    /// Number of head parameters, `C * d + C`.
    pub fn parameter_count(&self) -> usize {
        self.weight.numel() + self.bias.numel()
    }

    /// Logits `[batch, C]` (f32) for `hidden` `[batch, seq, d]` and
    /// `attention_mask` `[batch, seq]`.
    pub fn forward(&self, hidden: &Tensor, attention_mask: &Tensor) -> Tensor {
        self.pooling
            .pool(hidden, attention_mask)
            .linear(&self.weight, Some(&self.bias))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn mean_pooling_ignores_padding() {
        let hidden = Tensor::from_slice(&[
            1.0f32, 2.0, 3.0, 4.0, 1e6, 1e6, 1e6, 1e6, //
            1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0,
        ])
        .view([2, 4, 2]);
        let mask = Tensor::from_slice(&[1i64, 1, 0, 0, 1, 1, 1, 1]).view([2, 4]);
        let pooled = Pooling::Mean.pool(&hidden, &mask);
        let want = Tensor::from_slice(&[2.0f32, 3.0, 2.5, 2.5]).view([2, 2]);
        assert!(pooled.allclose(&want, 1e-6, 1e-6, false), "{pooled}");
        let last = Pooling::LastToken.pool(&hidden, &mask);
        let want = Tensor::from_slice(&[3.0f32, 4.0, 4.0, 4.0]).view([2, 2]);
        assert!(last.equal(&want), "{last}");
        // bf16 in, f32 out; an all-padding row pools to zeros.
        let empty = Tensor::zeros([2, 4], (Kind::Int64, Device::Cpu));
        let pooled = Pooling::Mean.pool(&hidden.to_kind(Kind::BFloat16), &empty);
        assert_eq!(pooled.kind(), Kind::Float);
        assert_eq!(pooled.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn head_names_shapes_and_logits() {
        let vs = nn::VarStore::new(Device::Cpu);
        let head = ClassifierHead::new(&vs.root(), 16, 6).unwrap();
        let vars = vs.variables();
        assert_eq!(vars["head.weight"].size(), vec![6, 16]);
        assert_eq!(vars["head.bias"].size(), vec![6]);
        assert_eq!(head.names(), vec!["head.weight", "head.bias"]);
        assert_eq!(head.parameter_count(), 6 * 16 + 6);
        let bound = vars["head.weight"].abs().max().double_value(&[]);
        assert!(bound <= 0.25 && bound > 0.1, "{bound}");

        let hidden = Tensor::randn([3, 5, 16], (Kind::Float, Device::Cpu));
        let mask = Tensor::ones([3, 5], (Kind::Int64, Device::Cpu));
        let logits = head.forward(&hidden, &mask);
        assert_eq!(logits.size(), vec![3, 6]);
        // Padding beyond the mask does not change the logits.
        let padded = Tensor::cat(
            &[
                &hidden,
                &(Tensor::ones([3, 2, 16], (Kind::Float, Device::Cpu)) * 100.0),
            ],
            1,
        );
        let pmask = Tensor::cat(
            &[&mask, &Tensor::zeros([3, 2], (Kind::Int64, Device::Cpu))],
            1,
        );
        let logits2 = head.forward(&padded, &pmask);
        assert!(logits.allclose(&logits2, 1e-5, 1e-5, false));
        let last = ClassifierHead::new(&(vs.root() / "b"), 16, 6)
            .unwrap()
            .with_pooling(Pooling::LastToken);
        assert_eq!(last.pooling(), Pooling::LastToken);
        assert_eq!(last.forward(&padded, &pmask).size(), vec![3, 6]);
        assert!(ClassifierHead::new(&vs.root(), 16, 0).is_err());
    }

    #[test]
    fn pooling_serde() {
        assert_eq!(
            serde_json::to_string(&Pooling::LastToken).unwrap(),
            "\"lastToken\""
        );
        assert_eq!(
            serde_json::from_str::<Pooling>("\"mean\"").unwrap(),
            Pooling::Mean
        );
    }
}
