//! HeteroTune operator and CLI library, one folder per product:
//!
//! * [`protocol`]: the round protocol (store, observation, pure planner),
//!   shared by both executors;
//! * [`execution`]: the trainer's command-line contract, staging, and the
//!   pod side of a cluster run (`heterotune job`);
//! * [`runner`]: `heterotune run`, the local executor, and its report;
//! * [`controller`]: the Kubernetes executor (reconcile, Jobs, status,
//!   metrics, HTTP, leader election);
//! * [`site`]: `heterotune site`, the agent a remote site runs (it pulls
//!   its rounds from the store);
//! * [`sizing`]: memory estimates and placement of each client's trainer;
//! * [`input`]: reading a spec file, and the checks a CRD cannot express;
//! * [`dry_run`]: what `heterotune plan` prints;
//! * [`bytes`]: `heterotune bytes`, what a client uploads per round, per
//!   method and backbone;
//! * [`cli`]: output formats, cluster sizing and store look-ups of the CLI;
//! * [`telemetry`]: logging set-up (human or JSON).
//!
//! docs/architecture.md has the rules of the house (which may import which).

pub mod bytes;
pub mod cli;
pub mod controller;
pub mod dry_run;
pub mod execution;
pub mod input;
pub mod protocol;
pub mod runner;
pub mod site;
pub mod sizing;
pub mod telemetry;
pub mod tls;
