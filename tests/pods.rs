//! The controller's Jobs run as their pods would, without a cluster
//! (`cluster_jobs.rs`): a Job's single container executed with its command
//! and environment (Secret references resolved to the test server's keys),
//! the spec ConfigMap's document as the mounted file and a fresh `/work`,
//! against a real S3 server that also holds the models and the dataset.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use heterotune_crds::manifest::ArtifactManifest;
use heterotune_operator::controller::jobs::{self, Run, SPEC_DIR, SPEC_FILE, WORK_DIR};

use crate::binary;
use crate::s3::S3Server;

pub const BUCKET: &str = "heterotune";
pub const ACCESS_KEY: &str = "heterotune-test";
pub const SECRET_KEY: &str = "heterotune-test-secret";
pub const UID: &str = "0f1e2d3c-4b5a-6978-8091-a2b3c4d5e6f7";

/// Runs a Job's single container as its pod would: the image's `heterotune`
/// (with `heterotune-trainer` beside it), the ConfigMap mounted at
/// `SPEC_DIR`, a fresh `WORK_DIR`, and the container's environment with the
/// Secret references resolved.
pub fn run_pod(job: &k8s_openapi::api::batch::v1::Job, spec_file: &Path, work: &Path) -> Output {
    run_pod_with(&binary("heterotune"), &[], job, spec_file, work)
}

/// [`run_pod`] with the image's `heterotune` at `heterotune` (a copy with a
/// stand-in trainer beside it) and `extra` variables added to the
/// container's environment.
pub fn run_pod_with(
    heterotune: &Path,
    extra: &[(&str, PathBuf)],
    job: &k8s_openapi::api::batch::v1::Job,
    spec_file: &Path,
    work: &Path,
) -> Output {
    let pod = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    let command = c.command.clone().expect("command");
    let mounted = format!("{SPEC_DIR}/{SPEC_FILE}");
    let args: Vec<String> = command[1..]
        .iter()
        .map(|a| {
            if *a == mounted {
                spec_file.display().to_string()
            } else if a == WORK_DIR {
                work.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    assert_eq!(command[0], "heterotune", "the image's entry binary");
    std::fs::create_dir_all(work).expect("work");
    let mut cmd = Command::new(heterotune);
    cmd.args(&args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    if let Some(v) = std::env::var_os("LD_LIBRARY_PATH") {
        cmd.env("LD_LIBRARY_PATH", v);
    }
    for e in c.env.clone().unwrap_or_default() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                let key = from
                    .secret_key_ref
                    .as_ref()
                    .expect("only Secret references");
                assert_eq!(key.name, "s3-credentials");
                match key.key.as_str() {
                    "AWS_ACCESS_KEY_ID" => ACCESS_KEY.to_string(),
                    "AWS_SECRET_ACCESS_KEY" => SECRET_KEY.to_string(),
                    other => panic!("unexpected secret key {other}"),
                }
            }
            (None, None) => String::new(),
        };
        let value = if e.name == "HOME" {
            work.display().to_string()
        } else {
            value
        };
        cmd.env(&e.name, value);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().expect("heterotune job runs")
}

pub fn manifest(server: &S3Server, key: &str) -> ArtifactManifest {
    let bytes = server
        .get(BUCKET, key)
        .unwrap_or_else(|| panic!("{key} is not in the bucket"));
    serde_json::from_slice(&bytes).expect("a manifest")
}

/// The tiny federation `name` of `rounds` rounds on a fresh S3 server, the
/// fixtures uploaded and named by `s3://` URIs (no pod sees the local
/// copies), with `extra` lines after its `storage:` block and `edit` applied
/// to its YAML: the server and the FederatedTune as the controller sees it
/// (namespace team-a, a fixed UID).
pub fn federation(
    root: &Path,
    name: &str,
    rounds: u32,
    extra: &str,
    edit: impl Fn(String) -> String,
) -> (S3Server, heterotune_crds::FederatedTune) {
    let server = S3Server::start(&root.join("s3"), BUCKET);
    let storage = format!(
        "  storage:\n    uri: \"s3://{BUCKET}/runs\"\n    endpoint: \"http://127.0.0.1:{}\"\n    region: us-east-1\n    forcePathStyle: true\n    credentialsSecret: {{ name: s3-credentials }}\n{extra}",
        server.port
    );
    let yaml = edit(server.put_federation(BUCKET, &root.join("fixtures"), name, rounds, &storage));
    let mut ft = heterotune_crds::validate::parse_federated_tune(&yaml).expect("valid spec");
    ft.metadata.namespace = Some("team-a".into());
    ft.metadata.uid = Some(UID.into());
    (server, ft)
}

/// Writes the ConfigMap's spec document where the pods read it
/// (`root/spec.json`); returns its path and the ConfigMap's data.
pub fn mounted_spec(root: &Path, run: &Run) -> (std::path::PathBuf, BTreeMap<String, String>) {
    let spec_file = root.join("spec.json");
    let data = jobs::spec_config_map(run).data.expect("data");
    std::fs::write(&spec_file, &data[SPEC_FILE]).expect("spec file");
    (spec_file, data)
}
