//! The fault-injection matrix of the local runner: `heterotune run` on the
//! tiny fixtures (3 clients, 3 rounds, a local folder store) is killed, or
//! its trainer is, at each step of the round protocol, then run again; every
//! case must end with the final global model bitwise equal to an
//! uninterrupted run's, no committed work redone, no client counted twice,
//! and a report that tells the truth.
//!
//! The faults come from a stand-in trainer (a shell script given as
//! `--trainer`) that logs every call and, on the one named by `FAULT`,
//! SIGKILLs the runner (its parent) before the real trainer runs, after it
//! has written its output (the runner never uploads it), or SIGKILLs itself
//! (a trainer that dies: the runner retries it). A SIGKILLed runner's
//! trainers die with it (`PR_SET_PDEATHSIG`), as a pod's do.
//!
//! A second test lets a deadline pass while a client's trainer hangs: the
//! round goes on without it, and its process does not outlive the cut-off.
//! A third stops the S3 server just as round 1 completes and starts it
//! again on the same endpoint seconds later: the run rides it out. The
//! matrix ends with the folder store's disk filling mid-round: the run
//! stops with an error that says so, and once space is freed it resumes to
//! the same model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use heterotune_crds::layout::RunLayout;
use heterotune_tests::local_run::{built, find, report, run_command};
use heterotune_tests::s3::S3Server;
use heterotune_tests::stand_in::{make_executable, WRAPPER};
use heterotune_tests::{fixtures, output_text};

const ROUNDS: u32 = 3;
const CLIENTS: [&str; 3] = ["small-bert", "wide-bert", "tiny-llama"];

/// One case of the matrix: where the fault strikes and whether the runner
/// dies with it (and must be run again).
struct Case {
    name: &'static str,
    fault: &'static str,
    when: &'static str,
    runner_dies: bool,
}

const CASES: [Case; 6] = [
    Case {
        name: "runner killed as a client starts training",
        fault: "train wide-bert 2",
        when: "before",
        runner_dies: true,
    },
    Case {
        name: "runner killed after a client trained, before its upload",
        fault: "train tiny-llama 2",
        when: "after",
        runner_dies: true,
    },
    Case {
        name: "runner killed as the aggregation starts",
        fault: "aggregate - 2",
        when: "before",
        runner_dies: true,
    },
    Case {
        name: "runner killed after the aggregation, before the global's commit",
        fault: "aggregate - 2",
        when: "after",
        runner_dies: true,
    },
    Case {
        name: "runner killed during the evaluation after the last global",
        fault: "eval wide-bert -",
        when: "after",
        runner_dies: true,
    },
    Case {
        name: "a trainer killed mid-round (the runner retries it)",
        fault: "train small-bert 2",
        when: "self",
        runner_dies: false,
    },
];

/// What a run left: its folder, store and trainer-call log.
struct Run {
    root: PathBuf,
}

impl Run {
    /// A fresh run folder under `base` with the shared fixtures' spec.
    fn new(base: &Path, name: &str, spec: &str) -> Run {
        let root = base.join(name);
        std::fs::create_dir_all(&root).expect("run folder");
        let store = root.join("store");
        let spec = spec.replace("STORE", &store.display().to_string());
        std::fs::write(root.join("spec.yaml"), spec).expect("spec");
        let wrapper = root.join("trainer.sh");
        std::fs::write(&wrapper, WRAPPER).expect("wrapper");
        make_executable(&wrapper);
        Run { root }
    }

    fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    /// `heterotune run` through the stand-in trainer, with `fault` armed.
    fn command(&self, fault: &str, when: &str) -> Command {
        let mut cmd = run_command(
            &self.root,
            &self.root.join("spec.yaml"),
            &self.root.join("trainer.sh"),
        );
        cmd.env("REAL", built("heterotune-trainer"))
            .env("LOG", self.root.join("calls.log"))
            .env("FIRED", self.root.join("fired"))
            .env("FAULT", fault)
            .env("WHEN", when);
        cmd
    }

    /// Runs with `fault` armed and the environment variable `var` set to
    /// `value`, and checks that the fault fired: the output and its text.
    fn fire(
        &self,
        fault: &str,
        when: &str,
        (var, value): (&str, &std::ffi::OsStr),
    ) -> (std::process::Output, String) {
        let out = self
            .command(fault, when)
            .env(var, value)
            .output()
            .expect("heterotune runs");
        let text = output_text(&out);
        assert!(
            self.root.join("fired").exists(),
            "{fault} ({when}): the fault never fired\n{text}"
        );
        (out, text)
    }

    /// Every committed manifest and its bytes.
    fn manifests(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        find(&self.store(), "manifest.json")
            .into_iter()
            .map(|p| {
                let b = std::fs::read(&p).expect("manifest");
                (p, b)
            })
            .collect()
    }

    /// The trainer calls logged, as `(subcommand, client, round)` counts.
    fn calls(&self) -> BTreeMap<String, usize> {
        let log = std::fs::read_to_string(self.root.join("calls.log")).unwrap_or_default();
        let mut n = BTreeMap::new();
        for line in log.lines() {
            *n.entry(line.to_string()).or_default() += 1;
        }
        n
    }

    /// The sha256 of the last round's global data, from its manifest.
    fn final_global(&self) -> String {
        let manifest = self.global_manifest(ROUNDS);
        manifest["artifact"]["sha256"]
            .as_str()
            .expect("artifact.sha256")
            .to_string()
    }

    fn global_manifest(&self, round: u32) -> serde_json::Value {
        let path = find(
            &self.store(),
            &format!("round-{round:04}/global/manifest.json"),
        );
        let path = path.first().expect("the round's global manifest");
        serde_json::from_slice(&std::fs::read(path).expect("read")).expect("JSON")
    }
}

/// The client artifacts of `round` as `client -> manifest path`.
fn client_commits(manifests: &BTreeMap<PathBuf, Vec<u8>>, round: u32) -> BTreeMap<String, PathBuf> {
    let dir = format!("round-{round:04}/clients/");
    manifests
        .keys()
        .filter_map(|p| {
            let s = p.to_string_lossy();
            let rest = &s[s.find(&dir)? + dir.len()..];
            let client = rest.strip_suffix("/manifest.json")?;
            Some((client.to_string(), p.clone()))
        })
        .collect()
}

/// The clients a global manifest counted (`stats.participants`), sorted,
/// a client counted twice listed twice.
fn participants(global: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = global["stats"]["participants"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v["client"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    names.sort_unstable();
    names
}

/// Every client of the fixtures, sorted as [`participants`] lists them.
fn all_clients() -> Vec<String> {
    let mut all: Vec<String> = CLIENTS.iter().map(|c| c.to_string()).collect();
    all.sort_unstable();
    all
}

/// The truth a finished run must tell, whatever happened on the way.
fn check_finished(run: &Run, case: &str) {
    let r = report(&run.root);
    assert_eq!(r["status"], "Succeeded", "{case}: {r}");
    let rounds = r["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), ROUNDS as usize, "{case}: {r}");
    for (i, round) in rounds.iter().enumerate() {
        let t = round["durationSeconds"].as_f64().unwrap_or(0.0);
        assert!(t > 0.0, "{case}: round {} has no time: {r}", i + 1);
    }
    assert_eq!(
        r["finalEvaluation"].as_array().map(Vec::len),
        Some(CLIENTS.len()),
        "{case}: {r}"
    );
    // No client counted twice: every round aggregated each client once.
    for round in 1..=ROUNDS {
        let m = run.global_manifest(round);
        let counted = &m["stats"]["participants"];
        let names = participants(&m);
        let mut unique = names.clone();
        unique.dedup();
        assert_eq!(
            (names.len(), unique.len()),
            (CLIENTS.len(), CLIENTS.len()),
            "{case}: round {round} participants {counted}"
        );
    }
}

/// Committed work is never redone: what was committed at the fault
/// (`committed`) is byte-identical at the end, and its client trained only
/// once.
fn check_committed_kept(run: &Run, committed: &BTreeMap<PathBuf, Vec<u8>>, case: &str) {
    let after = run.manifests();
    for (path, bytes) in committed {
        assert_eq!(
            after.get(path),
            Some(bytes),
            "{case}: {} changed after the fault",
            path.display()
        );
    }
    let calls = run.calls();
    for round in 1..=ROUNDS {
        for client in client_commits(committed, round).keys() {
            let call = format!("train {client} {round}");
            assert_eq!(
                calls.get(&call),
                Some(&1),
                "{case}: {call} was committed at the fault but trained again: {calls:?}"
            );
        }
    }
}

#[test]
fn every_fault_ends_in_the_uninterrupted_runs_global_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path();
    // One set of fixtures for every case: the runs differ only in their
    // store, work and report folders.
    let spec = fixtures::write_federation(
        &base.join("fixtures"),
        "faults",
        ROUNDS,
        "  storage: { uri: \"file://STORE\" }",
    );

    let clean = Run::new(base, "uninterrupted", &spec);
    let out = clean.command("", "").output().expect("heterotune runs");
    assert!(out.status.success(), "{}", output_text(&out));
    check_finished(&clean, "uninterrupted");
    let want = clean.final_global();
    for (call, n) in clean.calls() {
        assert!(
            n == 1 || call.starts_with("--version"),
            "uninterrupted: {call} called {n} times"
        );
    }

    for (i, case) in CASES.iter().enumerate() {
        let run = Run::new(base, &format!("case-{i}"), &spec);
        let first = run
            .command(case.fault, case.when)
            .output()
            .expect("heterotune runs");
        assert!(
            run.root.join("fired").exists(),
            "{}: the fault never fired; calls {:?}\n{}",
            case.name,
            run.calls(),
            output_text(&first)
        );
        // With the runner dead, what the store holds now is what was
        // committed when the fault struck.
        let committed_at_fault = if case.runner_dies {
            run.manifests()
        } else {
            BTreeMap::new()
        };
        if case.runner_dies {
            assert!(
                !first.status.success(),
                "{}: the runner survived its SIGKILL\n{}",
                case.name,
                output_text(&first)
            );
            let again = run.command("", "").output().expect("heterotune resumes");
            assert!(
                again.status.success(),
                "{}: the resumed run failed\n{}",
                case.name,
                output_text(&again)
            );
        } else {
            assert!(
                first.status.success(),
                "{}: {}",
                case.name,
                output_text(&first)
            );
        }
        check_finished(&run, case.name);
        assert_eq!(
            run.final_global(),
            want,
            "{}: the final global differs from the uninterrupted run's",
            case.name
        );
        check_committed_kept(&run, &committed_at_fault, case.name);
        let after = run.manifests();
        let calls = run.calls();
        for round in 1..=ROUNDS {
            assert_eq!(
                client_commits(&after, round).len(),
                CLIENTS.len(),
                "{}: round {round}",
                case.name
            );
        }
        // The interrupted call ran again (twice in all); with the runner
        // alive, no other client trained twice.
        assert_eq!(
            calls.get(case.fault),
            Some(&2),
            "{}: calls {calls:?}",
            case.name
        );
        if !case.runner_dies {
            for (call, n) in &calls {
                assert!(
                    *n == 1 || call == case.fault || !call.starts_with("train "),
                    "{}: {call} ran {n} times",
                    case.name
                );
            }
        }
    }
    a_full_store_disk_stops_the_run_and_freeing_it_resumes(base, &spec, &want);
}

/// A client whose trainer hangs in round 2 is cut off at the round's
/// deadline: the round is aggregated with the two that committed (the
/// quorum), the hung process is stopped (it does not outlive the cut-off or
/// the run), and the client trains again in round 3 from round 2's global.
#[test]
fn a_deadline_passing_while_a_client_runs_cuts_it_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path();
    let deadline = 40;
    let spec = fixtures::write_federation(
        &base.join("fixtures"),
        "deadline",
        ROUNDS,
        "  storage: { uri: \"file://STORE\" }",
    )
    .replace(
        "roundDeadlineSeconds: 600",
        &format!("roundDeadlineSeconds: {deadline}"),
    );
    let run = Run::new(base, "deadline", &spec);
    // A sleep no other process on the machine runs: found by its arguments.
    let pid = std::process::id();
    let hang = format!("{}.{}", 600 + pid % 97, pid % 1000);
    let started = std::time::Instant::now();
    let (out, text) = run.fire("train wide-bert 2", "hang", ("HANG", hang.as_ref()));
    assert!(out.status.success(), "{text}");
    assert!(
        started.elapsed().as_secs() >= deadline,
        "the round did not wait for its deadline"
    );
    assert!(
        text.contains("client wide-bert cut off at the deadline"),
        "{text}"
    );
    let sleeping = Command::new("pgrep")
        .args(["-f", &format!("sleep {hang}")])
        .output()
        .expect("pgrep");
    assert!(
        String::from_utf8_lossy(&sleeping.stdout).trim().is_empty(),
        "the hung trainer outlived its cut-off"
    );
    let counted = |round: u32| participants(&run.global_manifest(round));
    assert_eq!(counted(1), all_clients());
    assert_eq!(counted(2), ["small-bert", "tiny-llama"]);
    assert_eq!(counted(3), all_clients(), "the cut-off client trains again");
    // Its round-2 work was never committed.
    assert!(!client_commits(&run.manifests(), 2).contains_key("wide-bert"));
    let r = report(&run.root);
    assert_eq!(r["status"], "Succeeded", "{r}");
}

/// The global manifest of `round` of the run `name` under `prefix` in the
/// S3 `bucket`, as JSON.
fn s3_global(
    server: &S3Server,
    bucket: &str,
    prefix: &str,
    name: &str,
    round: u32,
) -> Option<serde_json::Value> {
    let uid = heterotune_operator::runner::local_uid("default", name);
    let key = RunLayout::new(prefix, "default", name, &uid).global_manifest(round);
    let bytes = server.get(bucket, &key)?;
    Some(serde_json::from_slice(&bytes).expect("a global manifest"))
}

/// The S3 store goes away as round 1 completes (SIGKILLed, as a crashed
/// server) and comes back on the same endpoint six seconds later, while
/// round 2's trainers start, run and commit: the runner's store calls retry
/// through the outage, and the run ends with the uninterrupted run's final
/// global model, each client counted once per round.
#[test]
fn an_s3_server_stopped_mid_round_and_restarted_changes_nothing() {
    const BUCKET: &str = "heterotune";
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path();
    let mut server = S3Server::start(&base.join("s3"), BUCKET);
    let spec = fixtures::write_federation(
        &base.join("fixtures"),
        "outage",
        ROUNDS,
        &server.storage_yaml(BUCKET),
    );
    let on = |prefix: &str| {
        spec.replace(
            &format!("s3://{BUCKET}/runs"),
            &format!("s3://{BUCKET}/{prefix}"),
        )
    };
    let command = |run: &Run| {
        let mut cmd = run.command("", "");
        cmd.env("AWS_ACCESS_KEY_ID", "heterotune-test")
            .env("AWS_SECRET_ACCESS_KEY", "heterotune-test-secret");
        cmd
    };
    let sha = |g: &serde_json::Value| g["artifact"]["sha256"].as_str().map(String::from);

    let clean = Run::new(base, "s3-clean", &on("clean"));
    let out = command(&clean).output().expect("heterotune runs");
    assert!(out.status.success(), "{}", output_text(&out));
    let want =
        s3_global(&server, BUCKET, "clean", "outage", ROUNDS).expect("the clean run's global");

    let run = Run::new(base, "s3-outage", &on("outage"));
    let child = command(&run)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("heterotune starts");
    let start = std::time::Instant::now();
    while s3_global(&server, BUCKET, "outage", "outage", 1).is_none() {
        assert!(start.elapsed().as_secs() < 300, "round 1 never completed");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    server.stop();
    std::thread::sleep(std::time::Duration::from_secs(6));
    server.restart();
    let out = child.wait_with_output().expect("heterotune ends");
    let text = output_text(&out);
    assert!(
        out.status.success(),
        "the run did not ride out the outage:\n{text}"
    );
    let got = s3_global(&server, BUCKET, "outage", "outage", ROUNDS).expect("the final global");
    assert_eq!(
        sha(&got),
        sha(&want),
        "the final global differs from the uninterrupted run's"
    );
    for round in 1..=ROUNDS {
        let g =
            s3_global(&server, BUCKET, "outage", "outage", round).expect("every round's global");
        assert_eq!(
            participants(&g),
            all_clients(),
            "round {round}: each client exactly once"
        );
    }
    assert_eq!(report(&run.root)["status"], "Succeeded");
}

/// A tmpfs mounted for the length of a test (unmounted on drop).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a `mib` MiB tmpfs at `at`, or says why it cannot.
    fn mount(at: &Path, mib: u32) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(output_text(&out));
        }
        Ok(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The folder store's disk fills up while round 2's clients train (after
/// wide-bert's trainer, a file grows until the disk is full): the runner
/// stops with an error that names the store and the full disk, having
/// committed nothing half-written; once the space is freed, running it
/// again resumes and ends with the uninterrupted run's final global, each
/// client counted once per round and nothing committed before the fault
/// trained again. Needs a tmpfs (mount privileges): skipped, saying so,
/// where none can be mounted. A case of the matrix (its uninterrupted run
/// is `want`'s).
fn a_full_store_disk_stops_the_run_and_freeing_it_resumes(base: &Path, spec: &str, want: &str) {
    let run = Run::new(base, "disk-full", spec);
    let _disk = match Tmpfs::mount(&run.store(), 64) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipping the disk-full case: no tmpfs can be mounted here ({why})");
            return;
        }
    };
    let filler = run.store().join("filler");
    let (first, text) = run.fire("train wide-bert 2", "fill", ("FILL", filler.as_os_str()));
    assert!(
        !first.status.success(),
        "the run went on with a full disk\n{text}"
    );
    assert!(
        text.contains("No space left on device") && text.contains("storage file://"),
        "the error does not say the store's disk is full:\n{text}"
    );
    let committed_at_fault = run.manifests();
    for (path, bytes) in &committed_at_fault {
        serde_json::from_slice::<serde_json::Value>(bytes)
            .unwrap_or_else(|e| panic!("{} is half-written: {e}", path.display()));
    }
    std::fs::remove_file(&filler).expect("free the disk");
    let again = run.command("", "").output().expect("heterotune resumes");
    assert!(again.status.success(), "{}", output_text(&again));
    check_finished(&run, "disk full");
    assert_eq!(
        run.final_global(),
        want,
        "disk full: the final global differs"
    );
    check_committed_kept(&run, &committed_at_fault, "disk full");
}
