//! Aggregation cost: time and peak memory of one round of `aggregate_round`
//! (read + verify + combine + write) for 10, 100 and 1000 clients over 1 and
//! 3 families, at two sizes, plus CMGA's combination alone as the number of
//! families grows. Prints figures; asserts nothing about time.
//!
//! ```text
//! source scripts/env.sh
//! cargo run --release -p heterotune-trainer --example aggregate_bench
//! cargo run --release -p heterotune-trainer --example aggregate_bench -- --sizes quickstart --clients 10,100
//! ```
//!
//! Sizes (DeMA; every client shares experts + gate, family parts and head):
//! * `quickstart`: r = 8, K = 4, S = 3 (972 shared parameters); one adapted
//!   layer per slot; family widths d = 384, 384, 576 (MiniLM-L6, MiniLM-L3,
//!   SmolLM2); 6-class head. About 40-60 KB per client upload.
//! * `llama7b`: r = 64, K = 8, S = 32 (1 081 600 shared parameters: a slot
//!   per LLaMA-7B layer); family parts for d = 4096 on 32 layers
//!   (16.8 M parameters); 6-class head. About 36 MB per client upload.
//!
//! Each measurement runs in a fresh child process (this program re-executed
//! with `--child`), so the peak RSS (VmHWM) is that one round's; the
//! baseline is the child's RSS before aggregating (libtorch loaded). Client
//! uploads are synthetic: per family 4 distinct artifacts, hard-linked for
//! the other clients of the family (every client is still read, hashed,
//! parsed, checked and accumulated; the page cache serves the reads, so
//! this measures CPU and memory, not the object store).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use heterotune_crds::manifest::{ArtifactKind, ArtifactManifest, TensorInfo};
use heterotune_crds::spec::{FamilyWeighting, FederatedTuneSpec};
use heterotune_trainer::aggregate::array::{serialize, WireDtype};
use heterotune_trainer::aggregate::cmga::{combine_group, CmgaOptions, FamilyUpdate};
use heterotune_trainer::aggregate::{
    aggregate_round, clients_dir, family_name, write_global, Array,
};
use heterotune_trainer::artifact::{sha256_hex, write_atomic};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const RUN: &str = "bench/aggregate-00000000";

#[derive(Parser, Debug)]
#[command(about = "Aggregation time and peak memory")]
struct Args {
    /// Sizes to measure: quickstart, llama7b.
    #[arg(long, value_delimiter = ',', default_value = "quickstart,llama7b")]
    sizes: Vec<String>,
    /// Client counts.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    clients: Vec<usize>,
    /// Family counts.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    families: Vec<usize>,
    /// Algorithms.
    #[arg(long, value_delimiter = ',', default_value = "cmga,fedavg")]
    algorithms: Vec<String>,
    /// Family counts for the combine-only measurement (llama7b shared part).
    #[arg(long, value_delimiter = ',', default_value = "2,3,10,30")]
    combine_families: Vec<usize>,
    /// Where to put the synthetic runs (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Internal: aggregate one prepared run (spec file, run dir, out dir).
    #[arg(long, num_args = 3, hide = true)]
    child: Option<Vec<PathBuf>>,
}

/// One size configuration.
struct Size {
    name: &'static str,
    rank: usize,
    experts: usize,
    slots: usize,
    /// Adapted layers per family (one per slot here).
    layers: usize,
    /// Family widths, cycled over families.
    widths: &'static [usize],
    classes: usize,
}

const QUICKSTART: Size = Size {
    name: "quickstart",
    rank: 8,
    experts: 4,
    slots: 3,
    layers: 3,
    widths: &[384, 384, 576],
    classes: 6,
};

const LLAMA7B: Size = Size {
    name: "llama7b",
    rank: 64,
    experts: 8,
    slots: 32,
    layers: 32,
    widths: &[4096],
    classes: 6,
};

fn size(name: &str) -> Size {
    match name {
        "quickstart" => QUICKSTART,
        "llama7b" => LLAMA7B,
        other => panic!("unknown size {other:?}: quickstart or llama7b"),
    }
}

fn random_array(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Array {
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|_| (rng.random::<f32>() - 0.5) * scale)
        .collect();
    Array::new(shape.to_vec(), data).expect("array")
}

/// Tensors of one DeMA client (or the global): shared part + family parts + head.
fn dema_tensors(
    size: &Size,
    d: usize,
    rng: &mut ChaCha8Rng,
    scale: f32,
    direction: Option<&BTreeMap<String, Array>>,
) -> BTreeMap<String, Array> {
    let (r, k) = (size.rank, size.experts);
    let mut m = BTreeMap::new();
    for s in 0..size.slots {
        for (name, shape) in [
            ("experts.weight", vec![k, r, r]),
            ("experts.bias", vec![k, r]),
            ("gate.weight", vec![k, r]),
            ("gate.bias", vec![k]),
        ] {
            m.insert(
                format!("shared.slot{s}.{name}"),
                random_array(rng, &shape, scale),
            );
        }
    }
    for l in 0..size.layers {
        m.insert(
            format!("family.layer{l}.down.weight"),
            random_array(rng, &[r, d], scale),
        );
        m.insert(
            format!("family.layer{l}.up.weight"),
            random_array(rng, &[d, r], scale),
        );
    }
    m.insert(
        "head.weight".into(),
        random_array(rng, &[size.classes, d], scale),
    );
    m.insert(
        "head.bias".into(),
        random_array(rng, &[size.classes], scale),
    );
    // A family's clients share a direction (so families differ, and some
    // family pairs conflict).
    if let Some(dir) = direction {
        for (name, a) in m.iter_mut() {
            if let Some(base) = dir.get(name) {
                for (v, b) in a.data.iter_mut().zip(&base.data) {
                    *v = 0.5 * *v + *b;
                }
            }
        }
    }
    m
}

fn manifest(kind: ArtifactKind, round: u32) -> ArtifactManifest {
    let mut m = ArtifactManifest::new(kind, RUN, round, round.saturating_sub(1), "aggregate_bench");
    m.artifact.path = "adapter.safetensors".into();
    m.created_at = "2026-01-01T00:00:00Z".into();
    m
}

fn spec_for(size: &Size, families: usize, clients: usize, algorithm: &str) -> FederatedTuneSpec {
    let list: Vec<serde_json::Value> = (0..clients)
        .map(|i| {
            serde_json::json!({"name": format!("c{i:04}"),
                "model": {"family": "llama", "uri": format!("/bench/family-{}", i % families)}})
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "clients": list,
        "task": {"dataset": {"uri": "/bench/data.jsonl"}, "labels": (0..size.classes).map(|c| format!("l{c}")).collect::<Vec<_>>()},
        "adapter": {"rank": size.rank, "experts": size.experts, "slots": size.slots},
        "aggregation": {"algorithm": algorithm, "alignment": "pcgrad", "conflictThreshold": 0.0},
    }))
    .expect("spec")
}

/// Writes the round-0 global and every client's round-1 artifact; returns
/// the bytes of one upload per family.
fn prepare(size: &Size, families: usize, clients: usize, run_dir: &Path) -> Vec<u64> {
    let spec = spec_for(size, families, clients, "cmga");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let width = |f: usize| size.widths[f % size.widths.len()];
    // The global: shared part from family 0's draw, every family's parts.
    let mut global = BTreeMap::new();
    for f in 0..families {
        let key = spec.family_key(f);
        for (name, a) in dema_tensors(size, width(f), &mut rng, 0.1, None) {
            if name.starts_with("shared.") {
                global.entry(name).or_insert(a);
            } else {
                global.insert(family_name(&key, &name), a);
            }
        }
    }
    write_global(
        &run_dir.join("round-0000/global"),
        &global,
        manifest(ArtifactKind::Global, 0),
    )
    .expect("global");
    drop(global);

    const DISTINCT: usize = 4;
    let mut upload_bytes = Vec::new();
    let clients_root = clients_dir(run_dir, 1);
    for f in 0..families {
        let key = spec.family_key(f);
        let direction = dema_tensors(size, width(f), &mut rng, 2e-3, None);
        let members: Vec<usize> = (0..clients).filter(|i| i % families == f).collect();
        let mut originals: Vec<(PathBuf, String, u64, Vec<TensorInfo>)> = Vec::new();
        for (j, &i) in members.iter().enumerate() {
            let name = format!("c{i:04}");
            let dir = clients_root.join(&name);
            std::fs::create_dir_all(&dir).expect("dir");
            let data = dir.join("adapter.safetensors");
            let (sha, bytes, tensors) = if j < DISTINCT {
                let t = dema_tensors(size, width(f), &mut rng, 2e-3, Some(&direction));
                let (raw, infos) = serialize(&t, WireDtype::Bf16).expect("serialize");
                write_atomic(&data, &raw).expect("write");
                let sha = sha256_hex(&raw);
                originals.push((data.clone(), sha.clone(), raw.len() as u64, infos.clone()));
                if j == 0 {
                    upload_bytes.push(raw.len() as u64);
                }
                (sha, raw.len() as u64, infos)
            } else {
                let (src, sha, bytes, infos) = &originals[j % DISTINCT];
                std::fs::hard_link(src, &data).expect("hard link");
                (sha.clone(), *bytes, infos.clone())
            };
            let mut m = manifest(ArtifactKind::Client, 1);
            m.client = Some(name);
            m.family = Some(key.clone());
            m.num_examples = 50 + (i as u64 % 97);
            m.artifact.sha256 = sha;
            m.artifact.bytes = bytes;
            m.tensors = tensors;
            write_atomic(
                &dir.join("manifest.json"),
                &serde_json::to_vec(&m).expect("json"),
            )
            .expect("manifest");
        }
    }
    upload_bytes
}

fn status_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn child(paths: &[PathBuf]) {
    let spec: FederatedTuneSpec =
        serde_json::from_slice(&std::fs::read(&paths[0]).expect("spec")).expect("spec json");
    let start_rss = status_kib("VmRSS:").unwrap_or(0);
    let run_dir = &paths[1];
    let t0 = Instant::now();
    let outcome = aggregate_round(
        &spec,
        run_dir,
        RUN,
        1,
        &run_dir.join("round-0000/global"),
        &paths[2],
    )
    .expect("aggregate");
    let wall = t0.elapsed().as_secs_f64();
    let s = &outcome.stats;
    let out = serde_json::json!({
        "wall": wall,
        "verify": s.timing.verify_seconds,
        "aggregate": s.timing.aggregate_seconds,
        "write": s.timing.write_seconds,
        "participants": s.participants.len(),
        "rejects": s.rejects.len(),
        "bytesReceived": s.bytes_received,
        "globalBytes": outcome.manifest.artifact.bytes,
        "conflicts": s.conflicts_projected,
        "startRssKib": start_rss,
        "peakRssKib": status_kib("VmHWM:").unwrap_or(0),
    });
    println!("{out}");
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn combine_only(families: &[usize]) {
    let size = LLAMA7B;
    let (r, k) = (size.rank, size.experts);
    let per_slot = k * (r * r + r) + k * r + k;
    println!();
    println!(
        "CMGA combination alone (steps 1-4, PCGrad, tau = 0), llama7b shared part: {} slots x {} = {} parameters",
        size.slots,
        per_slot,
        size.slots * per_slot
    );
    println!("| families | harmonisation | seconds per round | conflicts projected | FedAvg-equivalent sum (s) |");
    println!("|---:|---|---:|---:|---:|");
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for &f in families {
        let names: Vec<String> = (0..f).map(|i| format!("family-{i}")).collect();
        let sums: Vec<Vec<Vec<f64>>> = (0..f)
            .map(|_| {
                (0..size.slots)
                    .map(|_| (0..per_slot).map(|_| rng.random::<f64>() - 0.5).collect())
                    .collect()
            })
            .collect();
        for harmonise in [false, true] {
            let opts = CmgaOptions {
                alignment: heterotune_crds::spec::AlignmentRule::Pcgrad,
                threshold: 0.0,
                harmonise,
                weighting: FamilyWeighting::Samples,
                seed: 0,
            };
            let t = Instant::now();
            let mut conflicts = 0;
            for s in 0..size.slots {
                let updates: Vec<FamilyUpdate<'_>> = names
                    .iter()
                    .zip(&sums)
                    .map(|(n, v)| FamilyUpdate {
                        family: n,
                        examples: 100,
                        sum: &v[s],
                    })
                    .collect();
                conflicts += combine_group(&format!("shared.slot{s}"), 1, &updates, &opts)
                    .stats
                    .conflicts_projected;
            }
            let seconds = t.elapsed().as_secs_f64();
            // The plain weighted sum (what FedAvg does with the same sums).
            let t = Instant::now();
            let mut total = 0.0;
            for s in 0..size.slots {
                let mut acc = vec![0.0f64; per_slot];
                for v in &sums {
                    for (a, x) in acc.iter_mut().zip(&v[s]) {
                        *a += x;
                    }
                }
                total += acc[0];
            }
            let plain = t.elapsed().as_secs_f64();
            std::hint::black_box(total);
            println!("| {f} | {harmonise} | {seconds:.4} | {conflicts} | {plain:.4} |");
        }
    }
}

fn main() {
    let args = Args::parse();
    if let Some(paths) = &args.child {
        child(paths);
        return;
    }
    let exe = std::env::current_exe().expect("current exe");
    let tmp = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).expect("work dir");
            tempfile::tempdir_in(d).expect("tempdir")
        }
        None => tempfile::tempdir().expect("tempdir"),
    };
    println!(
        "aggregate_bench: one round of aggregate_round per row, fresh process each (peak RSS = VmHWM; \
         growth = peak - RSS before aggregating). 1 thread of aggregation; machine: {} logical CPUs.",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!();
    println!("| size | families | clients | algorithm | upload/client | received | total s | verify s | combine s | write s | ms/client | peak RSS MiB | growth MiB | conflicts |");
    println!("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for size_name in &args.sizes {
        let size = size(size_name);
        for &families in &args.families {
            for &clients in &args.clients {
                if clients < families {
                    continue;
                }
                let run_dir = tmp
                    .path()
                    .join(format!("{}-{families}-{clients}", size.name));
                let prep = Instant::now();
                let uploads = prepare(&size, families, clients, &run_dir);
                let prep_s = prep.elapsed().as_secs_f64();
                for algorithm in &args.algorithms {
                    let spec = spec_for(&size, families, clients, algorithm);
                    let spec_path = run_dir.join(format!("spec-{algorithm}.json"));
                    std::fs::write(&spec_path, serde_json::to_vec(&spec).expect("json"))
                        .expect("spec");
                    let out_dir = run_dir.join(format!("global-{algorithm}"));
                    let output = std::process::Command::new(&exe)
                        .arg("--child")
                        .arg(&spec_path)
                        .arg(&run_dir)
                        .arg(&out_dir)
                        .output()
                        .expect("child");
                    if !output.status.success() {
                        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
                        panic!(
                            "child failed for {} {families} {clients} {algorithm}",
                            size.name
                        );
                    }
                    let line = String::from_utf8_lossy(&output.stdout);
                    let v: serde_json::Value =
                        serde_json::from_str(line.lines().last().unwrap_or("{}"))
                            .expect("child json");
                    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
                    let upload = uploads.iter().sum::<u64>() as f64 / uploads.len().max(1) as f64;
                    println!(
                        "| {} | {families} | {clients} | {algorithm} | {:.1} KiB | {:.1} MiB | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.0} | {:.0} | {} |",
                        size.name,
                        upload / 1024.0,
                        f("bytesReceived") / 1048576.0,
                        f("wall"),
                        f("verify"),
                        f("aggregate"),
                        f("write"),
                        1000.0 * f("wall") / clients as f64,
                        mib(v["peakRssKib"].as_u64().unwrap_or(0)),
                        mib(v["peakRssKib"].as_u64().unwrap_or(0).saturating_sub(v["startRssKib"].as_u64().unwrap_or(0))),
                        v["conflicts"],
                    );
                    let _ = std::fs::remove_dir_all(&out_dir);
                }
                eprintln!(
                    "  (prepared {} {families} families {clients} clients in {prep_s:.1} s)",
                    size.name
                );
                let _ = std::fs::remove_dir_all(&run_dir);
            }
        }
    }
    if !args.combine_families.is_empty() {
        combine_only(&args.combine_families);
    }
}
