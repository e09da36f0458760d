//! The user's spec as it comes in: reading a `FederatedTune` file with the
//! schema and CEL checks ([`spec_file`]), and the checks a CRD cannot
//! express, on the models and datasets it names ([`checks`]).

pub mod checks;
pub mod documents;
pub mod spec_file;
