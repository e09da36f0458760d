//! The adapter every client trains: DeMA (the method) or LoRA (baselines).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Adapter settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdapterSpec {
    /// `dema` (dense mixture of adapters, the method) or `lora` (baselines).
    #[serde(default, rename = "type")]
    pub kind: AdapterKind,
    /// Width r of the shared space (DeMA) or LoRA rank.
    #[serde(default = "default_rank")]
    #[schemars(range(min = 1, max = 1024))]
    pub rank: u32,
    /// Number K of dense experts per slot (DeMA).
    #[serde(default = "default_experts")]
    #[schemars(range(min = 1, max = 64))]
    pub experts: u32,
    /// Number S of slots where layers of different depths meet (DeMA).
    /// Defaults to the depth of the shallowest client model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub slots: Option<u32>,
    /// Multiplier of the adapter's output.
    #[serde(default = "default_scale")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub scale: f64,
    /// What the DeMA output is measured against: `fixed` adds `scale · U m`
    /// to the layer's output; `residual` adds `scale · rms(h) · U m`, in
    /// units of that token's residual stream (whose size differs ~50× across
    /// families: RMS 20–28 at SmolLM2's top layers, 0.3–0.7 in the MiniLMs
    /// and MPNet), so one learning rate suits every family.
    #[serde(default)]
    pub output_scale: OutputScale,
    /// Which layers carry adapters, unless a client overrides it.
    #[serde(default)]
    pub layers: LayerSelectionSpec,
    /// Which adapter parts leave the client.
    #[serde(default)]
    pub share: SharePolicy,
    /// LoRA scaling numerator (the update is scaled by alpha / rank).
    #[serde(default = "default_lora_alpha")]
    #[schemars(range(min = 0.0, max = 10000.0))]
    pub lora_alpha: f64,
}

fn default_rank() -> u32 {
    8
}
fn default_experts() -> u32 {
    4
}
fn default_scale() -> f64 {
    1.0
}
fn default_lora_alpha() -> f64 {
    16.0
}

impl Default for AdapterSpec {
    fn default() -> Self {
        AdapterSpec {
            kind: AdapterKind::default(),
            rank: default_rank(),
            experts: default_experts(),
            slots: None,
            scale: default_scale(),
            output_scale: OutputScale::default(),
            layers: LayerSelectionSpec::default(),
            share: SharePolicy::default(),
            lora_alpha: default_lora_alpha(),
        }
    }
}

/// What DeMA's output is scaled against (`adapter.outputScale`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputScale {
    /// `h + scale · U m`.
    #[default]
    Fixed,
    /// `h + scale · rms(h) · U m`.
    Residual,
}

/// Adapter architectures.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// Dense Mixture of Adapters: family-specific projections into a shared
    /// r-space where K dense experts and a gate per slot are shared by all families.
    #[default]
    Dema,
    /// LoRA on the attention query and value projections.
    Lora,
}

/// Which layers carry adapters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.mode != 'topWindow' || has(self.window)",
        "message": "mode topWindow needs window (the number of top layers)",
        "fieldPath": ".window",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "self.mode == 'topWindow' || !has(self.window)",
        "message": "window applies to mode topWindow only",
        "fieldPath": ".window",
        "reason": "FieldValueForbidden"
    }
]))]
pub struct LayerSelectionSpec {
    /// `slotEnds`: over the full depth, the last layer of each slot group
    /// (SmolLM2 with 3 slots: layers 9, 19, 29); `topWindow`: the same map
    /// over the top `window` layers only (SmolLM2, window 6: 25, 27, 29),
    /// which lets the frozen layers below be run once and cached.
    #[serde(default)]
    pub mode: LayerSelectionMode,
    /// Number of top layers in the window (`topWindow` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub window: Option<u32>,
    /// Adapt every layer of each slot group (sharing that slot's experts)
    /// instead of only its last layer.
    #[serde(default)]
    pub every_layer_in_group: bool,
}

impl Default for LayerSelectionSpec {
    fn default() -> Self {
        LayerSelectionSpec {
            mode: LayerSelectionMode::SlotEnds,
            window: None,
            every_layer_in_group: false,
        }
    }
}

/// Layer selection modes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LayerSelectionMode {
    /// The last layer of each slot group over the full depth.
    #[default]
    SlotEnds,
    /// The slot map over the top `window` layers.
    TopWindow,
}

/// Which adapter parts are exchanged.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SharePolicy {
    /// Average the family-specific projections (down/up) among clients of
    /// the same family. They dominate the bytes sent (85 % in the reference);
    /// off keeps them local.
    #[serde(default = "super::defaults::yes")]
    pub family_parts: bool,
    /// Average the classification head among clients of the same family.
    #[serde(default = "super::defaults::yes")]
    pub head: bool,
}

impl Default for SharePolicy {
    fn default() -> Self {
        SharePolicy {
            family_parts: true,
            head: true,
        }
    }
}
