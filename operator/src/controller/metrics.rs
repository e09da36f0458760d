//! Prometheus metrics of the operator, all prefixed `heterotune_`.
//!
//! Per-run series carry `ft_namespace` and `federatedtune` (the
//! FederatedTune's namespace and name): not `namespace`, which Prometheus
//! and the Prometheus Operator set to the scraped pod's namespace (the
//! operator's), renaming a metric's own `namespace` to `exported_namespace`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `heterotune_build_info` | gauge (1) | `version` |
//! | `heterotune_reconciles_total` | counter | |
//! | `heterotune_reconcile_errors_total` | counter | `error` ([`crate::controller::Error::metric_label`]) |
//! | `heterotune_reconcile_duration_seconds` | histogram | |
//! | `heterotune_phase` | gauge (1 for the run's phase, 0 for the others) | run, `phase` |
//! | `heterotune_round` | gauge: the round in progress (the last one when finished) | run |
//! | `heterotune_planned_rounds` | gauge: `spec.rounds` | run |
//! | `heterotune_completed_rounds` | gauge: rounds with a global model | run |
//! | `heterotune_round_start_time_seconds` | gauge: Unix time the round in progress started (only while one is) | run |
//! | `heterotune_round_deadline_seconds` | gauge: `spec.roundDeadlineSeconds` | run |
//! | `heterotune_rounds_completed_total` | counter | run |
//! | `heterotune_round_duration_seconds` | histogram | run |
//! | `heterotune_clients` | gauge | run, `state` |
//! | `heterotune_uploaded_bytes_total` | counter | run |
//! | `heterotune_artifacts_rejected_total` | counter | run, `reason` |
//! | `heterotune_accuracy_ratio` | gauge | run, `family` (`all`: every client): after local training, last completed round |
//! | `heterotune_global_accuracy_ratio` | gauge | run, `family` (`all`: every client): the newest evaluated global model |
//! | `heterotune_jobs_created_total` | counter | `role` (`trainer`, `aggregator`, `evaluator`) |
//! | `heterotune_jobs_deleted_total` | counter | `reason` (`straggler`, `stale`) |
//! | `heterotune_leader` | gauge | (1 while this replica leads) |
//!
//! "run" is `ft_namespace`, `federatedtune`. Per-run series are removed
//! when the FederatedTune is deleted.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};
use prometheus::{Gauge, GaugeVec};

use heterotune_crds::status::Phase;

/// The per-run labels: the FederatedTune's namespace and name.
pub const RUN_LABELS: [&str; 2] = ["ft_namespace", "federatedtune"];

/// Every phase, in the order the `heterotune_phase` series are written.
pub const PHASES: [Phase; 7] = [
    Phase::Pending,
    Phase::Running,
    Phase::Aggregating,
    Phase::Evaluating,
    Phase::Suspended,
    Phase::Succeeded,
    Phase::Failed,
];

/// The `phase` label of `phase` (its name in the status).
pub fn phase_label(phase: Phase) -> &'static str {
    match phase {
        Phase::Pending => "Pending",
        Phase::Running => "Running",
        Phase::Aggregating => "Aggregating",
        Phase::Evaluating => "Evaluating",
        Phase::Suspended => "Suspended",
        Phase::Succeeded => "Succeeded",
        Phase::Failed => "Failed",
    }
}

/// Where a run stands, from the status about to be written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunProgress {
    /// The phase.
    pub phase: Phase,
    /// The round in progress (the last one when finished).
    pub round: u32,
    /// `spec.rounds`.
    pub planned_rounds: u32,
    /// Rounds with a global model.
    pub completed_rounds: u32,
    /// `spec.roundDeadlineSeconds`.
    pub round_deadline_seconds: u32,
    /// When the round in progress started (Unix seconds); None when no
    /// round is in progress (its series is then removed).
    pub round_started_at: Option<f64>,
}

/// Client states reported by the `heterotune_clients` gauge.
pub const CLIENT_STATES: &[&str] = &[
    "Pending",
    "Training",
    "Committed",
    "Failed",
    "Excluded",
    "Evaluating",
    "Evaluated",
    "EvaluationFailed",
    "WaitingForSite",
];

/// The operator's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    /// Reconciliations started.
    pub reconciles: IntCounter,
    /// Failed reconciliations by error label.
    pub reconcile_errors: IntCounterVec,
    /// Reconcile wall time.
    pub reconcile_duration: Histogram,
    /// 1, labelled with the operator's version.
    pub build_info: IntGaugeVec,
    /// 1 for the run's phase, 0 for the others.
    pub phase: IntGaugeVec,
    /// The round in progress.
    pub round: IntGaugeVec,
    /// `spec.rounds`.
    pub planned_rounds: IntGaugeVec,
    /// Rounds with a global model.
    pub completed_rounds: IntGaugeVec,
    /// Unix time the round in progress started.
    pub round_start_time: GaugeVec,
    /// `spec.roundDeadlineSeconds`.
    pub round_deadline: IntGaugeVec,
    /// Rounds completed.
    pub rounds_completed: IntCounterVec,
    /// Round wall time.
    pub round_duration: HistogramVec,
    /// Clients by state in the current round.
    pub clients: IntGaugeVec,
    /// Bytes uploaded by clients.
    pub uploaded_bytes: IntCounterVec,
    /// Rejected artifacts by reason.
    pub rejected: IntCounterVec,
    /// Accuracy after local training in the last completed round, per family.
    pub accuracy: GaugeVec,
    /// Accuracy of the newest evaluated global model, per family.
    pub global_accuracy: GaugeVec,
    /// Jobs created.
    pub jobs_created: IntCounterVec,
    /// Jobs deleted by the operator.
    pub jobs_deleted: IntCounterVec,
    /// 1 while this replica holds the leader lease.
    pub leader: IntGauge,
    series: Mutex<HashMap<(String, String), BTreeSet<Series>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Series {
    Progress,
    Phase(&'static str),
    RoundStart,
    Rounds,
    RoundDuration,
    Clients(String),
    Bytes,
    Rejected(String),
    Accuracy(String),
    GlobalAccuracy(String),
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric definitions are static: a failure here is a programming error
    // caught by the unit tests.
    r.unwrap_or_else(|e| panic!("invalid metric definition: {e}"))
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = must(Registry::new_custom(Some("heterotune".into()), None));
        let ft = &RUN_LABELS;
        let run_gauge = |name: &str, help: &str| must(IntGaugeVec::new(Opts::new(name, help), ft));
        let m = Metrics {
            reconciles: must(IntCounter::new(
                "reconciles_total",
                "Reconciliations started",
            )),
            reconcile_errors: must(IntCounterVec::new(
                Opts::new("reconcile_errors_total", "Failed reconciliations by error"),
                &["error"],
            )),
            reconcile_duration: must(Histogram::with_opts(
                HistogramOpts::new("reconcile_duration_seconds", "Reconcile wall time").buckets(
                    vec![
                        0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 15.0, 60.0,
                    ],
                ),
            )),
            build_info: must(IntGaugeVec::new(
                Opts::new("build_info", "1, labelled with the operator's version"),
                &["version"],
            )),
            phase: must(IntGaugeVec::new(
                Opts::new("phase", "1 for the run's phase, 0 for the others"),
                &["ft_namespace", "federatedtune", "phase"],
            )),
            round: run_gauge("round", "The round in progress (the last one when finished)"),
            planned_rounds: run_gauge("planned_rounds", "Rounds the spec asks for"),
            completed_rounds: run_gauge("completed_rounds", "Rounds with a global model"),
            round_start_time: must(GaugeVec::new(
                Opts::new(
                    "round_start_time_seconds",
                    "Unix time the round in progress started (absent when none is)",
                ),
                ft,
            )),
            round_deadline: run_gauge(
                "round_deadline_seconds",
                "Wall-clock limit of one round (spec.roundDeadlineSeconds)",
            ),
            rounds_completed: must(IntCounterVec::new(
                Opts::new("rounds_completed_total", "Rounds completed"),
                ft,
            )),
            round_duration: must(HistogramVec::new(
                HistogramOpts::new("round_duration_seconds", "Wall time of a round").buckets(vec![
                    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 21600.0,
                ]),
                ft,
            )),
            clients: must(IntGaugeVec::new(
                Opts::new("clients", "Clients of the current round by state"),
                &["ft_namespace", "federatedtune", "state"],
            )),
            uploaded_bytes: must(IntCounterVec::new(
                Opts::new(
                    "uploaded_bytes_total",
                    "Bytes of client artifacts in completed rounds",
                ),
                ft,
            )),
            rejected: must(IntCounterVec::new(
                Opts::new(
                    "artifacts_rejected_total",
                    "Client artifacts rejected by the aggregator, by reason",
                ),
                &["ft_namespace", "federatedtune", "reason"],
            )),
            accuracy: must(GaugeVec::new(
                Opts::new(
                    "accuracy_ratio",
                    "Global-test accuracy of the clients' models after local training in the last completed round (family=all: every client)",
                ),
                &["ft_namespace", "federatedtune", "family"],
            )),
            global_accuracy: must(GaugeVec::new(
                Opts::new(
                    "global_accuracy_ratio",
                    "Global-test accuracy of the newest evaluated global (aggregated) model (family=all: every client)",
                ),
                &["ft_namespace", "federatedtune", "family"],
            )),
            jobs_created: must(IntCounterVec::new(
                Opts::new("jobs_created_total", "Jobs created"),
                &["role"],
            )),
            jobs_deleted: must(IntCounterVec::new(
                Opts::new("jobs_deleted_total", "Jobs deleted by the operator"),
                &["reason"],
            )),
            leader: must(IntGauge::new(
                "leader",
                "1 while this replica holds the leader lease",
            )),
            registry,
            series: Mutex::new(HashMap::new()),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.reconciles.clone()),
            Box::new(m.reconcile_errors.clone()),
            Box::new(m.reconcile_duration.clone()),
            Box::new(m.build_info.clone()),
            Box::new(m.phase.clone()),
            Box::new(m.round.clone()),
            Box::new(m.planned_rounds.clone()),
            Box::new(m.completed_rounds.clone()),
            Box::new(m.round_start_time.clone()),
            Box::new(m.round_deadline.clone()),
            Box::new(m.rounds_completed.clone()),
            Box::new(m.round_duration.clone()),
            Box::new(m.clients.clone()),
            Box::new(m.uploaded_bytes.clone()),
            Box::new(m.rejected.clone()),
            Box::new(m.accuracy.clone()),
            Box::new(m.global_accuracy.clone()),
            Box::new(m.jobs_created.clone()),
            Box::new(m.jobs_deleted.clone()),
            Box::new(m.leader.clone()),
        ];
        for c in collectors {
            must(m.registry.register(c));
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// The registry (for the HTTP endpoint).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Counts a reconcile and measures it until the guard drops.
    pub fn reconcile_started(&self) -> ReconcileTimer {
        self.reconciles.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.reconcile_duration.clone(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, label: &str) {
        self.reconcile_errors.with_label_values(&[label]).inc();
    }

    fn remember(&self, ns: &str, name: &str, s: Series) {
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((ns.to_string(), name.to_string()))
            .or_default()
            .insert(s);
    }

    /// Records a completed round of run `ns/name`.
    #[allow(clippy::too_many_arguments)]
    pub fn round_completed(
        &self,
        ns: &str,
        name: &str,
        duration_seconds: Option<f64>,
        bytes: u64,
        rejected: &std::collections::BTreeMap<String, u32>,
        accuracy: Option<f64>,
        by_family: &std::collections::BTreeMap<String, f64>,
    ) {
        self.rounds_completed.with_label_values(&[ns, name]).inc();
        self.remember(ns, name, Series::Rounds);
        if let Some(d) = duration_seconds.filter(|d| d.is_finite() && *d >= 0.0) {
            self.round_duration
                .with_label_values(&[ns, name])
                .observe(d);
            self.remember(ns, name, Series::RoundDuration);
        }
        self.uploaded_bytes
            .with_label_values(&[ns, name])
            .inc_by(bytes);
        self.remember(ns, name, Series::Bytes);
        for (reason, n) in rejected {
            self.rejected
                .with_label_values(&[ns, name, reason.as_str()])
                .inc_by(u64::from(*n));
            self.remember(ns, name, Series::Rejected(reason.clone()));
        }
        if let Some(a) = accuracy {
            self.set_accuracy(ns, name, "all", a);
        }
        for (family, a) in by_family {
            self.set_accuracy(ns, name, family, *a);
        }
    }

    /// Sets the accuracy of the newest evaluated global model of `ns/name`.
    pub fn set_global_accuracy(
        &self,
        ns: &str,
        name: &str,
        accuracy: f64,
        by_family: &std::collections::BTreeMap<String, f64>,
    ) {
        let all = std::iter::once(("all", accuracy))
            .chain(by_family.iter().map(|(f, a)| (f.as_str(), *a)));
        for (family, value) in all {
            self.global_accuracy
                .with_label_values(&[ns, name, family])
                .set(value);
            self.remember(ns, name, Series::GlobalAccuracy(family.to_string()));
        }
    }

    fn set_accuracy(&self, ns: &str, name: &str, family: &str, value: f64) {
        let g: Gauge = self.accuracy.with_label_values(&[ns, name, family]);
        g.set(value);
        self.remember(ns, name, Series::Accuracy(family.to_string()));
    }

    /// Sets the gauges of where run `ns/name` stands.
    pub fn set_progress(&self, ns: &str, name: &str, p: &RunProgress) {
        let run = [ns, name];
        for phase in PHASES {
            let label = phase_label(phase);
            self.phase
                .with_label_values(&[ns, name, label])
                .set(i64::from(phase == p.phase));
            self.remember(ns, name, Series::Phase(label));
        }
        self.round.with_label_values(&run).set(i64::from(p.round));
        self.planned_rounds
            .with_label_values(&run)
            .set(i64::from(p.planned_rounds));
        self.completed_rounds
            .with_label_values(&run)
            .set(i64::from(p.completed_rounds));
        self.round_deadline
            .with_label_values(&run)
            .set(i64::from(p.round_deadline_seconds));
        self.remember(ns, name, Series::Progress);
        match p.round_started_at {
            Some(t) => {
                self.round_start_time.with_label_values(&run).set(t);
                self.remember(ns, name, Series::RoundStart);
            }
            None => {
                let _ = self.round_start_time.remove_label_values(&run);
            }
        }
    }

    /// Sets the clients-by-state gauge of run `ns/name`.
    pub fn set_clients(&self, ns: &str, name: &str, counts: &[(&str, i64)]) {
        for (state, n) in counts {
            self.clients.with_label_values(&[ns, name, state]).set(*n);
            self.remember(ns, name, Series::Clients(state.to_string()));
        }
    }

    /// Removes every series of run `ns/name` (it was deleted).
    pub fn forget(&self, ns: &str, name: &str) {
        let series = self
            .series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(ns.to_string(), name.to_string()))
            .unwrap_or_default();
        for s in series {
            let _ = match s {
                Series::Progress => {
                    let _ = self.round.remove_label_values(&[ns, name]);
                    let _ = self.planned_rounds.remove_label_values(&[ns, name]);
                    let _ = self.completed_rounds.remove_label_values(&[ns, name]);
                    self.round_deadline.remove_label_values(&[ns, name])
                }
                Series::Phase(p) => self.phase.remove_label_values(&[ns, name, p]),
                Series::RoundStart => self.round_start_time.remove_label_values(&[ns, name]),
                Series::Rounds => self.rounds_completed.remove_label_values(&[ns, name]),
                Series::RoundDuration => self.round_duration.remove_label_values(&[ns, name]),
                Series::Bytes => self.uploaded_bytes.remove_label_values(&[ns, name]),
                Series::Clients(st) => self.clients.remove_label_values(&[ns, name, st.as_str()]),
                Series::Rejected(r) => self.rejected.remove_label_values(&[ns, name, r.as_str()]),
                Series::Accuracy(f) => self.accuracy.remove_label_values(&[ns, name, f.as_str()]),
                Series::GlobalAccuracy(f) => {
                    self.global_accuracy
                        .remove_label_values(&[ns, name, f.as_str()])
                }
            };
        }
    }
}

/// Observes the reconcile duration when dropped.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `promtool check metrics` on the exposition, when promtool is installed
    /// (Debian package `prometheus`); skipped, saying so, otherwise.
    fn promtool_accepts(text: &str) {
        use std::io::Write;
        let child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("promtool not installed: `promtool check metrics` skipped");
            return;
        };
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(text.as_bytes()).expect("write to promtool");
        }
        let out = child.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn every_metric_is_prefixed_and_runs_are_forgotten() {
        let m = Metrics::new();
        {
            let _t = m.reconcile_started();
        }
        m.reconcile_failed("invalid_spec");
        let mut rejected = std::collections::BTreeMap::new();
        rejected.insert("norm_bound".to_string(), 2);
        let mut fam = std::collections::BTreeMap::new();
        fam.insert("bert".to_string(), 0.8);
        m.round_completed("ns", "ft", Some(42.0), 1234, &rejected, Some(0.75), &fam);
        m.set_clients("ns", "ft", &[("Training", 3), ("Committed", 1)]);
        let mut progress = RunProgress {
            phase: Phase::Running,
            round: 2,
            planned_rounds: 6,
            completed_rounds: 1,
            round_deadline_seconds: 3600,
            round_started_at: Some(1_700_000_000.0),
        };
        m.set_progress("ns", "ft", &progress);
        let text = m.encode();
        for name in [
            "heterotune_reconciles_total 1",
            "heterotune_reconcile_errors_total{error=\"invalid_spec\"} 1",
            "heterotune_reconcile_duration_seconds_count 1",
            "heterotune_rounds_completed_total{federatedtune=\"ft\",ft_namespace=\"ns\"} 1",
            "heterotune_round_duration_seconds_sum{federatedtune=\"ft\",ft_namespace=\"ns\"} 42",
            "heterotune_uploaded_bytes_total{federatedtune=\"ft\",ft_namespace=\"ns\"} 1234",
            "heterotune_artifacts_rejected_total{federatedtune=\"ft\",ft_namespace=\"ns\",reason=\"norm_bound\"} 2",
            "heterotune_accuracy_ratio{family=\"bert\",federatedtune=\"ft\",ft_namespace=\"ns\"} 0.8",
            "heterotune_accuracy_ratio{family=\"all\",federatedtune=\"ft\",ft_namespace=\"ns\"} 0.75",
            "heterotune_clients{federatedtune=\"ft\",ft_namespace=\"ns\",state=\"Training\"} 3",
            "heterotune_phase{federatedtune=\"ft\",ft_namespace=\"ns\",phase=\"Running\"} 1",
            "heterotune_phase{federatedtune=\"ft\",ft_namespace=\"ns\",phase=\"Failed\"} 0",
            "heterotune_round{federatedtune=\"ft\",ft_namespace=\"ns\"} 2",
            "heterotune_planned_rounds{federatedtune=\"ft\",ft_namespace=\"ns\"} 6",
            "heterotune_completed_rounds{federatedtune=\"ft\",ft_namespace=\"ns\"} 1",
            "heterotune_round_start_time_seconds{federatedtune=\"ft\",ft_namespace=\"ns\"} 1700000000",
            "heterotune_round_deadline_seconds{federatedtune=\"ft\",ft_namespace=\"ns\"} 3600",
            "heterotune_build_info{version=",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(line.starts_with("heterotune_"), "{line}");
        }
        promtool_accepts(&text);
        // No round in progress: no start time.
        progress.round_started_at = None;
        progress.phase = Phase::Succeeded;
        m.set_progress("ns", "ft", &progress);
        let text = m.encode();
        assert!(
            !text.contains("heterotune_round_start_time_seconds{"),
            "{text}"
        );
        assert!(text.contains("phase=\"Succeeded\"} 1"), "{text}");
        m.forget("ns", "ft");
        let text = m.encode();
        assert!(!text.contains("ft_namespace=\"ns\""), "{text}");
        assert!(text.contains("heterotune_build_info{"), "{text}");
    }
}
