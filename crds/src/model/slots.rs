//! Which backbone layers carry adapters, and which shared slot each one
//! uses: the one slot map of the trainer, the sizing and the checks.
//!
//! Families of different depth meet in `S` slots. Within a window of `n`
//! consecutive layers ending at the top of the backbone (the whole depth,
//! or the top `n` layers), window position `j` (0-based) maps to slot
//! `floor(j * S / n)`. By default a family adapts the last layer of each
//! slot group; with `everyLayerInGroup` it adapts every layer of the
//! window, the layers of one group sharing that slot's experts and gate.
//!
//! | backbone | selection | S | adapted layers |
//! |---|---|---|---|
//! | SmolLM2 (30 layers) | `slotEnds` | 3 | 9, 19, 29 |
//! | SmolLM2 (30 layers) | `topWindow { layers: 6 }` | 3 | 25, 27, 29 |
//! | MiniLM-L6 | `slotEnds` | 3 | 1, 3, 5 |
//! | MiniLM-L3 | `slotEnds` | 3 | 0, 1, 2 |
//!
//! The adapter acts on a layer's output, so layers `0..=first_adapted_layer()`
//! run before any adapter: their output can be computed once per example
//! and cached (the frozen prefix), and backpropagation stops there.

use serde::{Deserialize, Serialize};

use crate::spec::{LayerSelectionMode, LayerSelectionSpec};

/// A slot map that cannot be built, naming the spec field to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {message}")]
pub struct SlotError {
    /// The field at fault (`dema.slots`, `dema.layerSelection.layers`...).
    pub field: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

fn slot_error(field: &'static str, message: impl Into<String>) -> SlotError {
    SlotError {
        field,
        message: message.into(),
    }
}

/// Which part of the backbone the slot map covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum LayerSelection {
    /// The full depth (more accurate; backpropagates through most layers).
    #[default]
    SlotEnds,
    /// Only the top `layers` layers (much faster: the prefix below is frozen
    /// and cacheable).
    TopWindow {
        /// Number of top layers in the window.
        layers: usize,
    },
}

impl LayerSelection {
    /// The selection a spec asks for on a backbone of `num_layers` layers
    /// (a `topWindow` without `window` covers the whole depth).
    pub fn from_spec(spec: &LayerSelectionSpec, num_layers: usize) -> LayerSelection {
        match spec.mode {
            LayerSelectionMode::SlotEnds => LayerSelection::SlotEnds,
            LayerSelectionMode::TopWindow => LayerSelection::TopWindow {
                layers: spec.window.map_or(num_layers, |w| w as usize),
            },
        }
    }

    /// Number of layers the window covers on a backbone of `num_layers`
    /// layers (at most `num_layers`): what bounds the number of slots.
    pub fn window_depth(self, num_layers: usize) -> usize {
        match self {
            LayerSelection::SlotEnds => num_layers,
            LayerSelection::TopWindow { layers } => layers.min(num_layers),
        }
    }
}

/// The number of slots: `configured` (`adapter.slots`) when set, else the
/// shallowest window among the clients' `window_depths` (at least 1; 3 when
/// no depth is known).
pub fn resolve_slots(
    configured: Option<u32>,
    window_depths: impl IntoIterator<Item = usize>,
) -> usize {
    if let Some(s) = configured {
        return s as usize;
    }
    window_depths.into_iter().min().unwrap_or(3).max(1)
}

/// The resolved map from adapted layers to slots for one backbone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    num_layers: usize,
    slots: usize,
    window_start: usize,
    adapted: Vec<(usize, usize)>,
}

impl SlotMap {
    /// Builds the slot map of a backbone with `num_layers` layers.
    ///
    /// Errors (naming the field): `slots` is 0 or larger than the number of
    /// layers in the window; `layerSelection.layers` is 0 or larger than
    /// `num_layers`.
    pub fn new(
        num_layers: usize,
        slots: usize,
        selection: LayerSelection,
        every_layer_in_group: bool,
    ) -> Result<SlotMap, SlotError> {
        if num_layers == 0 {
            return Err(slot_error(
                "backbone.numLayers",
                "the backbone has no layers to adapt",
            ));
        }
        let window = match selection {
            LayerSelection::SlotEnds => num_layers,
            LayerSelection::TopWindow { layers } => {
                if layers == 0 || layers > num_layers {
                    return Err(slot_error(
                        "dema.layerSelection.layers",
                        format!(
                            "must be between 1 and the backbone's {num_layers} layers, got \
                             {layers}"
                        ),
                    ));
                }
                layers
            }
        };
        if slots == 0 {
            return Err(slot_error("dema.slots", "must be at least 1"));
        }
        if slots > window {
            return Err(slot_error(
                "dema.slots",
                format!(
                    "{slots} slots need at least {slots} layers, but the window has {window} \
                     (of {num_layers}); use fewer slots or a larger window"
                ),
            ));
        }
        let window_start = num_layers - window;
        let slot_of = |j: usize| j * slots / window;
        let adapted = (0..window)
            .filter(|&j| every_layer_in_group || j + 1 == window || slot_of(j + 1) != slot_of(j))
            .map(|j| (window_start + j, slot_of(j)))
            .collect();
        Ok(SlotMap {
            num_layers,
            slots,
            window_start,
            adapted,
        })
    }

    /// `(layer, slot)` for every adapted layer, by increasing layer.
    pub fn adapted_layers(&self) -> Vec<(usize, usize)> {
        self.adapted.clone()
    }

    /// The lowest adapted layer: layers `0..=` this one are unaffected by
    /// adapters (a frozen, cacheable prefix).
    pub fn first_adapted_layer(&self) -> usize {
        // `new` guarantees at least one adapted layer (the window's last).
        self.adapted
            .first()
            .map_or(self.num_layers - 1, |&(l, _)| l)
    }

    /// First layer of the window the slot map covers.
    pub fn window_start(&self) -> usize {
        self.window_start
    }

    /// The slot of `layer`, if it is adapted.
    pub fn slot_of(&self, layer: usize) -> Option<usize> {
        self.adapted
            .iter()
            .find(|&&(l, _)| l == layer)
            .map(|&(_, s)| s)
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Number of backbone layers.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// The adapted layers of a backbone of `num_layers` layers for an
    /// estimate that must not fail on a spec the checks reject: the window
    /// is cut to the depth and `slots` to the window.
    pub fn lenient(num_layers: usize, slots: usize, spec: &LayerSelectionSpec) -> Vec<usize> {
        let num_layers = num_layers.max(1);
        let selection = match LayerSelection::from_spec(spec, num_layers) {
            LayerSelection::TopWindow { layers } => LayerSelection::TopWindow {
                layers: layers.clamp(1, num_layers),
            },
            other => other,
        };
        let slots = slots.clamp(1, selection.window_depth(num_layers));
        SlotMap::new(num_layers, slots, selection, spec.every_layer_in_group)
            .map(|m| m.adapted.iter().map(|&(l, _)| l).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(n: usize, s: usize, sel: LayerSelection, every: bool) -> Vec<(usize, usize)> {
        SlotMap::new(n, s, sel, every).unwrap().adapted_layers()
    }

    #[test]
    fn slot_ends() {
        let full = LayerSelection::SlotEnds;
        assert_eq!(layers(30, 3, full, false), vec![(9, 0), (19, 1), (29, 2)]);
        assert_eq!(layers(6, 3, full, false), vec![(1, 0), (3, 1), (5, 2)]);
        assert_eq!(layers(3, 3, full, false), vec![(0, 0), (1, 1), (2, 2)]);
        assert_eq!(layers(22, 3, full, false), vec![(7, 0), (14, 1), (21, 2)]);
        assert_eq!(layers(12, 1, full, false), vec![(11, 0)]);
        let m = SlotMap::new(30, 3, full, false).unwrap();
        assert_eq!(m.first_adapted_layer(), 9);
        assert_eq!(m.slot_of(19), Some(1));
        assert_eq!(m.slot_of(18), None);
    }

    #[test]
    fn top_window() {
        let top6 = LayerSelection::TopWindow { layers: 6 };
        assert_eq!(layers(30, 3, top6, false), vec![(25, 0), (27, 1), (29, 2)]);
        let m = SlotMap::new(30, 3, top6, false).unwrap();
        assert_eq!(m.window_start(), 24);
        assert_eq!(m.first_adapted_layer(), 25);
        // A window over the whole depth is the full map.
        assert_eq!(
            layers(6, 3, LayerSelection::TopWindow { layers: 6 }, false),
            layers(6, 3, LayerSelection::SlotEnds, false)
        );
    }

    #[test]
    fn every_layer_in_group() {
        assert_eq!(
            layers(6, 3, LayerSelection::SlotEnds, true),
            vec![(0, 0), (1, 0), (2, 1), (3, 1), (4, 2), (5, 2)]
        );
        let top = layers(30, 3, LayerSelection::TopWindow { layers: 6 }, true);
        assert_eq!(
            top,
            vec![(24, 0), (25, 0), (26, 1), (27, 1), (28, 2), (29, 2)]
        );
        let full = layers(30, 3, LayerSelection::SlotEnds, true);
        assert_eq!(full.len(), 30);
        assert!(full.iter().all(|&(l, s)| s == l / 10));
        let m = SlotMap::new(30, 3, LayerSelection::TopWindow { layers: 6 }, true).unwrap();
        assert_eq!(m.first_adapted_layer(), 24);
    }

    #[test]
    fn errors_name_the_field() {
        let err = SlotMap::new(3, 4, LayerSelection::SlotEnds, false).unwrap_err();
        assert!(err.to_string().contains("`dema.slots`"), "{err}");
        let err = SlotMap::new(30, 0, LayerSelection::SlotEnds, false).unwrap_err();
        assert!(err.to_string().contains("`dema.slots`"), "{err}");
        let err = SlotMap::new(30, 3, LayerSelection::TopWindow { layers: 31 }, false).unwrap_err();
        assert!(err.to_string().contains("layerSelection.layers"), "{err}");
        let err = SlotMap::new(30, 3, LayerSelection::TopWindow { layers: 0 }, false).unwrap_err();
        assert!(err.to_string().contains("layerSelection.layers"), "{err}");
        let err = SlotMap::new(30, 4, LayerSelection::TopWindow { layers: 3 }, false).unwrap_err();
        assert!(err.to_string().contains("the window has 3"), "{err}");
    }

    #[test]
    fn spec_forms_windows_and_slot_resolution() {
        let top = LayerSelectionSpec {
            mode: LayerSelectionMode::TopWindow,
            window: Some(6),
            every_layer_in_group: false,
        };
        let sel = LayerSelection::from_spec(&top, 30);
        assert_eq!(sel, LayerSelection::TopWindow { layers: 6 });
        assert_eq!(sel.window_depth(30), 6);
        assert_eq!(sel.window_depth(3), 3);
        let ends = LayerSelectionSpec::default();
        assert_eq!(LayerSelection::from_spec(&ends, 6).window_depth(6), 6);
        assert_eq!(resolve_slots(Some(4), [3, 6]), 4);
        assert_eq!(resolve_slots(None, [6, 3, 30]), 3);
        assert_eq!(resolve_slots(None, []), 3);
        assert_eq!(SlotMap::lenient(30, 3, &top), vec![25, 27, 29]);
        assert_eq!(SlotMap::lenient(32, 3, &ends), vec![10, 21, 31]);
        // Out-of-range settings are cut, not refused.
        assert_eq!(SlotMap::lenient(3, 5, &top), vec![0, 1, 2]);
    }

    #[test]
    fn serde_forms() {
        let s: LayerSelection = serde_json::from_str(r#"{"type":"slotEnds"}"#).unwrap();
        assert_eq!(s, LayerSelection::SlotEnds);
        let s: LayerSelection = serde_json::from_str(r#"{"type":"topWindow","layers":6}"#).unwrap();
        assert_eq!(s, LayerSelection::TopWindow { layers: 6 });
    }
}
