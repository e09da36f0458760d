//! Datasets: loading, deduplication, deterministic splits, non-IID partitions.
//!
//! * [`source`]: a [`DatasetConfig`] (URI, CSV / TSV / JSONL, text and label
//!   fields, label map and aliases) is read into a deduplicated
//!   [`Dataset`] with a [`LoadReport`];
//! * [`split`](mod@split): a seeded, stratified train / validation / test split, and
//!   the portable seeded sampling (ChaCha8) everything random here uses;
//! * [`partition`](mod@partition): IID, Dirichlet(α) label skew, explicit index lists or
//!   one shard file per client; [`federate`] runs the whole pipeline from a
//!   [`DataConfig`].

pub mod partition;
mod readers;
pub mod source;
pub mod split;

pub use partition::{
    federate, partition, ClientData, ClientIndices, DataConfig, FederatedData, Partition,
    PartitionConfig, PartitionScheme,
};
pub use source::{load, DataFormat, Dataset, DatasetConfig, Example, LoadReport};
pub use split::{split, SplitFractions, Splits};
