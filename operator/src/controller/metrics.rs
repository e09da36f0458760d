//! Prometheus metrics of the operator, all prefixed `heterotune_`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `heterotune_reconciles_total` | counter | |
//! | `heterotune_reconcile_errors_total` | counter | `error` ([`crate::controller::Error::metric_label`]) |
//! | `heterotune_reconcile_duration_seconds` | histogram | |
//! | `heterotune_rounds_completed_total` | counter | `namespace`, `name` |
//! | `heterotune_round_duration_seconds` | histogram | `namespace`, `name` |
//! | `heterotune_clients` | gauge | `namespace`, `name`, `state` |
//! | `heterotune_uploaded_bytes_total` | counter | `namespace`, `name` |
//! | `heterotune_artifacts_rejected_total` | counter | `namespace`, `name`, `reason` |
//! | `heterotune_accuracy` | gauge | `namespace`, `name`, `family` (`all`: every client): after local training, last completed round |
//! | `heterotune_global_accuracy` | gauge | `namespace`, `name`, `family` (`all`: every client): the newest evaluated global model |
//! | `heterotune_jobs_created_total` | counter | `role` (`trainer`, `aggregator`, `evaluator`) |
//! | `heterotune_jobs_deleted_total` | counter | `reason` (`straggler`, `stale`) |
//! | `heterotune_leader` | gauge | (1 while this replica leads) |
//!
//! Per-run series are removed when the FederatedTune is deleted.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};
use prometheus::{Gauge, GaugeVec};

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
        let ft = &["namespace", "name"];
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
                &["namespace", "name", "state"],
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
                &["namespace", "name", "reason"],
            )),
            accuracy: must(GaugeVec::new(
                Opts::new(
                    "accuracy",
                    "Global-test accuracy of the clients' models after local training in the last completed round (family=all: every client)",
                ),
                &["namespace", "name", "family"],
            )),
            global_accuracy: must(GaugeVec::new(
                Opts::new(
                    "global_accuracy",
                    "Global-test accuracy of the newest evaluated global (aggregated) model (family=all: every client)",
                ),
                &["namespace", "name", "family"],
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
        let text = m.encode();
        for name in [
            "heterotune_reconciles_total 1",
            "heterotune_reconcile_errors_total{error=\"invalid_spec\"} 1",
            "heterotune_reconcile_duration_seconds_count 1",
            "heterotune_rounds_completed_total{name=\"ft\",namespace=\"ns\"} 1",
            "heterotune_round_duration_seconds_sum{name=\"ft\",namespace=\"ns\"} 42",
            "heterotune_uploaded_bytes_total{name=\"ft\",namespace=\"ns\"} 1234",
            "heterotune_artifacts_rejected_total{name=\"ft\",namespace=\"ns\",reason=\"norm_bound\"} 2",
            "heterotune_accuracy{family=\"bert\",name=\"ft\",namespace=\"ns\"} 0.8",
            "heterotune_accuracy{family=\"all\",name=\"ft\",namespace=\"ns\"} 0.75",
            "heterotune_clients{name=\"ft\",namespace=\"ns\",state=\"Training\"} 3",
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
        m.forget("ns", "ft");
        let text = m.encode();
        assert!(!text.contains("namespace=\"ns\""), "{text}");
    }
}
