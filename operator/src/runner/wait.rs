//! The local runner's wait: for a trainer to end (its artifact or
//! evaluation is then committed to the store), the planner's next deadline,
//! or Ctrl-C.

use super::executor::Runner;
use super::options::RunError;
use crate::execution::staging;
use crate::execution::trainer::ClientExit;
use crate::protocol::commit;

/// What ended the wait.
enum Event {
    Exit(Option<ClientExit>),
    Timeout,
    Interrupted,
}

impl Runner {
    /// Waits at most `requeue_after` seconds (an hour without one).
    pub async fn wait(&mut self, requeue_after: Option<f64>) -> Result<(), RunError> {
        let wait = requeue_after.unwrap_or(3600.0).clamp(0.05, 3600.0);
        let event = tokio::select! {
            exit = self.exited.recv() => Event::Exit(exit),
            _ = tokio::time::sleep(std::time::Duration::from_secs_f64(wait)) => Event::Timeout,
            _ = tokio::signal::ctrl_c() => Event::Interrupted,
        };
        match event {
            Event::Exit(Some(exit)) => self.on_exit(exit).await,
            Event::Exit(None) | Event::Timeout => {}
            Event::Interrupted => {
                self.children.kill_all();
                self.progress.note("interrupted: stopping trainers");
                return Err(RunError::Interrupted);
            }
        }
        Ok(())
    }

    /// A trainer ended: commits what it wrote to the store, or counts a
    /// failed attempt.
    async fn on_exit(&mut self, exit: ClientExit) {
        self.children.remove(&exit.client);
        let mut failed = None;
        if exit.evaluation {
            if exit.ok {
                let key = self.layout.evaluation_result(exit.round, &exit.client);
                match self.store.create_file(&exit.out_dir, &key).await {
                    Ok(true) => self.progress.client_evaluated(&exit.client, &exit.summary),
                    Ok(false) => self.progress.note(&format!(
                        "client {}'s evaluation was already committed by another writer: this one is discarded",
                        exit.client
                    )),
                    Err(e) => failed = Some(e.to_string()),
                }
            } else {
                failed = Some(exit.summary.clone());
            }
        } else if exit.ok && exit.round == self.round {
            let key_dir = self.layout.client_dir(exit.round, &exit.client);
            let base = staging::global_dir(&self.work, exit.round - 1);
            match commit::commit_artifact(&self.store, &exit.out_dir, &key_dir, Some(&base)).await {
                Ok(done) => {
                    self.schedule.record(&exit.client, exit.seconds);
                    let what = format!("round {}: client {}", exit.round, exit.client);
                    match done.second_writer_note(&what) {
                        Some(note) => self.progress.note(&note),
                        None => self.progress.client_done(&exit.client, &exit.summary),
                    }
                    let _ = std::fs::remove_dir_all(&exit.out_dir);
                }
                Err(e) => failed = Some(e.to_string()),
            }
        } else if !exit.ok {
            failed = Some(exit.summary.clone());
        }
        if let Some(why) = self.state.ended(&exit.client, failed) {
            let what = if exit.evaluation {
                "evaluation"
            } else {
                "attempt"
            };
            self.progress.note(&format!(
                "round {}: client {} {what} failed: {why}",
                exit.round, exit.client
            ));
        }
    }
}
