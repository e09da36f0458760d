//! The local runner's act step: one method per planner [`Action`], carried
//! out with local trainer processes and the staging helpers.

use std::time::Instant;

use super::executor::Runner;
use super::options::RunError;
use super::summary;
use crate::execution::staging;
use crate::execution::trainer::ClientDirs;
use crate::protocol::commit;
use crate::protocol::planner::{Action, FailureReason};

/// What acting on one action did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acted {
    /// Nothing that needs a new look at once.
    Idle,
    /// A process started or an aggregation ran: observe again at once.
    Started,
    /// The run is complete and its report written.
    Finished,
}

impl Runner {
    /// Carries out `action`; a failed run is an error.
    pub async fn act(&mut self, action: Action) -> Result<Acted, RunError> {
        match action {
            Action::Complete => {
                self.complete().await;
                Ok(Acted::Finished)
            }
            Action::Fail { reason, message } => Err(self.fail(reason, message).await),
            Action::ExcludeClient {
                client, failures, ..
            } => {
                self.exclude(client, failures);
                Ok(Acted::Idle)
            }
            Action::CancelClient { client, round } | Action::CancelEvaluation { client, round } => {
                self.children.kill(&client);
                if let Some(c) = self.state.clients.get_mut(&client) {
                    c.running = false;
                }
                self.progress.note(&format!(
                    "round {round}: client {client} cut off at the deadline"
                ));
                Ok(Acted::Idle)
            }
            Action::StartClient {
                client,
                round,
                attempt,
            } => self.start_client(&client, round, attempt, false).await,
            Action::StartEvaluation {
                client,
                round,
                attempt,
            } => self.start_client(&client, round, attempt, true).await,
            Action::StartAggregation {
                round,
                participants,
                attempt,
            } => {
                self.aggregate(round, &participants, attempt).await;
                Ok(Acted::Started)
            }
        }
    }

    /// All rounds are complete: the last round and the evaluation go into
    /// the report, which is written for the last time.
    async fn complete(&mut self) {
        let rounds = self.spec.rounds;
        if let Some((r, t)) = self.state.started.filter(|(r, _)| *r <= rounds) {
            let excluded = self.state.excluded.clone();
            self.record_round(r, t.elapsed().as_secs_f64(), &excluded);
            self.progress.round_done(&self.report);
        }
        if self.spec.evaluation.after_last_round {
            summary::record_evaluation(&mut self.report, rounds, &self.evaluated);
            self.progress.evaluation_done(&self.report);
        }
        self.report.total_seconds = self.total_seconds();
        self.report.status = "Succeeded".into();
        self.publish_report().await;
        self.progress.finish(&self.report);
    }

    /// The run cannot go on: trainers stop, the report says why.
    async fn fail(&mut self, reason: FailureReason, mut message: String) -> RunError {
        self.children.kill_all();
        if reason == FailureReason::AggregationFailed {
            if let Some(last) = &self.state.last_aggregation_error {
                message = format!("{message}; the last attempt: {last}");
            }
        }
        self.report.status = format!("Failed ({})", reason.as_str());
        self.report.total_seconds = self.total_seconds();
        self.publish_report().await;
        RunError::Failed {
            round: self.round,
            reason: reason.as_str(),
            message,
        }
    }

    fn exclude(&mut self, client: String, failures: u32) {
        if self.state.excluded.contains(&client) {
            return;
        }
        let why = self
            .state
            .clients
            .get(&client)
            .and_then(|c| c.last_error.clone())
            .unwrap_or_default();
        let round = self.round;
        self.progress.note(&format!(
            "round {round}: client {client} excluded after {failures} failed attempts: {why}"
        ));
        self.state.excluded.push(client);
    }

    /// Starts `client`'s trainer in `round`, or (`evaluation`) its
    /// evaluation of `round`'s global model, when a process slot is free.
    async fn start_client(
        &mut self,
        client: &str,
        round: u32,
        attempt: u32,
        evaluation: bool,
    ) -> Result<Acted, RunError> {
        if self.children.len() >= self.opts.parallel {
            return Ok(Acted::Idle);
        }
        // The evaluation of the last round is round `rounds + 1`.
        let (current, base) = if evaluation {
            (round + 1, round)
        } else {
            (round, round - 1)
        };
        self.state.start(current);
        let global =
            staging::ensure_global(&self.store, &self.layout, &self.trainer, &self.work, base)
                .await?;
        // An evaluation uses the client's newest private state (after the
        // last round it finished).
        let dirs = ClientDirs::new(&self.work, client, current);
        let exits = self.exits.clone();
        let child = if evaluation {
            let out = self
                .work
                .join("evaluation")
                .join(format!("round-{round:04}"))
                .join(format!("{}.json", heterotune_crds::uri::file_safe(client)));
            self.trainer
                .spawn_eval(client, round, attempt, &global, &dirs, &out, exits)
        } else {
            self.trainer
                .spawn_train(client, round, attempt, &global, &dirs, exits)
        };
        let started = self.state.track(&mut self.children, client, child);
        Ok(if started { Acted::Started } else { Acted::Idle })
    }

    /// After a quorum failure: the clients whose artifacts were rejected
    /// are set aside (`round-NNNN/rejected/`) and, within their retry
    /// budget (a rejection counts as a failed attempt), trained again.
    async fn retrain_rejected(
        &mut self,
        round: u32,
        participants: &[String],
        error: &str,
        attempt: u32,
    ) {
        let set_aside = commit::set_aside_rejected(
            &self.store,
            &self.layout,
            round,
            participants,
            error,
            attempt,
        )
        .await;
        for (client, outcome) in set_aside {
            if let Err(e) = outcome {
                self.progress.note(&format!(
                    "round {round}: could not set client {client}'s rejected artifact aside: {e}"
                ));
                continue;
            }
            if let Some(c) = self.state.clients.get_mut(client) {
                c.failed_attempts += 1;
                c.last_error = Some(format!(
                    "its artifact was rejected (aggregation attempt {attempt})"
                ));
            }
            self.progress.note(&format!(
                "round {round}: client {client}'s rejected artifact set aside; it trains again within its retries"
            ));
        }
    }

    /// Aggregates `round` over `participants`, then prunes old client
    /// rounds (`retention.keepClientRounds`); a failure is counted.
    async fn aggregate(&mut self, round: u32, participants: &[String], attempt: u32) {
        // A round resumed with every client committed starts here: its
        // report entry is recorded like any other round's.
        self.state.start(round);
        self.progress.aggregating(round, participants.len());
        let agg_start = Instant::now();
        let result = staging::aggregate(
            &self.store,
            &self.layout,
            &self.work,
            &self.trainer,
            round,
            participants,
            self.spec.aggregation.max_artifact_bytes,
        )
        .await;
        match result {
            Err(e) => {
                self.state.aggregation_failures = attempt;
                self.progress.note(&format!(
                    "round {round}: aggregation attempt {attempt} failed: {e}"
                ));
                self.retrain_rejected(round, participants, &e.to_string(), attempt)
                    .await;
                self.state.last_aggregation_error = Some(e.to_string());
                return;
            }
            Ok(done) => {
                if let Some(note) = done.second_writer_note(&format!("round {round}'s global")) {
                    self.progress.note(&note);
                }
            }
        }
        summary::note_aggregation(&mut self.report, round, agg_start.elapsed().as_secs_f64());
        // Retention is housekeeping: a failure is reported and retried after
        // the next round, never fatal.
        if let Some(keep) = self.spec.retention.keep_client_rounds {
            match self
                .store
                .prune_client_rounds(&self.layout, round, keep)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    round,
                    keep,
                    objects = n,
                    "retention.keepClientRounds: removed old client artifacts"
                ),
                Err(e) => self
                    .progress
                    .note(&format!("retention.keepClientRounds: could not prune: {e}")),
            }
        }
    }
}
