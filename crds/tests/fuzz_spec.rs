//! A bounded fuzz run of the spec parser and validator (`heterotune
//! validate`, the runner and the controller's admission of a spec all go
//! through it): each case mutates one of the committed example specs
//! (`examples/*.yaml`, the seed corpus) with random byte edits; parsing and
//! validating must return, valid or with problems, never panic. proptest
//! bounds the run (a fixed number of seeded cases) and shrinks a failure.

use std::path::Path;

use heterotune_crds::validate::parse_federated_tune;
use heterotune_tests::mutate::mutate;
use proptest::prelude::*;

fn seeds() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .expect("examples")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| std::fs::read_to_string(p).expect("example"))
        .collect();
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_spec_parser_never_panics(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..24),
    ) {
        let seeds = seeds();
        let seed = which.get(&seeds);
        let text = String::from_utf8_lossy(&mutate(seed.as_bytes(), &edits)).into_owned();
        let _ = parse_federated_tune(&text);
    }
}

#[test]
fn every_seed_is_valid() {
    let seeds = seeds();
    assert!(seeds.len() >= 3, "the corpus is examples/*.yaml");
    for s in seeds {
        assert!(parse_federated_tune(&s).is_ok());
    }
}
