//! Progress: bars and a live summary for people, log events for machines.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::runner::report::{human_bytes, Report};

/// Progress display of a run.
pub struct Progress {
    json: bool,
    multi: MultiProgress,
    rounds: ProgressBar,
    clients: ProgressBar,
}

impl Progress {
    /// Bars for `rounds` rounds of `clients` clients (hidden with `json`).
    pub fn new(json: bool, rounds: u32, clients: usize) -> Self {
        let multi = MultiProgress::new();
        if json {
            multi.set_draw_target(ProgressDrawTarget::hidden());
        }
        let style = ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let rounds_bar = multi.add(ProgressBar::new(u64::from(rounds)));
        rounds_bar.set_style(style.clone());
        rounds_bar.set_prefix("rounds");
        let clients_bar = multi.add(ProgressBar::new(clients as u64));
        clients_bar.set_style(style);
        clients_bar.set_prefix("clients");
        Progress {
            json,
            multi,
            rounds: rounds_bar,
            clients: clients_bar,
        }
    }

    fn line(&self, text: &str) {
        if self.json {
            tracing::info!(target: "heterotune::run", "{text}");
        } else if self.multi.is_hidden() {
            // Not a terminal (a log file, CI): plain lines.
            println!("{text}");
        } else {
            let _ = self.multi.println(text);
        }
    }

    /// A round begins.
    pub fn start_round(&self, round: u32) {
        self.rounds.set_position(u64::from(round.saturating_sub(1)));
        self.clients.set_position(0);
        self.clients.set_message("training");
        if self.json {
            tracing::info!(round, "round started");
        }
    }

    /// Committed and running clients in the current round.
    pub fn clients(&self, committed: u32, running: u32) {
        self.clients.set_position(u64::from(committed));
        self.clients.set_message(format!("{running} training"));
    }

    /// A client committed its artifact.
    pub fn client_done(&self, client: &str, trainer_stdout: &str) {
        let summary = trainer_stdout
            .lines()
            .find(|l| l.contains("validation accuracy"))
            .map(str::trim)
            .unwrap_or("done");
        if self.json {
            tracing::info!(client, summary, "client committed");
        } else {
            self.line(&format!("  {client}: {summary}"));
        }
    }

    /// The round is being aggregated.
    pub fn aggregating(&self, round: u32, participants: usize) {
        self.clients.set_message(format!(
            "aggregating round {round} over {participants} clients"
        ));
        if self.json {
            tracing::info!(round, participants, "aggregating");
        }
    }

    /// A round completed: the live summary (the clients' accuracy after
    /// local training; the previous round's global model as they received it).
    pub fn round_done(&self, report: &Report) {
        let Some(r) = report.rounds.last() else {
            return;
        };
        self.rounds.set_position(u64::from(r.round));
        let previous = report
            .rounds
            .iter()
            .find(|p| p.round + 1 == r.round)
            .and_then(|p| p.global_accuracy.map(|a| (a, &p.global_accuracy_by_family)));
        if self.json {
            tracing::info!(
                round = r.round,
                accuracy = r.accuracy,
                previous_global_accuracy = previous.map(|p| p.0),
                bytes_uploaded = r.bytes_uploaded,
                seconds = r.duration_seconds,
                "round complete"
            );
        } else {
            let global = previous
                .map(|(a, by)| {
                    format!(
                        "; global model of round {}: {a:.3} ({})",
                        r.round - 1,
                        by_family(by)
                    )
                })
                .unwrap_or_default();
            self.line(&format!(
                "round {}: accuracy after local training {:.3} ({}){global}, {} uploaded, {:.1} s",
                r.round,
                r.accuracy,
                by_family(&r.accuracy_by_family),
                human_bytes(r.bytes_uploaded),
                r.duration_seconds
            ));
        }
        for x in super::report::rejects(&r.aggregation) {
            if self.json {
                tracing::warn!(
                    round = r.round,
                    client = x.client,
                    reason = x.reason,
                    detail = x.detail,
                    "update rejected"
                );
            } else {
                self.line(&format!(
                    "round {}: rejected {}'s update ({}): {}",
                    r.round, x.client, x.reason, x.detail
                ));
            }
        }
    }

    /// The evaluation of the final global model begins.
    pub fn start_evaluation(&self, round: u32) {
        self.rounds.set_position(u64::from(round));
        self.clients.set_position(0);
        self.clients
            .set_message("evaluating the final global model");
        if self.json {
            tracing::info!(round, "evaluation started");
        }
    }

    /// A client evaluated the final global model (`result`: its JSON).
    pub fn client_evaluated(&self, client: &str, result: &str) {
        let accuracy = result
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .and_then(|v| v.get("accuracy").and_then(serde_json::Value::as_f64));
        if self.json {
            tracing::info!(client, accuracy, "client evaluated");
        } else if let Some(a) = accuracy {
            self.line(&format!(
                "  {client}: final global model, test accuracy {a:.3}"
            ));
        }
    }

    /// The final evaluation is recorded in `report`.
    pub fn evaluation_done(&self, report: &Report) {
        let Some(last) = report
            .rounds
            .iter()
            .find(|r| r.round == report.rounds_planned)
        else {
            return;
        };
        let Some(a) = last.global_accuracy else {
            self.note("evaluation: no client evaluated the final global model");
            return;
        };
        if self.json {
            tracing::info!(
                round = last.round,
                global_accuracy = a,
                clients = report.final_evaluation.len(),
                "evaluation complete"
            );
        } else {
            self.line(&format!(
                "final global model (round {}): accuracy {a:.3} ({}), {} clients",
                last.round,
                by_family(&last.global_accuracy_by_family),
                report.final_evaluation.len()
            ));
        }
    }

    /// Something worth telling (retries, exclusions, failures).
    pub fn note(&self, text: &str) {
        if self.json {
            tracing::warn!(target: "heterotune::run", "{text}");
        } else {
            self.line(text);
        }
    }

    /// The run finished.
    pub fn finish(&self, report: &Report) {
        self.rounds.finish();
        self.clients.finish_and_clear();
        let _ = report;
    }
}

/// `L6 0.850, SmolLM2 0.510`: per-family figures with short family names.
fn by_family(values: &std::collections::BTreeMap<String, f64>) -> String {
    values
        .iter()
        .map(|(k, v)| format!("{} {v:.3}", k.split('.').next().unwrap_or(k)))
        .collect::<Vec<_>>()
        .join(", ")
}
