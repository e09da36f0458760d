//! `heterotune site`: the agent an organisation runs to take part in a
//! federation with the object store as the only meeting point.
//!
//! The coordinator (`heterotune run` or the operator) never starts a client
//! marked `spec.clients[].site`; the site's agent pulls instead. It polls
//! the store with backoff (no inbound port), and for each round whose
//! previous global exists and whose commit for its client does not, it
//! downloads that global, verifies its manifest and digest, trains with
//! `heterotune-trainer` on the site's own data (the runner's
//! [`TrainerCommand`](crate::execution::trainer::TrainerCommand) and
//! [`ClientDirs`](crate::execution::trainer::ClientDirs)), and commits the
//! artifact with the same create-only commit. After the last round it
//! evaluates the final global and commits the result. The store is the
//! truth: a restarted agent trains exactly the rounds the store does not
//! show committed. The client's private state stays in the site's work
//! folder; nothing but the artifact, its manifest and the evaluation leaves.

mod agent;
mod backoff;
mod command;
mod join;
mod verify;

pub use agent::run;
pub use command::{main, SiteArgs};
pub use join::{SiteError, SiteOptions};

/// How a site's part of a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SiteOutcome {
    /// Every round is aggregated (and the final global evaluated where the
    /// spec asks): `trained` lists the rounds this agent committed now.
    Finished { trained: Vec<u32>, evaluated: bool },
    /// The coordinator's report says the run failed (`status`).
    RunFailed { status: String },
}
