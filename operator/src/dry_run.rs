//! `heterotune plan`: what a run would do, without doing it — clients and
//! their model families, adapted layers, trainable parameters and upload
//! size, the memory estimate and placement (GPU profile or CPU), the dtype
//! `auto` clients would get on this machine, the bridge model and what it
//! adds to every client, the store and how far a previous run there has
//! come.

mod plan;

pub use plan::{ClientPlan, PlacementKind, Plan, UNITS};

use heterotune_crds::dtype;
use heterotune_crds::layout::RunLayout;
use heterotune_crds::model::{wire, ModelFacts};
use heterotune_crds::spec::{Dtype, ModelSpec};
use heterotune_crds::uri::{self, Location};
use heterotune_crds::{FederatedTune, FederatedTuneSpec};

use crate::runner::report::human_bytes as bytes_si;
use crate::sizing::{
    self, BridgeModel, DataProfile, ModelShape, SizingConfig, SizingError, Target,
};

/// The shape of a backbone: from its local config.json, else the spec's
/// `parameters`, else the packaged-model table.
pub fn model_shape(model: &ModelSpec) -> Option<ModelShape> {
    if let Ok(Location::Local(dir)) = uri::resolve(&model.uri) {
        if let Ok(facts) = ModelFacts::read(&dir) {
            return Some(ModelShape::from_facts(&facts));
        }
    }
    if let Some(p) = model.parameters {
        return Some(ModelShape::from_parameters(model.family, p));
    }
    sizing::packaged_model(&model.uri)
}

/// The examples a client's trainer may prepare, from the run's dataset
/// when it is a local file: every record of it (what one client holds at
/// most) at `maxSeqLength` tokens each (an upper bound of their length),
/// so the estimate's frozen-prefix cache is an upper bound. `None` when the
/// dataset is not local or cannot be read (the cache is then counted at
/// `training.prefixCache.maxMemoryMiB`).
pub fn local_data_profile(spec: &FederatedTuneSpec) -> Option<DataProfile> {
    let Ok(Location::Local(path)) = uri::resolve(&spec.task.dataset.uri) else {
        return None;
    };
    let text = std::fs::read_to_string(path).ok()?;
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count() as u64;
    // A header row, when the file is a table; quoted fields that span lines
    // only add to the count.
    let json = spec.task.dataset.uri.ends_with(".jsonl")
        || spec.task.dataset.format == Some(heterotune_crds::spec::DatasetFormat::Jsonl);
    let examples = if json { lines } else { lines.saturating_sub(1) };
    Some(DataProfile {
        examples,
        mean_tokens: f64::from(spec.training.max_seq_length),
    })
}

/// The plan as text.
pub fn describe(
    ft: &FederatedTune,
    config: &SizingConfig,
    completed_rounds: Result<u32, &str>,
    layout: &RunLayout,
) -> String {
    Plan::of(ft, config, completed_rounds, layout).text()
}

/// Layers as ranges, 0-based and inclusive: `0-5`, `0-2, 4, 6-7`; `none`.
pub fn layer_ranges(layers: &[u64]) -> String {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &l in layers {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == l => *end = l,
            _ => runs.push((l, l)),
        }
    }
    if runs.is_empty() {
        return "none".into();
    }
    runs.iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first line: the run's settings.
fn headline(ft: &FederatedTune, slots: u64) -> String {
    let spec = &ft.spec;
    format!(
        "FederatedTune {:?}: {} clients, {} rounds of {} local steps (batch {}, {} tokens), quorum {}, algorithm {}, adapter {} (r={}, K={}, S={slots})\n",
        ft.metadata.name.as_deref().unwrap_or_default(),
        spec.clients.len(),
        spec.rounds,
        spec.training.local_steps,
        spec.training.batch_size,
        spec.training.max_seq_length,
        spec.quorum(),
        spec.aggregation.algorithm.as_str(),
        match spec.adapter.kind {
            heterotune_crds::spec::AdapterKind::Dema => "dema",
            heterotune_crds::spec::AdapterKind::Lora => "lora",
        },
        spec.adapter.rank,
        spec.adapter.experts,
    )
}

/// Bytes of the bridge's tensors a client uploads each round
/// ([`wire::bridge_upload`]; 0 without a bridge or when its shape is unknown).
fn bridge_upload_bytes(
    spec: &FederatedTuneSpec,
    bridge: Option<&Result<BridgeModel, SizingError>>,
) -> u64 {
    match bridge {
        Some(Ok(b)) => wire::bridge_upload(spec, b.shape.wire())
            .map(|t| wire::payload_bytes(&t))
            .unwrap_or_else(|_| sizing::trainable_parameters(&b.shape, &b.workload) * 2),
        _ => 0,
    }
}

/// The public pool's texts at most: `splits.pool` of the records left for
/// training once validation and test are split off. An upper bound: the
/// trainer drops duplicate texts first and rounds per class. `None` when
/// the run holds out no pool or the dataset is not a local file.
fn pool_texts_bound(spec: &FederatedTuneSpec, data: Option<DataProfile>) -> Option<u64> {
    let splits = &spec.task.splits;
    let data = data.filter(|_| splits.pool > 0.0)?;
    let train = data.examples as f64 * (1.0 - splits.validation - splits.test).max(0.0);
    Some((train * splits.pool).round() as u64)
}

/// Bytes of the pool ensemble's values a client uploads each round
/// ([`wire::pool_upload`]) at [`pool_texts_bound`] texts; 0 when the run
/// does not use the ensemble or the pool's size is unknown.
fn pool_upload_bytes(spec: &FederatedTuneSpec, data: Option<DataProfile>) -> u64 {
    pool_texts_bound(spec, data).map_or(0, |texts| {
        wire::payload_bytes(&wire::pool_upload(spec, texts))
    })
}

/// The pool ensemble's line: how many texts at most and what its values
/// add to every client's upload (`None` when the run does not use it).
fn pool_line(spec: &FederatedTuneSpec, data: Option<DataProfile>) -> Option<String> {
    if !spec.uses_pool_ensemble() {
        return None;
    }
    Some(match pool_texts_bound(spec, data) {
        Some(texts) => format!(
            "pool ensemble: at most {texts} texts ({} of the records left for training; \
             duplicates are dropped first) × {} classes: at most {} of probabilities per \
             client per round, in the upload column",
            spec.task.splits.pool,
            spec.task.labels.len(),
            bytes_si(pool_upload_bytes(spec, data)),
        ),
        None => format!(
            "pool ensemble: the dataset is not a local file, so the pool's size is unknown: \
             each client also sends {} B per pool text, not in the upload column",
            spec.task.labels.len() as u64 * wire::WIRE_ELEMENT_BYTES
        ),
    })
}

/// The bridge (`spec.bridge`): its model, size and what it adds to every
/// client (`None` without one).
fn bridge_lines(
    spec: &FederatedTuneSpec,
    bridge: Option<&Result<BridgeModel, SizingError>>,
    config: &SizingConfig,
) -> Option<String> {
    let model = &spec.bridge.as_ref()?.model;
    let b = match bridge? {
        Ok(b) => b,
        Err(e) => return Some(format!("bridge {}: {e}\n", model.uri)),
    };
    let adapted = sizing::adapted_layers(b.shape.num_layers, b.workload.slots, &b.workload.layers);
    let trainable = sizing::trainable_parameters(&b.shape, &b.workload);
    let adds = |target| sizing::human_bytes(b.parts(config, target).total());
    Some(format!(
        "bridge {} ({}): {:.1} M params, {} layers, adapted {} (S={}), {trainable} trainable; \
         every client trains it next to its own model\n  \
         adds per client: {} of host memory on a CPU, {} of GPU memory on a GPU (in the memory columns), \
         {} uploaded per round\n",
        model.uri,
        model.family.as_str(),
        b.shape.parameters as f64 / 1e6,
        b.shape.num_layers,
        layer_ranges(&adapted),
        b.workload.slots,
        adds(Target::Cpu),
        adds(Target::Gpu),
        bytes_si(bridge_upload_bytes(spec, bridge)),
    ))
}

/// What the clients with `dtype: auto` run in: `on_cpu` on this machine's
/// CPU, the GPU rule beside it (`None` when no client says `auto`).
fn dtype_line(spec: &FederatedTuneSpec, on_cpu: dtype::Resolved) -> Option<String> {
    let auto: Vec<&str> = spec
        .clients
        .iter()
        .filter(|c| c.model.dtype == Dtype::Auto)
        .map(|c| c.name.as_str())
        .collect();
    (!auto.is_empty()).then(|| {
        format!(
            "dtype of {}: {on_cpu} on this machine's CPU{}; on a CUDA GPU bfloat16 at compute \
             capability 8.0 or more, float32 below (memory is sized as bfloat16 on a GPU \
             and, on a CPU, as this machine's CPU runs it)",
            auto.join(", "),
            match on_cpu.reason {
                dtype::Reason::Avx512Bf16 | dtype::Reason::AmxBf16 => format!(
                    " by its flags, until the first trainer here times a GEMM in both dtypes \
                     (bfloat16 only when it is {}× faster)",
                    dtype::BF16_SPEEDUP
                ),
                _ => String::new(),
            }
        )
    })
}

/// How the frozen-prefix cache is counted in the memory column.
fn data_line(spec: &FederatedTuneSpec, data: Option<DataProfile>) -> String {
    match data {
        Some(d) => format!(
            "memory counts a frozen-prefix cache of at most {} examples (the dataset's records) × {} tokens",
            d.examples, spec.training.max_seq_length
        ),
        None => format!(
            "memory counts the frozen-prefix cache at its bound ({} MiB, training.prefixCache.maxMemoryMiB): the dataset is not a local file",
            if spec.training.prefix_cache.enabled { spec.training.prefix_cache.max_memory_mib } else { 0 }
        ),
    }
}

/// Where a previous run in the store stands.
fn progress_line(completed_rounds: Result<u32, &str>, rounds: u32) -> String {
    match completed_rounds {
        Ok(0) => "no round completed yet: `heterotune run` starts at round 1".into(),
        Ok(n) if n >= rounds => {
            format!("all {n} rounds are complete: `heterotune run` only rewrites the report")
        }
        Ok(n) => format!(
            "{n} of {rounds} rounds complete: `heterotune run` resumes at round {}",
            n + 1
        ),
        Err(why) => format!("store not checked: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sizing::Workload;
    use heterotune_crds::dtype::{resolve_cpu, CpuBf16Units};

    const SPEC: &str = r#"apiVersion: heterotune.dev/v1alpha1
kind: FederatedTune
metadata: { name: t }
spec:
  clients:
    - name: auto-a
      model: { family: bert, uri: "s3://m/a" }
    - name: exact
      model: { family: bert, uri: "s3://m/a", dtype: float32 }
    - name: auto-b
      model: { family: bert, uri: "s3://m/a", dtype: auto }
  task:
    dataset: { uri: "s3://d/x.jsonl" }
    labels: [a, b]
"#;

    fn ft() -> FederatedTune {
        heterotune_crds::validate::parse_federated_tune(SPEC).expect("valid spec")
    }

    #[test]
    fn layers_print_as_ranges() {
        assert_eq!(layer_ranges(&[0, 1, 2, 3, 4, 5]), "0-5");
        assert_eq!(layer_ranges(&[0, 1, 2, 4, 6, 7]), "0-2, 4, 6-7");
        assert_eq!(layer_ranges(&[9, 19, 29]), "9, 19, 29");
        assert_eq!(layer_ranges(&[]), "none");
    }

    #[test]
    fn the_plan_names_the_dtype_auto_clients_get() {
        let ft = ft();
        let units = |avx512_bf16| CpuBf16Units {
            avx512_bf16,
            amx_bf16: false,
        };
        let bf16 = dtype_line(&ft.spec, resolve_cpu(Dtype::Auto, units(true), None));
        let line = bf16.expect("two auto clients");
        assert!(line.starts_with("dtype of auto-a, auto-b: auto → bfloat16 (AVX512-BF16)"));
        let f32 = dtype_line(&ft.spec, resolve_cpu(Dtype::Auto, units(false), None));
        assert!(f32
            .expect("a line")
            .contains("auto → float32 (no bf16 units) on this machine's CPU"));
        let mut exact = ft.spec.clone();
        exact.clients.retain(|c| c.name == "exact");
        assert_eq!(
            dtype_line(&exact, resolve_cpu(Dtype::Auto, units(true), None)),
            None
        );
    }

    #[test]
    fn describe_prints_this_machines_choice() {
        let ft = ft();
        let layout = RunLayout::new("", "default", "t", "uid");
        let text = describe(
            &ft,
            &SizingConfig::default(),
            Err("not checked here"),
            &layout,
        );
        let here = dtype::resolve_this_cpu(Dtype::Auto).to_string();
        assert!(
            text.contains(&format!("dtype of auto-a, auto-b: {here}")),
            "{text}"
        );
    }

    /// A MiniLM-L6 client with a bridge at `bridge_uri`.
    fn bridged(bridge_uri: &str) -> FederatedTune {
        let yaml = SPEC.replace(
            "  task:",
            &format!("  bridge: {{ model: {{ family: bert, uri: \"{bridge_uri}\" }} }}\n  task:"),
        );
        let mut ft = heterotune_crds::validate::parse_federated_tune(&yaml).expect("valid spec");
        ft.spec.clients.truncate(1);
        ft.spec.clients[0].model.uri = "cache://models/all-MiniLM-L6-v2".into();
        ft
    }

    #[test]
    fn the_plan_prints_the_bridge_and_counts_it_per_client() {
        let layout = RunLayout::new("", "default", "t", "uid");
        let config = SizingConfig::default();
        let with = bridged("cache://models/paraphrase-MiniLM-L3-v2");
        let text = describe(&with, &config, Err("not checked here"), &layout);
        // Trainable: 3·(4·(64 + 8) + 4·8 + 4) = 972 shared, 2·8·384·3 = 18,432
        // per layer, the head 384·2 + 2 = 770 (two labels).
        assert!(
            text.contains(
                "bridge cache://models/paraphrase-MiniLM-L3-v2 (bert): 17.2 M params, 3 layers, \
                 adapted 0-2 (S=3), 20174 trainable"
            ),
            "{text}"
        );
        let bridge = BridgeModel::of(
            &with.spec,
            model_shape(&with.spec.bridge.as_ref().expect("bridge").model),
        )
        .expect("a bridge")
        .expect("known");
        let adds = |t| sizing::human_bytes(bridge.parts(&config, t).total());
        let line = format!(
            "adds per client: {} of host memory on a CPU, {} of GPU memory on a GPU",
            adds(Target::Cpu),
            adds(Target::Gpu)
        );
        assert!(text.contains(&line), "{text}");
        // The memory column: the client's own estimate plus the bridge's parts.
        let mut without = with.clone();
        without.spec.bridge = None;
        let shape = model_shape(&with.spec.clients[0].model).expect("shape");
        // One client: S is its window's depth, 6.
        let w = Workload::of(&with.spec, 0, 6);
        let own = sizing::estimate(&shape, &w, &config, Target::Cpu);
        let sum = own.with_bridge(bridge.parts(&config, Target::Cpu)).total;
        assert!(text.contains(&sizing::human_bytes(sum)), "{text}");
        let plain = describe(&without, &config, Err("not checked here"), &layout);
        assert!(!plain.contains("bridge"), "{plain}");
        assert!(plain.contains(&sizing::human_bytes(own.total)), "{plain}");
    }

    #[test]
    fn the_upload_column_is_what_the_trainer_sends() {
        let layout = RunLayout::new("", "default", "t", "uid");
        let config = SizingConfig::default();
        let upload = |ft: &FederatedTune| {
            Plan::of(ft, &config, Err("not checked here"), &layout).clients[0].upload_bytes
        };
        let mut ft = bridged("cache://models/paraphrase-MiniLM-L3-v2");
        // In bf16 (2 bytes): MiniLM-L6 (d = 384, 6 layers, S = 6, r = 8,
        // K = 4): shared 6·(4·64 + 4·8 + 4·8 + 4) = 1944, family parts
        // 2·8·384·6 = 36,864, head 770; the bridge all of its 20,174.
        let bridge = 20_174 * 2;
        assert_eq!(upload(&ft), (1944 + 36_864 + 770) * 2 + bridge);
        ft.spec.adapter.share.head = false;
        assert_eq!(upload(&ft), (1944 + 36_864) * 2 + bridge);
        ft.spec.adapter.share.family_parts = false;
        assert_eq!(upload(&ft), 1944 * 2 + bridge);
        ft.spec.aggregation.algorithm = heterotune_crds::spec::AggregationAlgorithm::LocalOnly;
        assert_eq!(upload(&ft), bridge, "local-only: the bridge alone");
        // The pool ensemble's values: a local dataset of 100 records, 80 %
        // of them for training, 10 % of those in the pool: 8 texts × 2
        // classes of probabilities and 2 class counts.
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("d.jsonl");
        std::fs::write(&data, "{\"text\": \"a\", \"label\": \"a\"}\n".repeat(100)).expect("write");
        ft.spec.task.dataset.uri = data.display().to_string();
        ft.spec.task.splits.pool = 0.1;
        assert!(ft.spec.uses_pool_ensemble());
        assert_eq!(upload(&ft), bridge + (8 * 2 + 2) * 2);
        let text = describe(&ft, &config, Err("not checked here"), &layout);
        assert!(
            text.contains("pool ensemble: at most 8 texts (0.1 of the records left for training"),
            "{text}"
        );
    }

    #[test]
    fn a_site_client_is_placed_by_its_site() {
        let layout = RunLayout::new("", "default", "t", "uid");
        let config = SizingConfig::default();
        let mut ft = bridged("cache://models/paraphrase-MiniLM-L3-v2");
        ft.spec.clients[0].site = Some(heterotune_crds::spec::SiteSpec {
            name: "hospital-x".into(),
        });
        let plan = Plan::of(&ft, &config, Err("not checked here"), &layout);
        assert_eq!(plan.clients[0].placement, PlacementKind::Site);
        assert_eq!(plan.clients[0].site.as_deref(), Some("hospital-x"));
        assert!(
            plan.clients[0].host_memory_bytes.is_some(),
            "what it needs is shown"
        );
        let text = plan.text();
        assert!(
            text.contains("site hospital-x: its agent runs it (`heterotune site`)"),
            "{text}"
        );
        // Unknown shape: still the site's.
        ft.spec.clients[0].model.uri = "s3://m/private".into();
        let plan = Plan::of(&ft, &config, Err("not checked here"), &layout);
        assert_eq!(plan.clients[0].placement, PlacementKind::Site);
    }

    #[test]
    fn the_plan_names_an_unknown_bridge_by_its_field() {
        let layout = RunLayout::new("", "default", "t", "uid");
        let text = describe(
            &bridged("s3://m/private-bridge"),
            &SizingConfig::default(),
            Err("not checked here"),
            &layout,
        );
        assert!(
            text.contains("bridge s3://m/private-bridge: the size of the bridge model s3://m/private-bridge (spec.bridge.model.uri) is unknown"),
            "{text}"
        );
        assert!(
            text.contains("NO FIT: the size of the bridge model"),
            "{text}"
        );
    }

    #[test]
    fn a_local_dataset_bounds_the_prefix_cache_by_its_records() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("d.jsonl");
        std::fs::write(
            &data,
            "{\"text\": \"a\", \"label\": \"a\"}\n\n{\"text\": \"b\", \"label\": \"b\"}\n",
        )
        .expect("write");
        let mut ft = ft();
        ft.spec.task.dataset.uri = format!("file://{}", data.display());
        let profile = local_data_profile(&ft.spec).expect("a local file");
        // Two records (the blank line is none) at maxSeqLength tokens.
        assert_eq!(profile.examples, 2);
        assert_eq!(
            profile.mean_tokens,
            f64::from(ft.spec.training.max_seq_length)
        );
        let layout = RunLayout::new("", "default", "t", "uid");
        let text = describe(
            &ft,
            &SizingConfig::default(),
            Err("not checked here"),
            &layout,
        );
        assert!(text.contains("at most 2 examples"), "{text}");
        // Not local: the bound.
        assert_eq!(local_data_profile(&self::ft().spec), None);
    }
}
