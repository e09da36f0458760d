//! HeteroTune trainer: everything that touches tensors.
//!
//! * [`models`]: frozen pretrained backbones, one file per architecture
//!   (BERT-family encoders, LLaMA-family decoders), loaded from the Hugging
//!   Face layout (config.json + model.safetensors + tokenizer.json).
//! * [`adapters`]: DeMA (dense mixture of adapters), LoRA and the
//!   classification head.
//! * [`data`]: datasets from CSV / TSV / JSONL, deduplication, deterministic
//!   splits and non-IID partitions over clients.

pub mod adapters;
pub mod aggregate;
pub mod artifact;
pub mod cuda;
pub mod data;
pub mod error;
pub mod job;
pub mod metrics;
pub mod models;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
