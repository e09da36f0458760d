//! One round of a client: train, score, write the artifact (the delta of
//! what the client shares) and its private state, and the report.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use heterotune_crds::manifest::{ArtifactKind, ArtifactManifest};
use heterotune_crds::spec::{Dtype, LogitAdjustment, PoolTeacher};
use tch::Tensor;

use super::bridge::{POOL_COUNTS, POOL_PROBS};
use super::load::{load_client, settings, ClientOptions, LoadedClient};
use crate::artifact::{self, StoreDtype, WRITER_VERSION};
use crate::calibration::fit_bias;
use crate::exchange::shared_names;
use crate::logit_adjustment;
use crate::metrics::Scores;
use crate::mutual::{
    evidence, served_probabilities, train_pair, PairLogits, PairScores, Pool,
    PoolTeacher as Teacher, Side,
};
use crate::train::{ClientModel, Prepared, TrainReport, TrainSettings};
use crate::Result;

/// One round of training: which round, the states it starts from and where
/// its outputs go (the trainer's `train` arguments).
#[derive(Debug, Clone, Copy)]
pub struct TrainRound<'a> {
    /// The round being trained (1-based).
    pub round: u32,
    /// Directory of the previous round's global artifact.
    pub global: Option<&'a Path>,
    /// The client's private state after the previous round.
    pub state_in: Option<&'a Path>,
    /// Where to save the client's private state after this round.
    pub state_out: Option<&'a Path>,
    /// Directory where frozen-prefix caches persist between rounds.
    pub cache_dir: Option<&'a Path>,
    /// Where to write adapter.safetensors and manifest.json.
    pub out: &'a Path,
    /// The run this artifact belongs to (written into the manifest).
    pub run: &'a str,
}

/// What one round of a client measured.
#[derive(Debug, Clone)]
struct RoundScores {
    report: TrainReport,
    validation: Scores,
    validation_loss: f64,
    test: Scores,
    /// The global test scores of the model the client received.
    received: Option<Scores>,
    /// With a bridge: global-test accuracy of each model the client can
    /// serve, after training and as received.
    variants: BTreeMap<String, f64>,
    /// The same on the client's validation split (what `serve: auto` reads).
    validation_variants: BTreeMap<String, f64>,
    received_variants: BTreeMap<String, f64>,
}

/// What [`train_round`] did; its `Display` is the trainer's report.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    client: String,
    family_key: String,
    /// The backbone's dtype (`auto → bfloat16 (AVX512-BF16)`, `float32`).
    dtype: String,
    num_layers: usize,
    prefix_layers: usize,
    round: u32,
    base_round: u32,
    examples: [usize; 3],
    scores: RoundScores,
    load_seconds: f64,
    prefix_from_disk: bool,
    trainable: usize,
    backbone_parameters: usize,
    /// Bytes and tensors of the uploaded artifact.
    upload: (u64, usize),
    out: PathBuf,
    /// The manifest as written.
    pub manifest: ArtifactManifest,
}

/// Trains client `opts.client` for one round and writes its artifact (the
/// delta of what it shares, BF16) into `args.out`, and its private state
/// into `args.state_out`.
pub fn train_round(opts: &ClientOptions, args: &TrainRound<'_>) -> Result<TrainSummary> {
    let mut c = load_client(opts, args.global, args.state_in)?;
    // The rounds' scores on the first `roundTestExamples` of the test set;
    // the evaluation after the last round (`eval`) scores all of it.
    if let Some(n) = c.spec.evaluation.round_test_examples {
        c.test.truncate(n as usize);
    }
    let info = c.model.backbone().info().clone();
    let send = shared_names(&c.model, &c.spec);
    let before = exported(&c, &send)?;
    let mut settings = settings(&c.spec, args.round, c.index, args.cache_dir);
    if c.spec.training.logit_adjustment == LogitAdjustment::ClientPrior {
        settings.logit_offsets = Some(logit_adjustment::offsets(
            c.train.iter().map(|e| e.label),
            c.num_classes,
            c.federation_prior.as_deref(),
        ));
    }
    let (scores, prefix_from_disk, pool_values) = train_and_score(&mut c, &settings)?;
    if let Some(file) = args.state_out {
        let mut values = c.model.export(&c.all_names)?;
        if let Some(b) = &c.bridge {
            values.extend(b.export()?);
        }
        let (bytes, _) = artifact::to_safetensors(&values, StoreDtype::F32)?;
        artifact::write_atomic(file, &bytes)?;
    }
    let after = exported(&c, &send)?;
    let mut delta: BTreeMap<String, Tensor> = after
        .iter()
        .map(|(name, t)| (name.clone(), t - &before[name]))
        .collect();
    // Probabilities on the pool are values, not deltas.
    delta.extend(pool_values);
    let trainable = c.model.adapter.parameter_count()
        + c.model.head.parameter_count()
        + c.bridge.as_ref().map_or(0, |b| {
            b.model.adapter.parameter_count() + b.model.head.parameter_count()
        });
    let client = c.spec_client();
    let manifest = ArtifactManifest {
        client: Some(client.name.clone()),
        family: Some(c.family_key.clone()),
        num_examples: c.train.len() as u64,
        metrics: scores.metrics(
            c.load_seconds,
            trainable,
            info.num_parameters,
            c.dtype.dtype,
        ),
        stats: serde_json::json!({
            "familyArchitecture": client.model.family.as_str(),
            "prefixLayers": c.model.prefix_layers(),
            "dtype": c.dtype.dtype.as_str(),
            "dtypeChoice": c.dtype.to_string(),
        }),
        ..ArtifactManifest::new(
            ArtifactKind::Client,
            args.run,
            args.round,
            c.base_round,
            WRITER_VERSION,
        )
    };
    let manifest = artifact::write_artifact(args.out, &delta, StoreDtype::Bf16, manifest)?;
    Ok(TrainSummary {
        client: client.name.clone(),
        family_key: c.family_key.clone(),
        dtype: c.dtype.to_string(),
        num_layers: info.num_layers,
        prefix_layers: c.model.prefix_layers(),
        round: args.round,
        base_round: c.base_round,
        examples: [c.train.len(), c.validation.len(), c.test.len()],
        scores,
        load_seconds: c.load_seconds,
        prefix_from_disk,
        trainable,
        backbone_parameters: info.num_parameters,
        upload: (manifest.artifact.bytes, manifest.tensors.len()),
        out: args.out.to_path_buf(),
        manifest,
    })
}

/// What client `c` sends, by artifact name: its own model's `send`
/// tensors and, with a bridge, every bridge tensor.
fn exported(c: &LoadedClient, send: &[String]) -> Result<BTreeMap<String, Tensor>> {
    let mut values = c.model.export(send)?;
    if let Some(b) = &c.bridge {
        values.extend(b.export()?);
    }
    Ok(values)
}

/// Values a client sends as they are (not as deltas): its probabilities on
/// the public pool with `poolTeacher: ensemble` (`pool.*`).
type PoolValues = BTreeMap<String, Tensor>;

/// Scores the received model on the test set (when the spec evaluates each
/// round and there is a previous round), trains, then scores the trained
/// model on validation and test. Also says whether the training prefixes
/// came from the disk cache.
fn train_and_score(
    c: &mut LoadedClient,
    settings: &TrainSettings,
) -> Result<(RoundScores, bool, PoolValues)> {
    if c.bridge.is_some() {
        return train_and_score_pair(c, settings);
    }
    let model_id = c.model_id();
    let batch = settings.eval_batch_size;
    let test_data = c.model.prepare(&c.test, settings, &model_id)?;
    // The model this client received (the previous round's global with its
    // own private parts), before local training: the previous round's
    // global accuracy. Round 1 starts from the untrained initial state.
    let received = if c.spec.evaluation.each_round && c.base_round > 0 {
        Some(c.model.evaluate(&test_data, batch, c.num_classes)?.0)
    } else {
        None
    };
    let train_data = c.model.prepare(&c.train, settings, &model_id)?;
    let report = c.model.train(&train_data, settings)?;
    let val_data = c.model.prepare(&c.validation, settings, &model_id)?;
    let (validation, validation_loss) = c.model.evaluate(&val_data, batch, c.num_classes)?;
    let (test, _) = c.model.evaluate(&test_data, batch, c.num_classes)?;
    let scores = RoundScores {
        report,
        validation,
        validation_loss,
        test,
        received,
        variants: BTreeMap::new(),
        validation_variants: BTreeMap::new(),
        received_variants: BTreeMap::new(),
    };
    Ok((scores, train_data.from_disk, PoolValues::new()))
}

/// [`train_and_score`] for a client with a bridge: the two models trained
/// together ([`crate::mutual`]); the scores are the served model's, with
/// every variant's accuracy alongside.
fn train_and_score_pair(
    c: &mut LoadedClient,
    settings: &TrainSettings,
) -> Result<(RoundScores, bool, PoolValues)> {
    let own_id = c.model_id();
    let calibration_teacher = c.calibration_teacher().map(|t| t.shallow_clone());
    let agreement_teacher = c.agreement_teacher().map(|t| t.shallow_clone());
    let (Some(spec), Some(b)) = (c.spec.bridge.clone(), c.bridge.as_mut()) else {
        return Err(crate::Error::config(
            "spec.bridge",
            "no bridge model loaded",
        ));
    };
    let bridge_id = b.model_id(&spec);
    let (batch, classes) = (settings.eval_batch_size, c.num_classes);
    let prepare = |examples: &[crate::data::source::Example]| -> Result<_> {
        Ok((
            c.model.prepare(examples, settings, &own_id)?,
            b.model.prepare(examples, settings, &bridge_id)?,
        ))
    };
    let test = prepare(&c.test)?;
    let train = prepare(&c.train)?;
    let validation = prepare(&c.validation)?;
    let pool = prepare(&c.pool)?;
    // The own model's calibration bias (`bridge.calibration`) from its
    // logits on the pool.
    let own_bias = |own_pool: &Tensor| -> Result<Option<Tensor>> {
        calibration_teacher
            .as_ref()
            .map(|t| fit_bias(own_pool, t))
            .transpose()
    };
    let score =
        |m: &ClientModel, bm: &ClientModel, d: &(Prepared, Prepared), bias: Option<&Tensor>| {
            let logits = PairLogits::of((m, &d.0), (bm, &d.1), batch)?;
            PairScores::from_logits(&logits, bias, &d.0, classes)
        };
    let received = if c.spec.evaluation.each_round && c.base_round > 0 {
        let bias = match calibration_teacher {
            Some(_) => own_bias(&c.model.logits(&pool.0, batch)?)?,
            None => None,
        };
        Some(score(&c.model, &b.model, &test, bias.as_ref())?)
    } else {
        None
    };
    let teacher = match (spec.distillation.pool_teacher, &c.pool_ensemble) {
        (PoolTeacher::Validated, _) if !c.pool.is_empty() => {
            let before = score(&c.model, &b.model, &validation, None)?;
            if before.bridge.0.accuracy >= before.own.0.accuracy {
                Teacher::Bridge
            } else {
                Teacher::Own
            }
        }
        (PoolTeacher::Ensemble, Some(e)) if e.teacher().is_some() => Teacher::Ensemble(&e.probs),
        _ => Teacher::Bridge,
    };
    let (report, _) = train_pair(
        Side {
            model: &mut c.model,
            data: &train.0,
        },
        Side {
            model: &mut b.model,
            data: &train.1,
        },
        Some(Pool {
            own: &pool.0,
            bridge: &pool.1,
            teacher,
        }),
        settings,
        &TrainSettings {
            learning_rate: spec.learning_rate.unwrap_or(settings.learning_rate),
            ..settings.clone()
        },
        &spec.distillation,
    )?;
    // The own model's pool logits: the calibration's input and (with an
    // ensemble) part of what is sent.
    let own_pool = if calibration_teacher.is_some() || c.pool_ensemble.is_some() {
        Some(c.model.logits(&pool.0, batch)?)
    } else {
        None
    };
    let bias = match &own_pool {
        Some(logits) => own_bias(logits)?,
        None => None,
    };
    let val = score(&c.model, &b.model, &validation, bias.as_ref())?;
    let tst = score(&c.model, &b.model, &test, bias.as_ref())?;
    // Both models on the pool when the run exchanges the ensemble (its
    // global holds one): what is sent, and `serve: agreement`'s evidence.
    let pool_pair = match (own_pool, &c.pool_ensemble) {
        (Some(own), Some(_)) => Some(PairLogits {
            own,
            bridge: b.model.logits(&pool.1, batch)?,
        }),
        _ => None,
    };
    let agreement = match (&pool_pair, &agreement_teacher) {
        (Some(pair), Some(teacher)) => pair.agreement(bias.as_ref(), teacher)?,
        _ => Vec::new(),
    };
    let (own_uri, bridge_uri) = (&c.spec.clients[c.index].model.uri, &spec.model.uri);
    let served = spec.serve.choose(own_uri, bridge_uri, |v| {
        if spec.serve.reads_pool() {
            evidence(&agreement, v)
        } else {
            val.get(v).0.accuracy
        }
    });
    // The uncalibrated view, so that the ensemble does not echo itself.
    let pool_values = if let Some(pair) = pool_pair {
        let mut counts = vec![0f32; classes];
        for e in &c.train {
            counts[e.label] += 1.0;
        }
        let sent = spec.serve.sent(own_uri, bridge_uri, served);
        PoolValues::from([
            (
                POOL_PROBS.to_string(),
                served_probabilities(&pair.own, &pair.bridge, sent),
            ),
            (POOL_COUNTS.to_string(), Tensor::from_slice(&counts)),
        ])
    } else {
        PoolValues::new()
    };
    let (validation, validation_loss) = *val.get(served);
    let scores = RoundScores {
        report,
        validation,
        validation_loss,
        test: tst.get(served).0,
        received: received.as_ref().map(|r| r.get(served).0),
        variants: tst.accuracies(),
        validation_variants: val.accuracies(),
        received_variants: received.map(|r| r.accuracies()).unwrap_or_default(),
    };
    Ok((scores, train.0.from_disk, pool_values))
}

impl RoundScores {
    /// The client manifest's metrics.
    fn metrics(
        &self,
        load_seconds: f64,
        trainable: usize,
        backbone_parameters: usize,
        dtype: Dtype,
    ) -> BTreeMap<String, f64> {
        let (report, val, tst) = (&self.report, &self.validation, &self.test);
        let mut metrics = BTreeMap::new();
        metrics.insert("loss".into(), report.final_loss);
        metrics.insert("mean_train_loss".into(), report.mean_loss);
        metrics.insert("validation_loss".into(), self.validation_loss);
        metrics.insert("accuracy".into(), val.accuracy);
        metrics.insert("macro_f1".into(), val.macro_f1);
        metrics.insert("validation_examples".into(), val.examples as f64);
        metrics.insert("test_accuracy".into(), tst.accuracy);
        metrics.insert("test_macro_f1".into(), tst.macro_f1);
        metrics.insert("test_examples".into(), tst.examples as f64);
        if let Some(r) = &self.received {
            metrics.insert("received_test_accuracy".into(), r.accuracy);
            metrics.insert("received_test_macro_f1".into(), r.macro_f1);
        }
        for (variant, accuracy) in &self.variants {
            metrics.insert(format!("{variant}_test_accuracy"), *accuracy);
        }
        for (variant, accuracy) in &self.validation_variants {
            metrics.insert(format!("validation_{variant}_accuracy"), *accuracy);
        }
        for (variant, accuracy) in &self.received_variants {
            metrics.insert(format!("received_{variant}_test_accuracy"), *accuracy);
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
        metrics.insert("backbone_parameters".into(), backbone_parameters as f64);
        // The resolved dtype, by its width (its name is in the stats).
        metrics.insert("backbone_dtype_bytes".into(), dtype.bytes() as f64);
        if let Some(rss) = report.peak_rss_bytes {
            metrics.insert("peak_rss_bytes".into(), rss as f64);
        }
        metrics
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl fmt::Display for TrainSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (report, val, tst) = (
            &self.scores.report,
            &self.scores.validation,
            &self.scores.test,
        );
        let [train, validation, test] = self.examples;
        writeln!(
            f,
            "client {} ({}, {} layers, frozen prefix of {} layers, dtype {}): round {}, {train} train / {validation} validation / {test} test examples",
            self.client, self.family_key, self.num_layers, self.prefix_layers, self.dtype, self.round,
        )?;
        writeln!(
            f,
            "  trained {} steps in {:.1} s ({:.2} steps/s, {:.0} tokens/s; prefix cache {:.1} s for {} examples; model load {:.1} s)",
            report.steps,
            report.seconds,
            report.steps_per_second,
            report.tokens_per_second,
            report.prefix_seconds,
            report.cached_examples,
            self.load_seconds
        )?;
        if self.prefix_from_disk {
            writeln!(f, "  (frozen-prefix cache loaded from disk)")?;
        }
        if let Some(r) = &self.scores.received {
            writeln!(
                f,
                "  received global model (round {}): global test accuracy {:.3}, macro-F1 {:.3}",
                self.base_round, r.accuracy, r.macro_f1
            )?;
        }
        writeln!(
            f,
            "  loss {:.4} -> validation accuracy {:.3}, macro-F1 {:.3}; global test accuracy {:.3}, macro-F1 {:.3}",
            report.final_loss, val.accuracy, val.macro_f1, tst.accuracy, tst.macro_f1
        )?;
        if !self.scores.variants.is_empty() {
            let list: Vec<String> = self
                .scores
                .variants
                .iter()
                .map(|(v, a)| format!("{v} {a:.3}"))
                .collect();
            writeln!(
                f,
                "  with the bridge, global test accuracy: {}",
                list.join(", ")
            )?;
        }
        writeln!(
            f,
            "  parameters: {} trainable of {} in the backbone ({:.4} %); upload {} bytes ({} tensors, bf16); peak RSS {:.0} MiB",
            self.trainable,
            self.backbone_parameters,
            100.0 * self.trainable as f64 / self.backbone_parameters.max(1) as f64,
            self.upload.0,
            self.upload.1,
            report.peak_rss_bytes.map(mib).unwrap_or(f64::NAN)
        )?;
        writeln!(f, "  artifact: {}", self.out.display())
    }
}
