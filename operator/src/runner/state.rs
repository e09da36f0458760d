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
    /// The round this bookkeeping is of (`rounds + 1`: the final
    /// evaluation; 0 before the first observation). It survives passes of
    /// the loop in which this runner starts nothing, so failures add up
    /// even in a round whose clients were all committed before a resume.
    pub round: u32,
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
    /// Why the last aggregation attempt failed (a run that ends on it says so).
    pub last_aggregation_error: Option<String>,
}

impl RoundState {
    /// Fresh bookkeeping of `round` for the clients of `spec`.
    pub fn new(spec: &FederatedTuneSpec, round: u32) -> Self {
        RoundState {
            round,
            clients: spec
                .clients
                .iter()
                .map(|c| (c.name.clone(), ClientRun::default()))
                .collect(),
            ..RoundState::default()
        }
    }

    /// True when this state is of `round`.
    pub fn is_of(&self, round: u32) -> bool {
        self.round == round
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
                        remote: c.is_remote(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FederatedTuneSpec {
        let yaml = r#"
apiVersion: heterotune.dev/v1alpha1
kind: FederatedTune
metadata: { name: t }
spec:
  clients:
    - { name: a, model: { family: bert, uri: "cache://models/m" } }
  task: { dataset: { uri: "cache://data/d.jsonl" }, labels: [neg, pos] }
"#;
        heterotune_crds::validate::parse_federated_tune(yaml)
            .expect("valid")
            .spec
    }

    /// A round in which this runner starts no process (every client was
    /// committed before a resume) keeps its aggregation failures: the
    /// planner sees them add up and ends the round instead of retrying
    /// the aggregation forever.
    #[test]
    fn bookkeeping_belongs_to_its_round_without_a_started_process() {
        let spec = spec();
        let mut state = RoundState::new(&spec, 2);
        assert!(state.is_of(2) && !state.is_of(3));
        state.aggregation_failures = 1;
        let obs = state.observation(&spec, 1, &[true], Instant::now());
        assert_eq!(obs.aggregation, AggregationState::Failed);
        assert_eq!(obs.aggregation_failures, 1);
        assert!(obs.round_started_at.is_none());
    }
}
