//! Reading a model directory's `config.json`: which architecture family it
//! is, and the pieces of configuration both families share (activations).
//! Each architecture's own `Config` lives in its file (`bert.rs`, `llama.rs`);
//! [`ModelConfig::read`] reads a directory's file into the right one, for
//! shape facts without loading weights.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use tch::Tensor;

use super::bert::BertConfig;
use super::llama::LlamaConfig;
use super::{BackboneInfo, Family};
use crate::error::{Error, Result};

/// Name of the configuration file in a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// Name of the weights file in a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the tokenizer file in a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A parsed `config.json`, kept as JSON until an architecture reads it.
#[derive(Debug, Clone)]
pub struct RawConfig {
    path: PathBuf,
    value: serde_json::Value,
}

/// The part of `config.json` used to pick an architecture.
#[derive(Debug, Deserialize)]
struct Header {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
}

impl RawConfig {
    /// Reads `dir/config.json`.
    ///
    /// # Errors
    /// [`Error::Model`] when the file is missing or not a JSON object.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::model(&path, "config file not found (run scripts/setup.sh)")
            } else {
                Error::io(&path, e)
            }
        })?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::model(&path, format!("invalid JSON: {e}")))?;
        if !value.is_object() {
            return Err(Error::model(&path, "expected a JSON object"));
        }
        Ok(Self { path, value })
    }

    /// Path of the file this configuration came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The architecture family, from `model_type` (`bert`, `llama`) or, when
    /// absent, from `architectures` (`Bert*`, `Llama*`).
    ///
    /// # Errors
    /// [`Error::Model`] naming the value when the family is not supported.
    pub fn family(&self) -> Result<Family> {
        let header: Header = self.parse()?;
        if let Some(model_type) = header.model_type.as_deref() {
            return match model_type {
                "bert" => Ok(Family::Bert),
                "llama" => Ok(Family::Llama),
                other => Err(Error::model(
                    &self.path,
                    format!("unknown model_type `{other}` (supported: bert, llama)"),
                )),
            };
        }
        for arch in &header.architectures {
            if arch.starts_with("Bert") {
                return Ok(Family::Bert);
            }
            if arch.starts_with("Llama") {
                return Ok(Family::Llama);
            }
        }
        Err(Error::model(
            &self.path,
            format!(
                "no model_type and no known architecture in {:?} (supported: bert, llama)",
                header.architectures
            ),
        ))
    }

    /// Deserialises the configuration into an architecture's config struct.
    ///
    /// # Errors
    /// [`Error::Model`] naming the file and the serde message (missing or
    /// ill-typed field, unknown activation...).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        T::deserialize(&self.value)
            .map_err(|e| Error::model(&self.path, format!("invalid configuration: {e}")))
    }
}

/// A model directory's `config.json`, parsed into its architecture's typed
/// configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// A BERT-family encoder.
    Bert(BertConfig),
    /// A LLaMA-family decoder (boxed: the larger configuration).
    Llama(Box<LlamaConfig>),
}

impl ModelConfig {
    /// Reads `dir/config.json`: the family ([`RawConfig::family`]), then that
    /// family's configuration, validated as loading the backbone would.
    ///
    /// # Errors
    /// [`Error::Model`] naming the file: missing file, invalid JSON, unknown
    /// family, a missing or ill-typed field (named), an inconsistent value.
    pub fn read(dir: &Path) -> Result<Self> {
        let raw = RawConfig::read(dir)?;
        let config = match raw.family()? {
            Family::Bert => {
                let c: BertConfig = raw.parse()?;
                c.validate(raw.path())?;
                ModelConfig::Bert(c)
            }
            Family::Llama => {
                let c: LlamaConfig = raw.parse()?;
                c.validate(raw.path())?;
                ModelConfig::Llama(Box::new(c))
            }
        };
        Ok(config)
    }

    /// The architecture family.
    pub fn family(&self) -> Family {
        match self {
            ModelConfig::Bert(_) => Family::Bert,
            ModelConfig::Llama(_) => Family::Llama,
        }
    }

    /// `hidden_size`: the width of the residual stream.
    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::Bert(c) => c.hidden_size,
            ModelConfig::Llama(c) => c.hidden_size,
        }
    }

    /// `num_hidden_layers`.
    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Bert(c) => c.num_hidden_layers,
            ModelConfig::Llama(c) => c.num_hidden_layers,
        }
    }

    /// `vocab_size`.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Bert(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
        }
    }

    /// The backbone's shape facts, as the loaded backbone reports them
    /// except `num_parameters`, which is 0 (no weights were read).
    pub fn info(&self) -> BackboneInfo {
        BackboneInfo {
            family: self.family(),
            hidden_size: self.hidden_size(),
            num_layers: self.num_layers(),
            vocab_size: self.vocab_size(),
            num_parameters: 0,
        }
    }
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
