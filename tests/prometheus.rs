//! A real Prometheus (Debian's `prometheus`, installed by scripts/setup.sh)
//! scrapes the operator's metrics endpoint (`controller::http::serve`, what
//! `heterotune-operator` serves on :8080) the way a ServiceMonitor does: the
//! target gets `job`, `namespace` (the operator's), `pod` and `service`
//! labels and `honor_labels` is off. The operator binary needs a Kubernetes
//! API server to start, so the series are recorded through the `Metrics`
//! calls the reconciler makes, for two runs named `ft1` in namespaces team-a
//! and team-b. Every query of the Grafana dashboard must return a series,
//! the two runs must stay apart, and Prometheus must load the alert rules.
//!
//! Without `prometheus` and `promtool` the test says so and passes, unless
//! `HETEROTUNE_REQUIRE_TOOLS=1` (scripts/test.sh), where it fails.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use heterotune_crds::status::Phase;
use heterotune_operator::controller::http::{self, Health};
use heterotune_operator::controller::metrics::{Metrics, RunProgress};
use heterotune_tests::repo_root;
use serde_json::Value;

/// Kills Prometheus when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn tools_present() -> bool {
    let runs = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if runs("prometheus") && runs("promtool") {
        return true;
    }
    let required = std::env::var("HETEROTUNE_REQUIRE_TOOLS").as_deref() == Ok("1");
    assert!(
        !required,
        "prometheus/promtool not installed (Debian package prometheus; scripts/setup.sh installs it)"
    );
    eprintln!("prometheus not installed: the scrape test is skipped");
    false
}

/// Two runs named ft1 (team-a: round 2 of 6 in progress; team-b: failed),
/// and the operator-wide series, as the reconciler records them.
fn record(m: &Metrics) {
    {
        let _t = m.reconcile_started();
    }
    m.reconcile_failed("storage_unavailable");
    m.leader.set(1);
    m.jobs_created.with_label_values(&["trainer"]).inc_by(3);
    m.jobs_deleted.with_label_values(&["straggler"]).inc();
    let rejected: BTreeMap<String, u32> = [("norm_exceeded".to_string(), 1)].into();
    let by_family: BTreeMap<String, f64> = [("bert".to_string(), 0.7)].into();
    for (ns, phase) in [("team-a", Phase::Running), ("team-b", Phase::Failed)] {
        m.round_completed(
            ns,
            "ft1",
            Some(90.0),
            1000,
            &rejected,
            Some(0.7),
            &by_family,
        );
        m.set_global_accuracy(ns, "ft1", 0.65, &by_family);
        m.set_clients(ns, "ft1", &[("Training", 2), ("Excluded", 1)]);
        m.set_progress(
            ns,
            "ft1",
            &RunProgress {
                phase,
                round: 2,
                planned_rounds: 6,
                completed_rounds: 1,
                round_deadline_seconds: 3600,
                round_started_at: (phase == Phase::Running).then_some(1_700_000_000.0),
            },
        );
    }
}

/// Counters move between scrapes, so rates and increases have something
/// to show.
fn tick(m: &Metrics) {
    {
        let _t = m.reconcile_started();
    }
    m.jobs_created.with_label_values(&["trainer"]).inc();
    for ns in ["team-a", "team-b"] {
        m.round_completed(
            ns,
            "ft1",
            Some(120.0),
            500,
            &BTreeMap::new(),
            None,
            &BTreeMap::new(),
        );
    }
}

fn query(prometheus: &str, expr: &str) -> Vec<Value> {
    let out = Command::new("promtool")
        .args(["query", "instant", "-o", "json", prometheus, expr])
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "{expr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice::<Value>(&out.stdout) {
        Ok(Value::Array(series)) => series,
        other => panic!("{expr}: unexpected answer {other:?}"),
    }
}

fn start_prometheus(dir: &Path, target: SocketAddr, port: u16) -> Server {
    let alerts = repo_root().join("charts/heterotune/dashboards/alerts.yaml");
    let config = format!(
        "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
         rule_files: [\"{}\"]\n\
         scrape_configs:\n\
         \x20 - job_name: heterotune-operator\n\
         \x20   honor_labels: false\n\
         \x20   static_configs:\n\
         \x20     - targets: [\"{target}\"]\n\
         \x20       labels: {{ namespace: heterotune-system, pod: heterotune-operator-0, service: heterotune-operator }}\n",
        alerts.display()
    );
    std::fs::write(dir.join("prometheus.yml"), config).expect("config");
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus starts");
    Server(child)
}

/// The dashboard's queries, with its variables set to "all".
fn dashboard_queries() -> Vec<String> {
    let path = repo_root().join("charts/heterotune/dashboards/heterotune.json");
    let d: Value = serde_json::from_slice(&std::fs::read(path).expect("dashboard")).expect("json");
    let all = |e: &str| e.replace("$namespace", ".*").replace("$run", ".*");
    let mut out: Vec<String> = d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(all))
        .collect();
    // label_values(metric{selector}, label) variables: the metric must carry the label.
    for v in d["templating"]["list"].as_array().expect("variables") {
        let Some(q) = v["query"]
            .as_str()
            .and_then(|q| q.strip_prefix("label_values("))
        else {
            continue;
        };
        let (metric, label) = q
            .trim_end_matches(')')
            .rsplit_once(',')
            .expect("label_values(metric, label)");
        out.push(format!("count by ({}) ({})", label.trim(), all(metric)));
    }
    out
}

#[test]
fn prometheus_scrapes_the_operator_and_every_dashboard_query_returns_series() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = Arc::new(Metrics::new());
    record(&metrics);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let target: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    runtime.spawn(http::serve(
        target,
        Health {
            metrics: metrics.clone(),
            ready: Arc::new(AtomicBool::new(true)),
        },
        std::future::pending(),
    ));
    let port = free_port();
    let _prometheus = start_prometheus(dir.path(), target, port);
    let url = format!("http://127.0.0.1:{port}");

    // Up, then a few more scrapes with moving counters.
    let start = Instant::now();
    loop {
        let up = Command::new("promtool")
            .args(["query", "instant", "-o", "json", &url, "up == 1"])
            .output();
        if up.is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"[{")) {
            break;
        }
        let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "Prometheus never scraped the operator: {log}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    for _ in 0..4 {
        tick(&metrics);
        std::thread::sleep(Duration::from_millis(1100));
    }

    for expr in dashboard_queries() {
        assert!(
            !query(&url, &expr).is_empty(),
            "no series for the dashboard's {expr}"
        );
    }

    // The runs' own namespaces survive the scrape; the target's namespace
    // is the operator's.
    let running = query(&url, "heterotune_phase{phase=\"Running\"}");
    let mut seen: Vec<(String, String, String)> = running
        .iter()
        .map(|s| {
            let m = &s["metric"];
            assert!(m.get("exported_namespace").is_none(), "{s}");
            let l = |k: &str| m[k].as_str().unwrap_or_default().to_string();
            (l("ft_namespace"), l("federatedtune"), l("namespace"))
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        ["team-a", "team-b"].map(|ns| (
            ns.to_string(),
            "ft1".to_string(),
            "heterotune-system".to_string()
        ))
    );
    let failed = query(
        &url,
        "max by (ft_namespace, federatedtune) (heterotune_phase{phase=\"Failed\"}) == 1",
    );
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["metric"]["ft_namespace"], "team-b");
    // The rules run in Prometheus: team-b's failure fires (no `for`), and
    // team-a's round, started in 2023 with a 1 h deadline, is stalled
    // (pending for 5 minutes first).
    let alerts: Vec<(String, String, String)> = query(&url, "ALERTS")
        .iter()
        .map(|s| {
            let l = |k: &str| s["metric"][k].as_str().unwrap_or_default().to_string();
            (l("alertname"), l("ft_namespace"), l("alertstate"))
        })
        .collect();
    for expected in [
        ("HeteroTuneRunFailed", "team-b", "firing"),
        ("HeteroTuneRoundStalled", "team-a", "pending"),
    ] {
        let expected = (
            expected.0.to_string(),
            expected.1.to_string(),
            expected.2.to_string(),
        );
        assert!(alerts.contains(&expected), "{expected:?} not in {alerts:?}");
    }
    // Only the run with a round in progress has a start time.
    let started = query(&url, "heterotune_round_start_time_seconds");
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(started[0]["metric"]["ft_namespace"], "team-a");
}
