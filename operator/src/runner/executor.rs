//! The local executor ([`Runner`]): what it holds for one run, and its
//! observe and report steps. The store is read once per step through the
//! shared [`RunReader`]; the report is fed from what that look found.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use heterotune_crds::layout::RunLayout;
use heterotune_crds::manifest::EvaluationResult;
use heterotune_crds::spec::FederatedTuneSpec;
use tokio::sync::mpsc;

use super::lease::Lease;
use super::options::{RunError, RunOptions, RunSummary};
use super::progress::Progress;
use super::schedule::Schedule;
use super::state::RoundState;
use super::summary;
use crate::execution::trainer::{Children, ClientExit, TrainerCommand};
use crate::protocol::observe::{Look, RoundFacts, RunObservation, RunReader, RunRef};
use crate::protocol::planner::Observation;
use crate::protocol::store::Store;
use crate::runner::report::Report;

/// One run on this machine: its store, its trainers and its report.
pub struct Runner {
    pub opts: RunOptions,
    pub spec: FederatedTuneSpec,
    pub store: Store,
    pub layout: RunLayout,
    /// The run as the shared observation looks at it.
    pub run: RunRef,
    pub reader: RunReader,
    /// This run's local working folder.
    pub work: PathBuf,
    pub trainer: TrainerCommand,
    pub progress: Progress,
    pub report: Report,
    pub report_dir: PathBuf,
    /// When `heterotune run` started (the report's total time).
    pub started: Instant,
    /// The time earlier runs of this run spent (their report in the store).
    pub earlier_seconds: f64,
    /// The planner's clock starts here.
    pub epoch: Instant,
    /// Rounds `1..=completed` are complete (the last look).
    pub completed: u32,
    /// Completed rounds not yet in the report, by round.
    pub facts: BTreeMap<u32, RoundFacts>,
    /// The clients' evaluations of the last round's global model, in spec order.
    pub evaluated: Vec<EvaluationResult>,
    /// The round in progress (`rounds + 1`: the final evaluation).
    pub round: u32,
    pub state: RoundState,
    /// How long each client's trainer took: who starts first.
    pub schedule: Schedule,
    pub children: Children,
    pub exits: mpsc::UnboundedSender<ClientExit>,
    pub exited: mpsc::UnboundedReceiver<ClientExit>,
    /// The run lease (taken at start, released when the run ends).
    pub lease: Option<Lease>,
}

impl Runner {
    /// Reads the store: rounds completed since the last look (with their
    /// participants' manifests, for the report), commits and evaluations.
    pub async fn look(&mut self) -> Result<RunObservation, RunError> {
        let look = Look {
            since: self.completed,
            history: usize::MAX,
            client_manifests: true,
        };
        let seen = self.reader.look(&self.store, &self.run, look).await?;
        self.completed = seen.completed_rounds;
        for facts in &seen.new_rounds {
            self.facts.insert(facts.round, facts.clone());
        }
        self.evaluated = self
            .run
            .clients
            .iter()
            .filter_map(|c| seen.evaluated.get(c).cloned())
            .collect();
        Ok(seen)
    }

    /// Records every completed round and the final evaluation found in the
    /// store (a resumed run), with the times the earlier runs measured.
    pub async fn rebuild_report(&mut self) -> Result<(), RunError> {
        self.look().await?;
        if let Some(earlier) = self.earlier_report().await {
            self.earlier_seconds = summary::resume(&mut self.report, earlier, self.completed);
        }
        for round in 1..=self.completed {
            self.record_round(round, f64::NAN, &[]);
        }
        summary::record_evaluation(&mut self.report, self.spec.rounds, &self.evaluated);
        Ok(())
    }

    /// The observe step: the store, then the round's own bookkeeping (a new
    /// round records the previous one in the report), then the planner's view.
    pub async fn observe(&mut self) -> Result<Observation, RunError> {
        if let Some(lease) = &self.lease {
            if let Err(e) = lease.check().await {
                self.children.kill_all();
                return Err(e.into());
            }
        }
        let seen = self.look().await?;
        // Rounds 1..=rounds, then (rounds + 1) the final evaluation.
        self.round = seen.completed_rounds + 1;
        self.next_round().await;
        let rounds = self.spec.rounds;
        let evaluate = self.spec.evaluation.after_last_round;
        let committed: Vec<bool> = self
            .run
            .clients
            .iter()
            .map(|c| {
                if self.round <= rounds {
                    seen.committed.contains_key(c)
                } else {
                    evaluate && seen.evaluated.contains_key(c)
                }
            })
            .collect();
        // A site's client starts no process here: its round (and deadline)
        // starts when this runner first sees the round open.
        if self.spec.clients.iter().any(|c| c.is_remote()) {
            self.state.start(self.round);
        }
        let obs = self
            .state
            .observation(&self.spec, seen.completed_rounds, &committed, self.epoch);
        let committed_count = committed.iter().filter(|c| **c).count() as u32;
        self.progress
            .clients(committed_count, self.children.len() as u32);
        Ok(obs)
    }

    /// A new round: records the previous one (when this runner started it)
    /// and publishes the report, then starts the round's bookkeeping afresh.
    async fn next_round(&mut self) {
        let (round, rounds) = (self.round, self.spec.rounds);
        let evaluate = self.spec.evaluation.after_last_round;
        if self.state.is_of(round) || !(round <= rounds || evaluate) {
            return;
        }
        if let Some((r, t)) = self.state.started {
            if r < round && r <= rounds {
                let excluded = self.state.excluded.clone();
                self.record_round(r, t.elapsed().as_secs_f64(), &excluded);
                self.report.total_seconds = self.total_seconds();
                self.report.status = "Running".into();
                self.publish_report().await;
                self.progress.round_done(&self.report);
            }
        }
        self.facts.retain(|r, _| *r >= round);
        self.state = RoundState::new(&self.spec, round);
        if round <= rounds {
            self.progress.start_round(round);
        } else {
            self.progress.start_evaluation(rounds);
        }
        let step = if round <= rounds {
            format!("round {round}")
        } else {
            "the final evaluation".to_string()
        };
        for c in &self.spec.clients {
            if let Some(site) = &c.site {
                self.progress.note(&format!(
                    "{step}: client {} is waiting for its site {} (heterotune site)",
                    c.name, site.name
                ));
            }
        }
    }

    /// The report an earlier run of this run left in the store, if any (one
    /// that cannot be read is only logged: the run goes on without its times).
    async fn earlier_report(&self) -> Option<Report> {
        let key = format!("{}/report.json", self.layout.report_dir());
        let bytes = match self.store.get(&key).await {
            Ok(found) => found?,
            Err(e) => {
                tracing::warn!(%key, error = %e, "cannot read the earlier report: its round times are lost");
                return None;
            }
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| tracing::warn!(%key, error = %e, "the earlier report does not parse: its round times are lost"))
            .ok()
    }

    /// Wall time of this run so far, earlier (interrupted) runs included.
    pub fn total_seconds(&self) -> f64 {
        self.earlier_seconds + self.started.elapsed().as_secs_f64()
    }

    /// Adds completed round `round` to the report.
    pub fn record_round(&mut self, round: u32, duration: f64, excluded: &[String]) {
        let facts = self.facts.remove(&round).unwrap_or(RoundFacts {
            round,
            global: None,
            clients: Vec::new(),
        });
        summary::record_round(&mut self.report, &facts, duration, excluded);
    }

    /// Writes the report locally and uploads it to the store.
    pub async fn publish_report(&self) {
        let dir = &self.report_dir;
        match self.report.write(dir) {
            Ok(files) => {
                for file in files {
                    if let (Ok(bytes), Some(name)) = (std::fs::read(&file), file.file_name()) {
                        let key =
                            format!("{}/{}", self.layout.report_dir(), name.to_string_lossy());
                        if let Err(e) = self.store.put(&key, bytes.into()).await {
                            tracing::warn!(error = %e, "could not upload the report");
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "could not write the report")
            }
        }
    }

    /// The finished run.
    pub fn into_summary(self) -> RunSummary {
        RunSummary {
            rounds: self.spec.rounds,
            report: self.report,
            report_dir: self.report_dir,
        }
    }
}
