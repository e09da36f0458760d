//! Backbone speed on the CPU, next to PyTorch + transformers.
//!
//! For each real model in `$HETEROTUNE_CACHE/models` (made by
//! `scripts/setup.sh`), at batch 16 × 32 tokens (no padding), f32 (or bf16),
//! `tch::set_num_threads(2)`:
//!
//! * `forward`: embeddings + every layer + final norm, no autograd;
//! * `train top-K`: the frozen prefix without autograd, then the top K layers
//!   with autograd from their input, the final norm, a scalar loss and
//!   backward: the backbone's share of a step with an adapter below layer
//!   L-K (SmolLM2 with the full-depth slot map adapts layer 9, so K = 21);
//! * `window top-K`: the top K layers + backward only (frozen prefix cached).
//!
//! `scripts/bench_torch_backbone.py` makes the same measurements with
//! transformers (2 threads); the two alternate for `--rounds` rounds so both
//! see the same machine load, and the table shows each side's fastest run
//! (other processes on a shared machine only ever add time) and its median.
//!
//! ```text
//! source scripts/env.sh
//! cargo run -p heterotune-trainer --release --example backbone_bench -- \
//!     [--reps 5] [--rounds 3] [--dtype f32|bf16] [--no-torch] [MODEL ...]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use heterotune_trainer::models::{load_backbone, Backbone, Family};
use tch::{Device, Kind, Tensor};

const BATCH: i64 = 16;
const SEQ: i64 = 32;
const THREADS: i32 = 2;
const MODELS: [&str; 3] = [
    "all-MiniLM-L6-v2",
    "paraphrase-MiniLM-L3-v2",
    "SmolLM2-135M-Instruct",
];

fn cache_dir() -> PathBuf {
    heterotune_crds::uri::cache_root().unwrap_or_else(|| PathBuf::from(".cache/heterotune"))
}

/// Resident set size of this process in MiB (Linux), if readable.
fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Wall times of `reps` runs of `f`, after two warm-ups.
fn time_runs(reps: usize, mut f: impl FnMut()) -> Vec<f64> {
    f();
    f();
    (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect()
}

/// Runs the frozen prefix `0..start` without autograd.
fn prefix(model: &dyn Backbone, ids: &Tensor, mask: &Tensor, start: usize) -> Tensor {
    tch::no_grad(|| {
        let mut h = model.embed(ids);
        for layer in 0..start {
            h = model.layer(layer, &h, mask, None);
        }
        h
    })
}

/// Top layers `start..` with autograd from their input, loss, backward.
fn train_from(model: &dyn Backbone, input: &Tensor, mask: &Tensor, start: usize) -> Tensor {
    let h = input.detach().set_requires_grad(true);
    let mut x = h.shallow_clone();
    for layer in start..model.info().num_layers {
        x = model.layer(layer, &x, mask, None);
    }
    model.final_norm(&x).square().mean(Kind::Float).backward();
    h.grad()
}

/// The `top-K` and `window top-K` depths measured for a model: all layers
/// for encoders; the reference's 21 and a 6-layer window for decoders.
fn plan(model: &dyn Backbone) -> (Vec<usize>, Vec<usize>) {
    let n = model.info().num_layers;
    match model.info().family {
        Family::Bert | Family::Mpnet => (vec![n], vec![]),
        Family::Llama => (vec![n.min(21)], vec![n.min(6)]),
    }
}

/// Times of one model, by measurement name.
type Times = BTreeMap<String, Vec<f64>>;

fn bench_rust(
    dir: &Path,
    kind: Kind,
    reps: usize,
    report_memory: bool,
    times: &mut Times,
) -> anyhow::Result<(Vec<usize>, Vec<usize>)> {
    let rss_before = rss_mib();
    let start = Instant::now();
    let model = load_backbone(dir, Device::Cpu, kind)?;
    let load = start.elapsed().as_secs_f64();
    let rss_loaded = rss_mib();
    let model = model.as_ref();
    let info = model.info().clone();
    tch::manual_seed(0);
    let ids = Tensor::randint(
        info.vocab_size as i64,
        [BATCH, SEQ],
        (Kind::Int64, Device::Cpu),
    );
    let mask = ids.ones_like();
    let n = info.num_layers;
    let mut record = |what: String, runs: Vec<f64>| times.entry(what).or_default().extend(runs);
    record(
        "forward".into(),
        time_runs(reps, || {
            let _ = tch::no_grad(|| model.forward(&ids, &mask));
        }),
    );
    let (tops, windows) = plan(model);
    for &k in &tops {
        record(
            format!("train top-{k}"),
            time_runs(reps, || {
                let h = prefix(model, &ids, &mask, n - k);
                let _ = train_from(model, &h, &mask, n - k);
            }),
        );
    }
    for &k in &windows {
        let cached = prefix(model, &ids, &mask, n - k);
        record(
            format!("window top-{k}"),
            time_runs(reps, || {
                let _ = train_from(model, &cached, &mask, n - k);
            }),
        );
    }
    if let (true, Some(before), Some(loaded), Some(after)) =
        (report_memory, rss_before, rss_loaded, rss_mib())
    {
        eprintln!(
            "{}: loaded in {load:.2} s; resident +{:.0} MiB after load, +{:.0} MiB after the runs",
            dir.display(),
            loaded - before,
            after - before
        );
    }
    Ok((tops, windows))
}

fn bench_torch(
    dir: &Path,
    dtype: &str,
    reps: usize,
    tops: &[usize],
    windows: &[usize],
    times: &mut Times,
) -> anyhow::Result<()> {
    let venv = std::env::var_os("HETEROTUNE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| heterotune_tests::repo_root().join(".venv"));
    let mut cmd = Command::new(venv.join("bin").join("python"));
    cmd.arg(
        heterotune_tests::repo_root()
            .join("scripts")
            .join("bench_torch_backbone.py"),
    )
    .arg(dir)
    .args(["--batch", &BATCH.to_string(), "--seq", &SEQ.to_string()])
    .args([
        "--threads",
        &THREADS.to_string(),
        "--reps",
        &reps.to_string(),
    ])
    .args(["--dtype", dtype]);
    for k in tops {
        cmd.args(["--top", &k.to_string()]);
    }
    for k in windows {
        cmd.args(["--window", &k.to_string()]);
    }
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "bench_torch_backbone.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.starts_with('{') {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)?;
        let what = v["what"].as_str().unwrap_or_default().to_string();
        let runs: Vec<f64> = v["runs"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default();
        times.entry(what).or_default().extend(runs);
    }
    Ok(())
}

fn min_median(runs: &[f64]) -> Option<(f64, f64)> {
    let mut sorted = runs.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some((*sorted.first()?, sorted[sorted.len() / 2]))
}

fn main() -> anyhow::Result<()> {
    let mut reps = 5usize;
    let mut rounds = 3usize;
    let mut with_torch = true;
    let mut dtype = "f32".to_string();
    let mut names = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()).unwrap_or(reps),
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or(rounds),
            "--no-torch" => with_torch = false,
            "--dtype" => dtype = args.next().unwrap_or(dtype),
            other => names.push(other.to_string()),
        }
    }
    if names.is_empty() {
        names = MODELS.iter().map(|s| s.to_string()).collect();
    }
    let kind = match dtype.as_str() {
        "f32" => Kind::Float,
        "bf16" => Kind::BFloat16,
        other => anyhow::bail!("--dtype {other}: use f32 or bf16"),
    };
    tch::set_num_threads(THREADS);
    println!(
        "batch {BATCH} x {SEQ} tokens, {dtype}, {THREADS} threads; {rounds} rounds x {reps} runs; seconds: min (median)"
    );
    println!(
        "{:<24} {:<14} {:>18} {:>18} {:>10}",
        "model", "measure", "rust", "pytorch", "rust/torch"
    );
    for name in &names {
        let dir = cache_dir().join("models").join(name);
        anyhow::ensure!(
            dir.join("config.json").exists(),
            "{} missing: run scripts/setup.sh",
            dir.display()
        );
        let (mut rust, mut torch) = (Times::new(), Times::new());
        for round in 0..rounds {
            let (tops, windows) = bench_rust(&dir, kind, reps, round == 0, &mut rust)?;
            if with_torch {
                bench_torch(&dir, &dtype, reps, &tops, &windows, &mut torch)?;
            }
        }
        for (what, runs) in &rust {
            let Some((r_min, r_med)) = min_median(runs) else {
                continue;
            };
            let t = torch.get(what).and_then(|t| min_median(t));
            let torch_cell = t.map_or("-".into(), |(m, d)| format!("{m:.4} ({d:.4})"));
            let ratio = t.map_or("-".into(), |(m, _)| format!("{:.2}", r_min / m));
            println!(
                "{name:<24} {what:<14} {:>18} {torch_cell:>18} {ratio:>10}",
                format!("{r_min:.4} ({r_med:.4})")
            );
        }
    }
    Ok(())
}
