//! The model's rules, in one place and without tensors: what a model folder
//! says about itself ([`facts`]: `config.json` and the safetensors header,
//! read once) and which of its layers carry adapters ([`slots`]: the slot
//! map shared by DeMA's families). The trainer, the sizing, the checks and
//! the report all read models through this module, so they cannot disagree
//! on which families exist, how deep a window is or which layer maps to
//! which slot. [`wire`] lists what a client uploads each round, tensor by
//! tensor, from the same facts.

pub mod error;
pub mod facts;
pub mod safetensors;
pub mod slots;
pub mod wire;

pub use error::ModelError;
pub use facts::{ModelFacts, CONFIG_FILE, MODEL_FILES, TOKENIZER_FILE, WEIGHTS_FILE};
pub use slots::{LayerSelection, SlotError, SlotMap};
