//! Backbone and tokenizer tests on tiny random checkpoints written from Rust
//! into a temporary directory (no model cache needed): shapes, padding
//! invariance (BERT), causality and grouped-query attention (LLaMA),
//! projection-delta hooks, gradients, bf16, and loading errors.

use std::cell::RefCell;
use std::path::Path;

use heterotune_trainer::models::bert::Bert;
use heterotune_trainer::models::llama::Llama;
use heterotune_trainer::models::{load_backbone, Backbone, Family, Projection, ProjectionDelta};
use heterotune_trainer::tokenizer::TextTokenizer;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

const BERT_VOCAB: i64 = 50;
const LLAMA_VOCAB: i64 = 60;
const MPNET_VOCAB: i64 = 45;

fn randn(shape: &[i64], std: f64) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu)) * std
}

fn near_one(size: i64) -> Tensor {
    Tensor::ones([size], (Kind::Float, Device::Cpu)) + randn(&[size], 0.1)
}

fn bert_config() -> Value {
    json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": BERT_VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "hidden_act": "gelu",
        "max_position_embeddings": 40,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0
    })
}

fn bert_tensors(config: &Value) -> Vec<(String, Tensor)> {
    tch::manual_seed(7);
    let h = config["hidden_size"].as_i64().unwrap();
    let i = config["intermediate_size"].as_i64().unwrap();
    let mut t = embedding_tensors(BERT_VOCAB, 40, h);
    t.push((
        "embeddings.token_type_embeddings.weight".to_string(),
        randn(&[2, h], 0.5),
    ));
    let layers = config["num_hidden_layers"].as_i64().unwrap();
    encoder_layers(&mut t, layers, h, i, &BERT_NAMES);
    t
}

/// An encoder's word and position tables and embedding LayerNorm.
fn embedding_tensors(vocab: i64, positions: i64, h: i64) -> Vec<(String, Tensor)> {
    vec![
        (
            "embeddings.word_embeddings.weight".to_string(),
            randn(&[vocab, h], 1.0),
        ),
        (
            "embeddings.position_embeddings.weight".to_string(),
            randn(&[positions, h], 0.5),
        ),
        ("embeddings.LayerNorm.weight".to_string(), near_one(h)),
        ("embeddings.LayerNorm.bias".to_string(), randn(&[h], 0.1)),
    ]
}

/// The parts of a post-LN encoder layer: q, k, v, attention output, its
/// LayerNorm, FFN in, FFN out, its LayerNorm.
type LayerNames = [&'static str; 8];

const BERT_NAMES: LayerNames = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
];

const MPNET_NAMES: LayerNames = [
    "attention.attn.q",
    "attention.attn.k",
    "attention.attn.v",
    "attention.attn.o",
    "attention.LayerNorm",
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
];

/// Random weights of `layers` encoder layers (BERT's or MPNet's `names`).
fn encoder_layers(t: &mut Vec<(String, Tensor)>, layers: i64, h: i64, i: i64, names: &LayerNames) {
    let [q, k, v, o, attention_norm, inner, out, out_norm] = names;
    for l in 0..layers {
        let p = format!("encoder.layer.{l}");
        for (name, rows, cols) in [
            (q, h, h),
            (k, h, h),
            (v, h, h),
            (o, h, h),
            (inner, i, h),
            (out, h, i),
        ] {
            t.push((format!("{p}.{name}.weight"), randn(&[rows, cols], 0.3)));
            t.push((format!("{p}.{name}.bias"), randn(&[rows], 0.1)));
        }
        for name in [attention_norm, out_norm] {
            t.push((format!("{p}.{name}.weight"), near_one(h)));
            t.push((format!("{p}.{name}.bias"), randn(&[h], 0.1)));
        }
    }
}

fn mpnet_config() -> Value {
    json!({
        "architectures": ["MPNetForMaskedLM"],
        "model_type": "mpnet",
        "vocab_size": MPNET_VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "hidden_act": "gelu",
        "max_position_embeddings": 42,
        "layer_norm_eps": 1e-5,
        "relative_attention_num_buckets": 32,
        "pad_token_id": 1
    })
}

fn mpnet_tensors(config: &Value) -> Vec<(String, Tensor)> {
    tch::manual_seed(13);
    let h = config["hidden_size"].as_i64().unwrap();
    let i = config["intermediate_size"].as_i64().unwrap();
    let heads = config["num_attention_heads"].as_i64().unwrap();
    let mut t = embedding_tensors(MPNET_VOCAB, 42, h);
    t.push((
        "encoder.relative_attention_bias.weight".to_string(),
        randn(&[32, heads], 1.0),
    ));
    let layers = config["num_hidden_layers"].as_i64().unwrap();
    encoder_layers(&mut t, layers, h, i, &MPNET_NAMES);
    t
}

fn llama_config(heads: i64, kv_heads: i64, tied: bool) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": LLAMA_VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": 40,
        "hidden_act": "silu",
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2
    })
}

fn llama_tensors(config: &Value) -> Vec<(String, Tensor)> {
    tch::manual_seed(11);
    let h = config["hidden_size"].as_i64().unwrap();
    let heads = config["num_attention_heads"].as_i64().unwrap();
    let kv = config["num_key_value_heads"].as_i64().unwrap();
    let d = h / heads;
    let i = config["intermediate_size"].as_i64().unwrap();
    let mut t = vec![
        (
            "model.embed_tokens.weight".to_string(),
            randn(&[LLAMA_VOCAB, h], 1.0),
        ),
        ("model.norm.weight".to_string(), near_one(h)),
    ];
    if !config["tie_word_embeddings"].as_bool().unwrap() {
        t.push(("lm_head.weight".to_string(), randn(&[LLAMA_VOCAB, h], 0.3)));
    }
    for l in 0..config["num_hidden_layers"].as_i64().unwrap() {
        let p = format!("model.layers.{l}");
        for (name, out, inp) in [
            ("self_attn.q_proj", heads * d, h),
            ("self_attn.k_proj", kv * d, h),
            ("self_attn.v_proj", kv * d, h),
            ("self_attn.o_proj", h, heads * d),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            t.push((format!("{p}.{name}.weight"), randn(&[out, inp], 0.3)));
        }
        t.push((format!("{p}.input_layernorm.weight"), near_one(h)));
        t.push((format!("{p}.post_attention_layernorm.weight"), near_one(h)));
    }
    t
}

fn write_model(dir: &Path, config: &Value, tensors: &[(String, Tensor)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    Tensor::write_safetensors(tensors, dir.join("model.safetensors")).unwrap();
}

fn tiny_bert(dir: &Path) -> Box<dyn Backbone> {
    let config = bert_config();
    write_model(dir, &config, &bert_tensors(&config));
    load_backbone(dir, Device::Cpu, Kind::Float).unwrap()
}

fn tiny_llama(dir: &Path, heads: i64, kv_heads: i64) -> Box<dyn Backbone> {
    let config = llama_config(heads, kv_heads, true);
    write_model(dir, &config, &llama_tensors(&config));
    load_backbone(dir, Device::Cpu, Kind::Float).unwrap()
}

fn tiny_mpnet(dir: &Path) -> Box<dyn Backbone> {
    let config = mpnet_config();
    write_model(dir, &config, &mpnet_tensors(&config));
    load_backbone(dir, Device::Cpu, Kind::Float).unwrap()
}

fn ids(rows: &[&[i64]]) -> (Tensor, Tensor) {
    ids_padded_with(rows, 0)
}

/// `[batch, seq]` ids right-padded with `pad`, and their mask.
fn ids_padded_with(rows: &[&[i64]], pad: i64) -> (Tensor, Tensor) {
    let seq = rows.iter().map(|r| r.len()).max().unwrap();
    let mut id = Vec::new();
    let mut mask = Vec::new();
    for r in rows {
        id.extend_from_slice(r);
        id.extend(std::iter::repeat_n(pad, seq - r.len()));
        mask.extend(std::iter::repeat_n(1i64, r.len()));
        mask.extend(std::iter::repeat_n(0i64, seq - r.len()));
    }
    let shape = [rows.len() as i64, seq as i64];
    (
        Tensor::from_slice(&id).view(shape),
        Tensor::from_slice(&mask).view(shape),
    )
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn error_text<T>(result: heterotune_trainer::Result<T>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bert_shapes_and_info() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path());
    let info = model.info();
    assert_eq!(info.family, Family::Bert);
    assert_eq!(
        (info.hidden_size, info.num_layers, info.vocab_size),
        (32, 2, 50)
    );
    let expected: i64 = bert_tensors(&bert_config())
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum();
    assert_eq!(info.num_parameters as i64, expected);
    let (input, mask) = ids(&[&[2, 5, 6, 7, 3], &[2, 9, 3]]);
    let out = model.forward(&input, &mask);
    assert_eq!(out.size(), [2, 5, 32]);
    assert_eq!(model.hidden_states(&input, &mask).len(), 3);
    assert!(!out.requires_grad());
}

#[test]
fn bert_padding_does_not_change_real_positions() {
    let _guard = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_bert(tmp.path());
    assert_padding_invariant(model.as_ref(), [2, 3], 0);
}

/// A 5-token sequence (`[first, 11, 12, 13, last]`) gives the same states
/// alone and right-padded with `pad` in a batch with a longer one.
fn assert_padding_invariant(model: &dyn Backbone, [first, last]: [i64; 2], pad: i64) {
    let short: &[i64] = &[first, 11, 12, 13, last];
    let (alone, alone_mask) = ids_padded_with(&[short], pad);
    let long: &[i64] = &[first, 4, 5, 6, 7, 8, 9, 10, last];
    let (batch, batch_mask) = ids_padded_with(&[short, long], pad);
    let a = model.hidden_states(&alone, &alone_mask);
    let b = model.hidden_states(&batch, &batch_mask);
    assert_eq!(b[1].size()[..2], [2, 9]);
    for (layer, (a, b)) in a.iter().zip(&b).enumerate() {
        let diff = max_diff(a, &b.get(0).narrow(0, 0, 5).unsqueeze(0));
        assert!(
            diff < 1e-5,
            "layer {layer}: padding changed real outputs by {diff}"
        );
    }
}

#[test]
fn bert_prefix_is_stripped() {
    let _guard = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    let config = bert_config();
    let plain = tmp.path().join("plain");
    let prefixed = tmp.path().join("prefixed");
    let tensors = bert_tensors(&config);
    let renamed: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (format!("bert.{n}"), t.shallow_clone()))
        .collect();
    write_model(&plain, &config, &tensors);
    write_model(&prefixed, &config, &renamed);
    let a = Bert::load(&plain, Device::Cpu, Kind::Float).unwrap();
    let b = Bert::load(&prefixed, Device::Cpu, Kind::Float).unwrap();
    let (input, mask) = ids(&[&[2, 5, 6, 3]]);
    assert_eq!(
        max_diff(&a.forward(&input, &mask), &b.forward(&input, &mask)),
        0.0
    );
}

#[test]
fn mpnet_shapes_parameters_and_padding() {
    let _guard = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_mpnet(tmp.path());
    let info = model.info().clone();
    assert_eq!(info.family, Family::Mpnet);
    assert_eq!(
        (info.hidden_size, info.num_layers, info.vocab_size),
        (32, 2, MPNET_VOCAB as usize)
    );
    // Every tensor is loaded, and the facts' formula counts the same.
    let expected: u64 = mpnet_tensors(&mpnet_config())
        .iter()
        .map(|(_, t)| t.numel() as u64)
        .sum();
    assert_eq!(info.num_parameters as u64, expected);
    let facts = heterotune_crds::model::ModelFacts::read(tmp.path()).unwrap();
    assert_eq!(facts.parameters(), expected);
    // Padding (id 1, MPNet's) does not change the real positions.
    assert_padding_invariant(model.as_ref(), [0, 2], 1);
}

/// Positions start after the padding id (RoBERTa's rule), and the relative
/// position bias reaches the attention: zeroing its table changes a layer.
#[test]
fn mpnet_positions_and_relative_bias() {
    let _guard = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    let config = mpnet_config();
    let tensors = mpnet_tensors(&config);
    write_model(tmp.path(), &config, &tensors);
    let model = load_backbone(tmp.path(), Device::Cpu, Kind::Float).unwrap();
    let weight = |name: &str| &tensors.iter().find(|(n, _)| n == name).unwrap().1;
    let (input, _) = ids(&[&[0, 7, 8, 2]]);
    let words = weight("embeddings.word_embeddings.weight").index_select(0, &input.get(0));
    let positions = weight("embeddings.position_embeddings.weight").narrow(0, 2, 4);
    let want = (words + positions).layer_norm(
        [32],
        Some(weight("embeddings.LayerNorm.weight")),
        Some(weight("embeddings.LayerNorm.bias")),
        1e-5,
        false,
    );
    assert!(max_diff(&model.embed(&input).get(0), &want) < 1e-5);

    // The same layers without the bias table's effect: a zero table.
    let flat: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| match n.as_str() {
            "encoder.relative_attention_bias.weight" => (n.clone(), t.zeros_like()),
            _ => (n.clone(), t.shallow_clone()),
        })
        .collect();
    let flat_dir = tmp.path().join("flat");
    write_model(&flat_dir, &config, &flat);
    let flat = load_backbone(&flat_dir, Device::Cpu, Kind::Float).unwrap();
    let (input, mask) = ids(&[&[0, 7, 8, 9, 10, 11, 2]]);
    let hidden = model.embed(&input);
    let diff = max_diff(
        &model.layer(0, &hidden, &mask, None),
        &flat.layer(0, &hidden, &mask, None),
    );
    assert!(
        diff > 1e-3,
        "the relative position bias had no effect ({diff})"
    );
}

#[test]
fn llama_is_causal() {
    let _guard = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_llama(tmp.path(), 4, 2);
    let (a, mask) = ids(&[&[1, 5, 6, 7, 8, 9, 10, 11]]);
    let (b, _) = ids(&[&[1, 5, 6, 7, 40, 9, 10, 11]]);
    let sa = model.hidden_states(&a, &mask);
    let sb = model.hidden_states(&b, &mask);
    for (layer, (x, y)) in sa.iter().zip(&sb).enumerate() {
        let before = max_diff(&x.narrow(1, 0, 4), &y.narrow(1, 0, 4));
        assert_eq!(
            before, 0.0,
            "layer {layer}: a later token changed earlier states"
        );
        let after = max_diff(&x.narrow(1, 4, 4), &y.narrow(1, 4, 4));
        assert!(
            after > 1e-3,
            "layer {layer}: the changed token had no effect"
        );
    }
}

#[test]
fn llama_right_padding_does_not_change_real_positions() {
    let _guard = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_llama(tmp.path(), 4, 2);
    let short: &[i64] = &[1, 20, 21, 22];
    let (alone, alone_mask) = ids(&[short]);
    let (batch, batch_mask) = ids(&[short, &[1, 4, 5, 6, 7, 8, 9, 10]]);
    let a = model.forward(&alone, &alone_mask);
    let b = model.forward(&batch, &batch_mask);
    assert!(max_diff(&a, &b.get(0).narrow(0, 0, 4).unsqueeze(0)) < 1e-5);
    assert!(
        b.isfinite().all().int64_value(&[]) == 1,
        "padded rows must stay finite"
    );
}

#[test]
fn llama_other_padding_layouts_mask_keys() {
    // A mask that is not right-padded takes the explicit-mask path: masked
    // keys must not influence real positions.
    let _guard = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_llama(tmp.path(), 4, 2);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 0, 1, 1, 1, 1]).view([2, 5]);
    let a = Tensor::from_slice(&[1i64, 5, 6, 7, 8, 30, 5, 6, 7, 8]).view([2, 5]);
    let b = Tensor::from_slice(&[1i64, 5, 6, 7, 8, 31, 5, 6, 7, 8]).view([2, 5]);
    let (ya, yb) = (model.forward(&a, &mask), model.forward(&b, &mask));
    assert_eq!(max_diff(&ya.narrow(1, 1, 4), &yb.narrow(1, 1, 4)), 0.0);
    // Row 0 has no padding: same result as computed alone.
    let alone = model.forward(&a.narrow(0, 0, 1), &mask.narrow(0, 0, 1));
    assert!(max_diff(&alone, &ya.narrow(0, 0, 1)) < 1e-5);
}

/// Grouped-query attention equals multi-head attention whose key/value
/// heads are copies of the shared ones.
#[test]
fn llama_gqa_matches_repeated_kv_heads() {
    let _guard = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    let (heads, d) = (4i64, 8i64);
    for kv in [1i64, 2] {
        let gqa_cfg = llama_config(heads, kv, true);
        let gqa_tensors = llama_tensors(&gqa_cfg);
        let mha_tensors: Vec<(String, Tensor)> = gqa_tensors
            .iter()
            .map(|(name, t)| {
                let t = if name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight") {
                    t.view([kv, d, 32])
                        .repeat_interleave_self_int(heads / kv, 0, None)
                        .reshape([heads * d, 32])
                } else {
                    t.shallow_clone()
                };
                (name.clone(), t)
            })
            .collect();
        let gqa_dir = tmp.path().join(format!("gqa{kv}"));
        let mha_dir = tmp.path().join(format!("mha{kv}"));
        write_model(&gqa_dir, &gqa_cfg, &gqa_tensors);
        write_model(&mha_dir, &llama_config(heads, heads, true), &mha_tensors);
        let gqa = load_backbone(&gqa_dir, Device::Cpu, Kind::Float).unwrap();
        let mha = load_backbone(&mha_dir, Device::Cpu, Kind::Float).unwrap();
        let (input, mask) = ids(&[&[1, 5, 6, 7, 8, 9], &[1, 10, 11]]);
        let (a, b) = (gqa.forward(&input, &mask), mha.forward(&input, &mask));
        assert_eq!(a.size(), [2, 6, 32]);
        let real = mask.unsqueeze(-1);
        let diff = max_diff(&(a * &real), &(b * &real));
        assert!(
            diff < 1e-5,
            "kv_heads {kv}: GQA differs from repeated MHA by {diff}"
        );
    }
}

#[test]
fn llama_lm_head_tied_and_untied() {
    let _guard = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    for tied in [true, false] {
        let dir = tmp.path().join(format!("tied{tied}"));
        let config = llama_config(4, 2, tied);
        let tensors = llama_tensors(&config);
        write_model(&dir, &config, &tensors);
        let model = Llama::load(&dir, Device::Cpu, Kind::Float).unwrap();
        let expected: i64 = tensors.iter().map(|(_, t)| t.numel() as i64).sum();
        assert_eq!(model.info().num_parameters as i64, expected);
        let (input, mask) = ids(&[&[1, 5, 6]]);
        let hidden = model.forward(&input, &mask);
        let logits = model.lm_logits(&hidden);
        assert_eq!(logits.size(), [1, 3, LLAMA_VOCAB]);
        let head = tensors
            .iter()
            .find(|(n, _)| {
                n == if tied {
                    "model.embed_tokens.weight"
                } else {
                    "lm_head.weight"
                }
            })
            .unwrap();
        assert!(max_diff(&logits, &hidden.matmul(&head.1.tr())) < 1e-4);
    }
}

/// Records every projection the backbone asks about; adds `scale` to `Value`.
struct Recorder {
    calls: RefCell<Vec<(usize, Projection, Vec<i64>)>>,
    value_shift: f64,
}

impl ProjectionDelta for Recorder {
    fn delta(&self, layer: usize, projection: Projection, input: &Tensor) -> Option<Tensor> {
        self.calls
            .borrow_mut()
            .push((layer, projection, input.size()));
        match projection {
            Projection::Query => Some(input.zeros_like().narrow(-1, 0, 1)),
            Projection::Value if self.value_shift != 0.0 => Some(Tensor::full(
                [1],
                self.value_shift,
                (input.kind(), input.device()),
            )),
            _ => None,
        }
    }
}

#[test]
fn projection_deltas_reach_every_attention_projection() {
    let _guard = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    let bert = tiny_bert(&tmp.path().join("bert"));
    // LLaMA with head_dim * heads != hidden would also work; here 4 x 8 = 32.
    let llama = tiny_llama(&tmp.path().join("llama"), 4, 2);
    let mpnet = tiny_mpnet(&tmp.path().join("mpnet"));
    for model in [&bert, &llama, &mpnet] {
        let (input, mask) = ids(&[&[1, 5, 6, 7], &[1, 8, 9]]);
        let hidden = model.embed(&input);
        let plain = model.layer(1, &hidden, &mask, None);
        let zero = Recorder {
            calls: RefCell::new(Vec::new()),
            value_shift: 0.0,
        };
        let same = model.layer(1, &hidden, &mask, Some(&zero));
        assert_eq!(
            max_diff(&plain, &same),
            0.0,
            "a zero delta changed the output"
        );
        let calls = zero.calls.borrow();
        let seen: Vec<Projection> = calls.iter().map(|c| c.1).collect();
        assert_eq!(
            seen,
            [
                Projection::Query,
                Projection::Key,
                Projection::Value,
                Projection::Output
            ]
        );
        // The layer packs the batch's 7 real tokens (of 8 positions): the
        // deltas see those rows only.
        assert!(
            calls.iter().all(|c| c.0 == 1 && c.2 == [7, 32]),
            "{calls:?}"
        );
        let shifted = Recorder {
            calls: RefCell::new(Vec::new()),
            value_shift: 0.5,
        };
        let moved = model.layer(1, &hidden, &mask, Some(&shifted));
        assert!(
            max_diff(&plain, &moved) > 1e-3,
            "a value delta had no effect"
        );
    }
}

#[test]
fn gradients_flow_through_frozen_layers() {
    let tmp = tempfile::tempdir().unwrap();
    for model in [
        tiny_bert(&tmp.path().join("bert")),
        tiny_llama(&tmp.path().join("llama"), 4, 1),
        tiny_mpnet(&tmp.path().join("mpnet")),
    ] {
        let (input, mask) = ids(&[&[1, 5, 6, 7], &[1, 8, 9]]);
        let start = tch::no_grad(|| model.embed(&input)).set_requires_grad(true);
        let mut hidden = start.shallow_clone();
        for layer in 0..model.info().num_layers {
            hidden = model.layer(layer, &hidden, &mask, None);
        }
        let loss = model.final_norm(&hidden).square().mean(Kind::Float);
        loss.backward();
        let grad = start.grad();
        assert!(grad.defined());
        assert!(grad.isfinite().all().int64_value(&[]) == 1);
        assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}

#[test]
fn bf16_weights_track_f32() {
    let _guard = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    let bert_dir = tmp.path().join("bert");
    let llama_dir = tmp.path().join("llama");
    let bert_cfg = bert_config();
    write_model(&bert_dir, &bert_cfg, &bert_tensors(&bert_cfg));
    let llama_cfg = llama_config(4, 2, true);
    write_model(&llama_dir, &llama_cfg, &llama_tensors(&llama_cfg));
    let mpnet_dir = tmp.path().join("mpnet");
    let mpnet_cfg = mpnet_config();
    write_model(&mpnet_dir, &mpnet_cfg, &mpnet_tensors(&mpnet_cfg));
    for dir in [&bert_dir, &llama_dir, &mpnet_dir] {
        let f32 = load_backbone(dir, Device::Cpu, Kind::Float).unwrap();
        let bf16 = load_backbone(dir, Device::Cpu, Kind::BFloat16).unwrap();
        let (input, mask) = ids(&[&[1, 5, 6, 7, 8]]);
        let a = f32.forward(&input, &mask);
        let b = bf16.forward(&input, &mask);
        assert_eq!(b.kind(), Kind::BFloat16);
        let rel = max_diff(&a, &b.to_kind(Kind::Float)) / a.abs().max().double_value(&[]);
        assert!(rel < 0.1, "{}: bf16 relative error {rel}", dir.display());
    }
}

/// An f32 adapter on a bf16 backbone: f32 hidden states and f32 deltas are
/// cast to the backbone's dtype.
#[test]
fn bf16_backbone_accepts_f32_adapters() {
    struct F32Delta;
    impl ProjectionDelta for F32Delta {
        fn delta(&self, _: usize, _: Projection, input: &Tensor) -> Option<Tensor> {
            Some(input.to_kind(Kind::Float).narrow(-1, 0, 1) * 0.1)
        }
    }
    let _guard = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    let bert_dir = tmp.path().join("bert");
    let llama_dir = tmp.path().join("llama");
    let bert_cfg = bert_config();
    write_model(&bert_dir, &bert_cfg, &bert_tensors(&bert_cfg));
    let llama_cfg = llama_config(4, 2, true);
    write_model(&llama_dir, &llama_cfg, &llama_tensors(&llama_cfg));
    let mpnet_dir = tmp.path().join("mpnet");
    let mpnet_cfg = mpnet_config();
    write_model(&mpnet_dir, &mpnet_cfg, &mpnet_tensors(&mpnet_cfg));
    for dir in [&bert_dir, &llama_dir, &mpnet_dir] {
        let model = load_backbone(dir, Device::Cpu, Kind::BFloat16).unwrap();
        let (input, mask) = ids(&[&[1, 5, 6, 7, 8], &[1, 9]]);
        let hidden = model.embed(&input).to_kind(Kind::Float);
        let out = model.layer(0, &hidden, &mask, Some(&F32Delta));
        assert_eq!(out.kind(), Kind::BFloat16);
        let normed = model.final_norm(&out.to_kind(Kind::Float));
        assert_eq!(normed.size(), [2, 5, 32]);
    }
}

#[test]
fn loading_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let missing = error_text(load_backbone(dir, Device::Cpu, Kind::Float));
    assert!(
        missing.contains("config.json") && missing.contains("setup.sh"),
        "{missing}"
    );

    let config = bert_config();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let no_weights = error_text(load_backbone(dir, Device::Cpu, Kind::Float));
    assert!(no_weights.contains("model.safetensors"), "{no_weights}");

    let mut other = config.clone();
    other["model_type"] = json!("gpt2");
    std::fs::write(dir.join("config.json"), other.to_string()).unwrap();
    let unknown = error_text(load_backbone(dir, Device::Cpu, Kind::Float));
    assert!(unknown.contains("unknown model_type `gpt2`"), "{unknown}");

    let mut act = config.clone();
    act["hidden_act"] = json!("gelu_fast");
    std::fs::write(dir.join("config.json"), act.to_string()).unwrap();
    let bad_act = error_text(load_backbone(dir, Device::Cpu, Kind::Float));
    assert!(
        bad_act.contains("gelu_fast") && bad_act.contains("config.json"),
        "{bad_act}"
    );

    let mut tensors = bert_tensors(&config);
    tensors.retain(|(n, _)| n != "encoder.layer.1.output.dense.bias");
    write_model(dir, &config, &tensors);
    let absent = error_text(load_backbone(dir, Device::Cpu, Kind::Float));
    assert!(
        absent.contains("`encoder.layer.1.output.dense.bias` is missing")
            && absent.contains("model.safetensors"),
        "{absent}"
    );

    let mut wide = config.clone();
    wide["intermediate_size"] = json!(64);
    write_model(dir, &wide, &bert_tensors(&config));
    let shape = error_text(load_backbone(dir, Device::Cpu, Kind::Float));
    assert!(
        shape.contains("encoder.layer.0.intermediate.dense.weight")
            && shape.contains("[48, 32]")
            && shape.contains("[64, 32]"),
        "{shape}"
    );

    let mut ints = bert_tensors(&config);
    ints[0].1 = ints[0].1.to_kind(Kind::Int64);
    write_model(dir, &config, &ints);
    let dtype = error_text(load_backbone(dir, Device::Cpu, Kind::Float));
    assert!(
        dtype.contains("word_embeddings") && dtype.contains("I64"),
        "{dtype}"
    );

    let llama = llama_config(4, 2, false);
    let mut tensors = llama_tensors(&llama);
    tensors.retain(|(n, _)| n != "lm_head.weight");
    write_model(dir, &llama, &tensors);
    let head = error_text(load_backbone(dir, Device::Cpu, Kind::Float));
    assert!(head.contains("lm_head.weight"), "{head}");

    let mut rope = llama_config(4, 2, true);
    rope["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
    std::fs::write(dir.join("config.json"), rope.to_string()).unwrap();
    let yarn = error_text(load_backbone(dir, Device::Cpu, Kind::Float));
    assert!(yarn.contains("yarn"), "{yarn}");
}

fn word_level_tokenizer() -> Value {
    let vocab: serde_json::Map<String, Value> =
        "[PAD] [UNK] [CLS] [SEP] the capital of france is paris what how far"
            .split(' ')
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect();
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": null,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": [special(0, "[PAD]"), special(1, "[UNK]"), special(2, "[CLS]"), special(3, "[SEP]")],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}

#[test]
fn tokenizer_pads_right_and_truncates_keeping_specials() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("tokenizer.json"),
        word_level_tokenizer().to_string(),
    )
    .unwrap();
    let tok = TextTokenizer::for_model(tmp.path(), 13).unwrap();
    assert_eq!(
        (tok.pad_id(), tok.num_special_tokens(), tok.vocab_size()),
        (0, 2, 13)
    );
    let enc = tok
        .encode_batch(&["What is the capital of France", "Paris"], 64)
        .unwrap();
    // The file's fixed padding to 128 is off: pad to the longest (8) only.
    assert_eq!(enc.input_ids.size(), [2, 8]);
    let row0 = Vec::<i64>::try_from(enc.input_ids.get(0)).unwrap();
    let row1 = Vec::<i64>::try_from(enc.input_ids.get(1)).unwrap();
    assert_eq!(row0, [2, 10, 8, 4, 5, 6, 7, 3]);
    assert_eq!(row1, [2, 9, 3, 0, 0, 0, 0, 0]);
    let mask1 = Vec::<i64>::try_from(enc.attention_mask.get(1)).unwrap();
    assert_eq!(mask1, [1, 1, 1, 0, 0, 0, 0, 0]);

    let short = tok
        .encode_batch(&["What is the capital of France", "Paris"], 5)
        .unwrap();
    let row0 = Vec::<i64>::try_from(short.input_ids.get(0)).unwrap();
    assert_eq!(row0, [2, 10, 8, 4, 3], "truncation keeps [CLS] and [SEP]");
    assert!(
        tok.encode("paris", 2).is_err(),
        "no room next to the special tokens"
    );
    assert_eq!(tok.decode(&[2, 9, 3]).unwrap(), "paris");

    let mismatch = error_text(TextTokenizer::for_model(tmp.path(), 10));
    assert!(
        mismatch.contains("tokenizer.json") && mismatch.contains("config.json"),
        "{mismatch}"
    );
    let none = error_text(TextTokenizer::for_model(&tmp.path().join("nope"), 10));
    assert!(
        none.contains("tokenizer.json") && none.contains("setup.sh"),
        "{none}"
    );
}

#[test]
fn model_config_gives_shape_facts_without_weights() {
    use heterotune_trainer::adapters::lora::ProjectionDims;
    use heterotune_trainer::job;
    use heterotune_trainer::models::ModelConfig;

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // BERT: no weights needed; the same facts as the loaded backbone.
    std::fs::write(dir.join("config.json"), bert_config().to_string()).unwrap();
    let bert = ModelConfig::read(dir).unwrap();
    assert_eq!(bert.family(), Family::Bert);
    let info = bert.info();
    assert_eq!(
        (
            info.hidden_size,
            info.num_layers,
            info.vocab_size,
            info.num_parameters
        ),
        (32, 2, BERT_VOCAB as usize, 0)
    );
    assert_eq!(ProjectionDims::of_model(&bert), ProjectionDims::square(32));
    assert_eq!(job::num_layers(dir).unwrap(), 2);

    // LLaMA with grouped-query attention: 8 query heads of 4, 2 KV heads.
    std::fs::write(
        dir.join("config.json"),
        llama_config(8, 2, true).to_string(),
    )
    .unwrap();
    let llama = ModelConfig::read(dir).unwrap();
    assert_eq!(llama.info().family, Family::Llama);
    assert_eq!(llama.num_layers(), 3);
    let dims = ProjectionDims::of_model(&llama);
    assert_eq!((dims.hidden, dims.query_out, dims.value_out), (32, 32, 8));

    // MPNet: square projections like BERT.
    std::fs::write(dir.join("config.json"), mpnet_config().to_string()).unwrap();
    let mpnet = ModelConfig::read(dir).unwrap();
    assert_eq!(mpnet.family(), Family::Mpnet);
    assert_eq!(ProjectionDims::of_model(&mpnet), ProjectionDims::square(32));
    assert_eq!(job::num_layers(dir).unwrap(), 2);

    // Errors name the file and the field.
    let mut missing = bert_config();
    missing.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(dir.join("config.json"), missing.to_string()).unwrap();
    for err in [
        error_text(ModelConfig::read(dir)),
        error_text(job::num_layers(dir)),
    ] {
        assert!(
            err.contains("config.json") && err.contains("missing field `num_hidden_layers`"),
            "{err}"
        );
    }
    let mut uneven = bert_config();
    uneven["hidden_size"] = json!(30); // not a multiple of 4 heads
    std::fs::write(dir.join("config.json"), uneven.to_string()).unwrap();
    let err = error_text(ModelConfig::read(dir));
    assert!(
        err.contains("config.json") && err.contains("num_attention_heads"),
        "{err}"
    );
    let gone = error_text(ModelConfig::read(&dir.join("nowhere")));
    assert!(
        gone.contains("config.json") && gone.contains("not found"),
        "{gone}"
    );
}
