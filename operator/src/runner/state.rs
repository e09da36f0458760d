//! The local runner's memory of the current round ([`RoundState`]): what
//! its trainer processes did (running, failed attempts, exclusions, the
//! aggregation's failures) and when the round started and reached its
//! quorum. The store decides what is committed; this adds what only the
//! runner can know, and together they make the planner's [`Observation`].

use std::collections::BTreeMap;
use std::time::Instant;

use heterotune_crds::spec::FederatedTuneSpec;
use tokio::sync::oneshot;

use crate::execution::trainer::Children;
use crate::protocol::planner::{AggregationState, ClientObservation, Observation};

/// Client bookkeeping of the current round (in memory; the store decides
/// what is committed).
#[derive(Debug, Default, Clone)]
pub struct ClientRun {
    pub failed_attempts: u32,
    pub running: bool,
    pub last_error: Option<String>,
}

/// The current round as the runner saw it.
#[derive(Debug, Default)]
pub struct RoundState {
    /// The round and when this runner started its first process in it
    /// (`rounds + 1`: the final evaluation); `None` until then.
    pub started: Option<(u32, Instant)>,
    /// When the round first had a quorum of committed artifacts.
    pub quorum_reached_at: Option<f64>,
    /// By client name.
    pub clients: BTreeMap<String, ClientRun>,
    /// Clients out of the round after exhausting their retries.
    pub excluded: Vec<String>,
    /// Failed aggregation attempts in the round.
    pub aggregation_failures: u32,
}

impl RoundState {
    /// A fresh round for the clients of `spec`.
    pub fn new(spec: &FederatedTuneSpec) -> Self {
        RoundState {
            clients: spec
                .clients
                .iter()
                .map(|c| (c.name.clone(), ClientRun::default()))
                .collect(),
            ..RoundState::default()
        }
    }

    /// True when this state is of `round` (a process of it was started).
    pub fn is_of(&self, round: u32) -> bool {
        self.started.map(|(r, _)| r) == Some(round)
    }

    /// Marks the round started now, unless it already is.
    pub fn start(&mut self, round: u32) {
        if self.started.is_none() {
            self.started = Some((round, Instant::now()));
        }
    }

    /// The planner's view: `committed` (per spec client, from the store)
    /// plus this state, at `now` seconds after `epoch`. Notes the quorum.
    pub fn observation(
        &mut self,
        spec: &FederatedTuneSpec,
        completed_rounds: u32,
        committed: &[bool],
        epoch: Instant,
    ) -> Observation {
        let committed_count = committed.iter().filter(|c| **c).count() as u32;
        let now = epoch.elapsed().as_secs_f64();
        if committed_count >= spec.quorum() && self.quorum_reached_at.is_none() {
            self.quorum_reached_at = Some(now);
        }
        Observation {
            now,
            completed_rounds,
            round_started_at: self
                .started
                .map(|(_, t)| t.duration_since(epoch).as_secs_f64()),
            quorum_reached_at: self.quorum_reached_at,
            clients: spec
                .clients
                .iter()
                .zip(committed)
                .map(|(c, done)| {
                    let state = self.clients.get(&c.name).cloned().unwrap_or_default();
                    ClientObservation {
                        name: c.name.clone(),
                        committed: *done,
                        running: state.running,
                        failed_attempts: state.failed_attempts,
                    }
                })
                .collect(),
            aggregation: if self.aggregation_failures > 0 {
                AggregationState::Failed
            } else {
                AggregationState::NotStarted
            },
            aggregation_failures: self.aggregation_failures,
        }
    }

    /// Records a trainer process that started (running) or could not start
    /// (a failed attempt); true when it started.
    pub fn track(
        &mut self,
        children: &mut Children,
        client: &str,
        child: Result<oneshot::Sender<()>, String>,
    ) -> bool {
        let state = self.clients.get_mut(client);
        match child {
            Ok(handle) => {
                children.insert(client.to_string(), handle);
                if let Some(c) = state {
                    c.running = true;
                }
                true
            }
            Err(e) => {
                if let Some(c) = state {
                    c.failed_attempts += 1;
                    c.last_error = Some(e);
                }
                false
            }
        }
    }

    /// A process of `client` ended; `failed` says why when it failed.
    /// Returns the failure to report, if any.
    pub fn ended(&mut self, client: &str, failed: Option<String>) -> Option<&str> {
        let c = self.clients.get_mut(client)?;
        c.running = false;
        let why = failed?;
        c.failed_attempts += 1;
        c.last_error = Some(why);
        c.last_error.as_deref()
    }
}
