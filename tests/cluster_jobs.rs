//! The Jobs the controller creates, run for real without a cluster: each
//! trainer and aggregation Job object built by `controller::jobs` is executed
//! the way its pod would run it (its command and environment, the spec
//! ConfigMap's document as the mounted file, a fresh empty `/work` per pod,
//! no model cache), against a real S3 server (SeaweedFS on loopback) that
//! also holds the models and the dataset. Two rounds of a tiny 3-client
//! federation must complete through the store alone, idempotently, with the
//! private state and `retention.keepClientRounds` handled, and the
//! evaluation Jobs after the last round must commit each client's
//! evaluation of the final global model.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use heterotune_crds::manifest::ArtifactManifest;
use heterotune_crds::manifest::EvaluationResult;
use heterotune_operator::controller::jobs::{self, Run, SPEC_DIR, SPEC_FILE, WORK_DIR};
use heterotune_operator::controller::JobConfig;
use heterotune_operator::protocol::observe::{
    previous_global_from_manifest, summary_from_manifest,
};
use heterotune_operator::sizing::Placement;
use heterotune_tests::s3::S3Server;
use heterotune_tests::{binary, output_text};

const BUCKET: &str = "heterotune";
const ACCESS_KEY: &str = "heterotune-test";
const SECRET_KEY: &str = "heterotune-test-secret";
const UID: &str = "0f1e2d3c-4b5a-6978-8091-a2b3c4d5e6f7";

/// Runs a Job's single container as its pod would: the image's `heterotune`
/// (with `heterotune-trainer` beside it), the ConfigMap mounted at
/// `SPEC_DIR`, a fresh `WORK_DIR`, and the container's environment with the
/// Secret references resolved.
fn run_pod(job: &k8s_openapi::api::batch::v1::Job, spec_file: &Path, work: &Path) -> Output {
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
    let mut cmd = Command::new(binary("heterotune"));
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
    cmd.output().expect("heterotune job runs")
}

fn manifest(server: &S3Server, key: &str) -> ArtifactManifest {
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
fn federation(
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
fn mounted_spec(root: &Path, run: &Run) -> (std::path::PathBuf, BTreeMap<String, String>) {
    let spec_file = root.join("spec.json");
    let data = jobs::spec_config_map(run).data.expect("data");
    std::fs::write(&spec_file, &data[SPEC_FILE]).expect("spec file");
    (spec_file, data)
}

#[test]
fn the_controllers_jobs_run_a_federation_through_s3() {
    assert!(
        binary("heterotune-trainer").exists(),
        "run `cargo build --workspace --bins` first (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let (server, ft) = federation(
        root,
        "e2e",
        2,
        "  retention: { keepClientRounds: 1 }",
        |y| y,
    );
    let run = Run::new(&ft).expect("run");
    let run_dir = run.layout.run_dir().to_string();
    assert_eq!(run_dir, "runs/team-a/e2e-0f1e2d3c");
    let (spec_file, data) = mounted_spec(root, &run);

    let config = JobConfig::default();
    let placement = Placement::Explicit { estimate: None };
    let clients: Vec<String> = ft.spec.clients.iter().map(|c| c.name.clone()).collect();
    let mut pods = 0;
    let mut pod = |job: &k8s_openapi::api::batch::v1::Job| {
        pods += 1;
        let out = run_pod(job, &spec_file, &root.join(format!("pod-{pods}")));
        assert!(out.status.success(), "{}", output_text(&out));
        assert!(
            !output_text(&out).contains(SECRET_KEY),
            "credentials leaked into the pod's log"
        );
        out
    };
    for round in 1..=2 {
        for i in 0..clients.len() {
            pod(&jobs::trainer_job(
                &run, i, round, 1, &placement, 600, &config, "1",
            ));
        }
        if round == 1 {
            // A duplicate pod of a committed client is told who won and
            // changes nothing (the first commit wins).
            let key = run.layout.client_manifest(1, &clients[0]);
            let before = server.get(BUCKET, &key);
            let out = pod(&jobs::trainer_job(
                &run, 0, 1, 2, &placement, 600, &config, "1",
            ));
            let writer = manifest(&server, &key).writer.expect("the writer is named");
            assert!(
                output_text(&out).contains(&format!("already committed by {writer}")),
                "{}",
                output_text(&out)
            );
            assert_eq!(server.get(BUCKET, &key), before);
            // A duplicate pod that trained beside the winner and lost the
            // commit left its own private state (here: bytes no trainer can
            // load, under a name that sorts after the winner's): round 2
            // resumes from the state the committed manifest names.
            let committed = manifest(&server, &key);
            let sha = committed
                .private_state_sha256
                .expect("the commit names its private state");
            assert!(server
                .get(BUCKET, &run.layout.client_state(&clients[0], 1, &sha))
                .is_some());
            server.put(
                BUCKET,
                &run.layout.client_state(&clients[0], 1, &"f".repeat(64)),
                b"a losing duplicate's state",
            );
        }
        pod(&jobs::aggregation_job(
            &run, round, 1, &clients, 600, &config,
        ));
        assert!(server
            .get(BUCKET, &run.layout.global_manifest(round))
            .is_some());
    }

    // Idempotent: a trainer Job of a finished round (a duplicate from a
    // restarted operator) changes nothing.
    let before = server.get(BUCKET, &run.layout.client_manifest(2, &clients[0]));
    let out = pod(&jobs::trainer_job(
        &run, 0, 2, 2, &placement, 600, &config, "1",
    ));
    assert!(
        output_text(&out).contains("already aggregated"),
        "{}",
        output_text(&out)
    );
    assert_eq!(
        server.get(BUCKET, &run.layout.client_manifest(2, &clients[0])),
        before
    );

    // What the store holds: round 2 complete, round 1's client artifacts
    // pruned (keepClientRounds 1) but its global kept, one private state
    // per client (the newest).
    let listing = server.list(BUCKET, &format!("{run_dir}/"));
    assert!(
        !listing.contains("round-0001/clients/"),
        "round 1 client artifacts survived keepClientRounds 1:\n{listing}"
    );
    assert!(listing.contains("round-0001/global/manifest.json"));
    assert!(listing.contains("round-0000/global/manifest.json"));
    // The jobs record the run's spec, as `heterotune run` does, for sites
    // to check the spec they joined against.
    let recorded = server
        .get(BUCKET, &run.layout.spec_file())
        .expect("the jobs recorded spec.json");
    let recorded: serde_json::Value = serde_json::from_slice(&recorded).expect("spec.json is JSON");
    let ours: serde_json::Value = serde_json::from_str(&data[SPEC_FILE]).expect("ConfigMap JSON");
    assert_eq!(
        recorded["spec"], ours["spec"],
        "spec.json is the ConfigMap's spec"
    );
    for c in &clients {
        assert!(listing.contains(&format!("round-0002/clients/{c}/manifest.json")));
        let sha = manifest(&server, &run.layout.client_manifest(2, c))
            .private_state_sha256
            .expect("the commit names its private state");
        assert!(listing.contains(&run.layout.client_state(c, 2, &sha)));
        assert!(
            !listing.contains(&format!("private/{c}/state-round-0001")),
            "{c}'s old private states were not removed:\n{listing}"
        );
    }
    // Round 2 trained from round 1's global and each client's own state.
    for c in &clients {
        let m = manifest(&server, &run.layout.client_manifest(2, c));
        assert_eq!(
            (m.round, m.base_round, m.run.as_str()),
            (2, 1, run_dir.as_str())
        );
    }
    // The global manifest carries what the controller's status history reads.
    let global = manifest(&server, &run.layout.global_manifest(2));
    let summary = summary_from_manifest(2, &global);
    assert_eq!(summary.participants, 3, "{global:?}");
    let accuracy = summary.accuracy.expect("global accuracy in the manifest");
    assert!((0.0..=1.0).contains(&accuracy));
    let families: BTreeMap<_, _> = summary.accuracy_by_family.into_iter().collect();
    assert_eq!(families.len(), 3, "{families:?}");
    let uploaded: u64 = clients
        .iter()
        .map(|c| {
            manifest(&server, &run.layout.client_manifest(2, c))
                .artifact
                .bytes
        })
        .sum();
    assert_eq!(summary.bytes_uploaded, uploaded);
    assert!(summary.rejected.is_empty(), "{:?}", summary.rejected);
    // Round 2's participants measured round 1's global model before training.
    let (previous, by_family) =
        previous_global_from_manifest(&global).expect("round 1's global accuracy");
    assert!((0.0..=1.0).contains(&previous));
    assert_eq!(by_family.len(), 3, "{by_family:?}");

    // After the last round: each client's evaluation Job commits its
    // evaluation of round 2's global model (with its own private state).
    for i in 0..clients.len() {
        let out = pod(&jobs::client_job(
            &run,
            i,
            jobs::ROLE_EVALUATOR,
            2,
            1,
            &placement,
            600,
            &config,
            "1",
        ));
        assert!(
            output_text(&out).contains("evaluation committed"),
            "{}",
            output_text(&out)
        );
    }
    for c in &clients {
        let key = run.layout.evaluation_result(2, c);
        let bytes = server
            .get(BUCKET, &key)
            .unwrap_or_else(|| panic!("{key} is not in the bucket"));
        let r: EvaluationResult = serde_json::from_slice(&bytes).expect("an evaluation");
        assert_eq!(
            (r.client.as_str(), r.global_round, r.run.as_str()),
            (c.as_str(), 2, run_dir.as_str())
        );
        assert!((0.0..=1.0).contains(&r.accuracy), "{r:?}");
        assert!(r.test_examples > 0);
    }
    // A duplicate evaluation Job changes nothing.
    let before = server.get(BUCKET, &run.layout.evaluation_result(2, &clients[0]));
    let out = pod(&jobs::client_job(
        &run,
        0,
        jobs::ROLE_EVALUATOR,
        2,
        2,
        &placement,
        600,
        &config,
        "1",
    ));
    assert!(
        output_text(&out).contains("already committed"),
        "{}",
        output_text(&out)
    );
    assert_eq!(
        server.get(BUCKET, &run.layout.evaluation_result(2, &clients[0])),
        before
    );
}

/// A committed artifact that the aggregation rejects (a manifest that does
/// not parse, planted over one client's commit) makes the aggregation Job's
/// quorum fail. Its pod sets the artifact aside, as `heterotune run` does:
/// the client is no longer committed though its trainer succeeded, which
/// the controller counts as a failed attempt and retrains
/// (`decide_tests::a_client_set_aside_by_the_aggregation_trains_again`).
/// The retrained client commits again and the aggregation's second attempt
/// completes the round with every client.
#[test]
fn the_aggregation_job_sets_a_rejected_artifact_aside_for_retraining() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    // Every client is needed: the planted reject makes the quorum fail.
    let (server, ft) = federation(root, "reject", 1, "  maxRetriesPerClient: 1", |y| {
        y.replace("minClients: 2", "minClients: 3")
    });
    let run = Run::new(&ft).expect("run");
    let (spec_file, _) = mounted_spec(root, &run);
    let config = JobConfig::default();
    let placement = Placement::Explicit { estimate: None };
    let clients: Vec<String> = ft.spec.clients.iter().map(|c| c.name.clone()).collect();
    let mut pods = 0;
    let mut pod = |job: &k8s_openapi::api::batch::v1::Job| {
        pods += 1;
        run_pod(job, &spec_file, &root.join(format!("pod-{pods}")))
    };
    for i in 0..clients.len() {
        let out = pod(&jobs::trainer_job(
            &run, i, 1, 1, &placement, 600, &config, "1",
        ));
        assert!(out.status.success(), "{}", output_text(&out));
    }
    let rejected = &clients[2];
    let key = run.layout.client_manifest(1, rejected);
    server.put(BUCKET, &key, b"not a manifest");

    let out = pod(&jobs::aggregation_job(&run, 1, 1, &clients, 600, &config));
    let text = output_text(&out);
    assert!(!out.status.success(), "the quorum cannot be met: {text}");
    assert!(
        text.contains(&format!("rejected the artifacts of {rejected}: set aside")),
        "{text}"
    );
    assert!(server.get(BUCKET, &key).is_none(), "still committed");
    assert_eq!(
        server
            .get(BUCKET, &run.layout.rejected_manifest(1, rejected, 1))
            .as_deref(),
        Some(&b"not a manifest"[..]),
        "the rejected manifest is kept under rejected/, named by the attempt"
    );
    for c in &clients[..2] {
        assert!(
            server
                .get(BUCKET, &run.layout.client_manifest(1, c))
                .is_some(),
            "{c}'s commit was accepted and stays"
        );
    }
    assert!(server.get(BUCKET, &run.layout.global_manifest(1)).is_none());

    // The controller's next Jobs: the client's second attempt, then the
    // aggregation's.
    let out = pod(&jobs::trainer_job(
        &run, 2, 1, 2, &placement, 600, &config, "1",
    ));
    assert!(out.status.success(), "{}", output_text(&out));
    let out = pod(&jobs::aggregation_job(&run, 1, 2, &clients, 600, &config));
    assert!(out.status.success(), "{}", output_text(&out));
    let global = manifest(&server, &run.layout.global_manifest(1));
    assert_eq!(
        summary_from_manifest(1, &global).participants,
        3,
        "{global:?}"
    );
}
