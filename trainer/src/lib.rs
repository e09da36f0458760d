//! HeteroTune trainer: everything that touches tensors.
//!
//! * [`models`]: frozen pretrained backbones, one file per architecture
//!   (BERT-family encoders, LLaMA-family decoders), loaded from the Hugging
//!   Face layout (config.json + model.safetensors + tokenizer.json).
//! * [`adapters`]: DeMA (dense mixture of adapters), LoRA and the
//!   classification head.
//! * [`data`]: datasets from CSV / TSV / JSONL, deduplication, deterministic
//!   splits and non-IID partitions over clients.
//! * [`client`]: one client loaded (backbone, adapter, head, data, state),
//!   trained for a round, evaluated; [`exchange`]: what it sends and
//!   receives; [`init`]: the run's initial global; [`aggregate`]: a round's
//!   aggregation on the server, with [`server_distillation`], the server's
//!   step on the bridge.

pub mod adapters;
pub mod aggregate;
pub mod artifact;
pub mod calibration;
pub mod client;
pub mod cpu_dtype;
pub mod cuda;
pub mod data;
pub mod error;
pub mod exchange;
pub mod init;
pub mod job;
pub mod logit_adjustment;
pub mod metrics;
pub mod models;
pub mod mutual;
pub(crate) mod prefix_cache;
pub mod server_distillation;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
