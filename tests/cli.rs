//! The `heterotune` CLI end to end: exit codes and messages of `validate`;
//! the trainer binary starting as built.

use std::process::Command;

use heterotune_tests::{binary, repo_root};

fn heterotune(args: &[&str]) -> (i32, String, String) {
    let bin = binary("heterotune");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build -p heterotune-operator` before these tests (scripts/test.sh does)",
        bin.display()
    );
    let out = Command::new(&bin)
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("heterotune runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn quickstart_validates() {
    let (code, stdout, stderr) = heterotune(&["validate", "-f", "examples/quickstart.yaml"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("valid FederatedTune \"quickstart\""),
        "{stdout}"
    );
}

#[test]
fn invalid_file_lists_every_field_and_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        r#"
apiVersion: heterotune.dev/v1alpha1
kind: FederatedTune
metadata: { name: bad }
spec:
  rounds: 0
  minClients: 5
  clients:
    - name: a
      model: { family: gpt, uri: "cache://models/x" }
  task:
    dataset: { uri: "cache://data/x.jsonl", colour: blue }
    labels: [neg, pos]
"#,
    )
    .expect("write");
    let path = file.to_string_lossy().into_owned();
    let (code, _, stderr) = heterotune(&["validate", "-f", &path]);
    assert_eq!(code, 1, "{stderr}");
    for field in [
        "spec.rounds:",
        "spec.clients[0].model.family:",
        "spec.task.dataset.colour:",
    ] {
        assert!(stderr.contains(field), "missing {field} in:\n{stderr}");
    }
}

#[test]
fn missing_file_and_bad_yaml_are_clear_errors() {
    let (code, _, stderr) = heterotune(&["validate", "-f", "no/such/file.yaml"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("cannot read no/such/file.yaml"), "{stderr}");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, "spec: [1, 2\nkind: x").expect("write");
    let (code, _, stderr) = heterotune(&["validate", "-f", &file.to_string_lossy()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("invalid YAML at line"), "{stderr}");
}

/// The trainer finds libtorch without `source scripts/env.sh` (its RUNPATH,
/// set at build time): it starts in an environment without LD_LIBRARY_PATH.
#[test]
fn the_trainer_starts_without_the_library_path() {
    let out = Command::new(binary("heterotune-trainer"))
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("heterotune-trainer starts");
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}
