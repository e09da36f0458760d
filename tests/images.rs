//! The trainer image runs the operator's Jobs as their pods would, with the
//! same results as the host: a trainer Job for one client and the round's
//! aggregation Job, built by `controller::jobs`, run once with the host's
//! binaries and once inside the image (`tests/images/pod.sh`: the image's
//! user, a read-only root, tmpfs HOME and /tmp, the spec file mounted where
//! the ConfigMap goes), each against its own real S3 server (SeaweedFS on
//! loopback), on the tiny fixture models (uploaded, `s3://`) and on a
//! packaged model (`cache://`, the image's baked cache). The committed
//! artifacts must be byte-identical.
//!
//! Ignored by default: `tests/images/smoke.sh` builds the image, makes a
//! container and runs it with `HETEROTUNE_TRAINER_CONTAINER` set.

use std::path::Path;
use std::process::{Command, Output};

use heterotune_crds::manifest::ArtifactManifest;
use heterotune_operator::controller::jobs::{self, Run, SPEC_DIR, SPEC_FILE, WORK_DIR};
use heterotune_operator::controller::JobConfig;
use heterotune_operator::sizing::Placement;
use heterotune_tests::s3::S3Server;
use heterotune_tests::{binary, output_text, repo_root};
use k8s_openapi::api::batch::v1::Job;

const BUCKET: &str = "heterotune";
const UID: &str = "5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d";

/// Where a Job's container runs.
enum Place<'a> {
    /// The host's binaries, with a fresh work folder and the host's cache.
    Host { work: &'a Path },
    /// The trainer image (a buildah container), as a pod.
    Image { container: &'a str },
}

/// Runs the Job's single container at `place`; the spec file stands for the
/// mounted ConfigMap.
fn run_job(job: &Job, spec_file: &Path, place: &Place) -> Output {
    let pod = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    let c = &pod.containers[0];
    let command = c.command.clone().expect("command");
    assert_eq!(command[0], "heterotune", "the image's entry binary");
    let env: Vec<(String, String)> = c
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            // The credentials Secret's keys, as its secretKeyRefs would give them.
            let secret = e.value_from.and_then(|f| f.secret_key_ref).map(|k| k.key);
            let value = match (e.value, secret.as_deref()) {
                (Some(v), _) => v,
                (None, Some("AWS_ACCESS_KEY_ID")) => "heterotune-test".to_string(),
                (None, Some("AWS_SECRET_ACCESS_KEY")) => "heterotune-test-secret".to_string(),
                (None, other) => panic!("{}: unexpected source {other:?}", e.name),
            };
            (e.name, value)
        })
        .collect();
    let mounted = format!("{SPEC_DIR}/{SPEC_FILE}");
    let out = match place {
        Place::Host { work } => {
            std::fs::create_dir_all(work).expect("work");
            let local = |a: &String| match a.as_str() {
                a if a == mounted => spec_file.display().to_string(),
                WORK_DIR => work.display().to_string(),
                _ => a.clone(),
            };
            let mut cmd = Command::new(binary("heterotune"));
            cmd.args(command[1..].iter().map(local)).env_clear();
            for k in ["PATH", "LD_LIBRARY_PATH", "HETEROTUNE_CACHE"] {
                if let Some(v) = std::env::var_os(k) {
                    cmd.env(k, v);
                }
            }
            for (k, v) in &env {
                cmd.env(k, if k == "HOME" { local(v) } else { v.clone() });
            }
            cmd.output()
        }
        Place::Image { container } => {
            let mut cmd = Command::new(repo_root().join("tests/images/pod.sh"));
            cmd.arg(container);
            for (k, v) in &env {
                cmd.arg("-e").arg(format!("{k}={v}"));
            }
            cmd.arg("-v")
                .arg(format!("{}:{mounted}", spec_file.display()))
                .arg("--")
                .args(&command);
            cmd.output()
        }
    };
    let out = out.expect("the Job's command starts");
    assert!(out.status.success(), "{}", output_text(&out));
    out
}

/// A one-client spec: the tiny fixture models uploaded to the store, or a
/// packaged model from the cache.
fn spec(case: &str, server: &S3Server, scratch: &Path) -> String {
    let storage = format!(
        "{}\n    credentialsSecret: {{ name: s3-credentials }}",
        server.storage_yaml(BUCKET)
    );
    if case == "fixture" {
        return server
            .put_federation(BUCKET, &scratch.join("fixtures"), case, 1, &storage)
            .replace("minClients: 2", "minClients: 1");
    }
    format!(
        r#"apiVersion: heterotune.dev/v1alpha1
kind: FederatedTune
metadata: {{ name: {case} }}
spec:
  rounds: 1
  minClients: 1
  roundDeadlineSeconds: 600
  clients:
    - name: edge
      model: {{ family: bert, uri: "cache://models/paraphrase-MiniLM-L3-v2" }}
  task:
    dataset: {{ uri: "cache://data/trec/trec.jsonl" }}
    labels: [ABBR, DESC, ENTY, HUM, LOC, NUM]
    maxTestExamples: 32
  training: {{ localSteps: 3, batchSize: 8, maxSeqLength: 32 }}
  adapter: {{ rank: 4, experts: 2, slots: 2 }}
{storage}
"#
    )
}

/// What must not depend on where the Job ran: the artifact (sha256, size),
/// its tensors and the example count.
fn outcome(server: &S3Server, key: &str) -> String {
    let bytes = server
        .get(BUCKET, key)
        .unwrap_or_else(|| panic!("{key} is not in the bucket"));
    let m: ArtifactManifest = serde_json::from_slice(&bytes).expect("a manifest");
    serde_json::json!({
        "artifact": m.artifact,
        "tensors": m.tensors,
        "examples": m.num_examples,
    })
    .to_string()
}

/// Trains the first client for round 1 and aggregates the round at `place`
/// against a fresh server; returns the client's and the global outcome.
fn train_and_aggregate(case: &str, scratch: &Path, place: &Place) -> (String, String) {
    let server = S3Server::start(&scratch.join("s3"), BUCKET);
    let yaml = spec(case, &server, scratch);
    let mut ft = heterotune_crds::validate::parse_federated_tune(&yaml).expect("valid spec");
    ft.metadata.namespace = Some("team-a".into());
    ft.metadata.uid = Some(UID.into());
    let run = Run::new(&ft).expect("run");
    let spec_file = scratch.join("spec.json");
    let data = jobs::spec_config_map(&run).data.expect("data");
    std::fs::write(&spec_file, &data[SPEC_FILE]).expect("spec file");
    let config = JobConfig::default();
    let placement = Placement::Explicit { estimate: None };
    let client = ft.spec.clients[0].name.clone();
    let train = jobs::trainer_job(&run, 0, 1, 1, &placement, 600, &config, "1");
    run_job(&train, &spec_file, place);
    let aggregate = jobs::aggregation_job(&run, 1, 1, std::slice::from_ref(&client), 600, &config);
    run_job(&aggregate, &spec_file, place);
    (
        outcome(&server, &run.layout.client_manifest(1, &client)),
        outcome(&server, &run.layout.global_manifest(1)),
    )
}

#[test]
#[ignore = "needs the built trainer image: tests/images/smoke.sh runs it"]
fn the_trainer_image_runs_the_jobs_as_the_host_does() {
    let container = std::env::var("HETEROTUNE_TRAINER_CONTAINER")
        .expect("HETEROTUNE_TRAINER_CONTAINER: a buildah container of the trainer image (tests/images/smoke.sh makes one)");
    assert!(
        binary("heterotune-trainer").exists(),
        "run `cargo build --workspace --bins` first (scripts/test.sh does)"
    );
    for case in ["fixture", "packaged"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = train_and_aggregate(
            case,
            &dir.path().join("host"),
            &Place::Host {
                work: &dir.path().join("host/work"),
            },
        );
        let image = train_and_aggregate(
            case,
            &dir.path().join("image"),
            &Place::Image {
                container: &container,
            },
        );
        assert_eq!(host.0, image.0, "{case}: the client's artifact differs");
        assert_eq!(host.1, image.1, "{case}: the global artifact differs");
        println!("{case}: client {}\n{case}: global {}", host.0, host.1);
    }
}
