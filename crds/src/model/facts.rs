//! What a model folder says about itself: its `config.json`, parsed once
//! into the facts every part of HeteroTune needs (family, widths, depth,
//! heads, vocabulary, the padding token), plus the safetensors header for
//! the stored parameter count and dtype. The trainer deserialises its
//! architecture's full configuration from [`ModelFacts::config`], the same
//! parsed document.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::error::ModelError;
use super::safetensors::Header;
use crate::spec::ModelFamily;

/// Name of the configuration file in a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// Name of the weights file in a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the tokenizer file in a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Files a model directory must hold (Hugging Face layout).
pub const MODEL_FILES: &[&str] = &[CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE];

/// The facts of one model, from its `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFacts {
    /// Where the configuration came from (a file, or a store key).
    pub source: PathBuf,
    /// Architecture family.
    pub family: ModelFamily,
    /// Width of the residual stream `d`.
    pub hidden_size: u64,
    /// Number of layers `L`.
    pub num_layers: u64,
    /// Attention heads `h`.
    pub num_heads: u64,
    /// Key/value heads (grouped-query attention; `h` when not grouped).
    pub num_kv_heads: u64,
    /// Width of one attention head.
    pub head_dim: u64,
    /// Feed-forward width.
    pub intermediate_size: u64,
    /// Vocabulary size.
    pub vocab_size: u64,
    /// Learned positions (BERT) or the context length (LLaMA).
    pub max_positions: u64,
    /// Token types (BERT segments; 0 for LLaMA and MPNet).
    pub type_vocab_size: u64,
    /// Buckets of MPNet's relative position bias table (0 for the others).
    pub relative_attention_buckets: u64,
    /// Whether the output head shares the embeddings (LLaMA).
    pub tied_embeddings: bool,
    /// `pad_token_id`, else the (first) `eos_token_id`.
    pub pad_token_id: Option<i64>,
    /// The whole parsed document, for an architecture's own fields.
    pub config: serde_json::Value,
}

/// The fields that name the architecture.
#[derive(Deserialize)]
struct Kind {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
}

/// The fields shared by the supported families, as config.json names them.
#[derive(Deserialize)]
struct Common {
    hidden_size: u64,
    num_hidden_layers: u64,
    num_attention_heads: u64,
    vocab_size: u64,
    intermediate_size: Option<u64>,
    num_key_value_heads: Option<u64>,
    head_dim: Option<u64>,
    max_position_embeddings: Option<u64>,
    type_vocab_size: Option<u64>,
    relative_attention_num_buckets: Option<u64>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    pad_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

/// The families this release supports, as `model_type` names them.
pub const SUPPORTED: &str = "bert, llama, mpnet";

/// The family named by `model_type`, or by the first known `architectures`
/// entry when `model_type` is absent.
fn family_of(model_type: Option<&str>, architectures: &[String]) -> Result<ModelFamily, String> {
    let by_type = |t: &str| match t {
        "bert" => Some(ModelFamily::Bert),
        "llama" => Some(ModelFamily::Llama),
        "mpnet" => Some(ModelFamily::Mpnet),
        _ => None,
    };
    if let Some(t) = model_type {
        return by_type(t)
            .ok_or_else(|| format!("unknown model_type `{t}` (supported: {SUPPORTED})"));
    }
    architectures
        .iter()
        .find_map(|a| {
            let lower = a.to_ascii_lowercase();
            ["bert", "llama", "mpnet"]
                .into_iter()
                .find(|f| lower.starts_with(f))
                .and_then(by_type)
        })
        .ok_or_else(|| {
            format!(
                "no model_type and no known architecture in {architectures:?} (supported: {SUPPORTED})"
            )
        })
}

fn first_id(v: &serde_json::Value) -> Option<i64> {
    match v {
        serde_json::Value::Array(items) => items.first().and_then(serde_json::Value::as_i64),
        other => other.as_i64(),
    }
}

impl ModelFacts {
    /// Reads `dir/config.json`.
    ///
    /// # Errors
    /// [`ModelError`] naming the file: missing (with the set-up hint),
    /// unreadable, not JSON, an unknown family, a missing or ill-typed field.
    pub fn read(dir: &Path) -> Result<ModelFacts, ModelError> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ModelError::new(&path, "config file not found (run scripts/setup.sh)")
            } else {
                ModelError::new(&path, e.to_string())
            }
        })?;
        ModelFacts::from_bytes(&path, text.as_bytes())
    }

    /// Parses a `config.json` document read from `source`.
    ///
    /// # Errors
    /// As [`ModelFacts::read`].
    pub fn from_bytes(source: &Path, bytes: &[u8]) -> Result<ModelFacts, ModelError> {
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| ModelError::new(source, format!("invalid JSON: {e}")))?;
        ModelFacts::from_value(source, value)
    }

    /// The facts of an already parsed `config.json`.
    ///
    /// # Errors
    /// As [`ModelFacts::read`].
    pub fn from_value(source: &Path, config: serde_json::Value) -> Result<ModelFacts, ModelError> {
        let bad = |m: String| ModelError::new(source, m);
        if !config.is_object() {
            return Err(bad("expected a JSON object".into()));
        }
        let invalid = |e: serde_json::Error| bad(format!("invalid configuration: {e}"));
        let kind = Kind::deserialize(&config).map_err(invalid)?;
        let family = family_of(kind.model_type.as_deref(), &kind.architectures).map_err(bad)?;
        let c = Common::deserialize(&config).map_err(invalid)?;
        let heads = c.num_attention_heads;
        if c.hidden_size == 0 || c.num_hidden_layers == 0 || heads == 0 || c.vocab_size == 0 {
            return Err(bad(
                "hidden_size, num_hidden_layers, num_attention_heads and vocab_size must be positive"
                    .into(),
            ));
        }
        let (default_ffn, default_positions, default_types) = match family {
            ModelFamily::Bert => (4 * c.hidden_size, 512, 2),
            ModelFamily::Llama => (8 * c.hidden_size / 3, 2048, 0),
            ModelFamily::Mpnet => (4 * c.hidden_size, 514, 0),
        };
        let relative_attention_buckets = match family {
            ModelFamily::Mpnet => c
                .relative_attention_num_buckets
                .unwrap_or(DEFAULT_RELATIVE_BUCKETS),
            ModelFamily::Bert | ModelFamily::Llama => 0,
        };
        let pad = c.pad_token_id.as_ref().and_then(first_id);
        Ok(ModelFacts {
            source: source.to_path_buf(),
            family,
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(heads),
            head_dim: c.head_dim.unwrap_or(c.hidden_size / heads),
            intermediate_size: c.intermediate_size.unwrap_or(default_ffn),
            vocab_size: c.vocab_size,
            max_positions: c.max_position_embeddings.unwrap_or(default_positions),
            type_vocab_size: c.type_vocab_size.unwrap_or(default_types),
            relative_attention_buckets,
            tied_embeddings: c.tie_word_embeddings.unwrap_or(false),
            pad_token_id: pad.or_else(|| c.eos_token_id.as_ref().and_then(first_id)),
            config,
        })
    }

    /// Width of the attention value projection (`kv_heads · head_dim`;
    /// narrower than `d` under grouped-query attention).
    pub fn value_width(&self) -> u64 {
        self.num_kv_heads * self.head_dim
    }

    /// Parameters the trainer loads, from the configuration alone.
    pub fn parameters(&self) -> u64 {
        let (d, l, i, v) = (
            self.hidden_size,
            self.num_layers,
            self.intermediate_size,
            self.vocab_size,
        );
        match self.family {
            ModelFamily::Bert => {
                bert_parameters(d, l, i, v, self.max_positions, self.type_vocab_size)
            }
            ModelFamily::Llama => llama_parameters(
                d,
                l,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                i,
                v,
                self.tied_embeddings,
            ),
            ModelFamily::Mpnet => mpnet_parameters(
                d,
                l,
                i,
                v,
                self.max_positions,
                self.num_heads,
                self.relative_attention_buckets,
            ),
        }
    }
}

/// Parameters of a BERT encoder without the pooler (the trainer does not load
/// it): embeddings (words, positions, token types, LayerNorm) and per layer
/// attention `4(d²+d)`, MLP `2di + i + d`, two LayerNorms `4d`.
pub fn bert_parameters(d: u64, layers: u64, i: u64, vocab: u64, positions: u64, types: u64) -> u64 {
    let embeddings = (vocab + positions + types) * d + 2 * d;
    let layer = 4 * (d * d + d) + 2 * d * i + i + d + 4 * d;
    embeddings + layers * layer
}

/// MPNet's `relative_attention_num_buckets` when `config.json` omits it.
pub const DEFAULT_RELATIVE_BUCKETS: u64 = 32;

/// Parameters of an MPNet encoder without the pooler (the trainer does not
/// load it): a BERT encoder without token types, plus the relative position
/// bias table `buckets · heads` shared by all layers.
pub fn mpnet_parameters(
    d: u64,
    layers: u64,
    i: u64,
    vocab: u64,
    positions: u64,
    heads: u64,
    buckets: u64,
) -> u64 {
    bert_parameters(d, layers, i, vocab, positions, 0) + buckets * heads
}

/// Parameters of a LLaMA decoder: embeddings, per layer the q/k/v/o
/// projections (grouped-query k/v), the SwiGLU MLP `3di` and two RMSNorms,
/// the final norm, and `lm_head` unless tied to the embeddings.
#[allow(clippy::too_many_arguments)]
pub fn llama_parameters(
    d: u64,
    layers: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    i: u64,
    vocab: u64,
    tied: bool,
) -> u64 {
    let attention = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim;
    let layer = attention + 3 * d * i + 2 * d;
    let head = if tied { 0 } else { vocab * d };
    vocab * d + layers * layer + d + head
}

/// What the model folder `dir` stores: the safetensors header of its weights.
///
/// # Errors
/// [`ModelError`] naming the weights file.
pub fn stored_weights(dir: &Path) -> Result<Header, ModelError> {
    Header::read(&dir.join(WEIGHTS_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn facts(v: serde_json::Value) -> Result<ModelFacts, ModelError> {
        ModelFacts::from_value(Path::new("m/config.json"), v)
    }

    #[test]
    fn minilm_and_smollm2_facts() {
        let bert = facts(
            json!({"model_type":"bert","hidden_size":384,"num_hidden_layers":6,
            "num_attention_heads":12,"intermediate_size":1536,"vocab_size":30522,
            "max_position_embeddings":512,"type_vocab_size":2,"pad_token_id":0}),
        )
        .expect("bert");
        assert_eq!(bert.family, ModelFamily::Bert);
        assert_eq!(bert.parameters(), 22_565_376);
        assert_eq!(bert.pad_token_id, Some(0));
        let llama = facts(
            json!({"model_type":"llama","hidden_size":576,"num_hidden_layers":30,
            "num_attention_heads":9,"num_key_value_heads":3,"intermediate_size":1536,
            "vocab_size":49152,"tie_word_embeddings":true,"eos_token_id":[2, 0]}),
        )
        .expect("llama");
        assert_eq!(llama.value_width(), 192);
        assert_eq!(llama.parameters(), 134_515_008);
        assert_eq!(llama.pad_token_id, Some(2));
    }

    /// all-mpnet-base-v2's `config.json` (the fields the facts read).
    fn mpnet_config() -> serde_json::Value {
        json!({"architectures":["MPNetForMaskedLM"],"model_type":"mpnet","hidden_size":768,
            "num_hidden_layers":12,"num_attention_heads":12,"intermediate_size":3072,
            "vocab_size":30527,"max_position_embeddings":514,
            "relative_attention_num_buckets":32,"pad_token_id":1,"eos_token_id":2})
    }

    #[test]
    fn mpnet_facts_and_defaults() {
        let mpnet = facts(mpnet_config()).expect("mpnet");
        assert_eq!(mpnet.family, ModelFamily::Mpnet);
        assert_eq!(
            (mpnet.type_vocab_size, mpnet.relative_attention_buckets),
            (0, 32)
        );
        assert_eq!(mpnet.value_width(), 768);
        assert_eq!(mpnet.pad_token_id, Some(1));
        // The real checkpoint's F32 tensors without the pooler (see below).
        assert_eq!(mpnet.parameters(), 108_895_872);
        // Defaults: FFN 4d, 514 positions, 32 buckets; family from architectures.
        let tiny = facts(json!({"architectures":["MPNetModel"],"hidden_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10}))
        .expect("defaults");
        assert_eq!(tiny.family, ModelFamily::Mpnet);
        assert_eq!((tiny.intermediate_size, tiny.max_positions), (32, 514));
        assert_eq!(
            tiny.parameters(),
            mpnet_parameters(8, 1, 32, 10, 514, 2, 32)
        );
    }

    /// The parameter count from the configuration equals the tensors of the
    /// real all-mpnet-base-v2 checkpoint (made by scripts/setup.sh) minus
    /// the pooler, which the trainer does not load, and the int64
    /// `embeddings.position_ids` buffer.
    #[test]
    fn mpnet_parameters_match_the_real_checkpoint() {
        let cache = std::env::var_os("HETEROTUNE_CACHE")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(&std::env::var_os("HOME").expect("HOME is set"))
                    .join(".cache")
                    .join("heterotune")
            });
        let dir = cache.join("models").join("all-mpnet-base-v2");
        let facts = ModelFacts::read(&dir)
            .unwrap_or_else(|e| panic!("all-mpnet-base-v2 missing ({e}): run scripts/setup.sh"));
        let header = stored_weights(&dir).expect("safetensors header");
        let loaded: u64 = header
            .tensors
            .iter()
            .filter(|(name, t)| !name.starts_with("pooler.") && t.dtype == "F32")
            .map(|(_, t)| t.shape.iter().product::<u64>())
            .sum();
        assert_eq!(facts.parameters(), loaded);
    }

    #[test]
    fn family_from_architectures_and_errors_name_the_file() {
        let f = facts(json!({"architectures":["LlamaForCausalLM"],"hidden_size":8,
            "num_hidden_layers":1,"num_attention_heads":1,"vocab_size":4}))
        .expect("arch");
        assert_eq!(f.family, ModelFamily::Llama);
        let err = facts(
            json!({"model_type":"qwen2","hidden_size":8,"num_hidden_layers":1,
            "num_attention_heads":1,"vocab_size":4}),
        )
        .expect_err("qwen2");
        assert!(
            err.to_string()
                .starts_with("m/config.json: unknown model_type `qwen2`"),
            "{err}"
        );
        let err = facts(json!({"model_type":"bert"})).expect_err("fields");
        assert!(err.to_string().contains("hidden_size"), "{err}");
        let err = facts(
            json!({"model_type":"bert","hidden_size":0,"num_hidden_layers":1,
            "num_attention_heads":1,"vocab_size":4}),
        )
        .expect_err("zero");
        assert!(err.to_string().contains("must be positive"), "{err}");
        let dir = tempfile::tempdir().expect("dir");
        let err = ModelFacts::read(dir.path()).expect_err("missing");
        assert!(err.to_string().contains("run scripts/setup.sh"), "{err}");
    }
}
