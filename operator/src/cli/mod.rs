//! The `heterotune` command line's library side: output formats
//! ([`output`]), the cluster sizing `plan` reads ([`cluster_sizing`]),
//! and the read-only store look-ups of `plan` and `status` ([`look`]).

pub mod cluster_sizing;
pub mod look;
pub mod output;
