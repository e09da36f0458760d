//! One training step of the trainer, next to the same step in PyTorch.
//!
//! For each packaged model in `$HETEROTUNE_CACHE/models` (made by
//! `scripts/setup.sh`) with the quickstart's DeMA (r = 8, K = 4, S = 3;
//! MiniLM-L6, MiniLM-L3 and MPNet with slot ends, SmolLM2 with the top-6
//! window), f32 (or the backbone in bfloat16 with `--bf16`, as `dtype:
//! bfloat16` runs it), `tch::set_num_threads(2)`, batch 16 of real TREC
//! questions
//! (right-padded to the longest in the batch, at most 32 tokens):
//!
//! * the Rust side is the trainer itself: [`ClientModel::prepare`] (the
//!   frozen prefix, cached once), then [`ClientModel::train`] for `--steps`
//!   steps; a step's time is the trainer's own training-loop time divided by
//!   its steps (batch assembly from the cache, forward through the window,
//!   cross-entropy, backward, grad clipping, AdamW, the loss read back);
//! * `scripts/bench_torch_step.py` runs the same step with PyTorch +
//!   transformers on the same model folder: the same token ids, batches and
//!   batch order (a JSON file this example writes), the same initial adapter
//!   and head values (a safetensors file), a DeMA written in torch with the
//!   same operations, the same optimiser settings, the backbone in the
//!   same dtype (every family, float32 or `--bf16`).
//!
//! The pool of `steps × 16` questions is a seeded sample of
//! `$HETEROTUNE_CACHE/data/trec/trec.jsonl`; the batches are the ones the
//! trainer draws from it (its seeded shuffle, reproduced here and checked
//! through the token count it reports). Each round runs all the steps once
//! on each side, alternating which side goes first, so both see the same
//! machine load; the table shows each side's fastest round and median round
//! (seconds per step), and the ratios of the fastest and of the median
//! rounds.
//!
//! ```text
//! source scripts/env.sh
//! cargo run -p heterotune-trainer --release --example step_bench -- \
//!     [--steps 20] [--warmup 3] [--rounds 5] [--no-torch] [--bf16] [--bucket] [--prefix-check] [--out DIR] [MODEL ...]
//! ```
//!
//! `--bucket` places the same questions so that each of the trainer's
//! batches holds questions of (nearly) the same length: what the step would
//! cost with length-bucketed batches, or with padding removed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::Context as _;
use heterotune_crds::spec::{Dtype, TrainingSpec};
use heterotune_trainer::adapters::{DemaConfig, LayerSelection, Pooling};
use heterotune_trainer::artifact::{self, StoreDtype};
use heterotune_trainer::client::train_settings;
use heterotune_trainer::data::source::Example;
use heterotune_trainer::data::split::{seeded_rng, shuffle};
use heterotune_trainer::job::kind_of;
use heterotune_trainer::models::load_backbone;
use heterotune_trainer::tokenizer::TextTokenizer;
use heterotune_trainer::train::{Adapter, AdapterChoice, ClientModel, TrainSettings};
use serde_json::{json, Value};
use tch::Device;

const BATCH: usize = 16;
const MAX_SEQ: usize = 32;
const THREADS: i32 = 2;
const LABELS: [&str; 6] = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"];
/// The trainer's batch-order stream (train.rs: `seeded_rng(seed, 0x74_7261_696e)`).
const TRAIN_STREAM: u64 = 0x74_7261_696e;
/// Seed of the training settings (batch order); the pool has its own.
const TRAIN_SEED: u64 = 1;
const POOL_SEED: u64 = 7;

/// A packaged model and its layer selection (as in examples/quickstart.yaml).
struct ModelCase {
    name: &'static str,
    selection: LayerSelection,
    /// Seconds per step of the design doc's PyTorch prototype (same settings).
    prototype: f64,
}

const MODELS: [ModelCase; 4] = [
    ModelCase {
        name: "all-MiniLM-L6-v2",
        selection: LayerSelection::SlotEnds,
        prototype: 0.081,
    },
    ModelCase {
        name: "paraphrase-MiniLM-L3-v2",
        selection: LayerSelection::SlotEnds,
        prototype: 0.045,
    },
    ModelCase {
        name: "all-mpnet-base-v2",
        selection: LayerSelection::SlotEnds,
        // The prototype predates the MPNet tier.
        prototype: f64::NAN,
    },
    ModelCase {
        name: "SmolLM2-135M-Instruct",
        selection: LayerSelection::TopWindow { layers: 6 },
        prototype: 0.126,
    },
];

fn cache_dir() -> PathBuf {
    heterotune_crds::uri::cache_root().unwrap_or_else(|| PathBuf::from(".cache/heterotune"))
}

/// Every TREC question (text, label id), in file order.
fn read_trec() -> anyhow::Result<Vec<Example>> {
    let path = cache_dir().join("data").join("trec").join("trec.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: run scripts/setup.sh", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)?;
        let label = v["label"].as_str().unwrap_or_default();
        let label = LABELS
            .iter()
            .position(|l| *l == label)
            .with_context(|| format!("unknown TREC label {label:?}"))?;
        out.push(Example {
            text: v["text"].as_str().unwrap_or_default().trim().to_string(),
            label,
        });
    }
    Ok(out)
}

/// The trainer's settings (`client::train_settings`) for `steps` steps of
/// the spec's default training section, which is the quickstart's (batch
/// 16, at most 32 tokens, learning rates 0.003 / 0.01, the prefix cache on).
fn settings(steps: usize) -> TrainSettings {
    let training = TrainingSpec {
        local_steps: steps as u32,
        batch_size: BATCH as u32,
        max_seq_length: MAX_SEQ as u32,
        ..TrainingSpec::default()
    };
    train_settings(&training, TRAIN_SEED, None)
}

/// The batches (indices into a pool of `n`) the trainer draws in its first
/// `steps` steps: one seeded shuffle, then consecutive chunks.
fn trainer_batches(n: usize, steps: usize) -> Vec<Vec<usize>> {
    assert!(n >= steps * BATCH, "the pool must hold every step's batch");
    let mut rng = seeded_rng(TRAIN_SEED, TRAIN_STREAM);
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut rng, &mut order);
    order
        .chunks(BATCH)
        .take(steps)
        .map(<[usize]>::to_vec)
        .collect()
}

/// The PyTorch side, kept running between rounds.
struct Torch {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Torch {
    fn spawn(job: &Path) -> anyhow::Result<(Self, Value)> {
        let venv = std::env::var_os("HETEROTUNE_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| heterotune_tests::repo_root().join(".venv"));
        let mut child = Command::new(venv.join("bin").join("python"))
            .arg(
                heterotune_tests::repo_root()
                    .join("scripts")
                    .join("bench_torch_step.py"),
            )
            .arg(job)
            .args(["--threads", &THREADS.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting scripts/bench_torch_step.py")?;
        let stdin = child.stdin.take().context("python stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("python stdout")?);
        let mut torch = Torch {
            child,
            stdin,
            stdout,
        };
        let ready = torch.read()?;
        Ok((torch, ready))
    }

    /// The next JSON line the script prints.
    fn read(&mut self) -> anyhow::Result<Value> {
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line)? == 0 {
                anyhow::bail!("bench_torch_step.py exited early (see its stderr above)");
            }
            if line.starts_with('{') {
                return Ok(serde_json::from_str(&line)?);
            }
        }
    }

    /// One timed round: every step once.
    fn round(&mut self) -> anyhow::Result<Value> {
        writeln!(self.stdin, "run")?;
        self.stdin.flush()?;
        self.read()
    }

    fn quit(mut self) -> anyhow::Result<()> {
        writeln!(self.stdin, "quit")?;
        self.stdin.flush()?;
        self.child.wait()?;
        Ok(())
    }
}

fn min_median(runs: &[f64]) -> (f64, f64) {
    let mut sorted = runs.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    };
    (sorted[0], median)
}

fn as_f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// What one model's measurement found.
struct Row {
    name: String,
    mean_len: f64,
    mean_tokens: f64,
    grad_layers: String,
    trainable: (usize, Option<usize>),
    rust: Vec<f64>,
    torch: Vec<f64>,
    prototype: f64,
}

struct Options {
    steps: usize,
    warmup: usize,
    rounds: usize,
    with_torch: bool,
    /// The backbone's dtype (`--bf16`: bfloat16).
    dtype: Dtype,
    /// Length-bucketed batches (same questions, sorted into batches by length).
    bucket: bool,
    /// Also time the prefix cache built from the pool sorted by length.
    prefix_check: bool,
    out: PathBuf,
}

fn bench_model(case: &ModelCase, all: &[Example], opt: &Options) -> anyhow::Result<Row> {
    let dir = cache_dir().join("models").join(case.name);
    anyhow::ensure!(
        dir.join("config.json").exists(),
        "{} missing: run scripts/setup.sh",
        dir.display()
    );
    let backbone = load_backbone(&dir, Device::Cpu, kind_of(opt.dtype))?;
    let info = backbone.info().clone();
    let tokenizer = TextTokenizer::for_model(&dir, info.vocab_size)?;
    let cfg = DemaConfig {
        rank: 8,
        experts: 4,
        slots: 3,
        scale: 1.0,
        residual_scale: false,
        layer_selection: case.selection,
        every_layer_in_group: false,
        init_seed: 0,
    };
    let mut model = ClientModel::new(
        backbone,
        tokenizer.clone(),
        &AdapterChoice::Dema(cfg.clone()),
        LABELS.len(),
        Pooling::Mean,
        Device::Cpu,
    )?;
    let adapted = match &model.adapter {
        Adapter::Dema(d) => d.slot_map().adapted_layers(),
        Adapter::Lora(_) => unreachable!("a DeMA adapter was built"),
    };
    let prefix = model.prefix_layers();
    let trainable = model.adapter.parameter_count() + model.head.parameter_count();
    let var_numel: usize = model
        .vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel())
        .sum();
    anyhow::ensure!(
        var_numel == trainable,
        "{}: var store holds {var_numel} trainable values, the adapter + head count {trainable}",
        case.name
    );

    // The pool: a seeded sample of TREC, exactly steps × 16 questions, so
    // the trainer's one shuffle visits each once.
    let n = opt.steps * BATCH;
    let mut index: Vec<usize> = (0..all.len()).collect();
    shuffle(&mut seeded_rng(POOL_SEED, 0), &mut index);
    let mut pool: Vec<Example> = index[..n].iter().map(|&i| all[i].clone()).collect();
    let mut ids: Vec<Vec<u32>> = pool
        .iter()
        .map(|e| tokenizer.encode(&e.text, MAX_SEQ))
        .collect::<Result<_, _>>()?;
    let batches = trainer_batches(n, opt.steps);
    if opt.bucket {
        // Place the questions so that the trainer's k-th batch holds the
        // k-th group of 16 by token count: (nearly) no padding.
        let mut by_len: Vec<usize> = (0..n).collect();
        by_len.sort_by_key(|&i| (ids[i].len(), i));
        let slots: Vec<usize> = batches.iter().flatten().copied().collect();
        let mut placed: Vec<Option<usize>> = vec![None; n];
        for (slot, src) in slots.iter().zip(&by_len) {
            placed[*slot] = Some(*src);
        }
        let src: Vec<usize> = placed
            .into_iter()
            .map(|p| p.expect("every slot filled"))
            .collect();
        pool = src.iter().map(|&i| pool[i].clone()).collect();
        ids = src.iter().map(|&i| ids[i].clone()).collect();
    }
    let lens: Vec<usize> = batches
        .iter()
        .map(|b| b.iter().map(|&i| ids[i].len()).max().unwrap_or(0))
        .collect();
    let batch_tokens: Vec<usize> = batches
        .iter()
        .map(|b| b.iter().map(|&i| ids[i].len()).sum())
        .collect();
    let mean_len = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
    let mean_tokens = batch_tokens.iter().sum::<usize>() as f64 / lens.len() as f64;

    // Initial adapter + head values, for the PyTorch side to start from.
    std::fs::create_dir_all(&opt.out)?;
    let names: Vec<String> = model.vs.variables().keys().cloned().collect();
    let init = opt
        .out
        .join(format!("step_bench-{}-init.safetensors", case.name));
    let (bytes, _) = artifact::to_safetensors(&model.export(&names)?, StoreDtype::F32)?;
    artifact::write_atomic(&init, &bytes)?;
    let job = opt.out.join(format!("step_bench-{}.json", case.name));
    let trainer = settings(opt.steps);
    let job_value = json!({
        "model": case.name,
        "model_dir": dir,
        "family": info.family.as_str(),
        "dtype": opt.dtype.as_str(),
        "num_layers": info.num_layers,
        "hidden_size": info.hidden_size,
        "labels": LABELS,
        "pad_id": tokenizer.pad_id(),
        "max_seq_length": MAX_SEQ,
        "batch_size": BATCH,
        "rank": cfg.rank,
        "experts": cfg.experts,
        "slots": cfg.slots,
        "scale": cfg.scale,
        "rms_eps": heterotune_trainer::adapters::dema::RMS_EPS,
        "prefix_layers": prefix,
        "adapted_layers": adapted,
        "learning_rate": trainer.learning_rate,
        "head_learning_rate": trainer.head_learning_rate,
        "weight_decay": trainer.weight_decay,
        "max_grad_norm": trainer.max_grad_norm,
        "eval_batch_size": trainer.eval_batch_size,
        "warmup_steps": opt.warmup,
        "init": init,
        "trainable_parameters": trainable,
        "pool": pool.iter().zip(&ids).map(|(e, t)| json!({
            "text": e.text, "label": e.label, "ids": t,
        })).collect::<Vec<_>>(),
        "batches": batches,
    });
    std::fs::write(&job, serde_json::to_vec(&job_value)?)?;

    let model_id = format!("{}|step_bench", dir.display());
    let start = Instant::now();
    let data = model.prepare(&pool, &settings(opt.steps), &model_id)?;
    anyhow::ensure!(
        data.cached == n,
        "only {} of {n} prefixes cached",
        data.cached
    );
    let prefix_seconds = start.elapsed().as_secs_f64();
    if opt.prefix_check {
        // The same prefixes computed from the pool sorted by length (the
        // cache is built in chunks of eval_batch_size in pool order, each
        // chunk padded to its longest question).
        let mut sorted: Vec<usize> = (0..n).collect();
        sorted.sort_by_key(|&i| ids[i].len());
        let sorted: Vec<Example> = sorted.iter().map(|&i| pool[i].clone()).collect();
        let start = Instant::now();
        let again = model.prepare(&sorted, &settings(opt.steps), &model_id)?;
        eprintln!(
            "  prefix cache for {} examples: {prefix_seconds:.2} s in pool order, {:.2} s with the pool sorted by length",
            again.cached,
            start.elapsed().as_secs_f64()
        );
    }

    let mut torch = None;
    let mut torch_trainable = None;
    let mut torch_warm = Vec::new();
    if opt.with_torch {
        let (t, ready) = Torch::spawn(&job)?;
        torch_trainable = ready["trainable_parameters"].as_u64().map(|v| v as usize);
        torch_warm = as_f64s(&ready["warmup_losses"]);
        eprintln!(
            "  torch: {} ({} attention), grad through layers {}, adapted {}, trainable {}, prefix {:.2} s, tokenizer {}",
            ready["torch"].as_str().unwrap_or("?"),
            ready["attn_implementation"].as_str().unwrap_or("?"),
            ready["grad_layers"],
            ready["adapted_layers"],
            ready["trainable_parameters"],
            ready["prefix_seconds"].as_f64().unwrap_or(f64::NAN),
            ready["tokenizer_check"].as_str().unwrap_or("?"),
        );
        torch = Some(t);
    }

    // Warm-up (same first batches on both sides; the torch side ran its own
    // before it said ready). Compare the losses: same start, same function.
    let warm = model.train(&data, &settings(opt.warmup))?;
    eprintln!(
        "  rust: prefix of {prefix} layers cached for {n} examples in {prefix_seconds:.2} s; grad through layers {prefix}..{}; adapted {:?}; trainable {trainable}",
        info.num_layers - 1,
        adapted.iter().map(|&(l, _)| l).collect::<Vec<_>>()
    );
    if !torch_warm.is_empty() {
        let torch_mean = torch_warm.iter().sum::<f64>() / torch_warm.len() as f64;
        eprintln!(
            "  warm-up ({} steps) mean loss: rust {:.6}, torch {:.6}; last: rust {:.6}, torch {:.6}",
            warm.steps,
            warm.mean_loss,
            torch_mean,
            warm.final_loss,
            torch_warm.last().copied().unwrap_or(f64::NAN)
        );
    }

    let expected_tokens: usize = batch_tokens.iter().sum();
    let mut rust = Vec::new();
    let mut torch_runs = Vec::new();
    for round in 0..opt.rounds {
        let rust_first = round % 2 == 0 || torch.is_none();
        let mut torch_round = |torch: &mut Option<Torch>| -> anyhow::Result<()> {
            if let Some(t) = torch.as_mut() {
                let v = t.round()?;
                let secs = v["seconds"].as_f64().context("torch round seconds")?;
                torch_runs.push(secs / opt.steps as f64);
                eprintln!(
                    "  round {round} torch: {:.4} s/step (mean loss {:.5})",
                    secs / opt.steps as f64,
                    v["mean_loss"].as_f64().unwrap_or(f64::NAN)
                );
            }
            Ok(())
        };
        if !rust_first {
            torch_round(&mut torch)?;
        }
        let report = model.train(&data, &settings(opt.steps))?;
        let train_seconds = report.steps as f64 / report.steps_per_second;
        let tokens = (report.tokens_per_second * train_seconds).round() as usize;
        anyhow::ensure!(
            tokens == expected_tokens,
            "the trainer saw {tokens} tokens, the batches written for torch hold {expected_tokens}"
        );
        rust.push(train_seconds / report.steps as f64);
        eprintln!(
            "  round {round} rust:  {:.4} s/step (mean loss {:.5})",
            train_seconds / report.steps as f64,
            report.mean_loss
        );
        if rust_first {
            torch_round(&mut torch)?;
        }
    }
    if let Some(t) = torch {
        t.quit()?;
    }
    Ok(Row {
        name: case.name.to_string(),
        mean_len,
        mean_tokens,
        grad_layers: format!(
            "{}..{} ({})",
            prefix,
            info.num_layers - 1,
            adapted
                .iter()
                .map(|&(l, _)| l.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
        trainable: (trainable, torch_trainable),
        rust,
        torch: torch_runs,
        prototype: case.prototype,
    })
}

fn main() -> anyhow::Result<()> {
    let mut opt = Options {
        steps: 20,
        warmup: 3,
        rounds: 5,
        with_torch: true,
        dtype: Dtype::Float32,
        bucket: false,
        prefix_check: false,
        out: heterotune_tests::repo_root()
            .join("target")
            .join("step_bench"),
    };
    let mut names = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut num = |d: usize| args.next().and_then(|v| v.parse().ok()).unwrap_or(d);
        match arg.as_str() {
            "--steps" => opt.steps = num(opt.steps),
            "--warmup" => opt.warmup = num(opt.warmup),
            "--rounds" => opt.rounds = num(opt.rounds),
            "--no-torch" => opt.with_torch = false,
            "--bf16" => opt.dtype = Dtype::Bfloat16,
            "--bucket" => opt.bucket = true,
            "--prefix-check" => opt.prefix_check = true,
            "--out" => opt.out = args.next().map(PathBuf::from).unwrap_or(opt.out),
            other => names.push(other.to_string()),
        }
    }
    anyhow::ensure!(
        opt.steps >= 1 && opt.warmup >= 1 && opt.warmup <= opt.steps,
        "need 1 <= --warmup <= --steps"
    );
    tch::set_num_threads(THREADS);
    let all = read_trec()?;
    let cases: Vec<&ModelCase> = if names.is_empty() {
        MODELS.iter().collect()
    } else {
        names
            .iter()
            .map(|n| {
                MODELS
                    .iter()
                    .find(|m| m.name == n)
                    .with_context(|| format!("unknown model {n}"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    println!(
        "one training step: batch {BATCH} TREC questions (<= {MAX_SEQ} tokens, padded to the batch's longest), backbone in {}, {THREADS} threads, DeMA r=8 K=4 S=3",
        opt.dtype.as_str()
    );
    println!(
        "{} steps per round after {} warm-up steps, {} rounds alternating rust/pytorch; seconds per step: min (median) over rounds{}",
        opt.steps,
        opt.warmup,
        opt.rounds,
        if opt.bucket { "; LENGTH-BUCKETED batches" } else { "" }
    );
    let mut rows = Vec::new();
    for case in cases {
        eprintln!("{}:", case.name);
        rows.push(bench_model(case, &all, &opt)?);
    }
    println!(
        "{:<24} {:>7} {:>7} {:<18} {:>15} {:>18} {:>18} {:>11} {:>10}",
        "model",
        "mean T",
        "tokens",
        "grad layers (DeMA)",
        "trainable r/t",
        "rust",
        "pytorch",
        "rust/torch",
        "prototype"
    );
    let mut summary = BTreeMap::new();
    for row in &rows {
        let (r_min, r_med) = min_median(&row.rust);
        let t = (!row.torch.is_empty()).then(|| min_median(&row.torch));
        let torch_cell = t.map_or("-".into(), |(m, d)| format!("{m:.4} ({d:.4})"));
        let ratio = t.map_or("-".into(), |(m, d)| {
            format!("{:.2} ({:.2})", r_min / m, r_med / d)
        });
        let trainable = format!(
            "{}/{}",
            row.trainable.0,
            row.trainable.1.map_or("-".into(), |t| t.to_string())
        );
        println!(
            "{:<24} {:>7.2} {:>7.1} {:<18} {:>15} {:>18} {torch_cell:>18} {ratio:>11} {:>10}",
            row.name,
            row.mean_len,
            row.mean_tokens,
            row.grad_layers,
            trainable,
            format!("{r_min:.4} ({r_med:.4})"),
            if row.prototype.is_nan() {
                "-".to_string()
            } else {
                format!("{:.3}", row.prototype)
            }
        );
        summary.insert(
            row.name.clone(),
            json!({"rust": row.rust, "torch": row.torch, "mean_padded_len": row.mean_len}),
        );
    }
    let file = opt.out.join("step_bench-results.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&summary)?)?;
    println!("per-round seconds per step: {}", file.display());
    Ok(())
}
