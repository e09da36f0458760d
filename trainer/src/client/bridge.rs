//! The bridge model of a client (`spec.bridge`): its frozen backbone, DeMA
//! adapters and head, loaded next to the client's own model, and the rule
//! that names its tensors in artifacts (`bridge.` + its var-store name).
//! Training the pair is [`crate::mutual`]; averaging the bridge over every
//! client is [`crate::aggregate::bridge`].

use std::collections::BTreeMap;

use heterotune_crds::dtype::Resolved;
use heterotune_crds::model::LayerSelection;
use heterotune_crds::spec::{BridgeSpec, FederatedTuneSpec, OutputScale};
use tch::{Device, Tensor};

use super::load::{load_frozen, pooling};
use crate::adapters::dema::{Dema, DemaConfig};
use crate::adapters::head::ClassifierHead;
use crate::job;
use crate::models::ModelConfig;
use crate::train::{AdapterChoice, ClientModel};
use crate::Result;

pub use crate::aggregate::common::{
    BRIDGE_PREFIX, POOL_COUNTS, POOL_ENSEMBLE, POOL_PRIOR, POOL_PROBS,
};
use crate::data::partition::federate;
use crate::error::Context as _;

/// The spec field of the bridge's model URI (in error messages).
const URI_FIELD: &str = "spec.bridge.model.uri";

/// A client's bridge model, loaded.
pub struct BridgeModel {
    /// Backbone, adapters and head.
    pub model: ClientModel,
    /// The backbone's dtype on this device.
    pub dtype: Resolved,
    /// Every variable of the bridge's var store (unprefixed).
    pub all_names: Vec<String>,
    /// Seconds loading the backbone and tokenizer took.
    pub load_seconds: f64,
}

impl BridgeModel {
    /// The key of the bridge's backbone in the prefix-cache fingerprints.
    pub fn model_id(&self, bridge: &BridgeSpec) -> String {
        format!("{}|{:?}", bridge.model.uri, self.dtype.dtype)
    }

    /// The bridge's values under their artifact names (`bridge.` + name).
    pub fn export(&self) -> Result<BTreeMap<String, Tensor>> {
        Ok(self
            .model
            .export(&self.all_names)?
            .into_iter()
            .map(|(name, t)| (format!("{BRIDGE_PREFIX}{name}"), t))
            .collect())
    }

    /// Loads the `bridge.*` entries of `values` (artifact names); returns
    /// how many it loaded.
    pub fn import(&self, values: &BTreeMap<String, Tensor>) -> Result<usize> {
        let own: BTreeMap<String, Tensor> = values
            .iter()
            .filter_map(|(name, t)| {
                name.strip_prefix(BRIDGE_PREFIX)
                    .map(|local| (local.to_string(), t.shallow_clone()))
            })
            .collect();
        self.model.import(&own, &self.all_names)
    }
}

/// DeMA settings of the bridge on a backbone of `num_layers` layers: the
/// spec's rank and experts, [`FederatedTuneSpec::bridge_layer_selection`],
/// one slot per adapted layer (the bridge is averaged only with other
/// clients' bridges: one architecture, nothing to map).
pub fn dema_config(spec: &FederatedTuneSpec, num_layers: usize) -> DemaConfig {
    let sel = spec
        .bridge_layer_selection()
        .unwrap_or(&spec.adapter.layers);
    let layer_selection = LayerSelection::from_spec(sel, num_layers);
    DemaConfig {
        rank: spec.adapter.rank as usize,
        experts: spec.adapter.experts as usize,
        slots: layer_selection.window_depth(num_layers),
        scale: spec.adapter.scale,
        residual_scale: spec.adapter.output_scale == OutputScale::Residual,
        layer_selection,
        every_layer_in_group: sel.every_layer_in_group,
        init_seed: spec.training.seed,
    }
}

/// Loads the bridge of `spec` (none without `spec.bridge`) on `device`.
pub fn load_bridge(
    spec: &FederatedTuneSpec,
    device: Device,
    num_classes: usize,
) -> Result<Option<BridgeModel>> {
    let Some(bridge) = &spec.bridge else {
        return Ok(None);
    };
    let dtype = job::resolve_dtype(bridge.model.dtype, device);
    let frozen = load_frozen(&bridge.model, URI_FIELD, "the bridge", device, dtype.dtype)?;
    let num_layers = frozen.backbone.info().num_layers;
    let choice = AdapterChoice::Dema(dema_config(spec, num_layers));
    let model = ClientModel::new(
        frozen.backbone,
        frozen.tokenizer,
        &choice,
        num_classes,
        pooling(spec),
        device,
    )?;
    let all_names = model.vs.variables().keys().cloned().collect();
    Ok(Some(BridgeModel {
        model,
        dtype,
        all_names,
        load_seconds: frozen.load_seconds,
    }))
}

/// The bridge's initial values (artifact names), for the round-0 global:
/// built from config.json alone, the same values every client's bridge
/// starts from; with `poolTeacher: ensemble`, a uniform [`POOL_ENSEMBLE`]
/// of the pool's shape (the data is read to count the pool's texts).
pub fn initial_values(spec: &FederatedTuneSpec) -> Result<Vec<(String, Tensor)>> {
    let Some(bridge) = &spec.bridge else {
        return Ok(Vec::new());
    };
    let mut values = initial_bridge(spec, bridge)?;
    if spec.uses_pool_ensemble() {
        let data = federate(&job::data_config(spec)?)
            .context_with(|| "preparing the data to size the pool's ensemble".into())?;
        let classes = data.labels.len() as i64;
        if data.pool.is_empty() {
            return Err(crate::Error::config(
                "spec.task.splits.pool",
                "poolTeacher ensemble needs a public pool: set task.splits.pool above 0",
            ));
        }
        let uniform = Tensor::full(
            [data.pool.len() as i64, classes],
            1.0 / classes as f64,
            (tch::Kind::Float, Device::Cpu),
        );
        values.push((POOL_ENSEMBLE.to_string(), uniform));
    }
    Ok(values)
}

fn initial_bridge(spec: &FederatedTuneSpec, bridge: &BridgeSpec) -> Result<Vec<(String, Tensor)>> {
    let dir = job::local_path(&bridge.model.uri, URI_FIELD)?;
    let info = ModelConfig::read(&dir)?.info();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let cfg = dema_config(spec, info.num_layers);
    let _dema = Dema::new(&vs.root(), &cfg, &info)?;
    let _head = ClassifierHead::new_seeded(
        &vs.root().set_group(1),
        info.hidden_size,
        spec.task.labels.len(),
        spec.training.seed,
    )?;
    Ok(vs
        .variables()
        .into_iter()
        .map(|(name, t)| (format!("{BRIDGE_PREFIX}{name}"), t.detach().copy()))
        .collect())
}
