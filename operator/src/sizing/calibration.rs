//! The estimate held to the measured peaks of `scripts/bench_memory.py`
//! (docs/data/memory.json): for every measured model × dtype × adapter ×
//! batch/sequence setting, the CPU estimate is at least the trainer's peak
//! RSS and at most 25 % above it. A trainer change that moves memory shows
//! up here once the benchmark is rerun.

use heterotune_crds::spec::FederatedTuneSpec;
use serde::Deserialize;

use super::*;

/// The benchmark's measurements.
const MEASURED: &str = include_str!("../../../docs/data/memory.json");

/// The most an estimate may lie above a measured peak.
const MAX_OVER: f64 = 1.25;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Doc {
    rows: Vec<Row>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    model: String,
    setting: String,
    dtype: String,
    dema: Run,
    lora: Run,
}

/// One measured `heterotune run`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Run {
    /// The train process's peak RSS (wait4 `ru_maxrss`), bytes.
    peak_rss: u64,
    /// Training, validation and test examples the trainer prepared.
    examples: [u64; 3],
    /// Bytes of the frozen-prefix cache files it wrote.
    prefix_cache_bytes: u64,
    /// The spec it ran.
    spec: serde_json::Value,
}

/// The CPU estimate of a measured run, with the data it prepared.
fn estimated(run: &Run) -> (u64, String) {
    let yaml = serde_json::to_string(&run.spec).expect("a spec");
    let spec: FederatedTuneSpec = heterotune_crds::validate::parse_federated_tune(&yaml)
        .expect("the benchmark's spec is valid")
        .spec;
    let shape = packaged_model(&spec.clients[0].model.uri).expect("a packaged model");
    let slots = resolve_slots(&spec, &[Some(shape.clone())]);
    let examples: u64 = run.examples.iter().sum();
    let elt = spec.clients[0].model.dtype.bytes();
    let mean_tokens = run.prefix_cache_bytes as f64 / (examples * shape.hidden_size * elt) as f64;
    let data = DataProfile {
        examples,
        mean_tokens,
    };
    let w = Workload::of(&spec, 0, slots).with_data(Some(data));
    let e = estimate(&shape, &w, &SizingConfig::default(), Target::Cpu);
    (e.total, format!("{e:?}"))
}

#[test]
fn the_cpu_estimate_holds_every_measured_peak_within_25_percent() {
    let doc: Doc = serde_json::from_str(MEASURED).expect("docs/data/memory.json parses");
    assert!(!doc.rows.is_empty(), "docs/data/memory.json has no rows");
    let mut failures = Vec::new();
    for row in &doc.rows {
        for (adapter, run) in [("dema", &row.dema), ("lora", &row.lora)] {
            let (total, parts) = estimated(run);
            let ratio = total as f64 / run.peak_rss as f64;
            if !(1.0..=MAX_OVER).contains(&ratio) {
                failures.push(format!(
                    "{} {} {} {adapter}: estimate {} for a measured peak of {} ({ratio:.2}×): {parts}",
                    row.model,
                    row.setting,
                    row.dtype,
                    human_bytes(total),
                    human_bytes(run.peak_rss)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
