//! `heterotune bytes`: what one client uploads per round, per method and
//! per backbone, computed from the models' `config.json` and the spec's
//! adapter settings (exact counts, nothing is run). The tensors come from
//! [`heterotune_crds::model::wire`], the one copy of the trainer's upload
//! rules; this module picks the methods and backbones and renders the table
//! ([`render`]), also into a marked block of a Markdown file.

mod render;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use heterotune_crds::model::wire::{self, WireTensor};
use heterotune_crds::model::{slots, LayerSelection, ModelError, ModelFacts, SlotError};
use heterotune_crds::spec::{
    AdapterKind, AggregationAlgorithm, FederatedTuneSpec, LayerSelectionMode, SharePolicy,
};
use heterotune_crds::uri::{self, Location};
use serde::Serialize;

pub use render::{replace_block, BLOCK_BEGIN, BLOCK_END};

use crate::cli::output::{self, Output, OutputError};

/// LoRA ranks of the HetLoRA / FlexLoRA columns (`examples/hetlora-baseline.yaml`
/// gives its clients 4, 8 and 16).
pub const HETLORA_RANKS: [u32; 2] = [4, 16];

/// Reference configurations the table can add by name (`--model llama-2-7b`):
/// the `config.json` facts of Meta's LLaMA-2 checkpoints.
pub const REFERENCE_MODELS: [(&str, &str); 2] = [
    ("llama-2-7b", include_str!("llama-2-7b.config.json")),
    ("llama-2-13b", include_str!("llama-2-13b.config.json")),
];

/// The arguments of `heterotune bytes`.
#[derive(Debug, Clone, clap::Args)]
pub struct BytesArgs {
    /// The FederatedTune file: its adapter settings, labels, bridge and
    /// clients' backbones (one row per distinct backbone and layer selection).
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// Another backbone row (at `adapter.layers`): a model folder, its
    /// config.json, a cache:// URI, or `llama-2-7b` / `llama-2-13b`; repeatable.
    #[arg(long = "model", value_name = "MODEL")]
    pub models: Vec<String>,
    /// Texts in the public pool: `poolTeacher: ensemble` (with the spec's
    /// bridge) sends `2·C` bytes per text; without it the pool is left out.
    #[arg(long, value_name = "N")]
    pub pool_texts: Option<u64>,
    /// Also write the table between the bytes-table markers of this
    /// Markdown file (docs/benchmarks.md).
    #[arg(long, value_name = "FILE")]
    pub docs: Option<PathBuf>,
    /// Output: `table` (Markdown text), `json` or `yaml`.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: Output,
}

/// Why the table cannot be computed.
#[derive(Debug, thiserror::Error)]
pub enum BytesError {
    /// A model's facts could not be read.
    #[error("{what}: {source}")]
    Model {
        what: String,
        #[source]
        source: ModelError,
    },
    /// A model URI that is not on this machine.
    #[error("{what}: {uri} is not a local model (run scripts/setup.sh for cache:// models, or pass --model with a local folder)")]
    NotLocal { what: String, uri: String },
    /// The adapter does not fit a backbone.
    #[error("{what}: {source}")]
    Slots {
        what: String,
        #[source]
        source: SlotError,
    },
    /// The Markdown file has no marked block, or cannot be read or written.
    #[error("{path}: {message}")]
    Docs { path: PathBuf, message: String },
    /// The output could not be serialised.
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// The table: the settings it was computed at and one row per backbone.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BytesTable {
    /// DeMA rank r (and LoRA-FedAvg's rank).
    pub rank: u32,
    /// DeMA experts K.
    pub experts: u32,
    /// DeMA slots S (resolved over the spec's clients).
    pub slots: u64,
    /// Classes C (the head's width).
    pub classes: u64,
    /// Pool texts of the pool-ensemble column, when given.
    pub pool_texts: Option<u64>,
    /// Bytes of the bridge's tensors, per client and round (0 without a bridge).
    pub bridge: u64,
    /// The bridge's backbone.
    pub bridge_model: Option<String>,
    /// Bytes of the pool ensemble's values, per client and round.
    pub pool: Option<u64>,
    /// One row per backbone.
    pub rows: Vec<BackboneBytes>,
}

/// What one client of a backbone uploads per round, by method (bf16 tensor
/// bytes; `dema_file` is the whole safetensors file).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackboneBytes {
    /// The model (folder name) and its layer selection.
    pub backbone: String,
    /// Backbone parameters the trainer loads.
    pub parameters: u64,
    /// Layers DeMA adapts.
    pub dema_layers: Vec<usize>,
    /// Layers LoRA adapts (every layer of the window).
    pub lora_layers: usize,
    /// Full-model FedAvg: every backbone parameter and the head.
    pub full_model: u64,
    /// LoRA-FedAvg at rank r on query and value, with the head.
    pub lora: u64,
    /// LoRA at each of [`HETLORA_RANKS`] (HetLoRA / FlexLoRA clients).
    pub hetlora: Vec<RankBytes>,
    /// DeMA, shared part only (`share: {familyParts: false, head: false}`).
    pub dema_shared: u64,
    /// DeMA, shared part and head (`share.familyParts: false`).
    pub dema_shared_head: u64,
    /// DeMA, shared part, family parts and head (the default).
    pub dema: u64,
    /// The safetensors file of [`BackboneBytes::dema`] as the trainer writes it.
    pub dema_file: u64,
}

/// What a LoRA client of one rank sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RankBytes {
    /// The client's LoRA rank.
    pub rank: u32,
    /// Its bytes per round.
    pub bytes: u64,
}

impl BackboneBytes {
    /// DeMA (default) as a fraction of full-model FedAvg.
    pub fn dema_vs_full(&self) -> f64 {
        self.dema as f64 / self.full_model as f64
    }
}

/// One backbone row to compute: its label, facts and layer selection.
struct Backbone {
    label: String,
    facts: ModelFacts,
    spec: FederatedTuneSpec,
}

/// `heterotune bytes`: the table of `spec` (read from `args.file`) as
/// `args.output` says; with `args.docs`, that file's block rewritten too.
///
/// # Errors
/// [`BytesError`] naming the model, setting or file at fault.
pub fn command(spec: &FederatedTuneSpec, args: &BytesArgs) -> Result<String, BytesError> {
    let table = table(spec, &args.models, args.pool_texts)?;
    if let Some(path) = &args.docs {
        let docs_error = |message: String| BytesError::Docs {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| docs_error(e.to_string()))?;
        let block = table.markdown(&render::command_line(&args.file, args));
        let text = replace_block(&text, &block).map_err(docs_error)?;
        std::fs::write(path, text).map_err(|e| docs_error(e.to_string()))?;
    }
    Ok(output::render(args.output, &table, |t| t.markdown(""))?)
}

/// The table of `spec`'s backbones and `extra` models.
///
/// # Errors
/// [`BytesError`] when a model's facts cannot be read or the adapter does
/// not fit it.
pub fn table(
    spec: &FederatedTuneSpec,
    extra: &[String],
    pool_texts: Option<u64>,
) -> Result<BytesTable, BytesError> {
    let mut backbones = client_backbones(spec)?;
    let depths = backbones.iter().map(|b| {
        let n = b.facts.num_layers as usize;
        LayerSelection::from_spec(b.spec.layer_selection(0), n).window_depth(n)
    });
    let slots = slots::resolve_slots(spec.adapter.slots, depths);
    for name in extra {
        backbones.push(extra_backbone(spec, name)?);
    }
    let rows = backbones
        .iter()
        .map(|b| row(b, slots))
        .collect::<Result<Vec<_>, _>>()?;
    let bridge = match &spec.bridge {
        Some(b) => {
            let facts = facts_of_uri(&b.model.uri, "spec.bridge.model.uri")?;
            let tensors =
                wire::bridge_upload(spec, &facts).map_err(|source| BytesError::Slots {
                    what: "spec.bridge".into(),
                    source,
                })?;
            wire::payload_bytes(&tensors)
        }
        None => 0,
    };
    // The pool ensemble needs the bridge; counted as if `poolTeacher: ensemble`.
    let pool = pool_texts.filter(|_| spec.bridge.is_some()).map(|n| {
        let mut ensemble = spec.clone();
        if let Some(b) = ensemble.bridge.as_mut() {
            b.distillation.pool_teacher = heterotune_crds::spec::PoolTeacher::Ensemble;
        }
        wire::payload_bytes(&wire::pool_upload(&ensemble, n))
    });
    Ok(BytesTable {
        rank: spec.adapter.rank,
        experts: spec.adapter.experts,
        slots: slots as u64,
        classes: spec.task.labels.len() as u64,
        pool_texts,
        bridge,
        bridge_model: spec.bridge.as_ref().map(|b| model_name(&b.model.uri)),
        pool,
        rows,
    })
}

/// One row: every method on `b`.
fn row(b: &Backbone, slots: usize) -> Result<BackboneBytes, BytesError> {
    let upload = |edit: &dyn Fn(&mut FederatedTuneSpec)| -> Result<Vec<WireTensor>, BytesError> {
        let mut spec = b.spec.clone();
        if spec.aggregation.algorithm == AggregationAlgorithm::LocalOnly {
            spec.aggregation.algorithm = AggregationAlgorithm::Fedavg;
        }
        spec.adapter.share = SharePolicy::default();
        edit(&mut spec);
        wire::own_upload(&spec, 0, &b.facts, slots).map_err(|source| BytesError::Slots {
            what: b.label.clone(),
            source,
        })
    };
    let dema_edit = |s: &mut FederatedTuneSpec| s.adapter.kind = AdapterKind::Dema;
    let lora_at = |rank: u32| {
        upload(&|s: &mut FederatedTuneSpec| {
            s.adapter.kind = AdapterKind::Lora;
            s.clients[0].lora_rank = Some(rank);
        })
        .map(|t| wire::payload_bytes(&t))
    };
    let dema = upload(&dema_edit)?;
    let shared = upload(&|s: &mut FederatedTuneSpec| {
        dema_edit(s);
        s.adapter.share.family_parts = false;
        s.adapter.share.head = false;
    })?;
    let shared_head = upload(&|s: &mut FederatedTuneSpec| {
        dema_edit(s);
        s.adapter.share.family_parts = false;
    })?;
    let n = b.facts.num_layers as usize;
    let selection = b.spec.layer_selection(0);
    Ok(BackboneBytes {
        backbone: b.label.clone(),
        parameters: b.facts.parameters(),
        dema_layers: wire::dema_layers(n, slots, selection).map_err(|source| {
            BytesError::Slots {
                what: b.label.clone(),
                source,
            }
        })?,
        lora_layers: wire::lora_layers(n, selection).len(),
        full_model: wire::full_model_bytes(&b.facts, b.spec.task.labels.len() as u64),
        lora: lora_at(b.spec.adapter.rank)?,
        hetlora: HETLORA_RANKS
            .iter()
            .map(|&rank| {
                Ok(RankBytes {
                    rank,
                    bytes: lora_at(rank)?,
                })
            })
            .collect::<Result<_, BytesError>>()?,
        dema_shared: wire::payload_bytes(&shared),
        dema_shared_head: wire::payload_bytes(&shared_head),
        dema: wire::payload_bytes(&dema),
        dema_file: wire::safetensors_file_bytes(&dema),
    })
}

/// One backbone per distinct (model, layer selection) among the clients,
/// in the spec's order.
fn client_backbones(spec: &FederatedTuneSpec) -> Result<Vec<Backbone>, BytesError> {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for (i, client) in spec.clients.iter().enumerate() {
        let key = spec.family_key(i);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let what = format!("spec.clients[{i}].model.uri");
        let facts = facts_of_uri(&client.model.uri, &what)?;
        let mut one = spec.clone();
        one.clients = vec![client.clone()];
        let label = label(&client.model.uri, one.layer_selection(0), &facts);
        out.push(Backbone {
            label,
            facts,
            spec: one,
        });
    }
    Ok(out)
}

/// A `--model` row at `adapter.layers`.
fn extra_backbone(spec: &FederatedTuneSpec, name: &str) -> Result<Backbone, BytesError> {
    let what = format!("--model {name}");
    let facts = match REFERENCE_MODELS.iter().find(|(n, _)| *n == name) {
        Some((n, text)) => ModelFacts::from_bytes(Path::new(n), text.as_bytes())
            .map_err(|source| BytesError::Model { what, source })?,
        None => facts_of_path(name, &what)?,
    };
    let mut one = spec.clone();
    let mut client = spec.clients[0].clone();
    client.model.family = facts.family;
    client.model.uri = name.to_string();
    client.model.adapted_layers = None;
    client.lora_rank = None;
    one.clients = vec![client];
    Ok(Backbone {
        label: label(name, one.layer_selection(0), &facts),
        facts,
        spec: one,
    })
}

/// The facts of a model URI (`cache://`, `file://`, a path).
fn facts_of_uri(model_uri: &str, what: &str) -> Result<ModelFacts, BytesError> {
    match uri::resolve(model_uri) {
        Ok(Location::Local(dir)) => ModelFacts::read(&dir).map_err(|source| BytesError::Model {
            what: what.to_string(),
            source,
        }),
        _ => Err(BytesError::NotLocal {
            what: what.to_string(),
            uri: model_uri.to_string(),
        }),
    }
}

/// The facts of a `--model` argument: a URI, a folder or a config.json.
fn facts_of_path(name: &str, what: &str) -> Result<ModelFacts, BytesError> {
    let path = Path::new(name);
    if path.is_file() {
        let bytes = std::fs::read(path).map_err(|e| BytesError::Model {
            what: what.to_string(),
            source: ModelError::new(path, e.to_string()),
        })?;
        return ModelFacts::from_bytes(path, &bytes).map_err(|source| BytesError::Model {
            what: what.to_string(),
            source,
        });
    }
    facts_of_uri(name, what)
}

/// The last path segment of a model URI (`all-MiniLM-L6-v2`).
fn model_name(model_uri: &str) -> String {
    let trimmed = model_uri.trim_end_matches('/');
    let trimmed = trimmed.strip_suffix("/config.json").unwrap_or(trimmed);
    trimmed.rsplit('/').next().unwrap_or(trimmed).to_string()
}

/// `name (top 6 of 30)` or `name (30 layers)`.
fn label(
    model_uri: &str,
    selection: &heterotune_crds::spec::LayerSelectionSpec,
    facts: &ModelFacts,
) -> String {
    let n = facts.num_layers as usize;
    let window = LayerSelection::from_spec(selection, n).window_depth(n);
    let name = model_name(model_uri);
    if selection.mode == LayerSelectionMode::TopWindow && window < n {
        format!("{name} (top {window} of {n} layers)")
    } else {
        format!("{name} ({n} layers)")
    }
}
