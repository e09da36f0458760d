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
use std::path::PathBuf;

use heterotune_crds::manifest::EvaluationResult;
use heterotune_operator::controller::jobs::{self, Run, SPEC_FILE};
use heterotune_operator::controller::JobConfig;
use heterotune_operator::protocol::observe::{
    previous_global_from_manifest, summary_from_manifest,
};
use heterotune_operator::sizing::Placement;
use heterotune_tests::pods::{
    federation, manifest, mounted_spec, run_pod, run_pod_with, BUCKET, SECRET_KEY,
};
use heterotune_tests::s3::S3Server;
use heterotune_tests::stand_in::{make_executable, WRAPPER};
use heterotune_tests::{binary, output_text};

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

/// Where a pod dies in the cluster fault matrix: the stand-in trainer's
/// `FAULT` and `WHEN` (`tests/stand_in.rs`).
const POD_FAULTS: [(&str, &str, &str); 5] = [
    (
        "a trainer pod killed as its trainer starts",
        "train wide-bert 2",
        "before",
    ),
    (
        "a trainer pod killed after training, before its upload",
        "train tiny-llama 2",
        "after",
    ),
    (
        "a trainer process killed (its pod fails)",
        "train small-bert 2",
        "self",
    ),
    (
        "an aggregation pod killed as it starts",
        "aggregate - 2",
        "before",
    ),
    (
        "an aggregation pod killed after aggregating, before the global's commit",
        "aggregate - 2",
        "after",
    ),
];

/// The fault matrix of the cluster path (issue 15, item 4): the controller's
/// pods are SIGKILLed at each step of the round protocol (the stand-in
/// trainer beside the image's `heterotune` kills its parent, the pod's
/// `heterotune job`, or itself), and the Job's next attempt runs as the
/// controller would create it (a fresh pod and `/work`). Every case must end
/// with the final global bitwise equal to an uninterrupted run's, every
/// manifest committed before the fault unchanged, each client counted once.
#[test]
fn a_pod_killed_at_each_protocol_step_ends_in_the_uninterrupted_runs_model() {
    const ROUNDS: u32 = 2;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let (server, ft) = federation(root, "ref", ROUNDS, "", |y| y);
    let clients: Vec<String> = ft.spec.clients.iter().map(|c| c.name.clone()).collect();
    let config = JobConfig::default();
    let placement = Placement::Explicit { estimate: None };
    // The image: `heterotune` with the stand-in trainer beside it (the
    // trainer is found next to the binary).
    let image = root.join("image");
    std::fs::create_dir_all(&image).expect("image");
    let heterotune = image.join("heterotune");
    if std::fs::hard_link(binary("heterotune"), &heterotune).is_err() {
        std::fs::copy(binary("heterotune"), &heterotune).expect("copy heterotune");
    }
    let wrapper = image.join("heterotune-trainer");
    std::fs::write(&wrapper, WRAPPER).expect("wrapper");
    make_executable(&wrapper);

    let mut pods = 0;
    // Runs `name`'s Jobs in the controller's order with `fault` armed;
    // a pod that fails is followed by its Job's next attempt. Returns the
    // final global's sha256, what was committed when the fault struck and
    // what is committed at the end.
    let mut federation_run = |name: &str, fault: &str, when: &str| {
        let mut ft = ft.clone();
        ft.metadata.name = Some(name.into());
        let run = Run::new(&ft).expect("run");
        let case = root.join(name);
        std::fs::create_dir_all(&case).expect("case folder");
        let (spec_file, _) = mounted_spec(&case, &run);
        let env = [
            ("REAL", binary("heterotune-trainer")),
            ("LOG", case.join("calls.log")),
            ("FIRED", case.join("fired")),
            ("FAULT", PathBuf::from(fault)),
            ("WHEN", PathBuf::from(when)),
        ];
        let mut at_fault: Option<BTreeMap<String, Vec<u8>>> = None;
        let mut run_job = |make: &dyn Fn(u32) -> k8s_openapi::api::batch::v1::Job| {
            for attempt in 1..=2 {
                pods += 1;
                let work = root.join(format!("pod-{pods}"));
                let out = run_pod_with(&heterotune, &env, &make(attempt), &spec_file, &work);
                if out.status.success() {
                    return;
                }
                assert_eq!(attempt, 1, "the retry failed too: {}", output_text(&out));
                assert!(case.join("fired").exists(), "{}", output_text(&out));
                at_fault = Some(committed(&server, &run));
            }
        };
        for round in 1..=ROUNDS {
            for i in 0..clients.len() {
                run_job(&|attempt| {
                    jobs::trainer_job(&run, i, round, attempt, &placement, 600, &config, "1")
                });
            }
            run_job(&|attempt| jobs::aggregation_job(&run, round, attempt, &clients, 600, &config));
        }
        let mut last = String::new();
        for round in 1..=ROUNDS {
            let g = manifest(&server, &run.layout.global_manifest(round));
            assert_eq!(
                summary_from_manifest(round, &g).participants as usize,
                clients.len(),
                "{name}: round {round} counts each client once"
            );
            last = g.artifact.sha256;
        }
        (last, at_fault, committed(&server, &run))
    };

    let (reference, _, _) = federation_run("ref", "", "");
    for (i, (what, fault, when)) in POD_FAULTS.iter().enumerate() {
        let (global, at_fault, now) = federation_run(&format!("fault-{i}"), fault, when);
        let at_fault = at_fault.unwrap_or_else(|| panic!("{what}: no pod failed"));
        assert_eq!(global, reference, "{what}: the final global differs");
        for (key, bytes) in &at_fault {
            assert_eq!(
                now.get(key),
                Some(bytes),
                "{what}: {key}, committed before the fault, changed or vanished"
            );
        }
    }
}

/// Every manifest of `run` in the bucket, by key.
fn committed(server: &S3Server, run: &Run) -> BTreeMap<String, Vec<u8>> {
    server
        .keys(BUCKET, &format!("{}/", run.layout.run_dir()))
        .into_iter()
        .filter(|k| k.ends_with("manifest.json"))
        .map(|k| {
            let bytes = server.get(BUCKET, &k).expect("listed");
            (k, bytes)
        })
        .collect()
}
