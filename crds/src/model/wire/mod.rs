//! What a client uploads each round, tensor by tensor, from the model's
//! facts and the spec alone (no tensors, no trainer): the names and shapes
//! the trainer writes into its round artifact, the bytes they take in
//! bfloat16 and the size of the safetensors file that carries them.
//!
//! The rules follow the trainer's, which own the tensors:
//!
//! | part | tensors | trainer |
//! |---|---|---|
//! | DeMA shared (per slot `s`) | `shared.slot{s}.experts.weight [K, r, r]`, `.experts.bias [K, r]`, `.gate.weight [K, r]`, `.gate.bias [K]` | `adapters/dema.rs` |
//! | DeMA family parts (per adapted layer `l`, [`SlotMap`]) | `family.layer{l}.down.weight [r, d]`, `.up.weight [d, r]` | `adapters/dema.rs` |
//! | LoRA (every layer of the window) | `lora.layer{l}.{query,value}.a [r, d]`, `.b [d_out, r]` (`d_out` of LLaMA's value: `kv_heads · head_dim`) | `adapters/lora.rs`, `client/load.rs` |
//! | head | `head.weight [C, d]`, `head.bias [C]` | `adapters/head.rs` |
//! | what is sent | DeMA shared; family parts when `adapter.share.familyParts` (LoRA factors always); the head when `adapter.share.head`; nothing own under `localOnly` | `exchange.rs` (`shared_names`) |
//! | the bridge (`spec.bridge`) | `bridge.` + every tensor of its DeMA (one slot per layer of its window) and head, every round | `client/bridge.rs`, `client/round.rs` |
//! | the pool ensemble (`poolTeacher: ensemble`) | `pool.probs [N, C]`, `pool.counts [C]` (`N` pool texts) | `client/round.rs` |
//!
//! Every tensor travels in bfloat16 ([`WIRE_ELEMENT_BYTES`]); the file is
//! safetensors with the tensors sorted by name and no metadata
//! ([`safetensors_file_bytes`]). The test next to this module holds the
//! list and the file size to real artifacts the trainer wrote (equality).

use serde::Serialize;

use super::facts::ModelFacts;
use super::slots::{LayerSelection, SlotMap};
use crate::spec::{
    AdapterKind, AggregationAlgorithm, FederatedTuneSpec, LayerSelectionSpec, ModelFamily,
};

#[cfg(test)]
mod tests;

/// Bytes per element on the wire: clients send bfloat16 deltas.
pub const WIRE_ELEMENT_BYTES: u64 = 2;
/// The safetensors dtype name of [`WIRE_ELEMENT_BYTES`].
pub const WIRE_DTYPE: &str = "BF16";
/// Prefix of the bridge's tensors in an artifact.
pub const BRIDGE_PREFIX: &str = "bridge.";

/// One tensor of an upload: its artifact name and shape.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct WireTensor {
    /// Name in the artifact, e.g. `shared.slot0.experts.weight`.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<u64>,
}

impl WireTensor {
    fn new(name: String, shape: &[u64]) -> WireTensor {
        WireTensor {
            name,
            shape: shape.to_vec(),
        }
    }

    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// Elements of `tensors`.
pub fn elements(tensors: &[WireTensor]) -> u64 {
    tensors.iter().map(WireTensor::elements).sum()
}

/// The tensor bytes of `tensors` on the wire (bfloat16).
pub fn payload_bytes(tensors: &[WireTensor]) -> u64 {
    elements(tensors) * WIRE_ELEMENT_BYTES
}

/// The size of the safetensors file holding `tensors` in bfloat16, as the
/// trainer writes it (`safetensors::serialize`, no metadata): an 8-byte
/// length, the JSON header (tensors sorted by name, data offsets in that
/// order) padded with spaces to a multiple of 8, then the data.
pub fn safetensors_file_bytes(tensors: &[WireTensor]) -> u64 {
    let mut sorted: Vec<&WireTensor> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut offset = 0;
    let entries: Vec<String> = sorted
        .iter()
        .map(|t| {
            let end = offset + t.elements() * WIRE_ELEMENT_BYTES;
            let shape: Vec<String> = t.shape.iter().map(u64::to_string).collect();
            let name = serde_json::Value::String(t.name.clone());
            let entry = format!(
                "{name}:{{\"dtype\":\"{WIRE_DTYPE}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
                shape.join(",")
            );
            offset = end;
            entry
        })
        .collect();
    let header = format!("{{{}}}", entries.join(",")).len() as u64;
    8 + header.next_multiple_of(8) + offset
}

/// DeMA's shared tensors for `slots` slots of `experts` experts of rank `r`.
pub fn dema_shared(slots: u64, experts: u64, r: u64) -> Vec<WireTensor> {
    (0..slots)
        .flat_map(|s| {
            let key = |part: &str| format!("shared.slot{s}.{part}");
            [
                WireTensor::new(key("experts.weight"), &[experts, r, r]),
                WireTensor::new(key("experts.bias"), &[experts, r]),
                WireTensor::new(key("gate.weight"), &[experts, r]),
                WireTensor::new(key("gate.bias"), &[experts]),
            ]
        })
        .collect()
}

/// DeMA's family parts (down and up projections) at `layers` of width `d`.
pub fn dema_family(layers: &[usize], r: u64, d: u64) -> Vec<WireTensor> {
    layers
        .iter()
        .flat_map(|l| {
            [
                WireTensor::new(format!("family.layer{l}.down.weight"), &[r, d]),
                WireTensor::new(format!("family.layer{l}.up.weight"), &[d, r]),
            ]
        })
        .collect()
}

/// The classification head of `classes` classes over width `d`.
pub fn head(d: u64, classes: u64) -> Vec<WireTensor> {
    vec![
        WireTensor::new("head.weight".into(), &[classes, d]),
        WireTensor::new("head.bias".into(), &[classes]),
    ]
}

/// What the upload rules need of a backbone: its facts when its
/// `config.json` was read ([`From<&ModelFacts>`]), else a sizing estimate
/// of its shape (`heterotune plan` on a model it cannot read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireShape {
    /// Width of the residual stream `d`.
    pub hidden_size: u64,
    /// Number of layers `L`.
    pub num_layers: u64,
    /// Output width of the attention query projection.
    pub query_width: u64,
    /// Output width of the attention value projection.
    pub value_width: u64,
}

impl From<&ModelFacts> for WireShape {
    fn from(facts: &ModelFacts) -> WireShape {
        let d = facts.hidden_size;
        let (query_width, value_width) = match facts.family {
            ModelFamily::Llama => (facts.num_heads * facts.head_dim, facts.value_width()),
            ModelFamily::Bert | ModelFamily::Mpnet => (d, d),
        };
        WireShape {
            hidden_size: d,
            num_layers: facts.num_layers,
            query_width,
            value_width,
        }
    }
}

/// LoRA's factors on the query and value projections of `layers` at rank `r`.
pub fn lora(shape: impl Into<WireShape>, layers: &[usize], r: u64) -> Vec<WireTensor> {
    let shape: WireShape = shape.into();
    let d = shape.hidden_size;
    let (query_out, value_out) = (shape.query_width, shape.value_width);
    layers
        .iter()
        .flat_map(|l| {
            [("query", query_out), ("value", value_out)]
                .into_iter()
                .flat_map(move |(p, out)| {
                    [
                        WireTensor::new(format!("lora.layer{l}.{p}.a"), &[r, d]),
                        WireTensor::new(format!("lora.layer{l}.{p}.b"), &[out, r]),
                    ]
                })
        })
        .collect()
}

/// The layers LoRA adapts: every layer of the selection's window.
pub fn lora_layers(num_layers: usize, selection: &LayerSelectionSpec) -> Vec<usize> {
    let window = LayerSelection::from_spec(selection, num_layers).window_depth(num_layers);
    (num_layers - window..num_layers).collect()
}

/// The layers DeMA adapts with `slots` slots (the trainer's slot map).
///
/// # Errors
/// [`super::SlotError`] when the slots do not fit the window.
pub fn dema_layers(
    num_layers: usize,
    slots: usize,
    selection: &LayerSelectionSpec,
) -> Result<Vec<usize>, super::SlotError> {
    let map = SlotMap::new(
        num_layers,
        slots,
        LayerSelection::from_spec(selection, num_layers),
        selection.every_layer_in_group,
    )?;
    Ok(map.adapted_layers().into_iter().map(|(l, _)| l).collect())
}

/// The own-model tensors client `index` of `spec` sends (no bridge, no
/// pool): `exchange.rs`'s rule. `slots` is the run's resolved slot count.
///
/// # Errors
/// [`super::SlotError`] when the slots do not fit the client's window.
pub fn own_upload(
    spec: &FederatedTuneSpec,
    index: usize,
    shape: impl Into<WireShape>,
    slots: usize,
) -> Result<Vec<WireTensor>, super::SlotError> {
    if spec.aggregation.algorithm == AggregationAlgorithm::LocalOnly {
        return Ok(Vec::new());
    }
    let shape: WireShape = shape.into();
    let (num_layers, d) = (shape.num_layers as usize, shape.hidden_size);
    let selection = spec.layer_selection(index);
    let share = &spec.adapter.share;
    let mut out = match spec.adapter.kind {
        AdapterKind::Dema => {
            let r = u64::from(spec.adapter.rank);
            let mut t = dema_shared(slots as u64, u64::from(spec.adapter.experts), r);
            if share.family_parts {
                t.extend(dema_family(
                    &dema_layers(num_layers, slots, selection)?,
                    r,
                    d,
                ));
            }
            t
        }
        AdapterKind::Lora => {
            let r = spec.clients[index].lora_rank.unwrap_or(spec.adapter.rank);
            lora(shape, &lora_layers(num_layers, selection), u64::from(r))
        }
    };
    if share.head {
        out.extend(head(d, spec.task.labels.len() as u64));
    }
    Ok(out)
}

/// Every tensor of the bridge (`spec.bridge`) on backbone `shape`, as a
/// client sends it each round: its DeMA (one slot per layer of its
/// window), its head, all under `bridge.`. Empty without a bridge.
///
/// # Errors
/// [`super::SlotError`] when the bridge's window does not fit its backbone.
pub fn bridge_upload(
    spec: &FederatedTuneSpec,
    shape: impl Into<WireShape>,
) -> Result<Vec<WireTensor>, super::SlotError> {
    let Some(selection) = spec.bridge_layer_selection() else {
        return Ok(Vec::new());
    };
    let shape: WireShape = shape.into();
    let num_layers = shape.num_layers as usize;
    let slots = LayerSelection::from_spec(selection, num_layers).window_depth(num_layers);
    let r = u64::from(spec.adapter.rank);
    let mut t = dema_shared(slots as u64, u64::from(spec.adapter.experts), r);
    t.extend(dema_family(
        &dema_layers(num_layers, slots, selection)?,
        r,
        shape.hidden_size,
    ));
    t.extend(head(shape.hidden_size, spec.task.labels.len() as u64));
    Ok(t.into_iter()
        .map(|w| WireTensor {
            name: format!("{BRIDGE_PREFIX}{}", w.name),
            ..w
        })
        .collect())
}

/// The pool ensemble's values ([`FederatedTuneSpec::uses_pool_ensemble`]):
/// the served probabilities on `pool_texts` texts and the class counts.
/// Empty otherwise.
pub fn pool_upload(spec: &FederatedTuneSpec, pool_texts: u64) -> Vec<WireTensor> {
    if !spec.uses_pool_ensemble() {
        return Vec::new();
    }
    let classes = spec.task.labels.len() as u64;
    vec![
        WireTensor::new("pool.probs".into(), &[pool_texts, classes]),
        WireTensor::new("pool.counts".into(), &[classes]),
    ]
}

/// The bytes full-model FedAvg sends: every backbone parameter the trainer
/// loads and the head, in bfloat16 (safetensors' header not counted).
pub fn full_model_bytes(facts: &ModelFacts, classes: u64) -> u64 {
    (facts.parameters() + facts.hidden_size * classes + classes) * WIRE_ELEMENT_BYTES
}
