//! The HeteroTune API.
//!
//! * [`spec`]: `FederatedTune` (`heterotune.dev/v1alpha1`) and its parts.
//! * [`status`]: the observed state the operator and the local runner report.
//! * [`manifest`], [`layout`] and [`digest`]: the artifact manifest, the
//!   object-store layout and the digest of the round protocol, shared by the
//!   operator and the trainer.
//! * [`dtype`]: what `dtype: auto` becomes on a CPU or a CUDA GPU.
//! * [`model`]: the model's rules without tensors: a model folder's facts
//!   (config.json, safetensors header) and the slot map of adapted layers.
//! * [`crd`] and [`validate`] (feature `kube`): the generated
//!   CustomResourceDefinition with its CEL rules, and the local validator
//!   that checks a spec against that very schema and those very rules, so
//!   that `heterotune validate` and the API server cannot disagree.

pub mod bounded;
pub mod digest;
pub mod dtype;
pub mod layout;
pub mod manifest;
pub mod model;
pub mod privacy;
pub mod redact;
pub mod spec;
pub mod status;
pub mod uri;

#[cfg(feature = "kube")]
pub mod crd;
#[cfg(feature = "kube")]
pub mod validate;

#[cfg(feature = "kube")]
pub use spec::FederatedTune;
pub use spec::FederatedTuneSpec;
pub use status::FederatedTuneStatus;

/// API group of every HeteroTune resource.
pub const GROUP: &str = "heterotune.dev";
/// API version of `FederatedTune`.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in manifests.
pub const API_VERSION: &str = "heterotune.dev/v1alpha1";
/// Kind of the custom resource.
pub const KIND: &str = "FederatedTune";
