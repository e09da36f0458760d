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

/// A stand-in Kubernetes API server on loopback: every GET is answered with
/// an empty list (a watch after a second), as in tests/images/smoke.sh. The
/// operator runs against it with nothing to reconcile. Returns its port.
fn stand_in_api_server() -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(match stream.try_clone() {
                    Ok(s) => s,
                    Err(_) => return,
                });
                let mut first = String::new();
                if reader.read_line(&mut first).is_err() {
                    return;
                }
                // The rest of the request head.
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                if first.contains("watch=") {
                    std::thread::sleep(Duration::from_secs(1));
                }
                let body = r#"{"kind":"List","apiVersion":"v1","metadata":{"resourceVersion":"1"},"items":[]}"#;
                let mut stream = stream;
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

/// `GET path` on loopback `port`; the status code and body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// The operator binary itself (`heterotune-operator`, as the chart runs
/// it), started against a stand-in API server, is scraped by a real
/// Prometheus: the target is up and its build_info series carries the
/// binary's version and the target's labels.
#[test]
fn prometheus_scrapes_the_running_operator_binary() {
    if !tools_present() {
        return;
    }
    let operator = heterotune_tests::binary("heterotune-operator");
    assert!(
        operator.exists(),
        "run `cargo build --workspace --bins` first (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let api = stand_in_api_server();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{ name: t, cluster: {{ server: \"http://127.0.0.1:{api}\" }} }}]\n\
             users: [{{ name: t, user: {{ token: t }} }}]\ncontexts: [{{ name: t, context: {{ cluster: t, user: t }} }}]\n\
             current-context: t\n"
        ),
    )
    .expect("kubeconfig");
    let http_port = free_port();
    let log = std::fs::File::create(dir.path().join("operator.log")).expect("log");
    let _operator = Server(
        Command::new(&operator)
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .env("KUBECONFIG", &kubeconfig)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the operator starts"),
    );
    let start = Instant::now();
    while http_get(http_port, "/healthz").map(|r| r.0) != Some(200) {
        let log = std::fs::read_to_string(dir.path().join("operator.log")).unwrap_or_default();
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the operator never answered /healthz: {log}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let target: SocketAddr = format!("127.0.0.1:{http_port}").parse().expect("addr");
    let port = free_port();
    let _prometheus = start_prometheus(dir.path(), target, port);
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    let build = loop {
        let found = Command::new("promtool")
            .args([
                "query",
                "instant",
                "-o",
                "json",
                &url,
                "heterotune_build_info",
            ])
            .output();
        if let Ok(o) = found {
            if let Ok(Value::Array(series)) = serde_json::from_slice::<Value>(&o.stdout) {
                if !series.is_empty() {
                    break series;
                }
            }
        }
        let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "Prometheus never scraped the operator binary: {log}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(build.len(), 1, "{build:?}");
    let m = &build[0]["metric"];
    assert_eq!(m["version"], env!("CARGO_PKG_VERSION"), "{m}");
    assert_eq!(m["job"], "heterotune-operator", "{m}");
    assert_eq!(m["namespace"], "heterotune-system", "{m}");
    let up = query(&url, "up{job=\"heterotune-operator\"} == 1");
    assert_eq!(up.len(), 1, "{up:?}");
}
