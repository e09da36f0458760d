//! The `heterotune` CLI end to end: exit codes, sources and messages of
//! `validate`, help and completions; the trainer binary starting as built.

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
    assert_eq!(code, 1, "invalid input: {stderr}");
    assert!(stderr.contains("cannot read no/such/file.yaml"), "{stderr}");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, "spec: [1, 2\nkind: x").expect("write");
    let (code, _, stderr) = heterotune(&["validate", "-f", &file.to_string_lossy()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("invalid YAML at line"), "{stderr}");
}

/// kubectl habits: `-f` repeated, a folder, `-` for stdin, multi-document
/// YAML with each document named in errors, `-o json`; exit codes 0 / 1 /
/// 2 (usage); `job` hidden; completions.
#[test]
fn validate_reads_files_folders_stdin_and_documents_like_kubectl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good =
        std::fs::read_to_string(repo_root().join("examples/quickstart.yaml")).expect("quickstart");
    let bad = good.replace("rounds: 6", "rounds: 0");
    assert_ne!(good, bad);
    std::fs::write(dir.path().join("two.yaml"), format!("{good}\n---\n{bad}")).expect("write");
    let folder = dir.path().join("specs");
    std::fs::create_dir(&folder).expect("folder");
    std::fs::write(folder.join("a.yaml"), &good).expect("write");
    std::fs::write(folder.join("b.yml"), &good).expect("write");
    let two = dir.path().join("two.yaml").to_string_lossy().into_owned();
    let (code, stdout, stderr) = heterotune(&["validate", "-f", &two]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("(document 1, line 1): valid"), "{stdout}");
    assert!(
        stderr.contains("(document 2, line") && stderr.contains("spec.rounds"),
        "{stderr}"
    );
    let folder_arg = folder.to_string_lossy().into_owned();
    let (code, stdout, _) = heterotune(&[
        "validate",
        "-f",
        &folder_arg,
        "-f",
        "examples/quickstart.yaml",
    ]);
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(
        stdout.matches(": valid FederatedTune").count(),
        3,
        "{stdout}"
    );
    // One -f with several files, as a shell glob gives them.
    let (a, b) = (folder.join("a.yaml"), folder.join("b.yml"));
    let (code, stdout, stderr) = heterotune(&[
        "validate",
        "-f",
        &a.to_string_lossy(),
        &b.to_string_lossy(),
        "examples/quickstart.yaml",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(
        stdout.matches(": valid FederatedTune").count(),
        3,
        "{stdout}"
    );
    // stdin, JSON output
    let out = Command::new(binary("heterotune"))
        .args(["validate", "-o", "json", "-f", "-"])
        .current_dir(repo_root())
        .stdin(std::fs::File::open(dir.path().join("two.yaml")).expect("open"))
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let verdicts: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(verdicts[0]["valid"], true, "{verdicts}");
    assert_eq!(verdicts[0]["name"], "quickstart", "{verdicts}");
    assert_eq!(verdicts[1]["valid"], false, "{verdicts}");
    assert!(verdicts[1]["problems"][0]
        .as_str()
        .unwrap_or_default()
        .contains("spec.rounds"));
    // usage errors are 2; `job` is not in the help; completions print
    let (code, _, _) = heterotune(&["validate", "--no-such-flag"]);
    assert_eq!(code, 2);
    let (_, help, _) = heterotune(&["--help"]);
    assert!(
        help.contains("validate") && !help.contains("\n  job "),
        "{help}"
    );
    assert!(help.contains("Exit codes"), "{help}");
    let (code, script, _) = heterotune(&["completions", "bash"]);
    assert_eq!(code, 0);
    assert!(
        script.contains("heterotune") && script.contains("complete"),
        "{script}"
    );
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

/// `plan` is a dry run: in a fresh folder it creates nothing and says why
/// the store was not read; an S3 store without credentials is not probed.
#[test]
fn plan_creates_nothing_and_says_why_the_store_was_not_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = std::fs::read_to_string(repo_root().join("examples/quickstart.yaml")).expect("spec");
    let s3 = spec.replace("file://heterotune-runs", "s3://bucket/runs");
    assert_ne!(spec, s3);
    std::fs::write(dir.path().join("local.yaml"), &spec).expect("write");
    std::fs::write(dir.path().join("s3.yaml"), &s3).expect("write");
    for (file, why) in [
        ("local.yaml", "does not exist yet"),
        ("s3.yaml", "no AWS_ACCESS_KEY_ID"),
    ] {
        let out = Command::new(binary("heterotune"))
            .args(["plan", "-f", file])
            .current_dir(dir.path())
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("HETEROTUNE_CACHE", repo_root().join("no-such-cache"))
            .output()
            .expect("plan runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("store not checked") && stdout.contains(why),
            "{file}: {stdout}"
        );
    }
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["local.yaml", "s3.yaml"], "plan wrote something");
}

/// `heterotune` with `args` in `dir`, no S3 credentials; (exit code, stdout).
fn heterotune_in(dir: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(binary("heterotune"))
        .args(args)
        .current_dir(dir)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .expect("heterotune runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

/// `plan -f examples/cluster-s3-gpu.yaml ARGS -o json` from the repository,
/// which must succeed: its one JSON document.
fn plan_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["plan", "-f", "examples/cluster-s3-gpu.yaml", "-o", "json"];
    all.extend_from_slice(args);
    let (code, out) = heterotune_in(&repo_root(), &all);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(&out).expect("one JSON document")
}

/// `plan -o json|yaml` against a cluster's sizing: the S3 example's LLaMA
/// client plans on the L4 profile with host and GPU memory apart; without
/// the cluster's profiles it plans on CPU; the text has layer ranges, the
/// two memory columns and the units legend.
#[test]
fn plan_prints_json_yaml_and_plans_against_a_clusters_gpu_profiles() {
    let root = repo_root();
    let spec = "examples/cluster-s3-gpu.yaml";
    let config = "examples/sizing/l4-cluster.yaml";
    let plan = plan_json(&["--operator-config", config]);
    let a = &plan["clients"][0];
    assert_eq!(a["name"], "hospital-a", "{plan}");
    assert_eq!(a["placement"], "gpu", "{plan}");
    assert_eq!(a["gpuProfile"], "l4-24gb", "{plan}");
    let gpu = a["gpuMemoryBytes"].as_u64().expect("GPU memory");
    let host = a["hostMemoryBytes"].as_u64().expect("host memory");
    assert!(gpu > host && host > 0, "{a}");
    assert_eq!(a["adaptedLayers"], serde_json::json!([9, 19, 29]), "{a}");
    assert_eq!(plan["clients"][1]["placement"], "cpu", "{plan}");
    assert!(plan["clients"][1]["gpuMemoryBytes"].is_null(), "{plan}");
    assert_eq!(plan["rounds"], 20);
    assert!(plan["storeNotChecked"]
        .as_str()
        .unwrap_or_default()
        .contains("AWS_ACCESS_KEY_ID"));
    // The default sizing has no GPU profile; --gpu-profiles replaces the
    // configuration's list.
    let (_, out) = heterotune_in(&root, &["plan", "-f", spec, "-o", "yaml"]);
    let plan: serde_json::Value = serde_saphyr::from_str(&out).expect("one YAML document");
    assert_eq!(plan["clients"][0]["placement"], "cpu", "{out}");
    let dir = tempfile::tempdir().expect("tempdir");
    let profiles = dir.path().join("profiles.yaml");
    std::fs::write(&profiles, "- { name: a100-80gb, memory: 80Gi }\n").expect("write");
    let profiles = profiles.to_string_lossy().into_owned();
    let plan = plan_json(&["--operator-config", config, "--gpu-profiles", &profiles]);
    assert_eq!(plan["clients"][0]["gpuProfile"], "a100-80gb", "{plan}");
    // A profile list with a typo: exit 1, the field named.
    std::fs::write(dir.path().join("bad.yaml"), "- { name: x, memroy: 8Gi }\n").expect("write");
    let bad = dir.path().join("bad.yaml").to_string_lossy().into_owned();
    let (code, out) = heterotune_in(&root, &["plan", "-f", spec, "--gpu-profiles", &bad]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("memroy"), "{out}");
    // The table.
    let (_, text) = heterotune_in(&root, &["plan", "-f", spec, "--operator-config", config]);
    for want in [
        "host mem",
        "GPU mem",
        "GPU profile l4-24gb",
        " 0-2 ",
        "units: ",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    assert!(!text.contains("[0, 1, 2]"), "{text}");
}

/// A report an earlier `heterotune run` left in the store, one round done.
fn write_report(dir: &std::path::Path, run_folder: &str) {
    use heterotune_operator::runner::report::{Report, RoundRecord};
    let report = Report {
        name: "quickstart".into(),
        status: "Running".into(),
        total_seconds: 42.0,
        rounds: vec![RoundRecord {
            round: 1,
            duration_seconds: 40.5,
            aggregation_seconds: 1.0,
            participants: vec!["edge-a".into(), "edge-b".into()],
            excluded: Vec::new(),
            clients: Vec::new(),
            accuracy: 0.75,
            macro_f1: 0.5,
            accuracy_by_family: Default::default(),
            global_accuracy: None,
            global_macro_f1: None,
            global_accuracy_by_family: Default::default(),
            bytes_uploaded: 1000,
            bytes_downloaded: 0,
            aggregation: serde_json::Value::Null,
        }],
        ..Default::default()
    };
    let folder = dir.join("heterotune-runs").join(run_folder).join("report");
    std::fs::create_dir_all(&folder).expect("report folder");
    std::fs::write(
        folder.join("report.json"),
        serde_json::to_vec(&report).expect("json"),
    )
    .expect("write");
}

/// `status -o json|yaml|table`: the store's progress and the report's rounds.
#[test]
fn status_reads_the_store_and_the_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        repo_root().join("examples/quickstart.yaml"),
        dir.path().join("q.yaml"),
    )
    .expect("copy");
    let (code, out) = heterotune_in(dir.path(), &["status", "-f", "q.yaml", "-o", "json"]);
    assert_eq!(code, 0, "{out}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert!(status["storeNotChecked"]
        .as_str()
        .unwrap_or_default()
        .contains("does not exist yet"));
    assert_eq!(status["history"], serde_json::json!([]));
    let run_folder = status["runFolder"]
        .as_str()
        .expect("run folder")
        .to_string();
    write_report(dir.path(), &run_folder);
    let (code, out) = heterotune_in(dir.path(), &["status", "-f", "q.yaml", "-o", "yaml"]);
    assert_eq!(code, 0, "{out}");
    let status: serde_json::Value = serde_saphyr::from_str(&out).expect("YAML");
    assert_eq!(status["completedRounds"], 0, "{out}");
    assert_eq!(status["state"], "Running", "{out}");
    assert_eq!(status["history"][0]["round"], 1, "{out}");
    assert_eq!(status["history"][0]["accuracy"], 0.75, "{out}");
    assert_eq!(status["history"][0]["durationSeconds"], 40.5, "{out}");
    let (_, text) = heterotune_in(dir.path(), &["status", "-f", "q.yaml"]);
    assert!(
        text.contains("0 of 6 rounds complete; Running, 42 s in all"),
        "{text}"
    );
    assert!(text.contains("    1       40.5     0.750"), "{text}");
    let (code, out) = heterotune_in(dir.path(), &["validate", "-f", "q.yaml", "-o", "yaml"]);
    assert_eq!(code, 0, "{out}");
    let verdicts: serde_json::Value = serde_saphyr::from_str(&out).expect("YAML");
    assert_eq!(verdicts[0]["valid"], true, "{out}");
    assert_eq!(verdicts[0]["name"], "quickstart", "{out}");
}

/// `heterotune crd | head -n 1`: a reader that stops early (its pipe
/// closed before the 73 KB CRD is written, more than a pipe holds) ends
/// the command quietly with 0, not with a panic.
#[test]
fn output_into_a_closed_pipe_is_not_a_panic() {
    use std::io::Read as _;
    for args in [["crd"].as_slice(), ["completions", "bash"].as_slice()] {
        let mut child = Command::new(binary("heterotune"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("heterotune starts");
        let mut first = [0u8; 16];
        child
            .stdout
            .take()
            .expect("stdout")
            .read_exact(&mut first)
            .expect("the first bytes");
        // The pipe's reading end is dropped here.
        let out = child.wait_with_output().expect("heterotune ends");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("panicked"),
            "{args:?}: {:?} {stderr}",
            out.status
        );
    }
}
