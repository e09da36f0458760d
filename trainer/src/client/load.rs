//! Loading one client: its backbone, adapter and head ([`adapter_choice`]),
//! its data, its private state and the global it received
//! ([`load_client`]); the settings it trains with ([`settings`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use heterotune_crds::dtype::Resolved;
use heterotune_crds::model::LayerSelection;
use heterotune_crds::spec::{
    AdapterKind, Calibration, ClientSpec, Dtype, FederatedTuneSpec, ModelSpec,
    Pooling as SpecPooling, TrainingSpec,
};
use tch::Device;

use super::bridge::{load_bridge, BridgeModel, POOL_ENSEMBLE, POOL_PRIOR};
use crate::adapters::head::Pooling;
use crate::adapters::lora::{LoraConfig, ProjectionDims};
use crate::artifact;
use crate::data::partition::{federate, ClientData};
use crate::data::source::Example;
use crate::error::Context as _;
use crate::exchange::{client_view, lora_rank, shared_names};
use crate::job;
use crate::models::ModelConfig;
use crate::models::{load_backbone, Backbone};
use crate::tokenizer::TextTokenizer;
use crate::train::{AdapterChoice, ClientModel, TrainSettings};
use crate::Result;

/// Which client to load and where it runs (the trainer's common arguments).
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The FederatedTune (YAML or JSON; the whole object or its spec).
    pub spec: PathBuf,
    /// The client's name in the spec.
    pub client: String,
    /// libtorch intra-op threads (`None`: all cores).
    pub threads: Option<i32>,
    /// `cpu`, `cuda`, or `auto` ([`crate::cuda::device`]).
    pub device: String,
}

/// A client's model with its private and global state loaded, and its data.
pub struct LoadedClient {
    /// The run's spec.
    pub spec: FederatedTuneSpec,
    /// The client's index in `spec.clients`.
    pub index: usize,
    /// The model: backbone, adapter and head.
    pub model: ClientModel,
    /// The family key of the client's model.
    pub family_key: String,
    /// The round of the global it loaded (0: none, or the initial state).
    pub base_round: u32,
    /// Seconds spent loading the backbone and tokenizer.
    pub load_seconds: f64,
    /// The backbone's dtype on this device (`auto` resolved).
    pub dtype: Resolved,
    /// The client's training examples.
    pub train: Vec<Example>,
    /// The client's validation examples.
    pub validation: Vec<Example>,
    /// The global test examples (`task.maxTestExamples` at most).
    pub test: Vec<Example>,
    /// The public, unlabeled pool (`task.splits.pool`; empty without one).
    pub pool: Vec<Example>,
    /// Classes of the task.
    pub num_classes: usize,
    /// Every variable of the model's var store.
    pub all_names: Vec<String>,
    /// The bridge model (`spec.bridge`), trained next to `model`.
    pub bridge: Option<BridgeModel>,
    /// The federation's ensemble on the pool (`poolTeacher: ensemble`) when
    /// the global holds one: the run exchanges it.
    pub pool_ensemble: Option<PoolEnsemble>,
    /// The federation's label prior (`[classes]`, sums to 1) when the
    /// global holds one ([`POOL_PRIOR`]).
    pub federation_prior: Option<Vec<f64>>,
}

/// The global's ensemble on the public pool.
pub struct PoolEnsemble {
    /// The round of the global (0: the initial, uniform placeholder).
    pub round: u32,
    /// `[pool texts, classes]` probabilities.
    pub probs: tch::Tensor,
}

impl PoolEnsemble {
    /// The probabilities to teach from: none before round 1's ensemble.
    pub fn teacher(&self) -> Option<&tch::Tensor> {
        (self.round >= 1).then_some(&self.probs)
    }
}

impl LoadedClient {
    /// The client's entry in the spec.
    pub fn spec_client(&self) -> &ClientSpec {
        &self.spec.clients[self.index]
    }

    /// The ensemble the own model is calibrated against before it is
    /// served (`bridge.calibration: poolEnsemble`, a pool, and an ensemble
    /// in the global); `None` when nothing is corrected.
    pub fn calibration_teacher(&self) -> Option<&tch::Tensor> {
        let spec = self.spec.bridge.as_ref()?;
        if spec.calibration != Calibration::PoolEnsemble || self.pool.is_empty() {
            return None;
        }
        self.pool_ensemble.as_ref()?.teacher()
    }

    /// The ensemble `bridge.serve: agreement` compares each candidate with
    /// (a pool, and an ensemble in the global); `None` for other choices.
    pub fn agreement_teacher(&self) -> Option<&tch::Tensor> {
        let spec = self.spec.bridge.as_ref()?;
        if !spec.serve.reads_pool() || self.pool.is_empty() {
            return None;
        }
        self.pool_ensemble.as_ref()?.teacher()
    }

    /// The key of this client's backbone in the prefix-cache fingerprints.
    pub fn model_id(&self) -> String {
        model_id(self.spec_client(), self.dtype.dtype)
    }
}

/// The adapter client `index` trains on a backbone with `num_layers` layers
/// whose config.json is in `model_dir`.
pub fn adapter_choice(
    spec: &FederatedTuneSpec,
    index: usize,
    model_dir: &Path,
    num_layers: usize,
    rank: usize,
) -> Result<AdapterChoice> {
    Ok(match spec.adapter.kind {
        AdapterKind::Dema => {
            let slots = job::resolve_slots(spec)?;
            AdapterChoice::Dema(job::dema_config(spec, index, num_layers, slots))
        }
        AdapterKind::Lora => {
            // LoRA adapts every layer of the client's window.
            let window = LayerSelection::from_spec(spec.layer_selection(index), num_layers)
                .window_depth(num_layers);
            let first = num_layers - window;
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

/// The head's pooling of `spec.training.pooling`.
pub fn pooling(spec: &FederatedTuneSpec) -> Pooling {
    match spec.training.pooling {
        SpecPooling::Mean => Pooling::Mean,
        SpecPooling::LastToken => Pooling::LastToken,
    }
}

/// The training settings of client `index` in round `round` (its batch
/// order seeded by the spec's seed, the round and the client).
pub fn settings(
    spec: &FederatedTuneSpec,
    round: u32,
    index: usize,
    cache_dir: Option<&Path>,
) -> TrainSettings {
    let seed = spec
        .training
        .seed
        .wrapping_mul(1_000_003)
        .wrapping_add(u64::from(round) * 1_009 + index as u64);
    train_settings(&spec.training, seed, cache_dir)
}

/// The training settings of `training` with batch-order seed `seed`, the
/// frozen-prefix caches persisting in `cache_dir`.
pub fn train_settings(
    training: &TrainingSpec,
    seed: u64,
    cache_dir: Option<&Path>,
) -> TrainSettings {
    TrainSettings {
        steps: training.local_steps as usize,
        batch_size: training.batch_size as usize,
        learning_rate: training.learning_rate,
        head_learning_rate: training.head_learning_rate,
        weight_decay: training.weight_decay,
        warmup_steps: training.warmup_steps as usize,
        max_grad_norm: training.max_grad_norm,
        max_seq_length: training.max_seq_length as usize,
        eval_batch_size: training.eval_batch_size as usize,
        seed,
        prefix_cache: training.prefix_cache.enabled,
        prefix_cache_bytes: training.prefix_cache.max_memory_mib as usize * 1024 * 1024,
        prefix_cache_dir: cache_dir.map(Path::to_path_buf),
        gradient_checkpointing: training.gradient_checkpointing,
        logit_offsets: None,
    }
}

/// The key of a client's model in the prefix-cache fingerprints, with the
/// dtype it runs in (`auto` resolved: the same computation as the explicit
/// dtype, so the same key).
pub fn model_id(client: &ClientSpec, dtype: Dtype) -> String {
    format!("{}|{:?}", client.model.uri, dtype)
}

/// Loads client `opts.client`: its backbone (on `opts.device`), data,
/// adapter and head, then its private state `state_in` and, on top of it,
/// the global artifact in `global`.
pub fn load_client(
    opts: &ClientOptions,
    global: Option<&Path>,
    state_in: Option<&Path>,
) -> Result<LoadedClient> {
    let spec = job::read_spec(&opts.spec)?;
    let index = job::client_index(&spec, &opts.client)?;
    if let Some(t) = opts.threads {
        tch::set_num_threads(t);
    }
    let device = crate::cuda::device(&opts.device)?;
    let dtype = job::resolve_dtype(spec.clients[index].model.dtype, device);
    tracing::info!(
        "client {}: backbone dtype {dtype} on {device:?}",
        spec.clients[index].name
    );
    let client = &spec.clients[index];
    let frozen = load_frozen(
        &client.model,
        &format!("spec.clients[{index}].model.uri"),
        &format!("client {}", client.name),
        device,
        dtype.dtype,
    )?;
    let load_seconds = frozen.load_seconds;
    let (mine, test, pool, num_classes) = client_data(&spec, index)?;
    let info = frozen.backbone.info().clone();
    let choice = adapter_choice(
        &spec,
        index,
        &frozen.model_dir,
        info.num_layers,
        lora_rank(&spec, index),
    )?;
    let model = ClientModel::new(
        frozen.backbone,
        frozen.tokenizer,
        &choice,
        num_classes,
        pooling(&spec),
        device,
    )?;
    let all_names: Vec<String> = model.vs.variables().keys().cloned().collect();

    let bridge = load_bridge(&spec, device, num_classes)?;

    // Private state first, then the global state on top of it.
    if let Some(file) = state_in {
        let values = import_private(&model, file, &all_names)?;
        if let Some(b) = &bridge {
            b.import(&values)
                .context_with(|| format!("loading the bridge's state {}", file.display()))?;
        }
    }
    let family_key = job::family_key(&spec, index);
    let mut base_round = 0;
    let mut pool_ensemble = None;
    let mut federation_prior = None;
    if let Some(global) = global {
        // With a private state, the global only replaces what the client
        // exchanges: the rest of the global (the initial values a
        // `local-only` run keeps there, say) must not undo local training.
        // Without one (first round), everything starts from the global.
        let from_global = if state_in.is_some() {
            shared_names(&model, &spec)
        } else {
            all_names.clone()
        };
        let (round, mapped) =
            import_global(&model, &spec, index, &family_key, global, &from_global)?;
        base_round = round;
        if let Some(b) = &bridge {
            import_bridge(b, &mapped, global)?;
        }
        pool_ensemble = pool_ensemble_of(&mapped, round, pool.len(), num_classes, global)?;
        federation_prior = prior_of(&mapped, num_classes, global)?;
        if pool_ensemble.is_none() && spec.uses_pool_ensemble() {
            tracing::warn!(
                "the global artifact in {} holds no pool ensemble: the run was started without \
                 poolTeacher ensemble, so the bridge teaches on the pool (start a new run for \
                 the ensemble)",
                global.display()
            );
        }
    }
    Ok(LoadedClient {
        index,
        family_key,
        base_round,
        load_seconds,
        dtype,
        train: mine.train,
        validation: mine.validation,
        test,
        pool,
        num_classes,
        all_names,
        model,
        bridge,
        pool_ensemble,
        federation_prior,
        spec,
    })
}

/// The global's label prior, checked: `classes` finite shares, none
/// negative, summing to 1 (a global is written by the aggregator, but it
/// is read from the store).
fn prior_of(
    mapped: &BTreeMap<String, tch::Tensor>,
    classes: usize,
    global: &Path,
) -> Result<Option<Vec<f64>>> {
    let Some(p) = mapped.get(POOL_PRIOR) else {
        return Ok(None);
    };
    let values: Vec<f64> = Vec::<f64>::try_from(p.to_kind(tch::Kind::Double).flatten(0, -1))
        .map_err(|e| crate::Error::config("spec.training.logitAdjustment", e.to_string()))?;
    let sum: f64 = values.iter().sum();
    if values.len() != classes
        || values.iter().any(|v| !v.is_finite() || *v < 0.0)
        || (sum - 1.0).abs() > 1e-3
    {
        return Err(crate::Error::config(
            "spec.task.labels",
            format!(
                "the global artifact in {} holds a label prior {values:?} that is not {classes} \
                 shares summing to 1: the labels changed under the run (start a new run)",
                global.display()
            ),
        ));
    }
    Ok(Some(values))
}

/// The global's ensemble on the pool, checked against the pool's shape.
fn pool_ensemble_of(
    mapped: &BTreeMap<String, tch::Tensor>,
    round: u32,
    texts: usize,
    classes: usize,
    global: &Path,
) -> Result<Option<PoolEnsemble>> {
    let Some(e) = mapped.get(POOL_ENSEMBLE) else {
        return Ok(None);
    };
    if e.size() != [texts as i64, classes as i64] {
        return Err(crate::Error::config(
            "spec.task.splits.pool",
            format!(
                "the global artifact in {} holds an ensemble of shape {:?} for a pool of {texts} \
                 texts and {classes} classes: the pool changed under the run (start a new run)",
                global.display(),
                e.size()
            ),
        ));
    }
    Ok(Some(PoolEnsemble {
        round,
        probs: e.to_kind(tch::Kind::Float),
    }))
}

/// Loads the bridge's tensors of a global into `bridge`: all of them, or
/// an error (a global written without `spec.bridge`).
fn import_bridge(
    bridge: &BridgeModel,
    mapped: &BTreeMap<String, tch::Tensor>,
    global: &Path,
) -> Result<()> {
    let loaded = bridge.import(mapped).context_with(|| {
        format!(
            "loading the bridge from the global artifact in {}",
            global.display()
        )
    })?;
    if loaded != bridge.all_names.len() {
        return Err(crate::Error::config(
            "spec.bridge",
            format!(
                "the global artifact in {} holds {loaded} of the bridge's {} tensors: the run \
                 was started without this bridge (a bridge cannot be added to a running \
                 federation: start a new run, or remove spec.bridge)",
                global.display(),
                bridge.all_names.len()
            ),
        ));
    }
    Ok(())
}

/// A frozen backbone with its tokenizer, loaded.
pub(crate) struct Frozen {
    pub backbone: Box<dyn Backbone>,
    pub tokenizer: TextTokenizer,
    /// The local model folder.
    pub model_dir: PathBuf,
    /// Seconds loading the backbone and tokenizer took.
    pub load_seconds: f64,
}

/// The frozen backbone of `model` (spec field `field`, belonging to `who`)
/// on `device` in `dtype`, and its tokenizer.
pub(crate) fn load_frozen(
    model: &ModelSpec,
    field: &str,
    who: &str,
    device: Device,
    dtype: Dtype,
) -> Result<Frozen> {
    let model_dir = job::local_path(&model.uri, field)?;
    let load_start = std::time::Instant::now();
    let backbone = load_backbone(&model_dir, device, job::kind_of(dtype))
        .context_with(|| format!("loading the backbone of {who}"))?;
    let tokenizer = TextTokenizer::for_model(&model_dir, backbone.info().vocab_size)?;
    Ok(Frozen {
        backbone,
        tokenizer,
        model_dir,
        load_seconds: load_start.elapsed().as_secs_f64(),
    })
}

/// Client `index`'s share of the data, the global test set (at most
/// `task.maxTestExamples`), the public pool and the number of classes.
fn client_data(
    spec: &FederatedTuneSpec,
    index: usize,
) -> Result<(ClientData, Vec<Example>, Vec<Example>, usize)> {
    let data = federate(&job::data_config(spec)?).context_with(|| "preparing the data".into())?;
    let mine = data.clients[index].clone();
    let mut test = data.test.clone();
    if let Some(max) = spec.task.max_test_examples {
        test.truncate(max as usize);
    }
    Ok((mine, test, data.pool, data.labels.len()))
}

/// Loads the client's private state from `file` into `names`; returns
/// every value the file holds.
fn import_private(
    model: &ClientModel,
    file: &Path,
    names: &[String],
) -> Result<BTreeMap<String, tch::Tensor>> {
    let bytes = std::fs::read(file)
        .context_with(|| format!("reading the client state {}", file.display()))?;
    let values = artifact::from_safetensors(&bytes, file)?;
    model
        .import(&values, names)
        .context_with(|| format!("loading the client state {}", file.display()))?;
    Ok(values)
}

/// Loads the client's view of the global artifact in `global` into
/// `names`; returns the global's round and that view.
fn import_global(
    model: &ClientModel,
    spec: &FederatedTuneSpec,
    index: usize,
    family_key: &str,
    global: &Path,
    names: &[String],
) -> Result<(u32, BTreeMap<String, tch::Tensor>)> {
    let (manifest, tensors) = artifact::read_artifact(global)
        .context_with(|| format!("reading the global artifact in {}", global.display()))?;
    let misfit = || {
        format!(
            "the global artifact in {} does not fit client {}",
            global.display(),
            spec.clients[index].name
        )
    };
    let rank = (spec.adapter.kind == AdapterKind::Lora).then(|| lora_rank(spec, index));
    let mapped = client_view(tensors, family_key, rank).context_with(misfit)?;
    model.import(&mapped, names).context_with(misfit)?;
    Ok((manifest.round, mapped))
}
