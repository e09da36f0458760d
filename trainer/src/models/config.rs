//! The pieces of model configuration the architectures share: reading an
//! architecture's typed configuration out of a model's facts
//! ([`heterotune_crds::model::ModelFacts`], where `config.json` is parsed),
//! the activations, and the positivity check. A leaf: the architectures
//! (`bert.rs`, `llama.rs`) use it; choosing between them is `select.rs`.

use std::path::Path;

use heterotune_crds::model::ModelFacts;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tch::Tensor;

use crate::error::{Error, Result};

/// Deserialises the model's `config.json` into an architecture's config struct.
///
/// # Errors
/// [`Error::Model`] naming the file and the serde message (missing or
/// ill-typed field, unknown activation...).
pub fn typed<T: DeserializeOwned>(facts: &ModelFacts) -> Result<T> {
    T::deserialize(&facts.config)
        .map_err(|e| Error::model(&facts.source, format!("invalid configuration: {e}")))
}

/// Activation function named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// Exact GELU (erf), Hugging Face's `gelu`.
    #[serde(rename = "gelu")]
    Gelu,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
    /// ReLU.
    #[serde(rename = "relu")]
    Relu,
    /// SiLU / swish.
    #[serde(rename = "silu", alias = "swish")]
    Silu,
}

impl Activation {
    /// Applies the activation element-wise.
    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }
}

/// Checks `value > 0` for a size read from `config.json`.
pub(crate) fn positive(path: &Path, field: &str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(Error::model(path, format!("`{field}` must be positive")));
    }
    Ok(())
}
