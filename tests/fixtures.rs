//! Test fixtures the project makes itself: tiny random BERT and LLaMA
//! checkpoints in the Hugging Face layout (config.json, model.safetensors,
//! tokenizer.json) and a small, learnable text-classification dataset.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

/// A small deterministic generator (xorshift64*), so fixtures are the same
/// on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Approximately N(0, std²) (sum of uniforms).
    pub fn normal(&mut self, std: f32) -> f32 {
        let s: f32 = (0..4)
            .map(|_| (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
            .sum();
        (s - 2.0) * std * 1.732
    }
}

/// Vocabulary of the fixtures: 4 special tokens and 60 words `w0`..`w59`.
pub const SPECIALS: [&str; 4] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"];
/// Number of plain words.
pub const WORDS: usize = 60;
/// Vocabulary size.
pub const VOCAB: usize = SPECIALS.len() + WORDS;
/// The fixture labels; each has three keywords (`w0`-`w2`, `w3`-`w5`, `w6`-`w8`).
pub const LABELS: [&str; 3] = ["red", "green", "blue"];

/// A word-level tokenizer.json with `[CLS] ... [SEP]` around each text.
pub fn tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert((*s).to_string(), json!(i));
    }
    for w in 0..WORDS {
        vocab.insert(format!("w{w}"), json!(SPECIALS.len() + w));
    }
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
            }
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}

struct Tensors {
    rng: Rng,
    data: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Tensors {
    fn random(&mut self, name: &str, shape: &[usize], std: f32) {
        let n = shape.iter().product();
        let values = (0..n).map(|_| self.rng.normal(std)).collect();
        self.data.insert(name.to_string(), (shape.to_vec(), values));
    }
    fn constant(&mut self, name: &str, shape: &[usize], value: f32) {
        let n = shape.iter().product();
        self.data
            .insert(name.to_string(), (shape.to_vec(), vec![value; n]));
    }
    fn write(self, file: &Path) {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .data
            .into_iter()
            .map(|(n, (s, v))| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .expect("valid view"),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, file).expect("write safetensors");
    }
}

fn write_common(dir: &Path, config: serde_json::Value, tensors: Tensors) {
    std::fs::create_dir_all(dir).expect("model dir");
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).expect("json"),
    )
    .expect("config");
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec(&tokenizer_json()).expect("json"),
    )
    .expect("tokenizer");
    tensors.write(&dir.join("model.safetensors"));
}

/// Writes a tiny random BERT encoder.
pub fn write_tiny_bert(dir: &Path, hidden: usize, layers: usize, heads: usize, seed: u64) {
    let inter = hidden * 2;
    let mut t = Tensors {
        rng: Rng::new(seed),
        data: BTreeMap::new(),
    };
    t.random("embeddings.word_embeddings.weight", &[VOCAB, hidden], 0.5);
    t.random("embeddings.position_embeddings.weight", &[64, hidden], 0.02);
    t.random(
        "embeddings.token_type_embeddings.weight",
        &[2, hidden],
        0.02,
    );
    t.constant("embeddings.LayerNorm.weight", &[hidden], 1.0);
    t.constant("embeddings.LayerNorm.bias", &[hidden], 0.0);
    let std = (1.0 / hidden as f32).sqrt();
    for l in 0..layers {
        let p = format!("encoder.layer.{l}");
        for proj in ["query", "key", "value"] {
            t.random(
                &format!("{p}.attention.self.{proj}.weight"),
                &[hidden, hidden],
                std,
            );
            t.constant(&format!("{p}.attention.self.{proj}.bias"), &[hidden], 0.0);
        }
        t.random(
            &format!("{p}.attention.output.dense.weight"),
            &[hidden, hidden],
            std,
        );
        t.constant(&format!("{p}.attention.output.dense.bias"), &[hidden], 0.0);
        t.constant(
            &format!("{p}.attention.output.LayerNorm.weight"),
            &[hidden],
            1.0,
        );
        t.constant(
            &format!("{p}.attention.output.LayerNorm.bias"),
            &[hidden],
            0.0,
        );
        t.random(
            &format!("{p}.intermediate.dense.weight"),
            &[inter, hidden],
            std,
        );
        t.constant(&format!("{p}.intermediate.dense.bias"), &[inter], 0.0);
        t.random(
            &format!("{p}.output.dense.weight"),
            &[hidden, inter],
            (1.0 / inter as f32).sqrt(),
        );
        t.constant(&format!("{p}.output.dense.bias"), &[hidden], 0.0);
        t.constant(&format!("{p}.output.LayerNorm.weight"), &[hidden], 1.0);
        t.constant(&format!("{p}.output.LayerNorm.bias"), &[hidden], 0.0);
    }
    let config = json!({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": VOCAB,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": inter, "hidden_act": "gelu", "max_position_embeddings": 64,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0
    });
    write_common(dir, config, t);
}

/// Writes a tiny random LLaMA decoder (grouped-query attention, tied embeddings).
pub fn write_tiny_llama(
    dir: &Path,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    seed: u64,
) {
    let inter = hidden * 2;
    let head_dim = hidden / heads;
    let mut t = Tensors {
        rng: Rng::new(seed),
        data: BTreeMap::new(),
    };
    t.random("model.embed_tokens.weight", &[VOCAB, hidden], 0.5);
    let std = (1.0 / hidden as f32).sqrt();
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        t.random(
            &format!("{p}.self_attn.q_proj.weight"),
            &[heads * head_dim, hidden],
            std,
        );
        t.random(
            &format!("{p}.self_attn.k_proj.weight"),
            &[kv_heads * head_dim, hidden],
            std,
        );
        t.random(
            &format!("{p}.self_attn.v_proj.weight"),
            &[kv_heads * head_dim, hidden],
            std,
        );
        t.random(
            &format!("{p}.self_attn.o_proj.weight"),
            &[hidden, heads * head_dim],
            std,
        );
        t.random(&format!("{p}.mlp.gate_proj.weight"), &[inter, hidden], std);
        t.random(&format!("{p}.mlp.up_proj.weight"), &[inter, hidden], std);
        t.random(
            &format!("{p}.mlp.down_proj.weight"),
            &[hidden, inter],
            (1.0 / inter as f32).sqrt(),
        );
        t.constant(&format!("{p}.input_layernorm.weight"), &[hidden], 1.0);
        t.constant(
            &format!("{p}.post_attention_layernorm.weight"),
            &[hidden],
            1.0,
        );
    }
    t.constant("model.norm.weight", &[hidden], 1.0);
    let config = json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_act": "silu",
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "bos_token_id": 2, "eos_token_id": 3
    });
    write_common(dir, config, t);
}

/// Writes `n` labelled examples as JSON lines: three filler words and two
/// keywords of the label, at random positions. Texts are unique.
pub fn write_dataset(file: &Path, n: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut seen = std::collections::BTreeSet::new();
    let mut lines = Vec::new();
    while lines.len() < n {
        let label = rng.below(LABELS.len());
        let mut words: Vec<String> = (0..3)
            .map(|_| format!("w{}", 10 + rng.below(WORDS - 10)))
            .collect();
        for _ in 0..2 {
            let keyword = format!("w{}", label * 3 + rng.below(3));
            let at = rng.below(words.len() + 1);
            words.insert(at, keyword);
        }
        let text = words.join(" ");
        if seen.insert(text.clone()) {
            lines.push(json!({"text": text, "label": LABELS[label]}).to_string());
        }
    }
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent).expect("data dir");
    }
    std::fs::write(file, lines.join("\n") + "\n").expect("dataset");
}

/// Writes the three tiny models and the dataset under `root`; returns a
/// FederatedTune spec (YAML) over them with `storage` as given.
pub fn write_federation(root: &Path, name: &str, rounds: u32, storage_yaml: &str) -> String {
    write_tiny_bert(&root.join("models/tiny-bert-a"), 32, 2, 2, 1);
    write_tiny_bert(&root.join("models/tiny-bert-b"), 48, 3, 4, 2);
    write_tiny_llama(&root.join("models/tiny-llama"), 32, 2, 4, 2, 3);
    write_dataset(&root.join("data/colors.jsonl"), 480, 7);
    let m = |d: &str| root.join("models").join(d).display().to_string();
    format!(
        r#"apiVersion: heterotune.dev/v1alpha1
kind: FederatedTune
metadata: {{ name: {name} }}
spec:
  rounds: {rounds}
  minClients: 2
  roundDeadlineSeconds: 600
  clients:
    - name: small-bert
      model: {{ family: bert, uri: "{}" }}
    - name: wide-bert
      model: {{ family: bert, uri: "{}" }}
    - name: tiny-llama
      model: {{ family: llama, uri: "{}" }}
  task:
    dataset: {{ uri: "{}" }}
    labels: [red, green, blue]
    partition: {{ strategy: dirichlet, alpha: 1.0, seed: 3, minExamplesPerClient: 32 }}
    maxTestExamples: 48
  training: {{ localSteps: 20, batchSize: 16, learningRate: 0.01, headLearningRate: 0.05, maxSeqLength: 16 }}
  adapter: {{ rank: 4, experts: 2, slots: 2 }}
  aggregation: {{ algorithm: cmga }}
{storage_yaml}
"#,
        m("tiny-bert-a"),
        m("tiny-bert-b"),
        m("tiny-llama"),
        root.join("data/colors.jsonl").display()
    )
}
