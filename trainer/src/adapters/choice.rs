//! Which adapter a client trains ([`AdapterChoice`]) and the adapter built
//! from it ([`Adapter`]): DeMA (the method) or LoRA (the baselines), behind
//! one interface for the training loop.

use tch::Tensor;

use super::dema::{Dema, DemaConfig};
use super::lora::{Lora, LoraConfig, ProjectionDims};

/// Which adapter to build.
#[derive(Debug, Clone)]
pub enum AdapterChoice {
    /// DeMA with these settings.
    Dema(DemaConfig),
    /// LoRA on the query and value projections of the backbone `dims` describes.
    Lora(LoraConfig, ProjectionDims),
}

/// A built adapter.
pub enum Adapter {
    Dema(Dema),
    Lora(Lora),
}

impl Adapter {
    /// Names of the parts shared across families (DeMA's experts and gates).
    pub fn shared_names(&self) -> Vec<String> {
        match self {
            Adapter::Dema(d) => d.shared_names(),
            Adapter::Lora(_) => Vec::new(),
        }
    }

    /// Names of the family-specific parts (DeMA's projections; LoRA's factors).
    pub fn family_names(&self) -> Vec<String> {
        match self {
            Adapter::Dema(d) => d.family_names(),
            Adapter::Lora(l) => l.names(),
        }
    }

    /// Trainable parameters of the adapter.
    pub fn parameter_count(&self) -> usize {
        match self {
            Adapter::Dema(d) => d.shared_parameter_count() + d.family_parameter_count(),
            Adapter::Lora(l) => l.parameter_count(),
        }
    }

    /// DeMA's update on the output of `layer` (identity elsewhere and for LoRA).
    pub(crate) fn after_layer(&self, layer: usize, h: Tensor) -> Tensor {
        match self {
            Adapter::Dema(d) if d.is_adapted(layer) => d.apply(layer, &h),
            _ => h,
        }
    }

    /// LoRA's updates inside the layers.
    pub(crate) fn delta(&self) -> Option<&dyn crate::models::ProjectionDelta> {
        match self {
            Adapter::Lora(l) => Some(l),
            Adapter::Dema(_) => None,
        }
    }
}
