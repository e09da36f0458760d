//! `heterotune plan`: what a run would do, without doing it — clients and
//! their model families, adapted layers, trainable parameters and upload
//! size, the memory estimate and placement (GPU profile or CPU), the store
//! and how far a previous run there has come.

use std::fmt::Write as _;

use heterotune_crds::layout::RunLayout;
use heterotune_crds::model::ModelFacts;
use heterotune_crds::uri::{self, Location};
use heterotune_crds::FederatedTune;

use crate::runner::report::human_bytes as bytes_si;
use crate::sizing::{self, ModelShape, Placement, SizingConfig, Workload};

/// The shape of client `index`'s model: from its local config.json, else the spec's
/// `parameters`, else the packaged-model table.
pub fn model_shape(ft: &FederatedTune, index: usize) -> Option<ModelShape> {
    let client = &ft.spec.clients[index];
    if let Ok(Location::Local(dir)) = uri::resolve(&client.model.uri) {
        if let Ok(facts) = ModelFacts::read(&dir) {
            return Some(ModelShape::from_facts(&facts));
        }
    }
    if let Some(p) = client.model.parameters {
        return Some(ModelShape::from_parameters(client.model.family, p));
    }
    sizing::packaged_model(&client.model.uri)
}

/// The plan as text.
pub fn describe(
    ft: &FederatedTune,
    config: &SizingConfig,
    completed_rounds: Option<u32>,
    layout: &RunLayout,
) -> String {
    let spec = &ft.spec;
    let shapes: Vec<Option<ModelShape>> = (0..spec.clients.len())
        .map(|i| model_shape(ft, i))
        .collect();
    let slots = sizing::resolve_slots(spec, &shapes);
    let mut out = headline(ft, slots);
    let _ = writeln!(
        out,
        "\n{:<14} {:<34} {:>9} {:>7} {:>14} {:>11} {:>10} {:>10}  placement",
        "client", "family", "params", "layers", "adapted", "trainable", "upload", "memory"
    );
    let mut upload_total = 0u64;
    for (i, c) in spec.clients.iter().enumerate() {
        let row = ClientRow::of(spec, i, shapes[i].as_ref(), slots, config);
        // Uploads are bf16 deltas of the shared parts (2 bytes a parameter).
        let upload = row.trainable * 2;
        upload_total += upload;
        let _ = writeln!(
            out,
            "{:<14} {:<34} {:>9} {:>7} {:>14} {:>11} {:>10} {:>10}  {}",
            c.name,
            spec.family_key(i),
            row.params,
            row.layers,
            row.adapted,
            row.trainable,
            bytes_si(upload),
            row.memory,
            row.placement
        );
    }
    let _ = writeln!(
        out,
        "\nabout {} uploaded per round in all; store {} (run folder {})",
        bytes_si(upload_total),
        spec.storage.uri,
        layout.run_dir()
    );
    let _ = writeln!(out, "{}", progress_line(completed_rounds, spec.rounds));
    out
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

/// One client's line of the table, as text cells.
struct ClientRow {
    params: String,
    layers: String,
    adapted: String,
    trainable: u64,
    memory: String,
    placement: String,
}

impl ClientRow {
    fn of(
        spec: &heterotune_crds::FederatedTuneSpec,
        i: usize,
        shape: Option<&ModelShape>,
        slots: u64,
        config: &SizingConfig,
    ) -> ClientRow {
        let Some(shape) = shape else {
            return ClientRow {
                params: "?".into(),
                layers: "?".into(),
                adapted: "?".into(),
                trainable: 0,
                memory: "-".into(),
                placement: "unknown model shape".into(),
            };
        };
        let workload = Workload::of(spec, i, slots);
        let adapted = sizing::adapted_layers(shape.num_layers, slots, spec.layer_selection(i));
        let placement = sizing::place(
            &spec.clients[i],
            Some(shape),
            &workload,
            spec.trainer.allow_cpu,
            config,
            i,
        );
        let (memory, placement) = match placement {
            Ok(p) => (
                p.estimated_bytes()
                    .map(sizing::human_bytes)
                    .unwrap_or_else(|| "-".into()),
                match &p {
                    Placement::Gpu { profile, .. } => format!("GPU profile {}", profile.name),
                    Placement::Cpu { .. } => "CPU".to_string(),
                    Placement::Explicit { .. } => "explicit resources".to_string(),
                },
            ),
            Err(e) => ("-".to_string(), format!("NO FIT: {e}")),
        };
        ClientRow {
            params: format!("{:.1} M", shape.parameters as f64 / 1e6),
            layers: shape.num_layers.to_string(),
            adapted: format!("{adapted:?}"),
            trainable: sizing::trainable_parameters(shape, &workload),
            memory,
            placement,
        }
    }
}

/// Where a previous run in the store stands.
fn progress_line(completed_rounds: Option<u32>, rounds: u32) -> String {
    match completed_rounds {
        Some(0) => "no round completed yet: `heterotune run` starts at round 1".into(),
        Some(n) if n >= rounds => {
            format!("all {n} rounds are complete: `heterotune run` only rewrites the report")
        }
        Some(n) => format!(
            "{n} of {rounds} rounds complete: `heterotune run` resumes at round {}",
            n + 1
        ),
        None => "store not checked".into(),
    }
}
