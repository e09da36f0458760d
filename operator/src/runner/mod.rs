//! `heterotune run`: the whole federation on one machine.
//!
//! The local executor of the round protocol: it observes the store, asks the
//! pure [`planner`](crate::protocol::planner) what to do, and does it with local
//! `heterotune-trainer` processes (bounded parallelism). The store is the
//! only source of truth, so a killed runner (or trainer) resumes where the
//! store says it is: a round is done exactly when its global manifest
//! exists, and a client's round is done exactly when its manifest does.

mod act;
mod executor;
pub mod lease;
mod options;
mod plots;
mod progress;
pub mod report;
mod schedule;
mod setup;
mod state;
mod summary;
mod wait;

use crate::protocol::planner;

use act::Acted;
use executor::Runner;
pub use options::{RunError, RunOptions, RunSummary};
pub use setup::local_uid;

/// Runs (or resumes) the federation the spec file describes: observe the
/// store, plan, act, and wait for a trainer or a deadline when nothing
/// started; the report follows each completed round.
/// The run holds its [`lease::Lease`] throughout and releases it at the end,
/// however it ends.
pub async fn run(opts: RunOptions) -> Result<RunSummary, RunError> {
    let mut runner = Runner::start(opts).await?;
    let result = drive(&mut runner).await;
    if let Some(lease) = runner.lease.take() {
        lease.release().await;
    }
    result.map(|()| runner.into_summary())
}

/// The loop of [`run`], until the run is finished or fails.
async fn drive(runner: &mut Runner) -> Result<(), RunError> {
    loop {
        let observation = runner.observe().await?;
        let mut plan = planner::plan(&runner.spec, &observation);
        runner.schedule.order(&mut plan.actions);
        let mut started_any = false;
        for action in plan.actions {
            match runner.act(action).await? {
                Acted::Finished => return Ok(()),
                Acted::Started => started_any = true,
                Acted::Idle => {}
            }
        }
        if !started_any {
            runner.wait(plan.requeue_after).await?;
        }
    }
}
