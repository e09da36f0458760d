//! The agent's loop: look at the store, do the one thing it shows is due
//! for this site's client (train the open round, evaluate the final global),
//! wait with backoff when nothing is. What the store shows is the truth, so
//! a restarted agent neither trains a committed round again nor skips one.

use super::backoff::Backoff;
use super::join::{Confinement, Site, SiteError, SiteOptions};
use super::SiteOutcome;
use crate::execution::trainer::ClientDirs;
use crate::protocol::commit::{self, Commit};

/// Runs the site's client through the run until it ends (see the module
/// documentation of [`crate::site`]).
pub async fn run(opts: SiteOptions) -> Result<SiteOutcome, SiteError> {
    let site = Site::join(opts).await?;
    let (min, max) = site.opts.poll;
    let mut backoff = Backoff::new(min, max);
    let mut trained = Vec::new();
    let mut evaluated = false;
    let mut completed = 0;
    let mut failures = Failures::default();
    // Checked before each round it trains until the store shows the key
    // confined; `--allow-unconfined-credentials` skips it.
    let mut confined = site.opts.allow_unconfined_credentials;
    if confined && site.store.is_bucket() {
        tracing::warn!(
            "--allow-unconfined-credentials: not checking whether this site's key can read other \
             clients' uploads"
        );
    }
    tracing::info!(
        run = site.layout.run_dir(),
        client = %site.opts.client,
        store = site.store.uri(),
        "site agent joined; polling the store"
    );
    loop {
        if !site.spec_recorded().await? && !site.has_global(0).await? {
            tokio::time::sleep(backoff.next_wait()).await;
            continue;
        }
        if let Some(status) = site.run_failed().await? {
            return Ok(SiteOutcome::RunFailed { status });
        }
        completed = site.completed_rounds(completed).await?;
        let step = site.next_step(completed).await?;
        let done = match step {
            Step::Finished => return Ok(SiteOutcome::Finished { trained, evaluated }),
            Step::Wait => None,
            Step::Train(round) => {
                if !confined && site.confinement(round).await? == Confinement::Confined {
                    tracing::info!(
                        "the store refuses this site's key another client's upload: confined"
                    );
                    confined = true;
                }
                Some((format!("training round {round}"), site.train(round).await))
            }
            Step::Evaluate(round) => Some((
                format!("evaluating round {round}'s global"),
                site.evaluate(round).await,
            )),
        };
        let Some((what, result)) = done else {
            tokio::time::sleep(backoff.next_wait()).await;
            continue;
        };
        match result {
            Ok(Some(Done::Trained(round))) => trained.push(round),
            Ok(Some(Done::Evaluated)) => evaluated = true,
            Ok(None) => {}
            Err(e) if e.is_retryable() && failures.retry(&site, &what) => {
                tracing::warn!(error = %e, "{what}: retrying");
            }
            Err(e) => return Err(failures.exhausted(&site, what, e)),
        }
        backoff.reset();
        tokio::time::sleep(min).await;
    }
}

/// What the store shows is due for this site.
enum Step {
    /// Train this round.
    Train(u32),
    /// Evaluate the global of this (the last) round.
    Evaluate(u32),
    /// Nothing yet (committed, or the previous global is not there).
    Wait,
    /// The run needs nothing more from this site.
    Finished,
}

/// What an action did.
enum Done {
    Trained(u32),
    Evaluated,
}

/// Failed attempts of one step, bounded by `maxRetriesPerClient` as the
/// coordinator bounds its own trainers.
#[derive(Default)]
struct Failures {
    what: String,
    count: u32,
}

impl Failures {
    /// Counts a failure of `what`; true while another attempt is allowed.
    fn retry(&mut self, site: &Site, what: &str) -> bool {
        if self.what != what {
            self.what = what.to_string();
            self.count = 0;
        }
        self.count += 1;
        self.count <= site.ft.spec.max_retries_per_client
    }

    fn exhausted(&self, site: &Site, what: String, e: SiteError) -> SiteError {
        if !e.is_retryable() {
            return e;
        }
        SiteError::Exhausted {
            what,
            attempts: self.count,
            retries: site.ft.spec.max_retries_per_client,
            last: e.to_string(),
        }
    }
}

impl Site {
    async fn has_global(&self, round: u32) -> Result<bool, SiteError> {
        Ok(self
            .store
            .exists(&self.layout.global_manifest(round))
            .await?)
    }

    /// Rounds `1..=n` have a global manifest; `known` of them were seen before.
    async fn completed_rounds(&self, known: u32) -> Result<u32, SiteError> {
        let mut n = known;
        while n < self.ft.spec.rounds && self.has_global(n + 1).await? {
            n += 1;
        }
        Ok(n)
    }

    /// The coordinator's report, when it says the run failed.
    async fn run_failed(&self) -> Result<Option<String>, SiteError> {
        let key = format!("{}/report.json", self.layout.report_dir());
        let Some(bytes) = self.store.get(&key).await? else {
            return Ok(None);
        };
        let status = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("status")?.as_str().map(str::to_string));
        Ok(status.filter(|s| s.starts_with("Failed")))
    }

    async fn next_step(&self, completed: u32) -> Result<Step, SiteError> {
        let (rounds, client) = (self.ft.spec.rounds, &self.opts.client);
        if completed >= rounds {
            let key = self.layout.evaluation_result(rounds, client);
            if !self.ft.spec.evaluation.after_last_round || self.store.exists(&key).await? {
                return Ok(Step::Finished);
            }
            return Ok(Step::Evaluate(rounds));
        }
        let round = completed + 1;
        let manifest = self.layout.client_manifest(round, client);
        if self.store.exists(&manifest).await? || !self.has_global(round - 1).await? {
            return Ok(Step::Wait);
        }
        Ok(Step::Train(round))
    }

    /// Trains the client in `round` on the verified previous global and
    /// commits the artifact (unless the round was aggregated meanwhile).
    async fn train(&self, round: u32) -> Result<Option<Done>, SiteError> {
        let Some(global) = self.verified_global(round - 1).await? else {
            return Ok(None);
        };
        let client = &self.opts.client;
        let dirs = ClientDirs::new(&self.work, client, round);
        tracing::info!(round, %client, "training");
        let summary = self
            .trainer
            .train(client, round, &self.opts.device, &global, &dirs)
            .await
            .map_err(SiteError::Trainer)?;
        tracing::info!(round, %client, "trained: {}", summary.trim());
        if self.has_global(round).await? {
            tracing::warn!(round, %client, "round {round} was aggregated without this site (cut off at its deadline or wait): the artifact is not committed");
            let _ = std::fs::remove_dir_all(&dirs.out);
            return Ok(None);
        }
        let key_dir = self.layout.client_dir(round, client);
        let done = commit::commit_artifact(&self.store, &dirs.out, &key_dir, Some(&global)).await?;
        let _ = std::fs::remove_dir_all(&dirs.out);
        Ok(match done {
            Commit::Created { bytes } => {
                tracing::info!(round, %client, bytes, "committed");
                Some(Done::Trained(round))
            }
            other => {
                tracing::warn!(round, %client, "already committed by {}", other.writer());
                None
            }
        })
    }

    /// Evaluates the client's model with the global of `round` (the last)
    /// and commits the result.
    async fn evaluate(&self, round: u32) -> Result<Option<Done>, SiteError> {
        let Some(global) = self.verified_global(round).await? else {
            return Ok(None);
        };
        let client = &self.opts.client;
        let dirs = ClientDirs::new(&self.work, client, round + 1);
        let out = self
            .work
            .join("evaluation")
            .join(format!("round-{round:04}.json"));
        let _ = std::fs::remove_file(&out);
        let summary = self
            .trainer
            .evaluate(
                client,
                &self.opts.device,
                &global,
                dirs.state_in.as_deref(),
                &dirs.cache,
                &out,
            )
            .await
            .map_err(SiteError::Trainer)?;
        tracing::info!(round, %client, "evaluated: {}", summary.trim());
        let key = self.layout.evaluation_result(round, client);
        if !self.store.create_file(&out, &key).await? {
            tracing::warn!(round, %client, "the evaluation was already committed");
        }
        Ok(Some(Done::Evaluated))
    }
}
