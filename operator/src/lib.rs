//! HeteroTune operator and CLI library.
//!
//! * [`checks`]: validation rules that need more than the document (files,
//!   model configs), reported like the schema and CEL problems.
//! * [`telemetry`]: logging set-up (human or JSON).

pub mod checks;
pub mod controller;
pub mod job;
pub mod observe;
pub mod plan;
pub mod planner;
pub mod report;
pub mod runner;
pub mod sizing;
pub mod spec_file;
pub mod staging;
pub mod store;
pub mod telemetry;
