//! A bounded fuzz run of the trainer's parsers of untrusted input: the
//! safetensors reader of client artifacts and globals, the dataset loader
//! (JSONL, CSV), and client manifests. Each case mutates a seed (the
//! committed corpus in `tests/corpus/`, or a valid artifact made here) with
//! random byte edits; the parser must return, `Ok` or `Err`, never panic.
//! proptest keeps the run bounded (a fixed number of cases, seeded) and
//! shrinks a failure to a small input.

use std::collections::BTreeMap;
use std::path::Path;

use heterotune_crds::manifest::ArtifactManifest;
use heterotune_tests::mutate::mutate;
use heterotune_trainer::aggregate::{array, Array, WireDtype};
use heterotune_trainer::data::source::{load, DatasetConfig};
use proptest::prelude::*;

/// Random edits: (where, byte, what: replace / insert / delete / repeat).
fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..24)
}

fn artifact() -> Vec<u8> {
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "shared.0.w".to_string(),
        Array::new(vec![2, 3], vec![0.5, -1.0, 2.0, 0.0, 1e-3, 7.0]).expect("array"),
    );
    tensors.insert(
        "head.b".to_string(),
        Array::new(vec![3], vec![0.1, 0.2, 0.3]).expect("array"),
    );
    array::serialize(&tensors, WireDtype::Bf16)
        .expect("serialise")
        .0
}

fn corpus(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/corpus")
            .join(name),
    )
    .expect("corpus file")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn safetensors_reader_never_panics(e in edits()) {
        let bytes = mutate(&artifact(), &e);
        let _ = array::parse_safetensors(&bytes, Path::new("fuzz.safetensors"));
    }

    #[test]
    fn dataset_loader_never_panics(e in edits(), csv in any::<bool>()) {
        let (name, seed) = if csv { ("d.csv", corpus("tiny.csv")) } else { ("d.jsonl", corpus("tiny.jsonl")) };
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(name);
        std::fs::write(&file, mutate(&seed, &e)).expect("write");
        let _ = load(&DatasetConfig::new(file.display().to_string()));
    }

    #[test]
    fn manifest_reader_never_panics(e in edits()) {
        let seed = corpus("manifest.json");
        let _ = serde_json::from_slice::<ArtifactManifest>(&mutate(&seed, &e));
    }
}

#[test]
fn the_seeds_parse() {
    assert!(array::parse_safetensors(&artifact(), Path::new("seed")).is_ok());
    for name in ["tiny.jsonl", "tiny.csv"] {
        let file = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/corpus")
            .join(name);
        let data = load(&DatasetConfig::new(file.display().to_string()));
        assert!(data.is_ok(), "{name}: {:?}", data.err());
    }
    serde_json::from_slice::<ArtifactManifest>(&corpus("manifest.json")).expect("manifest seed");
}
