//! Sites in other organisations (issue 19): a federation whose clients are
//! partly local trainer processes of `heterotune run` and partly
//! `heterotune site` agents, each with its own work folder and its own
//! store credentials, meeting only in the object store.
//!
//! The test S3 server (SeaweedFS `weed mini`) runs without authentication,
//! so it cannot hold one key per site: every process gets its own key pair
//! in its own environment (what a site would configure), and the policies
//! that confine a key to its prefix are documented in docs/sites.md.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use heterotune_tests::fixtures;
use heterotune_tests::local_run::built;
use heterotune_tests::s3::S3Server;

/// A process whose console goes to `<dir>/<name>.log`.
fn spawn(mut cmd: Command, dir: &Path, name: &str) -> Child {
    std::fs::create_dir_all(dir).expect("log dir");
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    cmd.stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("starts")
}

fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// The coordinator: `heterotune run` with its own credentials.
fn runner(root: &Path, spec: &Path) -> Command {
    let mut cmd = Command::new(built("heterotune"));
    cmd.arg("run")
        .arg("-f")
        .arg(spec)
        .arg("--trainer")
        .arg(built("heterotune-trainer"))
        .arg("--work-dir")
        .arg(root.join("coordinator/work"))
        .arg("--report-dir")
        .arg(root.join("coordinator/report"))
        .args(["--parallel", "2", "--threads", "1"])
        .current_dir(root)
        .env("AWS_ACCESS_KEY_ID", "coordinator-key")
        .env("AWS_SECRET_ACCESS_KEY", "coordinator-secret");
    cmd
}

/// A site's agent for `client`: its own folder (its copy of the spec, its
/// work folder, its console) and its own credentials. The test server
/// lets every key read every object, so the agent is told to accept a key
/// that is not confined ([`strict_site`] is not).
fn site(root: &Path, spec: &Path, client: &str) -> Command {
    let mut cmd = strict_site(root, spec, client);
    cmd.arg("--allow-unconfined-credentials");
    cmd
}

/// [`site`] checking that its key is confined to its own uploads.
fn strict_site(root: &Path, spec: &Path, client: &str) -> Command {
    let home = root.join("sites").join(client);
    std::fs::create_dir_all(&home).expect("site folder");
    let copy = home.join("federation.yaml");
    std::fs::copy(spec, &copy).expect("the site's copy of the spec");
    let mut cmd = Command::new(built("heterotune"));
    cmd.args(["--log-format", "json", "site"])
        .arg("--spec")
        .arg(&copy)
        .arg("--client")
        .arg(client)
        .arg("--work")
        .arg(home.join("work"))
        .arg("--trainer")
        .arg(built("heterotune-trainer"))
        .args(["--threads", "1", "--device", "cpu"])
        .args(["--poll-min", "0.2", "--poll-max", "1"])
        .current_dir(&home)
        .env("AWS_ACCESS_KEY_ID", format!("{client}-key"))
        .env("AWS_SECRET_ACCESS_KEY", format!("{client}-secret"));
    cmd
}

/// Waits for `child` to exit; kills it and fails with its console after `limit`.
fn wait(child: &mut Child, limit: Duration, console: impl Fn() -> String) -> bool {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.success();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}:\n{}", console());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The rounds an agent's log says it started training (JSON lines).
fn training_started(console: &str) -> Vec<u32> {
    console
        .lines()
        .filter(|l| l.contains(r#""message":"training""#))
        .filter_map(|l| {
            let value: serde_json::Value = serde_json::from_str(l).ok()?;
            value["fields"]["round"].as_u64().map(|r| r as u32)
        })
        .collect()
}

/// The rounds an agent's last line says it trained.
fn trained_rounds(console: &str) -> Vec<u32> {
    let line = console
        .lines()
        .rev()
        .find(|l| l.starts_with("site done: trained rounds ["))
        .unwrap_or_else(|| panic!("no summary line:\n{console}"));
    let inner = line
        .split_once('[')
        .and_then(|(_, r)| r.split_once(']'))
        .map(|(i, _)| i)
        .unwrap_or("");
    inner
        .split(", ")
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("a round number"))
        .collect()
}

/// `spec` with `clients` run by sites of their own.
fn with_sites(spec: &str, clients: &[(&str, &str)]) -> String {
    let mut text = spec.to_string();
    for (client, site) in clients {
        let entry = format!("    - name: {client}\n");
        assert!(text.contains(&entry), "{client} not in the spec");
        text = text.replace(&entry, &format!("{entry}      site: {{ name: {site} }}\n"));
    }
    text
}

#[test]
fn local_clients_and_site_agents_federate_through_the_store_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let server = S3Server::start(&root.join("s3"), "heterotune");
    let spec = fixtures::write_federation(root, "mixed", 3, &server.storage_yaml("heterotune"));
    let spec = with_sites(
        &spec,
        &[("wide-bert", "clinic-b"), ("tiny-llama", "bank-c")],
    );
    let spec_file = root.join("federation.yaml");
    std::fs::write(&spec_file, &spec).expect("spec");
    let logs = root.join("logs");

    let mut bank = spawn(site(root, &spec_file, "tiny-llama"), &logs, "bank-1");
    let mut coordinator = spawn(runner(root, &spec_file), &logs, "coordinator");
    let mut clinic = spawn(site(root, &spec_file, "wide-bert"), &logs, "clinic-1");

    // Kill the clinic's agent (and with it its trainer) once it has
    // started training round 2, then start it again.
    let run = "runs/default/mixed-";
    let start = Instant::now();
    while !training_started(&log(&logs, "clinic-1")).contains(&2) {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "round 1 never completed:\n{}\n{}",
            log(&logs, "coordinator"),
            log(&logs, "clinic-1")
        );
        assert!(
            coordinator.try_wait().expect("wait").is_none(),
            "{}",
            log(&logs, "coordinator")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    clinic.kill().expect("kill the clinic's agent");
    let _ = clinic.wait();
    let before: Vec<u32> = (1..=3)
        .filter(|r| {
            server
                .keys("heterotune", run)
                .iter()
                .any(|k| k.ends_with(&format!("round-{r:04}/clients/wide-bert/manifest.json")))
        })
        .collect();
    assert!(
        before.contains(&1),
        "the clinic committed round 1 before its restart"
    );
    let mut clinic = spawn(site(root, &spec_file, "wide-bert"), &logs, "clinic-2");

    let console = || {
        ["coordinator", "bank-1", "clinic-1", "clinic-2"]
            .map(|n| format!("--- {n}:\n{}", log(&logs, n)))
            .join("\n")
    };
    let limit = Duration::from_secs(600);
    assert!(wait(&mut coordinator, limit, console), "{}", console());
    assert!(wait(&mut clinic, limit, console), "{}", console());
    assert!(wait(&mut bank, limit, console), "{}", console());

    // Every round aggregated all three clients, each exactly once.
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("coordinator/report/report.json")).expect("report.json"),
    )
    .expect("report parses");
    assert_eq!(report["status"], "Succeeded", "{}", console());
    let rounds = report["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 3);
    for r in rounds {
        let mut who: Vec<&str> = r["participants"]
            .as_array()
            .expect("participants")
            .iter()
            .filter_map(|p| p.as_str())
            .collect();
        who.sort();
        assert_eq!(who, ["small-bert", "tiny-llama", "wide-bert"], "{r}");
    }
    assert_eq!(report["sites"]["wide-bert"], "clinic-b");
    let evaluated: Vec<&str> = report["finalEvaluation"]
        .as_array()
        .expect("the final evaluation")
        .iter()
        .filter_map(|e| e["client"].as_str())
        .collect();
    for client in ["small-bert", "wide-bert", "tiny-llama"] {
        assert!(
            evaluated.contains(&client),
            "{client} did not evaluate: {evaluated:?}"
        );
    }
    assert!(log(&logs, "coordinator").contains("waiting for its site clinic-b"));

    // The restarted agent trained exactly the rounds the store did not show.
    let again = trained_rounds(&log(&logs, "clinic-2"));
    let started_again = training_started(&log(&logs, "clinic-2"));
    assert!(
        started_again.iter().all(|r| !before.contains(r)),
        "trained {started_again:?} again after {before:?} were committed:\n{}",
        console()
    );
    let mut once = started_again.clone();
    once.dedup();
    assert_eq!(once, started_again, "a round trained twice:\n{}", console());
    assert_eq!(training_started(&log(&logs, "bank-1")), [1, 2, 3]);
    let mut all: Vec<u32> = before.iter().chain(&again).copied().collect();
    all.sort();
    assert_eq!(all, [1, 2, 3], "{}", console());
    assert_eq!(trained_rounds(&log(&logs, "bank-1")), [1, 2, 3]);

    // What the sites share: artifacts, manifests, evaluations; never their
    // data or their private state.
    let objects = server.keys("heterotune", "runs/");
    assert!(objects.len() > 20, "{objects:?}");
    for key in &objects {
        assert!(
            !key.ends_with(".jsonl") && !key.ends_with(".csv") && !key.contains("colors"),
            "a data file in the bucket: {key}"
        );
        for client in ["wide-bert", "tiny-llama"] {
            assert!(
                !key.contains(&format!("private/{client}")),
                "a site's private state in the bucket: {key}"
            );
        }
    }
    // Each site's files stay in its own work folder.
    for client in ["wide-bert", "tiny-llama"] {
        let state = root
            .join("sites")
            .join(client)
            .join("work/runs/default")
            .read_dir()
            .expect("the site's run folder")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("clients").join(client).join("state"))
            .find(|p| p.is_dir());
        assert!(
            state.is_some(),
            "{client} keeps no private state at its site"
        );
    }
}

/// The test server answers every key, as a bucket whose site keys are not
/// confined would: an agent that checks refuses to train once it sees
/// another client's upload it can read, names the key and the fix, and
/// exits with an error; it commits nothing for the round it refused.
#[test]
fn an_agent_whose_key_reads_other_clients_uploads_refuses_to_train() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let server = S3Server::start(&root.join("s3"), "heterotune");
    let spec = fixtures::write_federation(root, "open", 2, &server.storage_yaml("heterotune"));
    let spec = with_sites(&spec, &[("wide-bert", "clinic-b")]);
    let spec_file = root.join("federation.yaml");
    std::fs::write(&spec_file, &spec).expect("spec");
    let logs = root.join("logs");
    let mut coordinator = spawn(runner(root, &spec_file), &logs, "coordinator");
    let mut clinic = spawn(strict_site(root, &spec_file, "wide-bert"), &logs, "clinic");
    let console = || {
        ["coordinator", "clinic"]
            .map(|n| format!("--- {n}:\n{}", log(&logs, n)))
            .join("\n")
    };
    let refused = !wait(&mut clinic, Duration::from_secs(300), console);
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    assert!(refused, "the agent finished:\n{}", console());
    let clinic_log = log(&logs, "clinic");
    assert!(
        clinic_log.contains("can read another client's upload")
            && clinic_log.contains("--allow-unconfined-credentials")
            && clinic_log.contains("/clients/"),
        "{}",
        console()
    );
    // It refused before training the round it looked at.
    let started = training_started(&clinic_log);
    let committed: Vec<u32> = (1..=2)
        .filter(|r| {
            server
                .keys("heterotune", "runs/default/open-")
                .iter()
                .any(|k| k.ends_with(&format!("round-{r:04}/clients/wide-bert/manifest.json")))
        })
        .collect();
    assert_eq!(committed, started, "{}", console());
    assert!(started.len() < 2, "{}", console());
}

/// A site that never appears: below quorum the round fails at its
/// deadline; with a quorum of local clients the round goes on without it,
/// and a site that joins late takes part from the open round on. An agent
/// that starts after a failure stops at once, and one whose spec differs
/// from the run's refuses to train.
#[test]
fn a_site_that_never_appears_ends_the_round_at_its_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let store = root.join("store");
    let storage = format!("  storage: {{ uri: \"file://{}\" }}", store.display());
    let base = fixtures::write_federation(root, "absent", 1, &storage)
        .replace("roundDeadlineSeconds: 600", "roundDeadlineSeconds: 10")
        .replace(
            "  clients:\n",
            "  evaluation: { afterLastRound: false }\n  clients:\n",
        );
    let base = with_sites(&base, &[("tiny-llama", "bank-c")]);
    let logs = root.join("logs");

    // minClients 3: the site is needed and never comes.
    let spec_file = root.join("quorum.yaml");
    std::fs::write(&spec_file, base.replace("minClients: 2", "minClients: 3")).expect("spec");
    let mut run = spawn(runner(root, &spec_file), &logs, "quorum");
    assert!(!wait(&mut run, Duration::from_secs(300), || log(
        &logs, "quorum"
    )));
    let text = log(&logs, "quorum");
    assert!(text.contains("DeadlineExceeded"), "{text}");
    assert!(text.contains("waiting for its site bank-c"), "{text}");
    let mut late = spawn(site(root, &spec_file, "tiny-llama"), &logs, "late");
    assert!(!wait(&mut late, Duration::from_secs(120), || log(
        &logs, "late"
    )));
    let text = log(&logs, "late");
    assert!(
        text.contains("the coordinator's run ended: Failed (DeadlineExceeded)"),
        "{text}"
    );

    // A spec that is not the run's: refused, naming what differs.
    let changed = root.join("changed.yaml");
    std::fs::write(
        &changed,
        base.replace("minClients: 2", "minClients: 3")
            .replace("localSteps: 20", "localSteps: 5"),
    )
    .expect("spec");
    let mut other = spawn(site(root, &changed, "tiny-llama"), &logs, "changed");
    assert!(!wait(&mut other, Duration::from_secs(120), || log(
        &logs, "changed"
    )));
    let text = log(&logs, "changed");
    assert!(
        text.contains("was started with a spec other than") && text.contains("spec.training"),
        "{text}"
    );

    // minClients 2: the two local clients are a quorum; round 1 waits for
    // the site until its deadline and is aggregated without it. The site
    // joins late, after round 1: it takes part in round 2 only.
    let spec_file = root.join("enough.yaml");
    let spec = base
        .replace("name: absent", "name: enough")
        .replace("rounds: 1", "rounds: 2")
        .replace("roundDeadlineSeconds: 10", "roundDeadlineSeconds: 20");
    std::fs::write(&spec_file, spec).expect("spec");
    let started = Instant::now();
    let mut run = spawn(runner(root, &spec_file), &logs, "enough");
    let round_one = || {
        std::fs::read_dir(store.join("default"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("enough-")
                    && e.path().join("round-0001/global/manifest.json").is_file()
            })
    };
    while !round_one() {
        assert!(
            run.try_wait().expect("wait").is_none() && started.elapsed() < Duration::from_secs(300),
            "round 1 did not complete:\n{}",
            log(&logs, "enough")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        started.elapsed() >= Duration::from_secs(20),
        "round 1 did not wait for the site until its deadline"
    );
    let mut joiner = spawn(site(root, &spec_file, "tiny-llama"), &logs, "joiner");
    let console = || format!("{}\n{}", log(&logs, "enough"), log(&logs, "joiner"));
    assert!(
        wait(&mut run, Duration::from_secs(300), console),
        "{}",
        console()
    );
    assert!(
        wait(&mut joiner, Duration::from_secs(120), console),
        "{}",
        console()
    );
    assert_eq!(trained_rounds(&log(&logs, "joiner")), [2], "{}", console());
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("coordinator/report/report.json")).expect("report.json"),
    )
    .expect("report parses");
    let participants = |r: usize| report["rounds"][r]["participants"].clone();
    assert_eq!(
        participants(0),
        serde_json::json!(["small-bert", "wide-bert"]),
        "{report}"
    );
    assert_eq!(
        participants(1),
        serde_json::json!(["small-bert", "wide-bert", "tiny-llama"]),
        "{report}"
    );
}
