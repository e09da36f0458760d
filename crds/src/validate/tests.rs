//! The table of valid and invalid specs: each invalid one must be rejected
//! with a problem at exactly the named field path.

use serde_json::{json, Value};

use super::*;

const BASE: &str = r#"
apiVersion: heterotune.dev/v1alpha1
kind: FederatedTune
metadata: { name: t }
spec:
  rounds: 3
  minClients: 2
  clients:
    - name: a
      model: { family: bert, uri: "cache://models/all-MiniLM-L6-v2" }
    - name: b
      model:
        family: llama
        uri: "cache://models/SmolLM2-135M-Instruct"
        adaptedLayers: { mode: topWindow, window: 6 }
  task:
    dataset: { uri: "cache://data/trec/trec.jsonl" }
    labels: [ABBR, DESC, ENTY, HUM, LOC, NUM]
"#;

fn base() -> Value {
    parse_document(BASE).expect("base parses")
}

/// Sets (or with `None` removes) the value at a JSON pointer.
fn set(mut doc: Value, pointer: &str, value: Option<Value>) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
    let target = doc.pointer_mut(parent).expect("parent exists");
    match (target, value) {
        (Value::Object(map), Some(v)) => {
            map.insert(key.to_string(), v);
        }
        (Value::Object(map), None) => {
            map.remove(key);
        }
        (Value::Array(items), Some(v)) => {
            let i: usize = key.parse().expect("index");
            if i == items.len() {
                items.push(v);
            } else {
                items[i] = v;
            }
        }
        (Value::Array(items), None) => {
            items.remove(key.parse::<usize>().expect("index"));
        }
        _ => panic!("cannot set {pointer}"),
    }
    doc
}

#[test]
fn base_spec_is_valid_and_gets_defaults() {
    let mut doc = base();
    let ft = validate_value(&mut doc, None).expect("valid");
    assert_eq!(ft.spec.rounds, 3);
    assert_eq!(ft.spec.training.batch_size, 16);
    assert_eq!(ft.spec.adapter.rank, 8);
    assert_eq!(ft.spec.storage.uri, "file://heterotune-runs");
    assert_eq!(ft.spec.task.dataset.text_field, "text");
    // Defaults were written into the document, as the API server does.
    assert_eq!(
        doc.pointer("/spec/aggregation/algorithm"),
        Some(&json!("cmga"))
    );
    assert_eq!(
        doc.pointer("/spec/training/prefixCache/enabled"),
        Some(&json!(true))
    );
}

/// The base spec with a bridge on `cache://models/m` whose `distillation`
/// is `distillation`, and a public pool of `pool` (none at 0).
fn bridged(distillation: Value, pool: f64) -> Value {
    let doc = set(
        base(),
        "/spec/bridge",
        Some(
            json!({"model": {"family": "bert", "uri": "cache://models/m"},
                    "distillation": distillation}),
        ),
    );
    if pool > 0.0 {
        set(doc, "/spec/task/splits", Some(json!({ "pool": pool })))
    } else {
        doc
    }
}

#[test]
fn server_distillation_with_the_pool_ensemble_is_valid() {
    let ft = validate_value(&mut bridged(json!({"serverSteps": 10}), 0.1), None).expect("valid");
    let bridge = ft.spec.bridge.expect("a bridge");
    assert_eq!(bridge.distillation.server_steps, 10);
    // Off by default, and then not written back (the spec's bytes are unchanged).
    let ft = validate_value(&mut bridged(json!({}), 0.0), None).expect("valid");
    let bridge = ft.spec.bridge.expect("a bridge");
    assert_eq!(bridge.distillation.server_steps, 0);
    let back = serde_json::to_value(&bridge).expect("serialises");
    assert!(
        back.pointer("/distillation/serverSteps").is_none(),
        "{back}"
    );
}

#[test]
fn invalid_specs_name_their_field() {
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "unknown top-level field",
            set(base(), "/spec/roundz", Some(json!(3))),
            "spec.roundz",
        ),
        (
            "a bridge with local-only training",
            set(
                set(
                    base(),
                    "/spec/bridge",
                    Some(json!({"model": {"family": "bert", "uri": "cache://models/m"}})),
                ),
                "/spec/aggregation",
                Some(json!({"algorithm": "local-only"})),
            ),
            "spec.bridge",
        ),
        (
            "a pool without a bridge",
            set(base(), "/spec/task/splits", Some(json!({"pool": 0.1}))),
            "spec.task.splits.pool",
        ),
        (
            "the ensemble pool teacher (the default) with privacy",
            set(
                set(
                    set(
                        base(),
                        "/spec/bridge",
                        Some(json!({"model": {"family": "bert", "uri": "cache://models/m"}})),
                    ),
                    "/spec/task/splits",
                    Some(json!({"pool": 0.1})),
                ),
                "/spec/aggregation",
                Some(json!({"algorithm": "fedavg",
                            "privacy": {"clipNorm": 1.0, "noiseMultiplier": 1.0, "delta": 1e-5}})),
            ),
            "spec.bridge.distillation.poolTeacher",
        ),
        (
            "server distillation without a pool",
            bridged(json!({"serverSteps": 10}), 0.0),
            "spec.bridge.distillation.serverSteps",
        ),
        (
            "server distillation with the bridge teaching the pool",
            bridged(json!({"serverSteps": 10, "poolTeacher": "bridge"}), 0.1),
            "spec.bridge.distillation.serverSteps",
        ),
        (
            "an unknown served model",
            set(
                base(),
                "/spec/bridge",
                Some(
                    json!({"model": {"family": "bert", "uri": "cache://models/m"}, "serve": "best"}),
                ),
            ),
            "spec.bridge.serve",
        ),
        (
            "unknown nested field",
            set(base(), "/spec/clients/0/model/size", Some(json!("big"))),
            "spec.clients[0].model.size",
        ),
        (
            "wrong type",
            set(base(), "/spec/rounds", Some(json!("three"))),
            "spec.rounds",
        ),
        (
            "zero rounds",
            set(base(), "/spec/rounds", Some(json!(0))),
            "spec.rounds",
        ),
        (
            "unknown family",
            set(base(), "/spec/clients/1/model/family", Some(json!("gpt"))),
            "spec.clients[1].model.family",
        ),
        (
            "missing model",
            set(base(), "/spec/clients/0/model", None),
            "spec.clients[0].model",
        ),
        ("missing task", set(base(), "/spec/task", None), "spec.task"),
        (
            "bad client name",
            set(base(), "/spec/clients/0/name", Some(json!("Site_A"))),
            "spec.clients[0].name",
        ),
        (
            "bad model uri",
            set(base(), "/spec/clients/0/model/uri", Some(json!("models/x"))),
            "spec.clients[0].model.uri",
        ),
        (
            "duplicate client",
            set(base(), "/spec/clients/1/name", Some(json!("a"))),
            "spec.clients[1]",
        ),
        (
            "no clients",
            set(base(), "/spec/clients", Some(json!([]))),
            "spec.clients",
        ),
        (
            "one label",
            set(base(), "/spec/task/labels", Some(json!(["x"]))),
            "spec.task.labels",
        ),
        (
            "alpha zero",
            set(base(), "/spec/task/partition", Some(json!({"alpha": 0.0}))),
            "spec.task.partition.alpha",
        ),
        (
            "bad algorithm",
            set(
                base(),
                "/spec/aggregation",
                Some(json!({"algorithm": "krum"})),
            ),
            "spec.aggregation.algorithm",
        ),
        (
            "threshold out of range",
            set(
                base(),
                "/spec/aggregation",
                Some(json!({"conflictThreshold": 1.5})),
            ),
            "spec.aggregation.conflictThreshold",
        ),
        (
            "norm bound multiple negative",
            set(
                base(),
                "/spec/aggregation",
                Some(json!({"robust": {"normBoundMultiple": -1.0}})),
            ),
            "spec.aggregation.robust.normBoundMultiple",
        ),
        (
            "examples share above 1",
            set(
                base(),
                "/spec/aggregation",
                Some(json!({"robust": {"maxExamplesShare": 1.5}})),
            ),
            "spec.aggregation.robust.maxExamplesShare",
        ),
        (
            "trim fraction of half",
            set(
                base(),
                "/spec/aggregation",
                Some(json!({"robust": {"combine": "trimmedMean", "trimFraction": 0.5}})),
            ),
            "spec.aggregation.robust.trimFraction",
        ),
        (
            "unknown combiner",
            set(
                base(),
                "/spec/aggregation",
                Some(json!({"robust": {"combine": "krum"}})),
            ),
            "spec.aggregation.robust.combine",
        ),
        (
            "privacy with cmga",
            set(
                base(),
                "/spec/aggregation",
                Some(
                    json!({"algorithm": "cmga", "privacy": {"clipNorm": 1.0, "noiseMultiplier": 1.0}}),
                ),
            ),
            "spec.aggregation.privacy",
        ),
        (
            "privacy without noise",
            set(
                base(),
                "/spec/aggregation",
                Some(
                    json!({"algorithm": "fedavg", "privacy": {"clipNorm": 1.0, "noiseMultiplier": 0.0}}),
                ),
            ),
            "spec.aggregation.privacy",
        ),
        (
            "lr negative",
            set(
                base(),
                "/spec/training",
                Some(json!({"learningRate": -1.0})),
            ),
            "spec.training.learningRate",
        ),
        (
            "null field",
            set(base(), "/spec/rounds", Some(Value::Null)),
            "spec.rounds",
        ),
        // CEL rules.
        (
            "quorum above clients",
            set(base(), "/spec/minClients", Some(json!(3))),
            "spec.minClients",
        ),
        (
            "window without topWindow",
            set(
                base(),
                "/spec/clients/0/model/adaptedLayers",
                Some(json!({"window": 4})),
            ),
            "spec.clients[0].model.adaptedLayers.window",
        ),
        (
            "topWindow without window",
            set(
                base(),
                "/spec/clients/1/model/adaptedLayers",
                Some(json!({"mode": "topWindow"})),
            ),
            "spec.clients[1].model.adaptedLayers.window",
        ),
        (
            "splits too large",
            set(
                base(),
                "/spec/task/splits",
                Some(json!({"validation": 0.5, "test": 0.5})),
            ),
            "spec.task.splits",
        ),
        (
            "shards without data",
            set(
                base(),
                "/spec/task/partition",
                Some(json!({"strategy": "shards"})),
            ),
            "spec.clients",
        ),
        (
            "cmga needs dema",
            set(base(), "/spec/adapter", Some(json!({"type": "lora"}))),
            "spec.aggregation.algorithm",
        ),
        (
            "hetlora needs lora",
            set(
                base(),
                "/spec/aggregation",
                Some(json!({"algorithm": "hetlora"})),
            ),
            "spec.aggregation.algorithm",
        ),
        (
            "loraRank needs lora",
            set(base(), "/spec/clients/0/loraRank", Some(json!(4))),
            "spec.clients",
        ),
        (
            "a site client with pod resources",
            set(
                set(
                    base(),
                    "/spec/clients/0/site",
                    Some(json!({"name": "hospital-a"})),
                ),
                "/spec/clients/0/resources",
                Some(json!({"limits": {"cpu": "2"}})),
            ),
            "spec.clients[0].site",
        ),
        (
            "a site that is not a DNS label",
            set(
                base(),
                "/spec/clients/0/site",
                Some(json!({"name": "Hospital A"})),
            ),
            "spec.clients[0].site.name",
        ),
        (
            "a site field that does not exist",
            set(
                base(),
                "/spec/clients/0/site",
                Some(json!({"name": "a", "endpoint": "x"})),
            ),
            "spec.clients[0].site.endpoint",
        ),
        // Envelope.
        (
            "wrong kind",
            set(base(), "/kind", Some(json!("TrainJob"))),
            "kind",
        ),
        (
            "wrong apiVersion",
            set(base(), "/apiVersion", Some(json!("heterotune.dev/v1"))),
            "apiVersion",
        ),
        (
            "bad name",
            set(base(), "/metadata/name", Some(json!("Quick Start"))),
            "metadata.name",
        ),
        (
            "namespace that walks out of the work folder",
            set(base(), "/metadata/namespace", Some(json!("../../.."))),
            "metadata.namespace",
        ),
        (
            "namespace that is not a string",
            set(base(), "/metadata/namespace", Some(json!(7))),
            "metadata.namespace",
        ),
    ];
    let mut failures = Vec::new();
    for (what, mut doc, path) in cases {
        match validate_value(&mut doc, None) {
            Ok(_) => failures.push(format!("{what}: accepted, expected a problem at {path}")),
            Err(problems) => {
                if !problems.paths().contains(&path) {
                    failures.push(format!(
                        "{what}: expected a problem at {path}, got:\n{problems}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn integer_numbers_are_doubles_for_cel() {
    // `serverMomentum: 0` (an integer in YAML) must pass the rule that
    // compares it with 0.0, as it does on the API server.
    let mut doc = set(
        base(),
        "/spec/aggregation",
        Some(json!({"algorithm": "local-only", "serverMomentum": 0})),
    );
    assert!(validate_value(&mut doc, None).is_ok());
    assert!(doc
        .pointer("/spec/aggregation/serverMomentum")
        .map(|v| v.is_f64())
        .unwrap_or(false));
}

#[test]
fn messages_say_what_is_allowed() {
    let mut doc = set(base(), "/spec/clients/1/model/family", Some(json!("gpt")));
    let problems = validate_value(&mut doc, None).expect_err("invalid");
    let text = problems.to_string();
    assert!(text.contains("\"bert\""), "{text}");
    assert!(text.contains("\"llama\""), "{text}");
    let mut doc = set(base(), "/spec/roundz", Some(json!(1)));
    let text = validate_value(&mut doc, None)
        .expect_err("invalid")
        .to_string();
    assert!(
        text.contains("known fields here") && text.contains("rounds"),
        "{text}"
    );
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let doc = set(base(), "/spec/rounds", Some(json!(0)));
    let mut doc = set(doc, "/spec/clients/0/model/family", Some(json!("gpt")));
    let problems = validate_value(&mut doc, None).expect_err("invalid");
    assert_eq!(
        problems.paths(),
        vec!["spec.clients[0].model.family", "spec.rounds"]
    );
}

#[test]
fn malformed_yaml_is_a_syntax_problem_with_a_location() {
    let problems = parse_federated_tune("spec: [unclosed\n  rounds: 3").expect_err("invalid");
    assert_eq!(problems.0[0].kind, ProblemKind::Syntax);
    assert!(problems.to_string().contains("line"), "{problems}");
}

fn started(mut doc: Value) -> Value {
    doc["status"] = json!({"phase": "Running", "round": 2});
    doc
}

#[test]
fn immutable_fields_cannot_change_once_started() {
    let old = started(base());
    // Allowed: more rounds, a new quorum, suspend.
    let mut new = set(started(base()), "/spec/rounds", Some(json!(10)));
    new = set(new, "/spec/suspend", Some(json!(true)));
    let mut old_defaulted = old.clone();
    check_object(&mut old_defaulted, None);
    assert!(validate_value(&mut new, Some(&old_defaulted)).is_ok());
    // Forbidden: another dataset, another model, another algorithm.
    for (pointer, value) in [
        ("/spec/task/dataset/uri", json!("cache://data/other.jsonl")),
        ("/spec/clients/0/model/uri", json!("cache://models/other")),
        ("/spec/aggregation", json!({"algorithm": "fedavg"})),
    ] {
        let mut new = set(started(base()), pointer, Some(value));
        let problems = validate_value(&mut new, Some(&old_defaulted)).expect_err(pointer);
        assert_eq!(problems.paths(), vec!["spec"], "{pointer}: {problems}");
    }
    // Before the run starts everything may change.
    let mut pending = base();
    pending["status"] = json!({"phase": "Pending"});
    check_object(&mut pending, None);
    let mut new = set(
        base(),
        "/spec/task/dataset/uri",
        Some(json!("cache://data/other.jsonl")),
    );
    assert!(validate_value(&mut new, Some(&pending)).is_ok());
}

#[test]
fn typed_round_trip_is_lossless() {
    let mut doc = base();
    let ft = validate_value(&mut doc, None).expect("valid");
    let back = serde_json::to_value(&ft).expect("serialises");
    let again: crate::FederatedTune = serde_json::from_value(back.clone()).expect("deserialises");
    assert_eq!(ft.spec, again.spec);
    // The typed form is itself valid (defaults are stable).
    let mut back = back;
    assert!(validate_value(&mut back, None).is_ok());
}

/// A client run by its own site's agent is a valid client like any other.
#[test]
fn a_site_client_is_valid() {
    let mut doc = set(
        base(),
        "/spec/clients/1/site",
        Some(json!({"name": "hospital-a"})),
    );
    let ft = validate_value(&mut doc, None).expect("a site client is valid");
    assert!(ft.spec.clients[1].is_remote());
    assert!(!ft.spec.clients[0].is_remote());
}
