//! `heterotune-trainer`: one client's local training for one round (`train`)
//! and evaluation of a saved state (`eval`). Aggregation comes next.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use heterotune_crds::manifest::{
    ArtifactKind, ArtifactManifest, FileDigest, MANIFEST_SCHEMA_VERSION,
};
use heterotune_crds::spec::{
    AdapterKind, AggregationAlgorithm, FederatedTuneSpec, Pooling as SpecPooling,
};
use heterotune_trainer::adapters::head::Pooling;
use heterotune_trainer::adapters::lora::{LoraConfig, ProjectionDims};
use heterotune_trainer::artifact::{self, StoreDtype};
use heterotune_trainer::data::partition::federate;
use heterotune_trainer::job;
use heterotune_trainer::models::load_backbone;
use heterotune_trainer::models::ModelConfig;
use heterotune_trainer::tokenizer::TextTokenizer;
use heterotune_trainer::train::{AdapterChoice, ClientModel, TrainSettings};
use tch::{Device, Tensor};

#[derive(Parser)]
#[command(
    name = "heterotune-trainer",
    version,
    about = "HeteroTune trainer: local training and evaluation of one client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Common {
    /// The FederatedTune (YAML or JSON; the whole object or its spec).
    #[arg(long)]
    spec: PathBuf,
    /// The client's name in the spec.
    #[arg(long)]
    client: String,
    /// libtorch intra-op threads (default: all cores).
    #[arg(long)]
    threads: Option<i32>,
    /// `cpu`, `cuda`, or `auto` (CUDA when available).
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Subcommand)]
enum Command {
    /// Train one client for one round and write its artifact.
    Train {
        #[command(flatten)]
        common: Common,
        /// The round being trained (1-based).
        #[arg(long)]
        round: u32,
        /// Directory of the previous round's global artifact.
        #[arg(long)]
        global: Option<PathBuf>,
        /// The client's private state after the previous round (adapter parts
        /// that are not shared; never uploaded).
        #[arg(long)]
        state_in: Option<PathBuf>,
        /// Where to save the client's private state after this round.
        #[arg(long)]
        state_out: Option<PathBuf>,
        /// Directory where frozen-prefix caches persist between rounds.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Where to write adapter.safetensors and manifest.json.
        #[arg(long)]
        out: PathBuf,
        /// The run this artifact belongs to (written into the manifest).
        #[arg(long, default_value = "local")]
        run: String,
    },
    /// Evaluate a client's model with a global (and private) state on the
    /// global test split; prints JSON.
    Eval {
        #[command(flatten)]
        common: Common,
        /// Directory of the global artifact to evaluate.
        #[arg(long)]
        global: Option<PathBuf>,
        /// The client's private state.
        #[arg(long)]
        state_in: Option<PathBuf>,
        /// Directory where frozen-prefix caches persist.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Also write the result as an evaluation record (JSON) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The run the record belongs to (written into it).
        #[arg(long, default_value = "local")]
        run: String,
    },
    /// Aggregate one round: verify the committed client artifacts under
    /// `--run-dir` (round-NNNN/clients/<client>/), combine them with the
    /// spec's algorithm, and write the round's global artifact.
    Aggregate {
        /// The FederatedTune (YAML or JSON; the whole object or its spec).
        #[arg(long)]
        spec: PathBuf,
        /// The run directory holding round-NNNN/clients/<client>/ artifacts.
        #[arg(long)]
        run_dir: PathBuf,
        /// The run name every client manifest must carry.
        #[arg(long)]
        run: String,
        /// The round to aggregate.
        #[arg(long)]
        round: u32,
        /// The previous round's global artifact directory.
        #[arg(long)]
        previous_global: PathBuf,
        /// Where to write the global artifact.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the round-0 global artifact: the initial shared parts and every
    /// family's parts, from the seed (what every client starts from).
    Init {
        /// The FederatedTune (YAML or JSON; the whole object or its spec).
        #[arg(long)]
        spec: PathBuf,
        /// Where to write adapter.safetensors and manifest.json.
        #[arg(long)]
        out: PathBuf,
        /// The run this artifact belongs to (written into the manifest).
        #[arg(long, default_value = "local")]
        run: String,
    },
}

fn device(name: &str) -> anyhow::Result<Device> {
    use heterotune_trainer::cuda;
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if cuda::gpu_device_present() {
                if let Err(e) = cuda::load_cuda_backend() {
                    tracing::warn!("a GPU is present but {e}; training on the CPU");
                }
            }
            Ok(Device::cuda_if_available())
        }
        "cuda" => {
            cuda::load_cuda_backend().map_err(|e| {
                anyhow::anyhow!(
                    "--device cuda: {e}: the trainer needs a CUDA build of libtorch \
                     (the -cuda trainer image, or the CUDA torch wheel on this machine)"
                )
            })?;
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                anyhow::bail!(
                    "--device cuda: libtorch's CUDA backend is loaded but sees no GPU \
                     (driver missing, or no GPU given to this container)"
                )
            }
        }
        other => anyhow::bail!("--device {other:?}: use cpu, cuda or auto"),
    }
}

/// Names (in this client's var store) of what leaves the client each round.
fn shared_names(model: &ClientModel, spec: &FederatedTuneSpec) -> Vec<String> {
    if spec.aggregation.algorithm == AggregationAlgorithm::LocalOnly {
        return Vec::new();
    }
    let mut names = model.adapter.shared_names();
    // LoRA factors are always exchanged (within a family); DeMA's
    // family projections only when the spec shares them.
    if spec.adapter.kind == AdapterKind::Lora || spec.adapter.share.family_parts {
        names.extend(model.adapter.family_names());
    }
    if spec.adapter.share.head {
        names.extend(model.head.names());
    }
    names
}

/// The LoRA rank of client `index`.
fn lora_rank(spec: &FederatedTuneSpec, index: usize) -> usize {
    spec.clients[index].lora_rank.unwrap_or(spec.adapter.rank) as usize
}

/// The adapter client `index` trains on a backbone with `num_layers` layers
/// whose config.json is in `model_dir`.
fn adapter_choice(
    spec: &FederatedTuneSpec,
    index: usize,
    model_dir: &Path,
    num_layers: usize,
    rank: usize,
) -> anyhow::Result<AdapterChoice> {
    Ok(match spec.adapter.kind {
        AdapterKind::Dema => {
            let slots = job::resolve_slots(spec)?;
            AdapterChoice::Dema(job::dema_config(spec, index, num_layers, slots))
        }
        AdapterKind::Lora => {
            let sel = spec.layer_selection(index);
            let first = match sel.mode {
                heterotune_crds::spec::LayerSelectionMode::SlotEnds => 0,
                heterotune_crds::spec::LayerSelectionMode::TopWindow => {
                    num_layers.saturating_sub(sel.window.map(|w| w as usize).unwrap_or(num_layers))
                }
            };
            let cfg = LoraConfig {
                rank,
                alpha: spec.adapter.lora_alpha,
                scaling_rank: Some(spec.adapter.rank as usize),
                layers: (first..num_layers).collect(),
                init_seed: spec.training.seed,
            };
            let dims = ProjectionDims::of_model(&ModelConfig::read(model_dir)?);
            AdapterChoice::Lora(cfg, dims)
        }
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A client's model with its private and global state loaded.
struct Loaded {
    spec: FederatedTuneSpec,
    index: usize,
    model: ClientModel,
    family_key: String,
    base_round: u32,
    load_seconds: f64,
    train: Vec<heterotune_trainer::data::source::Example>,
    validation: Vec<heterotune_trainer::data::source::Example>,
    test: Vec<heterotune_trainer::data::source::Example>,
    num_classes: usize,
    all_names: Vec<String>,
}

fn pooling(spec: &FederatedTuneSpec) -> Pooling {
    match spec.training.pooling {
        SpecPooling::Mean => Pooling::Mean,
        SpecPooling::LastToken => Pooling::LastToken,
    }
}

fn load_client(
    common: &Common,
    global: Option<&Path>,
    state_in: Option<&Path>,
) -> anyhow::Result<Loaded> {
    let spec = job::read_spec(&common.spec)?;
    let index = job::client_index(&spec, &common.client)?;
    let client = &spec.clients[index];
    if let Some(t) = common.threads {
        tch::set_num_threads(t);
    }
    let device = device(&common.device)?;
    let model_dir = job::local_path(
        &client.model.uri,
        &format!("spec.clients[{index}].model.uri"),
    )?;
    let load_start = std::time::Instant::now();
    let backbone = load_backbone(&model_dir, device, job::kind_of(client.model.dtype))
        .with_context(|| format!("loading the backbone of client {}", client.name))?;
    let info = backbone.info().clone();
    let tokenizer = TextTokenizer::for_model(&model_dir, info.vocab_size)?;
    let load_seconds = load_start.elapsed().as_secs_f64();

    let data = federate(&job::data_config(&spec)?).context("preparing the data")?;
    let mine = data.clients[index].clone();
    let mut test = data.test.clone();
    if let Some(max) = spec.task.max_test_examples {
        test.truncate(max as usize);
    }
    let num_classes = data.labels.len();

    let choice = adapter_choice(
        &spec,
        index,
        &model_dir,
        info.num_layers,
        lora_rank(&spec, index),
    )?;
    let model = ClientModel::new(
        backbone,
        tokenizer,
        &choice,
        num_classes,
        pooling(&spec),
        device,
    )?;
    let all_names: Vec<String> = model.vs.variables().keys().cloned().collect();

    // Private state first, then the global state on top of it.
    if let Some(file) = state_in {
        let bytes = std::fs::read(file)
            .with_context(|| format!("reading the client state {}", file.display()))?;
        let values = artifact::from_safetensors(&bytes, file)?;
        model
            .import(&values, &all_names)
            .with_context(|| format!("loading the client state {}", file.display()))?;
    }
    let family_key = job::family_key(&spec, index);
    let mut base_round = 0;
    if let Some(global) = global {
        let (manifest, tensors) = artifact::read_artifact(global)
            .with_context(|| format!("reading the global artifact in {}", global.display()))?;
        base_round = manifest.round;
        let rank = (spec.adapter.kind == AdapterKind::Lora).then(|| lora_rank(&spec, index));
        let mapped = heterotune_trainer::aggregate::client_view(tensors, &family_key, rank)
            .with_context(|| {
                format!(
                    "the global artifact in {} does not fit client {}",
                    global.display(),
                    client.name
                )
            })?;
        // With a private state, the global only replaces what the client
        // exchanges: the rest of the global (the initial values a
        // `local-only` run keeps there, say) must not undo local training.
        // Without one (first round), everything starts from the global.
        let from_global = if state_in.is_some() {
            shared_names(&model, &spec)
        } else {
            all_names.clone()
        };
        model.import(&mapped, &from_global).with_context(|| {
            format!(
                "the global artifact in {} does not fit client {}",
                global.display(),
                client.name
            )
        })?;
    }
    Ok(Loaded {
        index,
        family_key,
        base_round,
        load_seconds,
        train: mine.train,
        validation: mine.validation,
        test,
        num_classes,
        all_names,
        model,
        spec,
    })
}

fn settings(
    spec: &FederatedTuneSpec,
    round: u32,
    index: usize,
    cache_dir: Option<&Path>,
) -> TrainSettings {
    TrainSettings {
        steps: spec.training.local_steps as usize,
        batch_size: spec.training.batch_size as usize,
        learning_rate: spec.training.learning_rate,
        head_learning_rate: spec.training.head_learning_rate,
        weight_decay: spec.training.weight_decay,
        warmup_steps: spec.training.warmup_steps as usize,
        max_grad_norm: spec.training.max_grad_norm,
        max_seq_length: spec.training.max_seq_length as usize,
        eval_batch_size: spec.training.eval_batch_size as usize,
        seed: spec
            .training
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add(u64::from(round) * 1_009 + index as u64),
        prefix_cache: spec.training.prefix_cache.enabled,
        prefix_cache_bytes: spec.training.prefix_cache.max_memory_mib as usize * 1024 * 1024,
        prefix_cache_dir: cache_dir.map(Path::to_path_buf),
        gradient_checkpointing: spec.training.gradient_checkpointing,
    }
}

#[allow(clippy::too_many_arguments)]
fn train(
    common: &Common,
    round: u32,
    global: Option<&Path>,
    state_in: Option<&Path>,
    state_out: Option<&Path>,
    cache_dir: Option<&Path>,
    out: &Path,
    run: &str,
) -> anyhow::Result<()> {
    let Loaded {
        spec,
        index,
        mut model,
        family_key,
        base_round,
        load_seconds,
        train,
        validation,
        test,
        num_classes,
        all_names,
    } = load_client(common, global, state_in)?;
    let client = &spec.clients[index];
    let info = model.backbone().info().clone();
    let send = shared_names(&model, &spec);
    let before = model.export(&send)?;
    let settings = settings(&spec, round, index, cache_dir);
    let model_id = format!("{}|{:?}", client.model.uri, client.model.dtype);
    let test_data = model.prepare(&test, &settings, &model_id)?;
    // The model this client received (the previous round's global with its
    // own private parts), before local training: the previous round's
    // global accuracy. Round 1 starts from the untrained initial state.
    let received = if spec.evaluation.each_round && base_round > 0 {
        Some(
            model
                .evaluate(&test_data, settings.eval_batch_size, num_classes)?
                .0,
        )
    } else {
        None
    };
    let train_data = model.prepare(&train, &settings, &model_id)?;
    let report = model.train(&train_data, &settings)?;
    let val_data = model.prepare(&validation, &settings, &model_id)?;
    let (val, val_loss) = model.evaluate(&val_data, settings.eval_batch_size, num_classes)?;
    let (tst, _) = model.evaluate(&test_data, settings.eval_batch_size, num_classes)?;
    let mine_train_len = train.len();

    if let Some(file) = state_out {
        let values = model.export(&all_names)?;
        let (bytes, _) = artifact::to_safetensors(&values, StoreDtype::F32)?;
        artifact::write_atomic(file, &bytes)?;
    }

    let after = model.export(&send)?;
    let delta: BTreeMap<String, Tensor> = after
        .iter()
        .map(|(name, t)| (name.clone(), t - &before[name]))
        .collect();
    let trainable = model.adapter.parameter_count() + model.head.parameter_count();
    let mut metrics = BTreeMap::new();
    metrics.insert("loss".into(), report.final_loss);
    metrics.insert("mean_train_loss".into(), report.mean_loss);
    metrics.insert("validation_loss".into(), val_loss);
    metrics.insert("accuracy".into(), val.accuracy);
    metrics.insert("macro_f1".into(), val.macro_f1);
    metrics.insert("validation_examples".into(), val.examples as f64);
    metrics.insert("test_accuracy".into(), tst.accuracy);
    metrics.insert("test_macro_f1".into(), tst.macro_f1);
    metrics.insert("test_examples".into(), tst.examples as f64);
    if let Some(r) = &received {
        metrics.insert("received_test_accuracy".into(), r.accuracy);
        metrics.insert("received_test_macro_f1".into(), r.macro_f1);
    }
    metrics.insert("steps".into(), report.steps as f64);
    metrics.insert("steps_per_second".into(), report.steps_per_second);
    metrics.insert("tokens_per_second".into(), report.tokens_per_second);
    metrics.insert("train_seconds".into(), report.seconds);
    metrics.insert("prefix_cache_seconds".into(), report.prefix_seconds);
    metrics.insert(
        "prefix_cached_examples".into(),
        report.cached_examples as f64,
    );
    metrics.insert("load_seconds".into(), load_seconds);
    metrics.insert("trainable_parameters".into(), trainable as f64);
    metrics.insert("backbone_parameters".into(), info.num_parameters as f64);
    if let Some(rss) = report.peak_rss_bytes {
        metrics.insert("peak_rss_bytes".into(), rss as f64);
    }
    let manifest = ArtifactManifest {
        schema_version: MANIFEST_SCHEMA_VERSION,
        kind: ArtifactKind::Client,
        run: run.to_string(),
        round,
        base_round,
        client: Some(client.name.clone()),
        family: Some(family_key.clone()),
        artifact: FileDigest {
            path: String::new(),
            sha256: String::new(),
            bytes: 0,
        },
        tensors: Vec::new(),
        num_examples: mine_train_len as u64,
        metrics,
        stats: serde_json::json!({"familyArchitecture": client.model.family.as_str(), "prefixLayers": model.prefix_layers()}),
        writer_version: format!("heterotune-trainer {}", env!("CARGO_PKG_VERSION")),
        created_at: heterotune_crds::manifest::now_rfc3339(),
    };
    let written = artifact::write_artifact(out, &delta, StoreDtype::Bf16, manifest)?;

    println!(
        "client {} ({}, {} layers, frozen prefix of {} layers): round {round}, {} train / {} validation / {} test examples",
        client.name,
        family_key,
        info.num_layers,
        model.prefix_layers(),
        mine_train_len,
        validation.len(),
        test.len()
    );
    println!(
        "  trained {} steps in {:.1} s ({:.2} steps/s, {:.0} tokens/s; prefix cache {:.1} s for {} examples; model load {:.1} s)",
        report.steps,
        report.seconds,
        report.steps_per_second,
        report.tokens_per_second,
        report.prefix_seconds,
        report.cached_examples,
        load_seconds
    );
    if train_data.from_disk {
        println!("  (frozen-prefix cache loaded from disk)");
    }
    if let Some(r) = &received {
        println!(
            "  received global model (round {base_round}): global test accuracy {:.3}, macro-F1 {:.3}",
            r.accuracy, r.macro_f1
        );
    }
    println!(
        "  loss {:.4} -> validation accuracy {:.3}, macro-F1 {:.3}; global test accuracy {:.3}, macro-F1 {:.3}",
        report.final_loss, val.accuracy, val.macro_f1, tst.accuracy, tst.macro_f1
    );
    println!(
        "  parameters: {} trainable of {} in the backbone ({:.4} %); upload {} bytes ({} tensors, bf16); peak RSS {:.0} MiB",
        trainable,
        info.num_parameters,
        100.0 * trainable as f64 / info.num_parameters.max(1) as f64,
        written.artifact.bytes,
        written.tensors.len(),
        report.peak_rss_bytes.map(mib).unwrap_or(f64::NAN)
    );
    println!("  artifact: {}", out.display());
    Ok(())
}

fn eval(
    common: &Common,
    global: Option<&Path>,
    state_in: Option<&Path>,
    cache_dir: Option<&Path>,
    out: Option<&Path>,
    run: &str,
) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let loaded = load_client(common, global, state_in)?;
    let client = &loaded.spec.clients[loaded.index];
    let settings = settings(&loaded.spec, loaded.base_round, loaded.index, cache_dir);
    let model_id = format!("{}|{:?}", client.model.uri, client.model.dtype);
    let test = loaded.model.prepare(&loaded.test, &settings, &model_id)?;
    let (scores, loss) =
        loaded
            .model
            .evaluate(&test, settings.eval_batch_size, loaded.num_classes)?;
    let result = heterotune_crds::manifest::EvaluationResult {
        schema_version: heterotune_crds::manifest::MANIFEST_SCHEMA_VERSION,
        run: run.to_string(),
        client: client.name.clone(),
        family: loaded.family_key.clone(),
        global_round: loaded.base_round,
        test_examples: scores.examples as u64,
        accuracy: scores.accuracy,
        macro_f1: scores.macro_f1,
        loss: loss.is_finite().then_some(loss),
        seconds: Some(start.elapsed().as_secs_f64()),
        writer_version: format!("heterotune-trainer {}", env!("CARGO_PKG_VERSION")),
        created_at: heterotune_crds::manifest::now_rfc3339(),
    };
    let json = serde_json::to_vec(&result)?;
    if let Some(file) = out {
        artifact::write_atomic(file, &json)?;
    }
    println!("{}", String::from_utf8_lossy(&json));
    Ok(())
}

/// Writes the round-0 global artifact: shared parts from the seed, and each
/// family's parts (when shared) under `family/<key>/`.
fn init(spec_path: &Path, out: &Path, run: &str) -> anyhow::Result<()> {
    let spec = job::read_spec(spec_path)?;
    let slots = match spec.adapter.kind {
        AdapterKind::Dema => job::resolve_slots(&spec)?,
        AdapterKind::Lora => 0,
    };
    let num_classes = spec.task.labels.len();
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut families = Vec::new();
    for index in 0..spec.clients.len() {
        let key = job::family_key(&spec, index);
        if families.contains(&key) {
            continue;
        }
        let client = &spec.clients[index];
        let dir = job::local_path(
            &client.model.uri,
            &format!("spec.clients[{index}].model.uri"),
        )?;
        // Shape facts from config.json, without loading the weights.
        let info = ModelConfig::read(&dir)?.info();
        // LoRA families start at the largest rank among their clients (HetLoRA,
        // FlexLoRA); each client truncates to its own rank, which equals its
        // own initial factors (A is drawn row by row from the seed).
        let family_rank = (0..spec.clients.len())
            .filter(|&j| job::family_key(&spec, j) == key)
            .map(|j| lora_rank(&spec, j))
            .max()
            .unwrap_or(spec.adapter.rank as usize);
        let choice = adapter_choice(&spec, index, &dir, info.num_layers, family_rank)?;
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let (adapter_names, shared) = match &choice {
            AdapterChoice::Dema(cfg) => {
                let dema = heterotune_trainer::adapters::dema::Dema::new(&vs.root(), cfg, &info)?;
                let family = if spec.adapter.share.family_parts {
                    dema.family_names()
                } else {
                    Vec::new()
                };
                (family, dema.shared_names())
            }
            AdapterChoice::Lora(cfg, dims) => {
                let lora = heterotune_trainer::adapters::lora::Lora::new(&vs.root(), cfg, dims)?;
                (lora.names(), Vec::new())
            }
        };
        let head = heterotune_trainer::adapters::head::ClassifierHead::new_seeded(
            &vs.root().set_group(1),
            info.hidden_size,
            num_classes,
            spec.training.seed,
        )?;
        let vars = vs.variables();
        for name in shared {
            tensors
                .entry(name.clone())
                .or_insert_with(|| vars[&name].detach().copy());
        }
        let mut family_names = adapter_names;
        if spec.adapter.share.head {
            family_names.extend(head.names());
        }
        for name in family_names {
            tensors.insert(format!("family/{key}/{name}"), vars[&name].detach().copy());
        }
        families.push(key);
    }
    let manifest = ArtifactManifest {
        schema_version: MANIFEST_SCHEMA_VERSION,
        kind: ArtifactKind::Global,
        run: run.to_string(),
        round: 0,
        base_round: 0,
        client: None,
        family: None,
        artifact: FileDigest {
            path: String::new(),
            sha256: String::new(),
            bytes: 0,
        },
        tensors: Vec::new(),
        num_examples: 0,
        metrics: BTreeMap::new(),
        stats: serde_json::json!({ "families": families, "slots": slots }),
        writer_version: format!("heterotune-trainer {}", env!("CARGO_PKG_VERSION")),
        created_at: heterotune_crds::manifest::now_rfc3339(),
    };
    let written = artifact::write_artifact(out, &tensors, StoreDtype::F32, manifest)?;
    println!(
        "initial state: {} tensors, {} bytes, families {}",
        written.tensors.len(),
        written.artifact.bytes,
        families.join(", ")
    );
    Ok(())
}

fn aggregate(
    spec: &Path,
    run_dir: &Path,
    run: &str,
    round: u32,
    previous: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    let spec = job::read_spec(spec)?;
    let outcome =
        heterotune_trainer::aggregate::aggregate_round(&spec, run_dir, run, round, previous, out)
            .with_context(|| format!("aggregating round {round}"))?;
    let s = &outcome.stats;
    println!(
        "round {round}: aggregated {} clients ({} rejected, {} missing), {} bytes received",
        s.participants.len(),
        s.rejects.len(),
        s.missing.len(),
        s.bytes_received
    );
    for r in &s.rejects {
        println!("  rejected {r:?}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Train {
            common,
            round,
            global,
            state_in,
            state_out,
            cache_dir,
            out,
            run,
        } => train(
            common,
            *round,
            global.as_deref(),
            state_in.as_deref(),
            state_out.as_deref(),
            cache_dir.as_deref(),
            out,
            run,
        ),
        Command::Eval {
            common,
            global,
            state_in,
            cache_dir,
            out,
            run,
        } => eval(
            common,
            global.as_deref(),
            state_in.as_deref(),
            cache_dir.as_deref(),
            out.as_deref(),
            run,
        ),
        Command::Init { spec, out, run } => init(spec, out, run),
        Command::Aggregate {
            spec,
            run_dir,
            run,
            round,
            previous_global,
            out,
        } => aggregate(spec, run_dir, run, *round, previous_global, out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("heterotune-trainer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
