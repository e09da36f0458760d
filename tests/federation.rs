//! The whole federation end to end on tiny fixtures: `heterotune run` with
//! real trainer processes, on a local-folder store and on a real S3 server
//! (SeaweedFS on loopback), plus kill-and-resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use heterotune_tests::local_run::{self, built, find, report};
use heterotune_tests::s3::S3Server;
use heterotune_tests::{fixtures, output_text};

fn trainer() -> PathBuf {
    built("heterotune-trainer")
}

fn run_command(root: &Path, spec: &Path) -> Command {
    local_run::run_command(root, spec, &trainer())
}

/// Writes `spec` to `root/spec.yaml`, runs it to the end and checks that it
/// succeeded with a report of `rounds` rounds.
fn run_to_success(root: &Path, spec: &str, rounds: usize) {
    let spec_file = root.join("spec.yaml");
    std::fs::write(&spec_file, spec).expect("spec");
    let out = run_command(root, &spec_file)
        .output()
        .expect("heterotune runs");
    assert!(out.status.success(), "{}\n{spec}", output_text(&out));
    check_report(root, rounds);
}

fn check_report(root: &Path, rounds: usize) {
    let r = report(root);
    assert_eq!(r["status"], "Succeeded", "{r}");
    let recs = r["rounds"].as_array().expect("rounds");
    assert_eq!(recs.len(), rounds, "{r}");
    for rec in recs {
        assert_eq!(
            rec["participants"].as_array().map(Vec::len),
            Some(3),
            "{rec}"
        );
        let acc = rec["accuracy"].as_f64().expect("accuracy is a number");
        assert!((0.0..=1.0).contains(&acc), "{rec}");
        assert!(rec["bytesUploaded"].as_u64().unwrap_or(0) > 0, "{rec}");
    }
    // The task is learnable (a keyword decides the label); three classes.
    let last = recs
        .last()
        .and_then(|x| x["accuracy"].as_f64())
        .unwrap_or(0.0);
    assert!(
        last > 0.5,
        "final accuracy {last} is not clearly above chance (0.33): {r}"
    );
    // The global model: every round's is measured (the next round's clients
    // before training, the final evaluation for the last), per family.
    for rec in recs {
        let g = rec["globalAccuracy"]
            .as_f64()
            .unwrap_or_else(|| panic!("no global-model accuracy in {rec}"));
        assert!((0.0..=1.0).contains(&g), "{rec}");
        let families = rec["globalAccuracyByFamily"]
            .as_object()
            .map_or(0, |m| m.len());
        assert!(families > 0, "{rec}");
    }
    let finals = r["finalEvaluation"].as_array().expect("finalEvaluation");
    assert_eq!(
        finals.len(),
        3,
        "every client evaluates the final model: {r}"
    );
    for e in finals {
        assert_eq!(e["globalRound"].as_u64(), Some(rounds as u64), "{e}");
    }
    let final_global = recs
        .last()
        .and_then(|x| x["globalAccuracy"].as_f64())
        .unwrap_or(0.0);
    assert!(
        final_global > 0.5,
        "the final global model's accuracy {final_global} is not clearly above chance: {r}"
    );
    let md = std::fs::read_to_string(root.join("report/report.md")).expect("report.md");
    assert!(md.contains("## The final global model"), "{md}");
}

#[test]
fn federation_on_a_local_folder_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let store = root.join("store");
    let spec = fixtures::write_federation(
        root,
        "local-fed",
        3,
        &format!("  storage: {{ uri: \"file://{}\" }}", store.display()),
    );
    run_to_success(root, &spec, 3);
    for r in 0..=3 {
        let manifests = find(&store, &format!("round-{r:04}/global/manifest.json"));
        assert_eq!(manifests.len(), 1, "round {r} global manifest");
    }
    assert_eq!(
        find(&store, "manifest.json").len(),
        4 + 3 * 3,
        "4 global + 9 client manifests"
    );
    let first = report(root);
    // A second run of the same command has nothing left to do, and its
    // report keeps every round's time and the time spent in all.
    let out = run_command(root, &root.join("spec.yaml"))
        .output()
        .expect("heterotune runs");
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(find(&store, "manifest.json").len(), 13);
    check_report(root, 3);
    let again = report(root);
    assert_eq!(round_times(&again), round_times(&first), "{again}");
    assert!(round_times(&again).iter().all(|t| *t > 0.0), "{again}");
    let total = |r: &serde_json::Value| r["totalSeconds"].as_f64().unwrap_or(0.0);
    assert!(total(&again) >= total(&first), "{again}");
    let md = std::fs::read_to_string(root.join("report/report.md")).expect("report.md");
    assert!(!md.contains(" 0 s in all"), "{md}");
}

/// Each round's measured time (`durationSeconds`), in round order.
fn round_times(report: &serde_json::Value) -> Vec<f64> {
    report["rounds"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| r["durationSeconds"].as_f64().unwrap_or(f64::NAN))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the report the runner uploaded to the store records
/// `rounds` rounds.
fn wait_for_report(store: &Path, rounds: usize, child: &mut Child, limit: Duration) -> bool {
    let start = Instant::now();
    let recorded = || {
        find(store, "report/report.json")
            .first()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|r| round_times(&r).len() >= rounds)
    };
    while start.elapsed() < limit {
        if recorded() {
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return recorded();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn wait_for(path_suffix: &str, dir: &Path, child: &mut Child, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !find(dir, path_suffix).is_empty() {
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return !find(dir, path_suffix).is_empty();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn killed_runner_resumes_without_redoing_or_losing_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let store = root.join("store");
    let spec = fixtures::write_federation(
        root,
        "resume-fed",
        3,
        &format!("  storage: {{ uri: \"file://{}\" }}", store.display()),
    );
    let spec_file = root.join("spec.yaml");
    std::fs::write(&spec_file, spec).expect("spec");
    let mut child = run_command(root, &spec_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("heterotune starts");
    let reached = wait_for(
        "round-0001/global/manifest.json",
        &store,
        &mut child,
        Duration::from_secs(300),
    ) && wait_for_report(&store, 1, &mut child, Duration::from_secs(60));
    // The store's copy: what a resumed run reads.
    let uploaded = find(&store, "report/report.json");
    let round_one = uploaded
        .first()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .map(|r| round_times(&r))
        .unwrap_or_default();
    // A second `heterotune run` of the same run refuses, naming the holder.
    let second = run_command(root, &spec_file)
        .output()
        .expect("heterotune runs");
    // SIGKILL: no chance to clean up, the hardest case.
    let _ = child.kill();
    let _ = child.wait();
    assert!(reached, "round 1 never completed");
    let text = output_text(&second);
    assert!(
        !second.status.success() && text.contains("is being run by"),
        "{text}"
    );
    assert!(text.contains(&format!("/{}/", child.id())), "{text}");
    let before: Vec<(PathBuf, Vec<u8>)> = find(&store, "manifest.json")
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("round-0001"))
        .map(|p| {
            let b = std::fs::read(&p).expect("read");
            (p, b)
        })
        .collect();
    assert_eq!(
        before.len(),
        4,
        "round 1: 3 client manifests + the global one"
    );
    // The killed runner's lease is taken over at once (its process is gone).
    let out = run_command(root, &spec_file)
        .output()
        .expect("heterotune resumes");
    assert!(out.status.success(), "{}", output_text(&out));
    for (path, bytes) in &before {
        assert_eq!(
            &std::fs::read(path).expect("still there"),
            bytes,
            "{} was redone",
            path.display()
        );
    }
    assert_eq!(find(&store, "manifest.json").len(), 4 + 3 * 3);
    // Each client evaluated the final global model once.
    assert_eq!(find(&store, "round-0003/evaluation").len(), 0);
    let evaluations: Vec<PathBuf> = find(&store, ".json")
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("round-0003/evaluation/"))
        .collect();
    assert_eq!(evaluations.len(), 3, "{evaluations:?}");
    let r = report(root);
    assert_eq!(r["status"], "Succeeded");
    assert_eq!(r["rounds"].as_array().map(Vec::len), Some(3), "{r}");
    // Round 1's time, measured before the kill, is still there; the others
    // were measured by the resumed run.
    let times = round_times(&r);
    assert_eq!(times.first(), round_one.first(), "{r}");
    assert!(times.iter().all(|t| *t > 0.0), "{r}");
    assert_eq!(
        r["finalEvaluation"].as_array().map(Vec::len),
        Some(3),
        "{r}"
    );
}

#[test]
fn federation_on_a_real_s3_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let server = S3Server::start(&root.join("s3"), "heterotune");
    let storage = server.storage_yaml("heterotune");
    let spec = fixtures::write_federation(root, "s3-fed", 2, &storage);
    let spec_file = root.join("spec.yaml");
    std::fs::write(&spec_file, spec).expect("spec");
    let out = run_command(root, &spec_file)
        .env("AWS_ACCESS_KEY_ID", "heterotune-test")
        .env("AWS_SECRET_ACCESS_KEY", "heterotune-test-secret")
        .output()
        .expect("heterotune runs");
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("heterotune-test-secret"),
        "credentials leaked into the output"
    );
    check_report(root, 2);
    let listing = server.list("heterotune", "runs/");
    for key in [
        "round-0002/global/manifest.json",
        "round-0002/clients/tiny-llama/data-",
        "spec.json",
        "report/report.json",
    ] {
        assert!(
            listing.contains(key),
            "{key} missing from the bucket listing:\n{listing}"
        );
    }
}

/// `aggregation.privacy`: every round's global is aggregated from clipped,
/// equally weighted, noised updates; the round statistics and the report
/// carry the accountant's ε after each round.
#[test]
fn private_federation_reports_its_epsilon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let spec =
        fixtures::write_federation(root, "private", 2, "  storage: { uri: \"file://store\" }")
            .replace(
            "aggregation: { algorithm: cmga }",
            "aggregation: { algorithm: fedavg, privacy: { clipNorm: 0.5, noiseMultiplier: 1.5 } }",
        );
    assert!(spec.contains("privacy"), "{spec}");
    let spec_file = root.join("spec.yaml");
    std::fs::write(&spec_file, &spec).expect("spec");
    // With JSON logs, stdout holds JSON only (the summary as one object).
    let out = run_command(root, &spec_file)
        .args(["--log-format", "json"])
        .output()
        .expect("heterotune runs");
    assert!(out.status.success(), "{}", output_text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    for line in stdout.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON on stdout: {line}"
        );
    }
    let done: serde_json::Value = serde_json::from_str(last).expect("a summary line");
    assert_eq!(done["done"], true, "{done}");
    assert_eq!(done["rounds"], 2, "{done}");
    let r = report(root);
    let rounds = r["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2, "{r}");
    for (i, round) in rounds.iter().enumerate() {
        let p = &round["aggregation"]["privacy"];
        let expected = heterotune_crds::privacy::epsilon(1.5, i as u32 + 1, 1e-5);
        assert_eq!(p["epsilon"].as_f64(), Some(expected), "{p}");
        assert_eq!(p["clipNorm"].as_f64(), Some(0.5), "{p}");
        // Local training moves these tiny models far more than 0.5.
        assert_eq!(p["clipped"].as_array().map(Vec::len), Some(3), "{p}");
    }
    let md = std::fs::read_to_string(root.join("report/report.md")).expect("report.md");
    assert!(md.contains("Differential privacy"), "{md}");
}

#[test]
fn hetlora_baseline_federation_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let store = root.join("store");
    let spec = fixtures::write_federation(
        root,
        "lora-fed",
        2,
        &format!("  storage: {{ uri: \"file://{}\" }}", store.display()),
    );
    let spec = spec
        .replace(
            "adapter: { rank: 4, experts: 2, slots: 2 }",
            "adapter: { type: lora, rank: 4 }",
        )
        .replace("algorithm: cmga", "algorithm: hetlora");
    // wide-bert trains at rank 2 (HetLoRA truncates the global factors for it).
    let at = spec.find("    - name: tiny-llama").expect("client list");
    let spec = format!("{}      loraRank: 2\n{}", &spec[..at], &spec[at..]);
    run_to_success(root, &spec, 2);
    let r = report(root);
    assert_eq!(r["algorithm"], "hetlora");
}

/// A `local-only` client keeps its training across rounds: the global of a
/// local-only run still holds the initial shared values, and loading it on
/// top of the client's private state must not reset them. Evaluating the
/// round-1 state with that global gives exactly the accuracy the client
/// reported after training (with the reset it was the untrained model's).
#[test]
fn local_only_clients_keep_their_training_across_rounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let spec = fixtures::write_federation(root, "local", 2, "  storage: { uri: \"file://store\" }")
        .replace("algorithm: cmga", "algorithm: local-only");
    let spec_file = root.join("spec.yaml");
    std::fs::write(&spec_file, &spec).expect("spec");
    let trainer = |args: &[&str]| {
        let out = Command::new(trainer())
            .args(args)
            .arg("--spec")
            .arg(&spec_file)
            .output()
            .expect("trainer runs");
        assert!(out.status.success(), "{args:?}: {}", output_text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let p = |name: &str| root.join(name).display().to_string();
    trainer(&["init", "--out", &p("global0"), "--run", "r"]);
    for client in ["small-bert", "tiny-llama"] {
        let (state, out) = (p(&format!("{client}.state")), p(&format!("{client}.out")));
        let common = ["--client", client, "--threads", "1", "--device", "cpu"];
        trainer(
            &[
                &["train", "--round", "1", "--run", "r"][..],
                &common,
                &[
                    "--global",
                    &p("global0"),
                    "--state-out",
                    &state,
                    "--out",
                    &out,
                ],
            ]
            .concat(),
        );
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root.join(format!("{client}.out/manifest.json"))).expect("manifest"),
        )
        .expect("json");
        let trained = manifest["metrics"]["test_accuracy"]
            .as_f64()
            .expect("test accuracy");
        let eval: serde_json::Value = serde_json::from_str(&trainer(
            &[
                &["eval"][..],
                &common,
                &["--global", &p("global0"), "--state-in", &state],
            ]
            .concat(),
        ))
        .expect("eval prints JSON");
        assert_eq!(
            eval["accuracy"].as_f64(),
            Some(trained),
            "{client}: the global undid local training: {eval}"
        );
    }
}

/// Runs the fixture federation `name` (2 rounds, fedavg) with a public
/// pool and the tiny BERT as the bridge, `poolTeacher: teacher`, `training`
/// appended to the training section (`""`: as written); checks it
/// succeeded and its report.
/// `bridge` adds fields to `spec.bridge` (`, serve: own`).
fn run_bridge_federation(
    root: &Path,
    name: &str,
    storage: &str,
    teacher: &str,
    training: &str,
    bridge: &str,
) {
    let spec = fixtures::write_federation(root, name, 2, storage)
        .replace("algorithm: cmga", "algorithm: fedavg")
        .replace(
            "maxSeqLength: 16 }",
            &format!("maxSeqLength: 16{training} }}"),
        )
        .replace(
            "    maxTestExamples: 48",
            "    splits: { pool: 0.1 }\n    maxTestExamples: 48",
        );
    let spec = format!(
        "{spec}  bridge: {{ model: {{ family: bert, uri: \"{}\" }}, \
         distillation: {{ poolTeacher: {teacher} }}{bridge} }}\n",
        root.join("models/tiny-bert-a").display()
    );
    run_to_success(root, &spec, 2);
}

/// A bridge (`spec.bridge`): every client co-trains a small common model
/// next to its own. The final evaluation reports each model a client can
/// serve; the bridge is one global model (the same accuracy for every
/// client) and the served accuracy is the ensemble's (`serve: auto`), the
/// bridge's for the client whose own model is the bridge's backbone, named
/// in the evaluation. The pool's teacher is chosen on validation.
#[test]
fn bridge_federation_shares_one_bridge_and_serves_by_the_auto_rule() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    // With a public pool held out of the training split: the bridge also
    // teaches every own model there.
    run_bridge_federation(
        root,
        "bridge",
        "  storage: { uri: \"file://store\" }",
        "validated",
        "",
        "",
    );
    let r = report(root);
    let evaluations = r["finalEvaluation"].as_array().expect("final evaluation");
    assert_eq!(evaluations.len(), 3, "{r}");
    let variant = |e: &serde_json::Value, v: &str| {
        e["variants"][v]
            .as_f64()
            .unwrap_or_else(|| panic!("variant {v} in {e}"))
    };
    let bridge_accuracy = variant(&evaluations[0], "bridge");
    for e in evaluations {
        // serve: auto: the ensemble, except on the bridge's own backbone.
        let served = if e["client"] == "small-bert" {
            "bridge"
        } else {
            "ensemble"
        };
        assert_eq!(e["served"].as_str(), Some(served), "{e}");
        assert_eq!(e["accuracy"].as_f64(), Some(variant(e, served)), "{e}");
        assert!(variant(e, "own").is_finite(), "{e}");
        assert_eq!(
            variant(e, "bridge"),
            bridge_accuracy,
            "one global bridge: {e}"
        );
    }
}

/// The global data file of `round` of the local run `name` in `store`.
fn global_file(store: &Path, name: &str, round: u32) -> Vec<u8> {
    let uid = heterotune_operator::runner::local_uid("default", name);
    let layout = heterotune_crds::layout::RunLayout::new("", "default", name, &uid);
    let files = find(&store.join(layout.global_dir(round)), ".safetensors");
    assert_eq!(files.len(), 1, "{files:?}");
    std::fs::read(&files[0]).expect("global data")
}

/// The f32 tensors of the global data of `round` of the local run `name`
/// in `store`: shape and values by name.
fn global_tensors(
    store: &Path,
    name: &str,
    round: u32,
) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = global_file(store, name, round);
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .filter(|(_, t)| t.dtype() == safetensors::Dtype::F32)
        .map(|(n, t)| {
            let values = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, (t.shape().to_vec(), values))
        })
        .collect()
}

/// A bridge next to LoRA own models (`adapter.type: lora`, `hetlora`), the
/// bridge at its own learning rate (`bridge.learningRate`): at 0 the
/// bridge's adapter tensors stay where round 0 put them (its head trains at
/// `training.headLearningRate`) while the own models' LoRA factors train.
#[test]
fn a_bridge_pairs_with_lora_own_models_at_its_own_learning_rate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let store = root.join("store");
    let storage = format!("  storage: {{ uri: \"file://{}\" }}", store.display());
    let spec = fixtures::write_federation(root, "lora-bridge", 2, &storage)
        .replace("algorithm: cmga", "algorithm: hetlora")
        .replace("adapter: { rank: 4,", "adapter: { type: lora, rank: 4,");
    let spec = format!(
        "{spec}  bridge: {{ model: {{ family: bert, uri: \"{}\" }}, learningRate: 0.0 }}\n",
        root.join("models/tiny-bert-a").display()
    );
    run_to_success(root, &spec, 2);
    let (start, end) = (
        global_tensors(&store, "lora-bridge", 0),
        global_tensors(&store, "lora-bridge", 2),
    );
    let (mut bridge, mut lora_moved) = (0, 0);
    for (name, (_, before)) in &start {
        let (_, after) = &end[name];
        if name.starts_with("bridge.") && !name.starts_with("bridge.head.") {
            bridge += 1;
            for (a, b) in before.iter().zip(after) {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + a.abs()),
                    "{name} moved: {a} -> {b}"
                );
            }
        } else if name.contains("lora") && before != after {
            lora_moved += 1;
        }
    }
    assert!(
        bridge > 0,
        "no bridge tensors in the global: {:?}",
        start.keys()
    );
    assert!(lora_moved > 0, "no LoRA factor trained: {:?}", start.keys());
}

/// `poolTeacher: ensemble` (FedDF-style): every client sends its served
/// probabilities on the public pool and its class counts; each global from
/// round 1 on holds the federation's ensemble on the pool, a probability
/// row per pool text, which round 2's clients distil from, and which the
/// final evaluation calibrates each own model against.
#[test]
fn the_pool_ensemble_is_averaged_into_the_global_and_taught_from() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let store = root.join("store");
    let storage = format!("  storage: {{ uri: \"file://{}\" }}", store.display());
    run_bridge_federation(root, "ensemble", &storage, "ensemble", "", "");
    let uid = heterotune_operator::runner::local_uid("default", "ensemble");
    let layout = heterotune_crds::layout::RunLayout::new("", "default", "ensemble", &uid);
    let ensemble = |round: u32| -> (Vec<usize>, Vec<f32>) {
        global_tensors(&store, "ensemble", round)
            .remove("pool.ensemble")
            .expect("pool.ensemble, f32, in the global")
    };
    let (shape0, uniform) = ensemble(0);
    let classes = shape0[1];
    assert!(shape0[0] > 0 && classes > 1, "{shape0:?}");
    assert!(uniform
        .iter()
        .all(|&v| (v - 1.0 / classes as f32).abs() < 1e-6));
    for round in [1, 2] {
        let (shape, values) = ensemble(round);
        assert_eq!(shape, shape0, "round {round}");
        for row in values.chunks(classes) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4, "{row:?}");
        }
        assert_ne!(values, uniform, "round {round}: the ensemble moved");
    }
    // The aggregator reads the partition (a local run can): each client's
    // weight and its class counts are its partition's; honest counts, sent
    // in bf16, are the partition's and are not reported as replaced.
    for round in [1, 2] {
        let m = std::fs::read(store.join(layout.global_manifest(round))).expect("global");
        let m: serde_json::Value = serde_json::from_slice(&m).expect("json");
        let robust = &m["stats"]["robust"];
        assert_eq!(robust["examplesCap"], "partition", "{robust}");
        assert!(robust.get("countsReplaced").is_none(), "{robust}");
    }
    // Every client of round 2 sent its probabilities and counts.
    let manifest = std::fs::read(store.join(layout.client_manifest(2, "tiny-llama"))).expect("m");
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("json");
    let names: Vec<&str> = manifest["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        names.contains(&"pool.probs") && names.contains(&"pool.counts"),
        "{names:?}"
    );
    // `calibration: poolEnsemble` (the default): the own model is served
    // with its bias fitted to the ensemble; every evaluation also reports
    // the variants it changes without the correction, and the bridge, which
    // is never corrected, once.
    let r = report(root);
    for e in r["finalEvaluation"].as_array().expect("final evaluation") {
        let variants = e["variants"].as_object().expect("variants");
        for v in ["own", "ensemble", "confident"] {
            let raw = format!("{v}-uncalibrated");
            assert!(
                variants[&raw].as_f64().is_some_and(f64::is_finite),
                "{raw} in {e}"
            );
        }
        assert!(!variants.contains_key("bridge-uncalibrated"), "{e}");
        let served = e["served"].as_str().expect("served");
        assert_eq!(e["accuracy"].as_f64(), variants[served].as_f64(), "{e}");
    }
}

/// `serve: agreement` changes what a client serves, not what it trains or
/// sends: two runs of one spec, serving `auto` and `agreement`, commit the
/// same globals, tensor for tensor, and evaluate every variant alike; each
/// `agreement` client serves one of its candidates, at that one's accuracy.
#[test]
fn serving_by_agreement_changes_what_is_served_not_what_is_trained() {
    let runs: Vec<_> = ["auto", "agreement"]
        .iter()
        .map(|serve| {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path();
            let store = root.join("store");
            let storage = format!("  storage: {{ uri: \"file://{}\" }}", store.display());
            let bridge = format!(", serve: {serve}");
            run_bridge_federation(root, "served", &storage, "ensemble", "", &bridge);
            let globals: Vec<_> = (1..=2)
                .map(|round| global_data(&store, "served", round))
                .collect();
            let r = report(root);
            (dir, globals, r)
        })
        .collect();
    let (auto, agreement) = (&runs[0], &runs[1]);
    assert!(
        auto.1[1].contains_key("pool.ensemble"),
        "{:?}",
        auto.1[1].keys()
    );
    for (round, (a, b)) in auto.1.iter().zip(&agreement.1).enumerate() {
        let differ: Vec<_> = a.keys().filter(|k| b.get(*k) != Some(&a[*k])).collect();
        assert!(differ.is_empty(), "round {}: {differ:?} differ", round + 1);
    }
    let evaluations =
        |r: &serde_json::Value| r["finalEvaluation"].as_array().expect("final").clone();
    for (a, b) in evaluations(&auto.2).iter().zip(&evaluations(&agreement.2)) {
        assert_eq!(a["client"], b["client"]);
        assert_eq!(a["variants"], b["variants"], "{a}\n{b}");
        let served = b["served"].as_str().expect("served");
        assert!(["ensemble", "bridge", "own"].contains(&served), "{b}");
        assert_eq!(b["accuracy"], b["variants"][served], "{b}");
    }
}

/// `bridge.distillation.serverSteps`: the aggregator distils the averaged
/// bridge on the pool towards the round's ensemble. One spec run with and
/// without it: round 1's clients start from the same global, so the
/// round-1 globals agree on every tensor but the bridge's; the step's
/// statistics in each global manifest show the bridge nearer the ensemble
/// over the whole pool after it than before; the run without it has none.
#[test]
fn the_server_distils_the_averaged_bridge_towards_the_pool_ensemble() {
    let runs: Vec<_> = ["", ", serverSteps: 40"]
        .iter()
        .map(|steps| {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path();
            let store = root.join("store");
            let storage = format!("  storage: {{ uri: \"file://{}\" }}", store.display());
            run_bridge_federation(
                root,
                "server",
                &storage,
                &format!("ensemble{steps}"),
                "",
                "",
            );
            let uid = heterotune_operator::runner::local_uid("default", "server");
            let layout = heterotune_crds::layout::RunLayout::new("", "default", "server", &uid);
            let stats: Vec<serde_json::Value> = (1..=2)
                .map(|round| {
                    let m = std::fs::read(store.join(layout.global_manifest(round))).expect("m");
                    let m: serde_json::Value = serde_json::from_slice(&m).expect("json");
                    m["stats"]["serverDistillation"].clone()
                })
                .collect();
            (dir, global_data(&store, "server", 1), stats)
        })
        .collect();
    let (plain, distilled) = (&runs[0], &runs[1]);
    assert!(
        plain.2.iter().all(serde_json::Value::is_null),
        "{:?}",
        plain.2
    );
    for s in &distilled.2 {
        assert_eq!(s["steps"], 40, "{s}");
        assert!(s["poolTexts"].as_u64().is_some_and(|n| n > 0), "{s}");
        let (before, after) = (s["klBefore"].as_f64(), s["klAfter"].as_f64());
        assert!(
            matches!((before, after), (Some(b), Some(a)) if a.is_finite() && a < b),
            "the bridge moved towards the ensemble: {s}"
        );
    }
    let differ: Vec<&String> = plain
        .1
        .keys()
        .filter(|k| distilled.1.get(*k) != Some(&plain.1[*k]))
        .collect();
    assert!(!differ.is_empty(), "the server's step changed nothing");
    assert!(
        differ.iter().all(|k| k.starts_with("bridge.")),
        "only the bridge may differ: {differ:?}"
    );
    assert!(
        plain.1.contains_key("pool.ensemble"),
        "{:?}",
        plain.1.keys()
    );
}

/// Every tensor's bytes in the global data of `round` of the local run
/// `name` in `store`, by name, each family's key without the hash of its
/// model's location (`family/tiny-bert-a.cb8c21/…` → `family/tiny-bert-a/…`).
fn global_data(store: &Path, name: &str, round: u32) -> BTreeMap<String, Vec<u8>> {
    let unhashed = |name: &str| -> String {
        name.split('/')
            .map(|part| match part.rsplit_once('.') {
                Some((key, hash))
                    if hash.len() == 6 && hash.chars().all(|c| c.is_ascii_hexdigit()) =>
                {
                    key
                }
                _ => part,
            })
            .collect::<Vec<_>>()
            .join("/")
    };
    let bytes = global_file(store, name, round);
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(n, t)| (unhashed(&n), t.data().to_vec()))
        .collect()
}

/// `training.logitAdjustment: clientPrior` with the pool ensemble: each
/// global from round 1 on holds the federation's label prior (`pool.prior`:
/// the round's client class counts summed and normalised), which the next
/// round's clients train against; round 0's global holds none (round 1
/// adjusts against a uniform prior). The ensemble is weighted by agreement
/// (`poolWeighting: agreement`), which leaves the prior as it is.
#[test]
fn logit_adjusted_clients_get_the_federations_label_prior_in_the_global() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let store = root.join("store");
    let storage = format!("  storage: {{ uri: \"file://{}\" }}", store.display());
    let name = "adjusted";
    run_bridge_federation(
        root,
        name,
        &storage,
        "ensemble, poolWeighting: agreement",
        ", logitAdjustment: clientPrior",
        "",
    );
    assert!(!global_tensors(&store, name, 0).contains_key("pool.prior"));
    let uid = heterotune_operator::runner::local_uid("default", name);
    let layout = heterotune_crds::layout::RunLayout::new("", "default", name, &uid);
    for round in [1, 2] {
        let (shape, prior) = global_tensors(&store, name, round)
            .remove("pool.prior")
            .expect("pool.prior, f32, in the global");
        assert_eq!(shape, [3], "round {round}");
        // The clients' counts (bf16 in their artifacts: exact below 256).
        let mut sums = [0f64; 3];
        for client in ["small-bert", "wide-bert", "tiny-llama"] {
            let files = find(
                &store.join(layout.client_dir(round, client)),
                ".safetensors",
            );
            let bytes = std::fs::read(&files[0]).expect("client data");
            let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
            let counts = st.tensor("pool.counts").expect("pool.counts");
            assert_eq!(counts.dtype(), safetensors::Dtype::BF16);
            for (sum, b) in sums.iter_mut().zip(counts.data().chunks_exact(2)) {
                *sum += f64::from(f32::from_bits(
                    u32::from(u16::from_le_bytes([b[0], b[1]])) << 16,
                ));
            }
        }
        let total: f64 = sums.iter().sum();
        assert!(total > 0.0);
        for (p, n) in prior.iter().zip(sums) {
            assert!(
                (f64::from(*p) - n / total).abs() < 1e-5,
                "round {round}: prior {prior:?}, counts {sums:?}"
            );
        }
    }
}

/// A committed artifact that the aggregation rejects (here a manifest that
/// does not parse, planted before the run) is set aside and its client
/// trained again within its retries: the round completes with every
/// client, and the rejected manifest is kept under `rejected/`.
#[test]
fn a_rejected_client_is_set_aside_and_trained_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let store = root.join("store");
    let spec = fixtures::write_federation(
        root,
        "reject-fed",
        1,
        &format!(
            "  storage: {{ uri: \"file://{}\" }}\n  maxRetriesPerClient: 1",
            store.display()
        ),
    );
    // Every client is needed: the planted reject makes the quorum fail.
    let spec = spec.replace("minClients: 2", "minClients: 3");
    let spec_file = root.join("spec.yaml");
    std::fs::write(&spec_file, spec).expect("spec");
    let uid = heterotune_operator::runner::local_uid("default", "reject-fed");
    let layout = heterotune_crds::layout::RunLayout::new("", "default", "reject-fed", &uid);
    let planted = store.join(layout.client_manifest(1, "tiny-llama"));
    std::fs::create_dir_all(planted.parent().expect("parent")).expect("mkdir");
    std::fs::write(&planted, b"not a manifest").expect("plant");
    let out = run_command(root, &spec_file)
        .output()
        .expect("heterotune runs");
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("tiny-llama's rejected artifact set aside"),
        "{text}"
    );
    let aside = store.join(layout.rejected_manifest(1, "tiny-llama", 1));
    assert_eq!(std::fs::read(aside).expect("set aside"), b"not a manifest");
    let global: serde_json::Value = serde_json::from_slice(
        &std::fs::read(store.join(layout.global_manifest(1))).expect("round 1 complete"),
    )
    .expect("json");
    let participants = global["stats"]["participants"].as_array().map(Vec::len);
    assert_eq!(participants, Some(3), "{global}");
}

/// `evaluation.roundTestExamples`: every client scores the first 10 test
/// examples in the rounds (its manifest's `test_examples`), and the final
/// evaluation all 48 of the fixtures' test set; the report says so.
#[test]
fn rounds_score_a_subset_of_the_test_set_and_the_final_evaluation_all_of_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let store = root.join("store");
    let spec = fixtures::write_federation(
        root,
        "subset-fed",
        1,
        &format!(
            "  storage: {{ uri: \"file://{}\" }}\n  evaluation: {{ roundTestExamples: 10 }}",
            store.display()
        ),
    );
    let spec_file = root.join("spec.yaml");
    std::fs::write(&spec_file, spec).expect("spec");
    let out = run_command(root, &spec_file)
        .output()
        .expect("heterotune runs");
    assert!(out.status.success(), "{}", output_text(&out));
    let manifests = find(&store, "/manifest.json");
    let clients: Vec<&PathBuf> = manifests
        .iter()
        .filter(|p| p.to_string_lossy().contains("/clients/"))
        .collect();
    assert_eq!(clients.len(), 3, "{manifests:?}");
    for path in clients {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
        assert_eq!(m["metrics"]["test_examples"], 10.0, "{}", path.display());
    }
    let r = report(root);
    let finals = r["finalEvaluation"].as_array().expect("finalEvaluation");
    assert_eq!(finals.len(), 3);
    assert!(finals.iter().all(|e| e["testExamples"] == 48), "{finals:?}");
    let md = std::fs::read_to_string(root.join("report/report.md")).expect("report.md");
    assert!(
        md.contains("Each round scores the first 10 test examples"),
        "{md}"
    );
}
