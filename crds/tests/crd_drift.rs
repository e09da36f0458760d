//! The committed CRD copies must equal what `crdgen` generates now.

use std::path::Path;

#[test]
fn committed_crds_match_the_generated_one() {
    let yaml = heterotune_crds::crd::crd_yaml().expect("CRD serialises");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for target in [
        "charts/heterotune/crds/federatedtunes.heterotune.dev.yaml",
        "manifests/crds/federatedtunes.heterotune.dev.yaml",
    ] {
        let committed = std::fs::read_to_string(root.join(target)).unwrap_or_default();
        assert!(
            committed == yaml,
            "{target} is out of date: run `cargo run -p heterotune-crds --bin crdgen` and commit it"
        );
    }
}

#[test]
fn generated_crd_has_the_promised_shape() {
    let crd = heterotune_crds::crd::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("federatedtunes.heterotune.dev")
    );
    assert_eq!(crd.spec.scope, "Namespaced");
    let names = &crd.spec.names;
    assert_eq!(
        names.short_names.as_deref(),
        Some(&["ft".to_string(), "fedtune".to_string()][..])
    );
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v
        .subresources
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .is_some());
    let columns: Vec<&str> = v
        .additional_printer_columns
        .as_ref()
        .map(|c| c.iter().map(|c| c.name.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        columns,
        ["Phase", "Round", "Ready", "Global", "Local", "Age", "Reason", "Message"]
    );
    // Reason and Message only with `kubectl get -o wide`.
    let wide: Vec<(&str, Option<i32>)> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.as_str(), c.priority))
        .filter(|(_, p)| p.is_some())
        .collect();
    assert_eq!(wide, [("Reason", Some(1)), ("Message", Some(1))]);
    let schema = heterotune_crds::crd::schema_json();
    // Conditions in the Kubernetes Condition shape, a list-map keyed by type.
    let conditions = schema
        .pointer("/properties/status/properties/conditions")
        .expect("status.conditions");
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
    let condition = &conditions["items"]["properties"];
    assert_eq!(
        condition["status"]["enum"],
        serde_json::json!(["True", "False", "Unknown"])
    );
    assert_eq!(condition["lastTransitionTime"]["format"], "date-time");
    let states = schema
        .pointer("/properties/status/properties/clients/items/properties/state/enum")
        .expect("the client state enum");
    assert_eq!(
        states,
        &serde_json::to_value(heterotune_crds::status::ClientState::ALL).expect("json")
    );
    let rules = schema
        .pointer("/properties/spec/x-kubernetes-validations")
        .and_then(|r| r.as_array());
    assert!(
        rules.map(|r| r.len() >= 5).unwrap_or(false),
        "spec CEL rules missing"
    );
    // Structural schema: no references left for the API server to reject.
    let text = schema.to_string();
    assert!(!text.contains("$ref") && !text.contains("anyOf") && !text.contains("oneOf"));
}

#[test]
fn examples_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/ exists") {
        let path = entry.expect("readable").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        if let Err(problems) = heterotune_crds::validate::parse_federated_tune(&text) {
            panic!("{}:\n{problems}", path.display());
        }
        seen += 1;
    }
    assert!(seen >= 4, "expected at least 4 examples, found {seen}");
}
