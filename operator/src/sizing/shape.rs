//! The shape of a backbone as far as memory is concerned: from its facts,
//! the packaged-model table or a parameter count; its adapted layers.

use heterotune_crds::model::facts::{
    bert_parameters, llama_parameters, mpnet_parameters, DEFAULT_RELATIVE_BUCKETS,
};
use heterotune_crds::model::wire::WireShape;
use heterotune_crds::model::{slots, LayerSelection, ModelFacts, SlotMap};
use heterotune_crds::spec::{FederatedTuneSpec, LayerSelectionSpec, ModelFamily};
use serde::Serialize;

/// Where a model's shape came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ShapeSource {
    /// The checkpoint's `config.json`.
    Config,
    /// The table of packaged models.
    Packaged,
    /// `clients[].model.parameters` with an assumed aspect ratio.
    Parameters,
}

/// The shape of a backbone, as far as memory is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelShape {
    /// Architecture family.
    pub family: ModelFamily,
    /// Parameters the trainer loads (BERT without the pooler; LLaMA with
    /// `lm_head` when it is not tied).
    pub parameters: u64,
    /// Hidden size `d`.
    pub hidden_size: u64,
    /// Layers `L`.
    pub num_layers: u64,
    /// Attention heads `h`.
    pub num_heads: u64,
    /// Vocabulary size.
    pub vocab_size: u64,
    /// MLP width.
    pub intermediate_size: u64,
    /// Output width of the attention query projection (`h · head_dim`).
    pub query_width: u64,
    /// Output width of the attention value projection (`kv_heads ·
    /// head_dim`: narrower than `d` under grouped-query attention).
    pub value_width: u64,
    /// Where the numbers came from.
    pub source: ShapeSource,
}

impl ModelShape {
    /// The shape of a model whose facts were read.
    pub fn from_facts(facts: &ModelFacts) -> ModelShape {
        let wire = WireShape::from(facts);
        ModelShape {
            family: facts.family,
            parameters: facts.parameters(),
            hidden_size: facts.hidden_size,
            num_layers: facts.num_layers,
            num_heads: facts.num_heads,
            vocab_size: facts.vocab_size,
            intermediate_size: facts.intermediate_size,
            query_width: wire.query_width,
            value_width: wire.value_width,
            source: ShapeSource::Config,
        }
    }

    /// What the upload rules ([`heterotune_crds::model::wire`]) need of it.
    pub fn wire(&self) -> WireShape {
        WireShape {
            hidden_size: self.hidden_size,
            num_layers: self.num_layers,
            query_width: self.query_width,
            value_width: self.value_width,
        }
    }

    /// A shape from a parameter count alone: `L = d/128` and `P = 3·d³/32`
    /// (LLaMA-7B gives d = 4211, L = 33 against the real 4096 and 32), with
    /// 64-dimensional heads, `i = 8d/3` and a 32000-token vocabulary.
    pub fn from_parameters(family: ModelFamily, parameters: u64) -> ModelShape {
        let d = ((parameters as f64) * 32.0 / 3.0).cbrt().round().max(64.0) as u64;
        let layers = (d / 128).max(1);
        ModelShape {
            family,
            parameters,
            hidden_size: d,
            num_layers: layers,
            num_heads: (d / 64).max(1),
            vocab_size: 32000,
            intermediate_size: 8 * d / 3,
            query_width: d,
            value_width: d,
            source: ShapeSource::Parameters,
        }
    }
}

/// The shapes of the models `scripts/setup.sh` packages, by the last path
/// segment of `cache://models/<name>` (or any URI ending in that name).
pub fn packaged_model(uri: &str) -> Option<ModelShape> {
    let name = uri
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    let (family, d, layers, heads, i, vocab) = match name {
        "all-MiniLM-L6-v2" => (ModelFamily::Bert, 384, 6, 12, 1536, 30522),
        "paraphrase-MiniLM-L3-v2" => (ModelFamily::Bert, 384, 3, 12, 1536, 30522),
        "all-mpnet-base-v2" => (ModelFamily::Mpnet, 768, 12, 12, 3072, 30527),
        "SmolLM2-135M" | "SmolLM2-135M-Instruct" => (ModelFamily::Llama, 576, 30, 9, 1536, 49152),
        // its first 14 layers (scripts/assets.py, `_build_smollm2_mid`)
        "SmolLM2-135M-Instruct-L14" => (ModelFamily::Llama, 576, 14, 9, 1536, 49152),
        _ => return None,
    };
    // SmolLM2: 3 key/value heads of width 64 (grouped-query attention).
    let (kv_heads, head_dim) = (3, 64);
    let value_width = match family {
        ModelFamily::Llama => kv_heads * head_dim,
        ModelFamily::Bert | ModelFamily::Mpnet => d,
    };
    let parameters = match family {
        ModelFamily::Bert => bert_parameters(d, layers, i, vocab, 512, 2),
        ModelFamily::Llama => {
            llama_parameters(d, layers, heads, kv_heads, head_dim, i, vocab, true)
        }
        ModelFamily::Mpnet => {
            mpnet_parameters(d, layers, i, vocab, 514, heads, DEFAULT_RELATIVE_BUCKETS)
        }
    };
    Some(ModelShape {
        family,
        parameters,
        hidden_size: d,
        num_layers: layers,
        num_heads: heads,
        vocab_size: vocab,
        intermediate_size: i,
        query_width: d,
        value_width,
        source: ShapeSource::Packaged,
    })
}

/// The adapted layers of a model with `num_layers` layers: the trainer's
/// slot map ([`SlotMap::lenient`]: an estimate never fails on settings the
/// checks reject).
pub fn adapted_layers(num_layers: u64, slots: u64, selection: &LayerSelectionSpec) -> Vec<u64> {
    SlotMap::lenient(num_layers as usize, slots as usize, selection)
        .into_iter()
        .map(|l| l as u64)
        .collect()
}

/// Depth of the layer-selection window of a client (what bounds `slots`).
pub fn window_depth(num_layers: u64, selection: &LayerSelectionSpec) -> u64 {
    LayerSelection::from_spec(selection, num_layers as usize).window_depth(num_layers as usize)
        as u64
}

/// Resolves `adapter.slots`: the spec's value, or the shallowest client's
/// window depth (what the trainer does). `shapes[i]` is client i's shape.
pub fn resolve_slots(spec: &FederatedTuneSpec, shapes: &[Option<ModelShape>]) -> u64 {
    let depths = shapes.iter().enumerate().filter_map(|(i, shape)| {
        let shape = shape.as_ref()?;
        Some(window_depth(shape.num_layers, spec.layer_selection(i)) as usize)
    });
    slots::resolve_slots(spec.adapter.slots, depths) as u64
}
