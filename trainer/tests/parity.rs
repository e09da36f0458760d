//! Parity of the Rust backbones and tokenizer with Hugging Face transformers
//! on the project's four real models.
//!
//! For each model in `$HETEROTUNE_CACHE/models` (made by `scripts/setup.sh`),
//! `scripts/parity_reference.py` runs transformers (f32, eval) on a fixed
//! batch of TREC questions and saves the token ids, every layer's hidden
//! states and, for LLaMA, the logits and a greedy continuation. The test then
//!
//! * tokenises the same texts with [`TextTokenizer`] and requires identical
//!   ids and masks (also with truncation);
//! * runs the Rust backbone in f32 and requires max |Δ| ≤ 1e-4 + 1e-6·max|hf|
//!   on real (unmasked) positions for the embeddings and every layer's
//!   output (max|hf| so far: an error made at a large activation stays in
//!   the residual stream), for the mean-pooled final output (what the head
//!   reads, and sentence-transformers' embedding for MPNet), and for
//!   LLaMA's final norm and logits (the relative term: the
//!   layers compute on the real tokens only, so their GEMMs sum in another
//!   order than HF's padded ones; SmolLM2's residual stream has ~25 000-sized
//!   activations, where f32's own spacing is 0.002);
//! * loads the model in bf16 and requires its mean-pooled output within
//!   cosine 0.999 of HF's f32 one;
//! * for LLaMA, greedy-decodes the same prompt and requires the same tokens
//!   (" Paris.").
//!
//! Three more tests build small random transformers checkpoints with the options
//! the real models do not use (`parity_reference.py make-tiny`: GELU-tanh,
//! `bert.` / `mpnet.` prefixes, head_dim != hidden/heads, llama3 RoPE,
//! untied head, biases) and check them the same way.
//!
//! A missing model directory FAILS the test (run `scripts/setup.sh`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use heterotune_trainer::models::llama::Llama;
use heterotune_trainer::models::{load_backbone, Backbone, Family};
use heterotune_trainer::tokenizer::TextTokenizer;
use tch::{Device, Kind, Tensor};

/// Hidden states must match HF to this (f32, real positions), plus
/// [`RELATIVE_TOLERANCE`] times the largest magnitude.
const HIDDEN_TOLERANCE: f64 = 1e-4;
/// Relative part of the tolerances: ~8 f32 ulps (a different summation order).
const RELATIVE_TOLERANCE: f64 = 1e-6;
/// LLaMA logits must match HF to this too (measured: 0 for SmolLM2 in f32,
/// whose libtorch kernels are the ones HF calls).
const LOGITS_TOLERANCE: f64 = 1e-4;
/// bf16 weights and activations: mean-pooled outputs stay this close (HF's
/// own bf16 models reach ≥ 0.9999 on these inputs).
const BF16_MIN_COSINE: f64 = 0.999;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("trainer/ has a parent")
        .to_path_buf()
}

fn python() -> PathBuf {
    let venv = std::env::var_os("HETEROTUNE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv"));
    let python = venv.join("bin").join("python");
    assert!(
        python.exists(),
        "\n!!!! {} not found: run scripts/setup.sh (or set HETEROTUNE_VENV)\n",
        python.display()
    );
    python
}

fn model_dir(name: &str) -> PathBuf {
    let cache = std::env::var_os("HETEROTUNE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache")
                .join("heterotune")
        });
    let dir = cache.join("models").join(name);
    if !dir.join("config.json").exists() {
        eprintln!(
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !!!! model {name} is missing at {}\n\
             !!!! run scripts/setup.sh before the tests\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n",
            dir.display()
        );
        panic!(
            "model {name} missing at {}: run scripts/setup.sh",
            dir.display()
        );
    }
    dir
}

/// The reference tensors and metadata written by `parity_reference.py`.
struct Reference {
    tensors: HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
}

impl Reference {
    fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference lacks tensor {name}"))
    }

    fn meta(&self, key: &str) -> &str {
        self.metadata
            .get(key)
            .unwrap_or_else(|| panic!("reference lacks metadata {key}"))
    }

    fn texts(&self) -> Vec<String> {
        serde_json::from_str(self.meta("texts")).expect("texts metadata is a JSON list")
    }
}

fn reference(dir: &Path, out_dir: &Path) -> Reference {
    let out = out_dir.join("reference.safetensors");
    let script = repo_root().join("scripts").join("parity_reference.py");
    let status = Command::new(python())
        .arg(&script)
        .arg(dir)
        .arg(&out)
        .env("OMP_NUM_THREADS", "2")
        .status()
        .expect("cannot run python");
    assert!(status.success(), "{} failed: {status}", script.display());
    let bytes = std::fs::read(&out).expect("reference file written");
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(&bytes).expect("valid safetensors reference");
    let metadata = metadata.metadata().clone().unwrap_or_default();
    let tensors = Tensor::read_safetensors(&out)
        .expect("readable reference")
        .into_iter()
        .collect();
    Reference { tensors, metadata }
}

/// Max |a - b| over positions where `mask` is 1 (`a`, `b`: `[B, T, ...]`).
fn masked_max_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    let mut keep = mask.to_kind(Kind::Float);
    while keep.dim() < a.dim() {
        keep = keep.unsqueeze(-1);
    }
    ((a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs() * keep)
        .max()
        .double_value(&[])
}

fn masked_max_abs(a: &Tensor, mask: &Tensor) -> f64 {
    masked_max_diff(a, &a.zeros_like(), mask)
}

/// Tokenisation must give HF's ids on real positions and HF's mask.
fn check_tokenizer(dir: &Path, vocab: usize, reference: &Reference, prefix: &str, max_len: usize) {
    let tokenizer = TextTokenizer::for_model(dir, vocab).expect("tokenizer loads");
    let texts = reference.texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let encoded = tokenizer.encode_batch(&refs, max_len).expect("encodes");
    let ref_ids = reference.tensor(&format!("{prefix}input_ids"));
    let ref_mask = reference.tensor(&format!("{prefix}attention_mask"));
    assert_eq!(
        encoded.attention_mask.size(),
        ref_mask.size(),
        "batch shape differs from HF ({prefix}max_len {max_len})"
    );
    assert!(
        encoded.attention_mask.equal(ref_mask),
        "attention mask differs from HF ({prefix}max_len {max_len})"
    );
    let same = (&encoded.input_ids * &encoded.attention_mask).equal(&(ref_ids * ref_mask));
    if !same {
        let mine = Vec::<i64>::try_from(encoded.input_ids.get(0)).unwrap_or_default();
        let theirs = Vec::<i64>::try_from(ref_ids.get(0)).unwrap_or_default();
        panic!("token ids differ from HF ({prefix}max_len {max_len}): first row {mine:?} vs {theirs:?}");
    }
}

fn check_model(name: &str) {
    check_dir(name, &model_dir(name), true);
}

/// Parity of the checkpoint in `dir`; `real` adds the bf16 and greedy checks
/// that only make sense for trained weights.
fn check_dir(name: &str, dir: &Path, real: bool) {
    tch::set_num_threads(2);
    let _guard = tch::no_grad_guard();
    let dir = dir.to_path_buf();
    let tmp = tempfile::tempdir().expect("tempdir");
    let reference = reference(&dir, tmp.path());

    let backbone = load_backbone(&dir, Device::Cpu, Kind::Float).expect("backbone loads");
    let info = backbone.info().clone();
    println!("{name}: {info:?}");

    let max_len: usize = reference.meta("max_len").parse().expect("max_len");
    let short_len: usize = reference
        .meta("short_max_len")
        .parse()
        .expect("short_max_len");
    check_tokenizer(&dir, info.vocab_size, &reference, "", max_len);
    check_tokenizer(&dir, info.vocab_size, &reference, "short.", short_len);

    let ids = reference.tensor("input_ids");
    let mask = reference.tensor("attention_mask");
    let states = backbone.hidden_states(ids, mask);
    assert_eq!(states.len(), info.num_layers + 1);
    let mut worst: f64 = 0.0;
    let mut largest: f64 = 0.0;
    let mut failures = Vec::new();
    println!("{name}: max |rust - hf| on real positions (max |hf|)");
    for (i, state) in states.iter().enumerate() {
        let key = format!("hidden.{i}");
        let hf = reference.tensor(&key);
        let diff = masked_max_diff(state, hf, mask);
        let scale = masked_max_abs(hf, mask);
        let what = if i == 0 {
            "embeddings".to_string()
        } else {
            format!("layer {}", i - 1)
        };
        println!("  {what:>11}: {diff:.3e}  ({scale:.2})");
        worst = worst.max(diff);
        // An error made at a large activation is carried by the residual
        // stream after that value shrinks: scale by the largest one so far.
        largest = largest.max(scale);
        if diff > HIDDEN_TOLERANCE + RELATIVE_TOLERANCE * largest || diff.is_nan() {
            failures.push(format!("{what}: {diff:.3e}"));
        }
    }
    println!("{name}: worst hidden-state diff {worst:.3e}");
    let pooled = masked_mean(&backbone.final_norm(&states[info.num_layers]), mask);
    let hf_pooled = reference.tensor("pooled");
    let diff = (&pooled - hf_pooled).abs().max().double_value(&[]);
    println!("  mean-pooled output: {diff:.3e}");
    if diff > HIDDEN_TOLERANCE + RELATIVE_TOLERANCE * largest || diff.is_nan() {
        failures.push(format!("mean-pooled output: {diff:.3e}"));
    }
    assert!(
        failures.is_empty(),
        "{name}: hidden states differ from HF by more than {HIDDEN_TOLERANCE} + {RELATIVE_TOLERANCE}·max|hf|: {failures:?}"
    );

    drop(backbone);
    if real {
        check_bf16(&dir, &reference, info.num_layers, info.family, name);
    }
    if info.family == Family::Llama {
        check_llama_head(&dir, &reference, &states[info.num_layers], mask, name, real);
    }
}

/// Mean of `hidden` (`[B, T, H]`) over real positions, `[B, H]` in f32.
fn masked_mean(hidden: &Tensor, mask: &Tensor) -> Tensor {
    let keep = mask.to_kind(Kind::Float).unsqueeze(-1);
    (hidden.to_kind(Kind::Float) * &keep).sum_dim_intlist(1, false, Kind::Float)
        / keep.sum_dim_intlist(1, false, Kind::Float)
}

/// The bf16 backbone (a speed option on CPUs with AVX512-BF16) keeps the
/// mean-pooled final representation, what the classification head reads,
/// within cosine [`BF16_MIN_COSINE`] of HF's f32 one.
fn check_bf16(dir: &Path, reference: &Reference, layers: usize, family: Family, name: &str) {
    let backbone = load_backbone(dir, Device::Cpu, Kind::BFloat16).expect("bf16 backbone loads");
    let ids = reference.tensor("input_ids");
    let mask = reference.tensor("attention_mask");
    let ours = masked_mean(&backbone.forward(ids, mask), mask);
    let key = match family {
        Family::Bert | Family::Mpnet => format!("hidden.{layers}"),
        Family::Llama => "final_norm".to_string(),
    };
    let theirs = masked_mean(reference.tensor(&key), mask);
    let cosine = Tensor::cosine_similarity(&ours, &theirs, -1, 1e-8)
        .min()
        .double_value(&[]);
    println!("  bf16 vs HF f32: min cosine of mean-pooled output {cosine:.6}");
    assert!(
        cosine >= BF16_MIN_COSINE,
        "{name}: bf16 mean-pooled output has cosine {cosine} < {BF16_MIN_COSINE} with f32"
    );
}

fn check_llama_head(
    dir: &Path,
    reference: &Reference,
    last: &Tensor,
    mask: &Tensor,
    name: &str,
    greedy: bool,
) {
    let llama = Llama::load(dir, Device::Cpu, Kind::Float).expect("llama loads");
    let normed = llama.final_norm(last);
    let diff = masked_max_diff(&normed, reference.tensor("final_norm"), mask);
    println!("  final_norm: {diff:.3e}");
    assert!(
        diff <= HIDDEN_TOLERANCE,
        "{name}: final norm differs by {diff:.3e}"
    );

    let logits = llama.lm_logits(&normed);
    let hf_logits = reference.tensor("logits");
    let diff = masked_max_diff(&logits, hf_logits, mask);
    let scale = masked_max_abs(hf_logits, mask);
    println!("  logits: {diff:.3e} (max |logit| {scale:.2})");
    assert!(
        diff <= LOGITS_TOLERANCE + RELATIVE_TOLERANCE * scale,
        "{name}: logits differ from HF by {diff:.3e} > {LOGITS_TOLERANCE} + {RELATIVE_TOLERANCE}·{scale:.2}"
    );
    let argmax_same = (logits
        .argmax(-1, false)
        .eq_tensor(&hf_logits.argmax(-1, false)))
    .logical_or(&mask.eq(0))
    .all()
    .int64_value(&[])
        == 1;
    assert!(argmax_same, "{name}: next-token argmax differs from HF");

    if !greedy {
        return;
    }
    // Greedy decoding of the reference prompt reproduces HF's tokens.
    let tokenizer = TextTokenizer::for_model(dir, llama.info().vocab_size).expect("tokenizer");
    let hf_greedy = Vec::<i64>::try_from(reference.tensor("greedy_ids").get(0)).expect("ids");
    let prompt = tokenizer
        .encode(reference.meta("greedy_prompt"), 64)
        .expect("prompt encodes");
    let mut ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    while ids.len() < hf_greedy.len() {
        let input = Tensor::from_slice(&ids).unsqueeze(0);
        let mask = input.ones_like();
        let hidden = llama.forward(&input, &mask);
        let next = llama
            .lm_logits(&hidden.narrow(1, ids.len() as i64 - 1, 1))
            .argmax(-1, false)
            .int64_value(&[0, 0]);
        ids.push(next);
    }
    let new: Vec<u32> = ids[prompt.len()..].iter().map(|&t| t as u32).collect();
    let text = tokenizer.decode(&new).expect("decodes");
    println!(
        "  greedy: {:?} -> {text:?}",
        reference.meta("greedy_prompt")
    );
    assert_eq!(
        ids, hf_greedy,
        "{name}: greedy continuation differs from HF"
    );
    assert!(
        text.starts_with(" Paris"),
        "{name}: greedy continuation {text:?}"
    );
}

#[test]
fn parity_all_minilm_l6_v2() {
    check_model("all-MiniLM-L6-v2");
}

#[test]
fn parity_paraphrase_minilm_l3_v2() {
    check_model("paraphrase-MiniLM-L3-v2");
}

#[test]
fn parity_all_mpnet_base_v2() {
    check_model("all-mpnet-base-v2");
}

#[test]
fn parity_smollm2_135m_instruct() {
    check_model("SmolLM2-135M-Instruct");
}

/// A random transformers checkpoint with the options the real models do not
/// use (see `parity_reference.py make-tiny`), tokenizer borrowed from `real`.
fn check_tiny(kind: &str, real: &str) {
    let source = model_dir(real);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join(kind);
    let status = Command::new(python())
        .arg(repo_root().join("scripts").join("parity_reference.py"))
        .args(["make-tiny", kind])
        .arg(&source)
        .arg(&dir)
        .status()
        .expect("cannot run python");
    assert!(status.success(), "make-tiny {kind} failed: {status}");
    check_dir(&format!("tiny {kind}"), &dir, false);
}

#[test]
fn parity_tiny_bert_variant() {
    check_tiny("bert", "all-MiniLM-L6-v2");
}

#[test]
fn parity_tiny_llama_variant() {
    check_tiny("llama", "SmolLM2-135M-Instruct");
}

#[test]
fn parity_tiny_mpnet_variant() {
    check_tiny("mpnet", "all-mpnet-base-v2");
}
