//! The bridge model (`spec.bridge`) as sizing sees it: the second frozen
//! backbone every client's trainer loads next to its own, with DeMA adapters
//! of `adapter.rank` and `adapter.experts`, one slot per adapted layer
//! (`trainer/src/client/bridge.rs`, `dema_config`).

use heterotune_crds::spec::{AdapterKind, BridgeSpec, FederatedTuneSpec};

use super::estimate::{model_parts, ModelParts, Target, Workload};
use super::settings::SizingConfig;
use super::shape::{window_depth, ModelShape};
use super::SizingError;

/// The bridge of a run: its shape and how every client trains it.
#[derive(Debug, Clone, PartialEq)]
pub struct BridgeModel {
    /// Its backbone's shape.
    pub shape: ModelShape,
    /// Its training settings (the same for every client).
    pub workload: Workload,
}

impl BridgeModel {
    /// The bridge of `spec` with backbone `shape`: `None` without
    /// `spec.bridge`, [`SizingError::UnknownBridge`] when its shape is
    /// unknown.
    pub fn of(
        spec: &FederatedTuneSpec,
        shape: Option<ModelShape>,
    ) -> Option<Result<BridgeModel, SizingError>> {
        let bridge = spec.bridge.as_ref()?;
        Some(match shape {
            Some(shape) => Ok(BridgeModel {
                workload: workload(spec, bridge, shape.num_layers),
                shape,
            }),
            None => Err(SizingError::UnknownBridge {
                uri: bridge.model.uri.clone(),
            }),
        })
    }

    /// What the bridge adds to a client's trainer on `target`.
    pub fn parts(&self, config: &SizingConfig, target: Target) -> ModelParts {
        model_parts(&self.shape, &self.workload, config, target)
    }
}

/// The bridge's workload on a backbone of `num_layers` layers: DeMA at
/// `adapter.rank`, its own layer selection (else `adapter.layers`) and as
/// many slots as that selection's window is deep.
pub fn workload(spec: &FederatedTuneSpec, bridge: &BridgeSpec, num_layers: u64) -> Workload {
    let selection = spec
        .bridge_layer_selection()
        .unwrap_or(&spec.adapter.layers);
    let slots = window_depth(num_layers, selection);
    Workload::of_model(
        spec,
        &bridge.model,
        AdapterKind::Dema,
        spec.adapter.rank,
        slots,
    )
}
