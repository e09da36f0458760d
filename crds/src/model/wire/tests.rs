//! The upload computed from the facts against real artifacts: the
//! manifests in `fixtures/` are round-3 client manifests the trainer wrote
//! in the heterogeneity benchmark (S1, TREC-6, the bridge with
//! `poolTeacher: ensemble`, one per packaged backbone), `spec.json` that
//! run's spec and `config-*.json` the packaged models' `config.json`.

use std::path::Path;

use super::*;
use crate::manifest::ArtifactManifest;
use crate::model::slots::resolve_slots;
use crate::spec::PoolTeacher;
use crate::FederatedTune;

const SPEC: &str = include_str!("fixtures/spec.json");
/// `pool.probs` rows in those artifacts: the TREC pool (10 % of the
/// training split) of that run's data.
const POOL_TEXTS: u64 = 431;

fn facts(uri: &str) -> ModelFacts {
    let name = uri.rsplit('/').next().expect("model name");
    let text = match name {
        "paraphrase-MiniLM-L3-v2" => include_str!("fixtures/config-paraphrase-MiniLM-L3-v2.json"),
        "all-MiniLM-L6-v2" => include_str!("fixtures/config-all-MiniLM-L6-v2.json"),
        "all-mpnet-base-v2" => include_str!("fixtures/config-all-mpnet-base-v2.json"),
        "SmolLM2-135M-Instruct" => include_str!("fixtures/config-SmolLM2-135M-Instruct.json"),
        other => panic!("no fixture config for {other}"),
    };
    ModelFacts::from_bytes(Path::new(name), text.as_bytes()).expect("fixture config parses")
}

fn spec() -> FederatedTuneSpec {
    let ft: FederatedTune = serde_json::from_str(SPEC).expect("fixture spec parses");
    ft.spec
}

/// What client `index` of the fixture run sends, computed.
fn upload(spec: &FederatedTuneSpec, index: usize) -> Vec<WireTensor> {
    let depths = (0..spec.clients.len()).map(|i| {
        let n = facts(&spec.clients[i].model.uri).num_layers as usize;
        LayerSelection::from_spec(spec.layer_selection(i), n).window_depth(n)
    });
    let slots = resolve_slots(spec.adapter.slots, depths);
    let own = facts(&spec.clients[index].model.uri);
    let bridge = facts(&spec.bridge.as_ref().expect("a bridge").model.uri);
    let mut t = own_upload(spec, index, &own, slots).expect("own upload");
    t.extend(bridge_upload(spec, &bridge).expect("bridge upload"));
    t.extend(pool_upload(spec, POOL_TEXTS));
    t.sort();
    t
}

#[test]
fn computed_uploads_equal_the_artifacts_the_trainer_wrote() {
    let spec = spec();
    let manifests = [
        include_str!("fixtures/manifest-edge-a.json"),
        include_str!("fixtures/manifest-clinic-a.json"),
        include_str!("fixtures/manifest-hospital-a.json"),
        include_str!("fixtures/manifest-bank-a.json"),
    ];
    for text in manifests {
        let m: ArtifactManifest = serde_json::from_str(text).expect("fixture manifest");
        let client = m.client.clone().expect("a client manifest");
        let index = spec
            .clients
            .iter()
            .position(|c| c.name == client)
            .expect("client in the spec");
        let mut written: Vec<WireTensor> = m
            .tensors
            .iter()
            .map(|t| {
                assert_eq!(t.dtype, WIRE_DTYPE, "{client}: {}", t.name);
                WireTensor {
                    name: t.name.clone(),
                    shape: t.shape.iter().map(|&d| d as u64).collect(),
                }
            })
            .collect();
        written.sort();
        let computed = upload(&spec, index);
        assert_eq!(computed, written, "{client}: tensor list");
        assert_eq!(
            safetensors_file_bytes(&computed),
            m.artifact.bytes,
            "{client}: file size"
        );
    }
}

#[test]
fn the_bank_window_sends_three_family_layers_of_the_top_six() {
    let spec = spec();
    let bank = spec.clients.iter().position(|c| c.name == "bank-a");
    let own = own_upload(
        &spec,
        bank.expect("bank-a"),
        &facts("SmolLM2-135M-Instruct"),
        3,
    )
    .expect("upload");
    let family: Vec<&str> = own
        .iter()
        .filter(|t| t.name.ends_with("down.weight"))
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(
        family,
        [
            "family.layer25.down.weight",
            "family.layer27.down.weight",
            "family.layer29.down.weight"
        ]
    );
}

#[test]
fn share_policy_and_local_only_shrink_the_upload() {
    let mut spec = spec();
    let minilm = facts("all-MiniLM-L6-v2");
    let full = payload_bytes(&own_upload(&spec, 2, &minilm, 3).expect("upload"));
    // K(r² + r) + Kr + K per slot, 2rd per adapted layer, Cd + C.
    let shared = 3 * (4 * (64 + 8) + 4 * 8 + 4);
    let family = 3 * 2 * 8 * 384;
    assert_eq!(full, 2 * (shared + family + 6 * 384 + 6));
    spec.adapter.share.family_parts = false;
    spec.adapter.share.head = false;
    let shared_only = own_upload(&spec, 2, &minilm, 3).expect("upload");
    assert_eq!(payload_bytes(&shared_only), 2 * shared);
    spec.aggregation.algorithm = AggregationAlgorithm::LocalOnly;
    assert!(own_upload(&spec, 2, &minilm, 3).expect("upload").is_empty());
}

#[test]
fn lora_adapts_every_window_layer_and_narrows_grouped_values() {
    let mut spec = spec();
    spec.adapter.kind = AdapterKind::Lora;
    spec.adapter.share.head = false;
    let bank = spec.clients.iter().position(|c| c.name == "bank-a");
    let smol = facts("SmolLM2-135M-Instruct");
    let t = own_upload(&spec, bank.expect("bank-a"), &smol, 3).expect("upload");
    // Six layers (the window), q: [r, 576] + [576, r], v: [r, 576] + [3·64, r].
    assert_eq!(t.len(), 6 * 4);
    assert!(t.contains(&WireTensor::new("lora.layer24.value.b".into(), &[192, 8])));
    assert_eq!(elements(&t), 6 * 8 * (576 + 576 + 576 + 192));
    spec.clients[0].lora_rank = Some(4);
    let edge = own_upload(&spec, 0, &facts("paraphrase-MiniLM-L3-v2"), 3).expect("upload");
    assert_eq!(elements(&edge), 3 * 4 * 4 * 384, "rank 4 on all 3 layers");
}

#[test]
fn without_a_bridge_or_ensemble_nothing_extra_is_sent() {
    let mut spec = spec();
    let facts = facts("paraphrase-MiniLM-L3-v2");
    spec.bridge
        .as_mut()
        .expect("bridge")
        .distillation
        .pool_teacher = PoolTeacher::Validated;
    assert!(pool_upload(&spec, POOL_TEXTS).is_empty());
    // The ensemble teacher (the default) sends nothing without a pool.
    spec.bridge
        .as_mut()
        .expect("bridge")
        .distillation
        .pool_teacher = PoolTeacher::Ensemble;
    assert!(!pool_upload(&spec, POOL_TEXTS).is_empty());
    spec.task.splits.pool = 0.0;
    assert!(pool_upload(&spec, POOL_TEXTS).is_empty());
    spec.bridge = None;
    assert!(bridge_upload(&spec, &facts).expect("no bridge").is_empty());
}

#[test]
fn the_file_size_counts_header_padding() {
    // {"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]}} is 55 bytes,
    // padded to 56; one more character of name fills it, two pad to 64.
    let named = |name: &str| [WireTensor::new(name.into(), &[3])];
    assert_eq!(safetensors_file_bytes(&named("a")), 8 + 56 + 6);
    assert_eq!(safetensors_file_bytes(&named("ab")), 8 + 56 + 6);
    assert_eq!(safetensors_file_bytes(&named("abc")), 8 + 64 + 6);
}
