//! No secret leaves through a spec or a run (issue 15, item 1).
//!
//! A federation runs on the real S3 server with canary credentials in the
//! environment; afterwards every byte the run produced (its console, every
//! file under its work and report folders, every object in the bucket) is
//! searched for the canaries. Specs that aim a dataset or a model at the
//! process environment, a system path or out of the cache are refused by
//! `validate --check-files` and by `run`, naming the field, without echoing
//! the environment.

use std::path::Path;
use std::process::{Command, Output};

use heterotune_tests::s3::S3Server;
use heterotune_tests::{binary, fixtures};

const ACCESS_KEY: &str = "HTCANARYACCESS7F3A";
const SECRET_KEY: &str = "htcanary-secret-9c41d2e8";

fn heterotune(root: &Path) -> Command {
    let mut cmd = Command::new(binary("heterotune"));
    cmd.current_dir(root)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    cmd
}

fn run(root: &Path, spec: &Path) -> Output {
    heterotune(root)
        .arg("run")
        .arg("-f")
        .arg(spec)
        .arg("--trainer")
        .arg(binary("heterotune-trainer"))
        .arg("--work-dir")
        .arg(root.join("work"))
        .arg("--report-dir")
        .arg(root.join("report"))
        .args(["--parallel", "2", "--threads", "1"])
        .output()
        .expect("heterotune runs")
}

fn console(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Fails naming `what` when `bytes` holds either canary.
fn assert_clean(what: &str, bytes: &[u8]) {
    for canary in [ACCESS_KEY, SECRET_KEY] {
        assert!(
            !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
            "a credential ({canary}) leaked into {what}"
        );
    }
}

/// Every file under `dir`, recursively, searched for the canaries; returns
/// how many were read.
fn assert_tree_clean(dir: &Path) -> usize {
    let mut files = 0;
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files += assert_tree_clean(&path);
        } else if path.is_file() {
            let bytes = std::fs::read(&path).expect("read file");
            assert_clean(&path.display().to_string(), &bytes);
            files += 1;
        }
    }
    files
}

#[test]
fn no_credential_reaches_the_console_the_files_or_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let server = S3Server::start(&root.join("s3"), "heterotune");
    let storage = server.storage_yaml("heterotune");
    let spec = fixtures::write_federation(root, "canary", 1, &storage);
    let spec_file = root.join("spec.yaml");
    std::fs::write(&spec_file, spec).expect("spec");
    let out = run(root, &spec_file);
    assert!(out.status.success(), "{}", console(&out));
    assert_clean("the console", console(&out).as_bytes());
    let files = assert_tree_clean(&root.join("work")) + assert_tree_clean(&root.join("report"));
    assert!(
        files > 10,
        "only {files} files written: the run did not run"
    );
    let objects = server.keys("heterotune", "runs/");
    assert!(
        objects.iter().any(|k| k.ends_with("report/report.json")),
        "{objects:?}"
    );
    for key in &objects {
        let bytes = server.get("heterotune", key).expect("listed object");
        assert_clean(&format!("s3://heterotune/{key}"), &bytes);
    }
}

/// The trainer processes start without the store's credentials: a stand-in
/// trainer writes the environment it was given and fails.
#[test]
fn trainers_start_without_the_stores_credentials() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let spec = fixtures::write_federation(root, "env", 1, "  storage: { uri: \"file://store\" }");
    let spec_file = root.join("spec.yaml");
    std::fs::write(&spec_file, spec).expect("spec");
    let seen = root.join("trainer-env.txt");
    let fake = root.join("fake-trainer");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\nenv >> '{}'\nexit 3\n", seen.display()),
    )
    .expect("fake trainer");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = heterotune(root)
        .args(["run", "-f"])
        .arg(&spec_file)
        .arg("--trainer")
        .arg(&fake)
        .arg("--work-dir")
        .arg(root.join("work"))
        .output()
        .expect("heterotune runs");
    assert!(!out.status.success(), "{}", console(&out));
    let env = std::fs::read_to_string(&seen).expect("the stand-in trainer ran");
    assert!(env.contains("PATH="), "{env}");
    assert_clean("a trainer's environment", env.as_bytes());
}

#[test]
fn specs_aimed_at_the_environment_are_refused_without_echoing_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let spec =
        fixtures::write_federation(root, "attack", 1, "  storage: { uri: \"file://store\" }");
    let dataset = root.join("data/colors.jsonl").display().to_string();
    let model = root.join("models/tiny-bert-a").display().to_string();
    let attacks = [
        ("task.dataset", dataset.as_str(), "/proc/self/environ"),
        (
            "task.dataset",
            dataset.as_str(),
            "file:///proc/self/environ",
        ),
        (
            "task.dataset",
            dataset.as_str(),
            "cache://../../../proc/self/environ",
        ),
        ("task.dataset", dataset.as_str(), "/sys/kernel/notes"),
        ("model", model.as_str(), "/proc/self/cwd"),
        ("model", model.as_str(), "cache://models/../../../../etc"),
    ];
    for (field, good, bad) in attacks {
        let text = spec.replacen(&format!("\"{good}\""), &format!("\"{bad}\""), 1);
        assert_ne!(text, spec, "{bad}: the spec did not change");
        let file = root.join("attack.yaml");
        std::fs::write(&file, &text).expect("spec");
        let checked = heterotune(root)
            .args(["validate", "--check-files", "-f"])
            .arg(&file)
            .output()
            .expect("validate runs");
        let ran = run(root, &file);
        for (what, out) in [("validate --check-files", &checked), ("run", &ran)] {
            let said = console(out);
            assert!(!out.status.success(), "{what} accepted {bad}:\n{said}");
            assert!(
                said.contains(field),
                "{what} on {bad} names no {field}:\n{said}"
            );
            assert_clean(&format!("{what} on {bad}"), said.as_bytes());
            // Nothing from the environment is echoed (a variable every
            // process here has).
            assert!(
                !said.contains("PATH="),
                "{what} on {bad} echoed the environment:\n{said}"
            );
        }
    }
}
