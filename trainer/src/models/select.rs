//! Choosing the architecture of a model folder: its facts name the family,
//! and the family's own file (`bert.rs`, `llama.rs`, `mpnet.rs`) reads the rest.

use std::path::Path;

use heterotune_crds::model::ModelFacts;
use tch::{Device, Kind};

use super::bert::{Bert, BertConfig};
use super::config::typed;
use super::llama::{Llama, LlamaConfig};
use super::mpnet::{Mpnet, MpnetConfig};
use super::{Backbone, BackboneInfo, Family};
use crate::error::Result;

/// A model directory's `config.json`, parsed into its architecture's typed
/// configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// A BERT-family encoder.
    Bert(BertConfig),
    /// A LLaMA-family decoder (boxed: the larger configuration).
    Llama(Box<LlamaConfig>),
    /// An MPNet encoder.
    Mpnet(MpnetConfig),
}

impl ModelConfig {
    /// Reads `dir/config.json`: the family, then that family's
    /// configuration, validated as loading the backbone would.
    ///
    /// # Errors
    /// [`crate::Error::Model`] naming the file: missing file, invalid JSON,
    /// unknown family, a missing or ill-typed field (named), an inconsistent value.
    pub fn read(dir: &Path) -> Result<Self> {
        Self::from_facts(&ModelFacts::read(dir)?)
    }

    /// The typed configuration of already read facts.
    ///
    /// # Errors
    /// As [`ModelConfig::read`].
    pub fn from_facts(facts: &ModelFacts) -> Result<Self> {
        Ok(match facts.family {
            Family::Bert => {
                let c: BertConfig = typed(facts)?;
                c.validate(&facts.source)?;
                ModelConfig::Bert(c)
            }
            Family::Llama => {
                let c: LlamaConfig = typed(facts)?;
                c.validate(&facts.source)?;
                ModelConfig::Llama(Box::new(c))
            }
            Family::Mpnet => {
                let c: MpnetConfig = typed(facts)?;
                c.validate(&facts.source)?;
                ModelConfig::Mpnet(c)
            }
        })
    }

    /// The architecture family.
    pub fn family(&self) -> Family {
        match self {
            ModelConfig::Bert(_) => Family::Bert,
            ModelConfig::Llama(_) => Family::Llama,
            ModelConfig::Mpnet(_) => Family::Mpnet,
        }
    }

    /// `hidden_size`: the width of the residual stream.
    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::Bert(c) => c.hidden_size,
            ModelConfig::Llama(c) => c.hidden_size,
            ModelConfig::Mpnet(c) => c.hidden_size,
        }
    }

    /// `num_hidden_layers`.
    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Bert(c) => c.num_hidden_layers,
            ModelConfig::Llama(c) => c.num_hidden_layers,
            ModelConfig::Mpnet(c) => c.num_hidden_layers,
        }
    }

    /// `vocab_size`.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Bert(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
            ModelConfig::Mpnet(c) => c.vocab_size,
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

/// Loads the backbone in `dir` with the architecture its `config.json`
/// names (`model_type`, else `architectures`), sized from that
/// `config.json`, so any checkpoint of these families loads.
///
/// # Errors
/// [`crate::Error::Model`] naming the file: missing `config.json` or
/// `model.safetensors`, unknown `model_type`, unsupported option, missing
/// tensor, shape mismatch (expected vs found), non-float tensor.
pub fn load_backbone(dir: &Path, device: Device, dtype: Kind) -> Result<Box<dyn Backbone>> {
    Ok(match ModelFacts::read(dir)?.family {
        Family::Bert => Box::new(Bert::load(dir, device, dtype)?),
        Family::Llama => Box::new(Llama::load(dir, device, dtype)?),
        Family::Mpnet => Box::new(Mpnet::load(dir, device, dtype)?),
    })
}
