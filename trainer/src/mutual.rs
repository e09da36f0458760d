//! Mutual distillation of a client's own model and the bridge (`spec.bridge`):
//! both train on the same batches of the client's data, each on the labels
//! and on the other's softened predictions (deep mutual learning, FedKD).
//!
//! Per step, with logits `a` (own) and `b` (bridge), temperature `T` and
//! weights `w` (own) and `w_b` (bridge):
//!
//! ```text
//! L_own    = CE(a, y) + w   T² KL(softmax(b/T) ‖ softmax(a/T))
//! L_bridge = CE(b, y) + w_b T² KL(softmax(a/T) ‖ softmax(b/T))
//! ```
//!
//! the teacher side of each KL detached, so each model gets only its own
//! loss's gradient; each has its own optimiser and gradient clipping. With
//! `training.logitAdjustment`, both CE terms see the adjusted logits
//! ([`crate::logit_adjustment`]); the KL terms compare the plain ones.

use std::collections::BTreeMap;
use std::time::Instant;

use heterotune_crds::spec::{DistillationSpec, ServedModel};
use tch::{Kind, Tensor};

use crate::calibration::calibrated;
use crate::logit_adjustment::adjusted;
use crate::metrics::Scores;
use crate::train::{
    score_logits, set_step_lr, BatchSampler, ClientModel, Prepared, TrainReport, TrainSettings,
};
use crate::{Error, Result};

/// `T² KL(softmax(teacher/T) ‖ softmax(student/T))`, batch mean; gradient to
/// `student` only.
pub fn distillation_loss(student: &Tensor, teacher: &Tensor, temperature: f64) -> Tensor {
    let log_q = (student / temperature).log_softmax(-1, Kind::Float);
    let log_p = (teacher.detach() / temperature).log_softmax(-1, Kind::Float);
    let batch = student.size()[0].max(1) as f64;
    (log_p.exp() * (log_p - log_q)).sum(Kind::Float) * (temperature * temperature / batch)
}

/// One model of the pair with its prepared training data.
pub struct Side<'a> {
    pub model: &'a mut ClientModel,
    pub data: &'a Prepared,
}

/// The public pool prepared for both models (the same texts in the same
/// order), and who teaches on it.
#[derive(Clone, Copy)]
pub struct Pool<'a> {
    pub own: &'a Prepared,
    pub bridge: &'a Prepared,
    pub teacher: PoolTeacher<'a>,
}

/// Who teaches on the pool.
#[derive(Clone, Copy)]
pub enum PoolTeacher<'a> {
    /// The bridge teaches the own model.
    Bridge,
    /// The own model teaches the bridge.
    Own,
    /// The federation's ensemble (`[pool texts, classes]` probabilities)
    /// teaches both models.
    Ensemble(&'a Tensor),
}

/// Logits (f32) of `rows` of `data` through `model`'s window, the rows'
/// labels and their real tokens.
fn batch_logits(model: &ClientModel, data: &Prepared, rows: &[usize]) -> (Tensor, Tensor, i64) {
    let (ids, mask, labels) = model.batch(&data.tokens, rows);
    let tokens = mask.sum(Kind::Int64).int64_value(&[]);
    let h = model.window_input(data.cache.as_ref(), rows, &ids, &mask);
    (model.window(h, &mask).to_kind(Kind::Float), labels, tokens)
}

/// Trains `own` and `bridge` together for `settings.steps` steps (the batch
/// order of `settings.seed`, the same rows for both: the two prepared sets
/// must hold the same examples in the same order). With a `pool`, each step
/// also distils on a batch of pool texts (`distillation.poolWeight`): one
/// model into the other, or the federation's ensemble into both
/// ([`PoolTeacher`]). `settings` drive the own model and the steps;
/// the bridge's optimiser takes `bridge_settings` (its learning rates).
/// Returns each model's report (its losses include the distillation term
/// on the client's data, not the pool's).
pub fn train_pair(
    own: Side<'_>,
    bridge: Side<'_>,
    pool: Option<Pool<'_>>,
    settings: &TrainSettings,
    bridge_settings: &TrainSettings,
    distill: &DistillationSpec,
) -> Result<(TrainReport, TrainReport)> {
    let n = own.data.len();
    if n == 0 {
        return Err(Error::config(
            "data",
            "this client has no training examples",
        ));
    }
    if bridge.data.len() != n {
        return Err(Error::config(
            "bridge",
            format!(
                "the bridge prepared {} examples, the client's model {n}",
                bridge.data.len()
            ),
        ));
    }
    if settings.gradient_checkpointing {
        return Err(Error::config(
            "spec.training.gradientCheckpointing",
            "is not supported with spec.bridge yet: turn one of them off",
        ));
    }
    let start = Instant::now();
    let each = [settings, bridge_settings];
    let mut opts = [
        own.model.optimizer(settings)?,
        bridge.model.optimizer(bridge_settings)?,
    ];
    let mut sampler = BatchSampler::new(settings.seed, n);
    let mut pool_sampler = pool.filter(|p| !p.own.is_empty()).map(|p| {
        (
            p,
            BatchSampler::new(settings.seed ^ 0x706f_6f6c, p.own.len()),
        )
    });
    let mut losses: [Vec<f64>; 2] = Default::default();
    let mut tokens_seen = [0i64; 2];
    let train_start = Instant::now();
    let models = [&*own.model, &*bridge.model];
    let data = [own.data, bridge.data];
    for step in 0..settings.steps {
        let rows = sampler.next(settings.batch_size);
        let mut logits = Vec::with_capacity(2);
        let mut labels = Vec::with_capacity(2);
        for (i, (m, d)) in models.iter().zip(data).enumerate() {
            let (l, y, tokens) = batch_logits(m, d, &rows);
            tokens_seen[i] += tokens;
            logits.push(l);
            labels.push(y);
        }
        let mut total = Tensor::zeros([], (Kind::Float, logits[0].device()));
        for i in 0..2 {
            let ce = adjusted(&logits[i], settings.logit_offsets.as_deref())
                .cross_entropy_for_logits(&labels[i]);
            let kd = distillation_loss(&logits[i], &logits[1 - i], distill.temperature);
            let weight = if i == 0 {
                distill.weight
            } else {
                distill.bridge_weight
            };
            let loss = ce + kd * weight;
            let value = loss.double_value(&[]);
            if !value.is_finite() {
                return Err(Error::config(
                    "training.learningRate",
                    format!("loss became {value} at step {step}: lower the learning rate"),
                ));
            }
            losses[i].push(value);
            total += loss;
        }
        if let Some((p, sampler)) = pool_sampler.as_mut() {
            let rows = sampler.next(settings.batch_size);
            total += pool_loss(models, p, &rows, distill);
        }
        for (opt, s) in opts.iter_mut().zip(each) {
            set_step_lr(opt, s, step);
            opt.zero_grad();
        }
        total.backward();
        for opt in opts.iter_mut() {
            if settings.max_grad_norm > 0.0 {
                opt.clip_grad_norm(settings.max_grad_norm);
            }
            opt.step();
        }
    }
    let report =
        |i: usize| TrainReport::new(&losses[i], start, train_start, tokens_seen[i], data[i]);
    Ok((report(0), report(1)))
}

/// The distillation loss on pool rows `rows`, times `poolWeight`: the
/// student(s) against the pool's teacher.
fn pool_loss(
    models: [&ClientModel; 2],
    pool: &Pool<'_>,
    rows: &[usize],
    distill: &DistillationSpec,
) -> Tensor {
    let texts = [pool.own, pool.bridge];
    let student = |i: usize| batch_logits(models[i], texts[i], rows).0;
    let t = distill.temperature;
    let one_way = |s: usize, te: usize| {
        let teacher = tch::no_grad(|| student(te));
        distillation_loss(&student(s), &teacher, t)
    };
    let loss = match pool.teacher {
        PoolTeacher::Bridge => one_way(0, 1),
        PoolTeacher::Own => one_way(1, 0),
        PoolTeacher::Ensemble(probs) => {
            let own = student(0);
            let teacher = teacher_rows(probs, rows, own.device());
            distillation_loss(&own, &teacher, t) + distillation_loss(&student(1), &teacher, t)
        }
    };
    loss * distill.pool_weight
}

/// Rows `rows` of the ensemble's `[pool texts, classes]` probabilities as
/// logits on `device` (log-probabilities are logits of the same softmax).
fn teacher_rows(probs: &Tensor, rows: &[usize], device: tch::Device) -> Tensor {
    let index = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>())
        .to_device(probs.device());
    probs
        .index_select(0, &index)
        .clamp_min(1e-8)
        .log()
        .to_device(device)
}

/// Trains `model` alone on the public pool against the ensemble's
/// probabilities `teacher` (`[pool texts, classes]`, the rows of `pool` in
/// order) for `settings.steps` batches of `settings.batch_size`:
/// `T² KL(teacher ‖ model)` and nothing else, no label read (the
/// aggregator's step, `bridge.distillation.serverSteps`). Returns each
/// step's loss.
pub fn distil_on_pool(
    model: &mut ClientModel,
    pool: &Prepared,
    teacher: &Tensor,
    settings: &TrainSettings,
    temperature: f64,
) -> Result<Vec<f64>> {
    let n = pool.len();
    let shape = teacher.size();
    if n == 0 || shape.first().copied() != Some(n as i64) {
        return Err(Error::config(
            "spec.task.splits.pool",
            format!(
                "the pool has {n} texts and its ensemble {shape:?} rows: the pool changed \
                 under the run (start a new run)"
            ),
        ));
    }
    let mut opt = model.optimizer(settings)?;
    let mut sampler = BatchSampler::new(settings.seed, n);
    let mut losses = Vec::with_capacity(settings.steps);
    for step in 0..settings.steps {
        set_step_lr(&mut opt, settings, step);
        let rows = sampler.next(settings.batch_size);
        let (logits, _, _) = batch_logits(model, pool, &rows);
        let target = teacher_rows(teacher, &rows, logits.device());
        let loss = distillation_loss(&logits, &target, temperature);
        opt.zero_grad();
        loss.backward();
        if settings.max_grad_norm > 0.0 {
            opt.clip_grad_norm(settings.max_grad_norm);
        }
        opt.step();
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            return Err(Error::config(
                "spec.bridge.learningRate",
                format!("the server's distillation loss became {value} at step {step}: lower the learning rate"),
            ));
        }
        losses.push(value);
    }
    Ok(losses)
}

/// The class probabilities (`[examples, classes]`) of the model a client
/// serves, from the two models' logits (`auto` and `validated` resolved
/// first, as in [`PairScores::get`]).
pub fn served_probabilities(own: &Tensor, bridge: &Tensor, served: ServedModel) -> Tensor {
    match served {
        ServedModel::Own => own.softmax(-1, Kind::Float),
        ServedModel::Bridge => bridge.softmax(-1, Kind::Float),
        ServedModel::Confident => confident_logits(own, bridge).exp(),
        ServedModel::Auto
        | ServedModel::Validated
        | ServedModel::Agreement
        | ServedModel::Ensemble => ensemble_logits(own, bridge).exp(),
    }
}

/// Class probabilities of the ensemble: the mean of the two models'
/// softmax, as logits (log-probabilities) for [`crate::train::score_logits`].
pub fn ensemble_logits(own: &Tensor, bridge: &Tensor) -> Tensor {
    let p = (own.softmax(-1, Kind::Float) + bridge.softmax(-1, Kind::Float)) / 2.0;
    p.clamp_min(1e-12).log()
}

/// Both models' logits on the same examples.
pub struct PairLogits {
    pub own: Tensor,
    pub bridge: Tensor,
}

impl PairLogits {
    /// `own` and `bridge` on the same examples (`own.1` and `bridge.1`
    /// prepared from one list).
    pub fn of(
        own: (&ClientModel, &Prepared),
        bridge: (&ClientModel, &Prepared),
        batch_size: usize,
    ) -> Result<Self> {
        Ok(PairLogits {
            own: own.0.logits(own.1, batch_size)?,
            bridge: bridge.0.logits(bridge.1, batch_size)?,
        })
    }

    /// The own model's logits, shifted by `own_bias` (its calibration)
    /// when given.
    fn own_shifted(&self, own_bias: Option<&Tensor>) -> Tensor {
        match own_bias {
            Some(bias) => calibrated(&self.own, bias),
            None => self.own.shallow_clone(),
        }
    }

    /// For each model a client can serve ([`ServedModel::ALL`]), the share
    /// of rows on which its top class is `teacher`'s (`[rows, classes]`
    /// probabilities), the own model shifted by `own_bias` when given: the
    /// evidence of `serve: agreement` on the pool.
    pub fn agreement(
        &self,
        own_bias: Option<&Tensor>,
        teacher: &Tensor,
    ) -> Result<Vec<(ServedModel, f64)>> {
        if teacher.size() != self.own.size() || teacher.size() != self.bridge.size() {
            return Err(Error::config(
                "pool.ensemble",
                format!(
                    "the global's ensemble is {:?}, the pool's logits {:?}: the global was made for another pool",
                    teacher.size(),
                    self.own.size()
                ),
            ));
        }
        let a = self.own_shifted(own_bias);
        let target = teacher.to_device(a.device()).argmax(-1, false);
        let share = |logits: Tensor| {
            logits
                .argmax(-1, false)
                .eq_tensor(&target)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[])
        };
        Ok(ServedModel::ALL
            .iter()
            .map(|&v| (v, share(served_logits(&a, &self.bridge, v))))
            .collect())
    }
}

/// The logits of the model `v` serves from the two models' logits (the
/// mixtures as log-probabilities; `auto`, `validated` and `agreement` read
/// as `ensemble`, as in [`PairScores::get`]).
fn served_logits(own: &Tensor, bridge: &Tensor, v: ServedModel) -> Tensor {
    match v {
        ServedModel::Own => own.shallow_clone(),
        ServedModel::Bridge => bridge.shallow_clone(),
        ServedModel::Confident => confident_logits(own, bridge),
        ServedModel::Auto
        | ServedModel::Validated
        | ServedModel::Agreement
        | ServedModel::Ensemble => ensemble_logits(own, bridge),
    }
}

/// `v`'s share in [`PairLogits::agreement`]'s list; 0 when it is not there
/// (no pool ensemble: every candidate equal, and the rule's first wins).
pub fn evidence(agreement: &[(ServedModel, f64)], v: ServedModel) -> f64 {
    agreement
        .iter()
        .find(|(candidate, _)| *candidate == v)
        .map_or(0.0, |(_, share)| *share)
}

/// The suffix of a variant's accuracy without the own model's calibration.
pub const UNCALIBRATED: &str = "uncalibrated";

/// Global-test (or validation) scores of each model a client with a bridge
/// can serve, with their mean cross-entropy.
#[derive(Debug, Clone)]
pub struct PairScores {
    pub own: (Scores, f64),
    pub bridge: (Scores, f64),
    pub ensemble: (Scores, f64),
    pub confident: (Scores, f64),
    /// With a calibrated own model ([`crate::calibration`]): the scores
    /// without the correction (the ablation every evaluation reports).
    pub uncalibrated: Option<Box<PairScores>>,
}

impl PairScores {
    /// Scores `own` and `bridge` on the same examples (`own_data` and
    /// `bridge_data` prepared from one list) and their ensemble.
    pub fn of(
        own: (&ClientModel, &Prepared),
        bridge: (&ClientModel, &Prepared),
        batch_size: usize,
        num_classes: usize,
    ) -> Result<Self> {
        let logits = PairLogits::of(own, bridge, batch_size)?;
        Self::from_logits(&logits, None, own.1, num_classes)
    }

    /// Scores the two models' `logits` on `data` (prepared for either:
    /// only its labels are read), the own model's logits shifted by
    /// `own_bias` when given.
    pub fn from_logits(
        logits: &PairLogits,
        own_bias: Option<&Tensor>,
        data: &Prepared,
        num_classes: usize,
    ) -> Result<Self> {
        let a = logits.own_shifted(own_bias);
        let score = |v| score_logits(&served_logits(&a, &logits.bridge, v), data, num_classes);
        Ok(PairScores {
            own: score(ServedModel::Own)?,
            bridge: score(ServedModel::Bridge)?,
            ensemble: score(ServedModel::Ensemble)?,
            confident: score(ServedModel::Confident)?,
            uncalibrated: match own_bias {
                Some(_) => Some(Box::new(Self::from_logits(
                    logits,
                    None,
                    data,
                    num_classes,
                )?)),
                None => None,
            },
        })
    }

    /// The scores of the served model `served` (`auto` and `validated` must
    /// be resolved first: [`ServedModel::choose`]; unresolved they read as
    /// `ensemble`).
    pub fn get(&self, served: ServedModel) -> &(Scores, f64) {
        match served {
            ServedModel::Own => &self.own,
            ServedModel::Auto | ServedModel::Validated | ServedModel::Agreement => &self.ensemble,
            ServedModel::Bridge => &self.bridge,
            ServedModel::Ensemble => &self.ensemble,
            ServedModel::Confident => &self.confident,
        }
    }

    /// Accuracy of every variant, by its spec name; with a calibrated own
    /// model, also those it changes without the correction
    /// (`own-uncalibrated`, `ensemble-uncalibrated`, `confident-uncalibrated`).
    pub fn accuracies(&self) -> BTreeMap<String, f64> {
        let mut out: BTreeMap<String, f64> = ServedModel::ALL
            .iter()
            .map(|&v| (v.as_str().to_string(), self.get(v).0.accuracy))
            .collect();
        if let Some(raw) = &self.uncalibrated {
            for v in ServedModel::ALL {
                if v != ServedModel::Bridge {
                    out.insert(
                        format!("{}-{UNCALIBRATED}", v.as_str()),
                        raw.get(v).0.accuracy,
                    );
                }
            }
        }
        out
    }
}

/// The two models' probabilities weighted per example by each one's top
/// probability, as log-probabilities.
pub fn confident_logits(own: &Tensor, bridge: &Tensor) -> Tensor {
    let (p, q) = (
        own.softmax(-1, Kind::Float),
        bridge.softmax(-1, Kind::Float),
    );
    let (cp, cq) = (p.amax(-1, true), q.amax(-1, true));
    ((p * &cp + q * &cq) / (cp + cq)).clamp_min(1e-12).log()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distillation_is_zero_between_equal_logits_and_positive_otherwise() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0]).view([2, 3]);
        let same = distillation_loss(&a, &a.copy(), 2.0).double_value(&[]);
        assert!(same.abs() < 1e-6, "{same}");
        let b = Tensor::from_slice(&[0.0f32, 0.0, 4.0, 2.0, 1.0, 0.0]).view([2, 3]);
        let diff = distillation_loss(&a, &b, 2.0).double_value(&[]);
        assert!(diff > 0.05, "{diff}");
        // KL by hand for row 0 at T = 1: Σ p (log p − log q).
        let row = |t: &Tensor| t.get(0).unsqueeze(0);
        let p = row(&b).softmax(-1, Kind::Float);
        let q = row(&a).softmax(-1, Kind::Float);
        let want = (&p * (p.log() - q.log()))
            .sum(Kind::Float)
            .double_value(&[]);
        let got = distillation_loss(&row(&a), &row(&b), 1.0).double_value(&[]);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn distillation_sends_gradient_to_the_student_only() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 0.5])
            .view([1, 3])
            .set_requires_grad(true);
        let b = Tensor::from_slice(&[0.0f32, 0.0, 4.0])
            .view([1, 3])
            .set_requires_grad(true);
        distillation_loss(&a, &b, 2.0).backward();
        assert!(a.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(!b.grad().defined() || b.grad().abs().sum(Kind::Float).double_value(&[]) == 0.0);
    }

    #[test]
    fn the_confident_ensemble_follows_the_surer_model() {
        // own is sure of class 0, the bridge hedges towards class 1.
        let a = Tensor::from_slice(&[6.0f32, 0.0, 0.0]).view([1, 3]);
        let b = Tensor::from_slice(&[0.0f32, 0.5, 0.0]).view([1, 3]);
        let p = confident_logits(&a, &b).exp();
        let v = Vec::<f32>::try_from(p.view([-1])).unwrap();
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-4, "{v:?}");
        assert!(v[0] > 0.6, "{v:?}");
        let swapped = Vec::<f32>::try_from(confident_logits(&b, &a).exp().view([-1])).unwrap();
        for (x, y) in v.iter().zip(&swapped) {
            assert!((x - y).abs() < 1e-6, "symmetric: {v:?} {swapped:?}");
        }
    }

    #[test]
    fn agreement_counts_the_rows_whose_top_class_is_the_teachers() {
        // own says class 0 everywhere, the bridge follows the teacher.
        let own = Tensor::from_slice(&[3.0f32, 0.0, 3.0, 0.0, 3.0, 0.0, 3.0, 0.0]).view([4, 2]);
        let bridge = Tensor::from_slice(&[2.0f32, 0.0, 0.0, 2.0, 0.0, 2.0, 0.0, 2.0]).view([4, 2]);
        let teacher = Tensor::from_slice(&[0.9f32, 0.1, 0.2, 0.8, 0.3, 0.7, 0.1, 0.9]).view([4, 2]);
        let pair = PairLogits { own, bridge };
        let get = evidence;
        let raw = pair.agreement(None, &teacher).unwrap();
        assert_eq!(get(&raw, ServedModel::Own), 0.25);
        assert_eq!(get(&raw, ServedModel::Bridge), 1.0);
        // a bias that takes out the own model's lean towards class 0
        let bias = Tensor::from_slice(&[-3.0f32, 0.0]);
        let fixed = pair.agreement(Some(&bias), &teacher).unwrap();
        assert_eq!(get(&fixed, ServedModel::Own), 0.25, "ties go to class 0");
        let bias = Tensor::from_slice(&[-4.0f32, 0.0]);
        let fixed = pair.agreement(Some(&bias), &teacher).unwrap();
        assert_eq!(get(&fixed, ServedModel::Own), 0.75);
        let short = Tensor::from_slice(&[0.5f32, 0.5]).view([1, 2]);
        let err = pair.agreement(None, &short).unwrap_err().to_string();
        assert!(err.contains("another pool"), "{err}");
        assert_eq!(evidence(&[], ServedModel::Own), 0.0);
    }

    #[test]
    fn the_ensemble_averages_probabilities() {
        let a = Tensor::from_slice(&[10.0f32, 0.0]).view([1, 2]);
        let b = Tensor::from_slice(&[0.0f32, 10.0]).view([1, 2]);
        let p = ensemble_logits(&a, &b).exp();
        let v = Vec::<f32>::try_from(p.view([-1])).unwrap();
        assert!(
            (v[0] - 0.5).abs() < 1e-3 && (v[1] - 0.5).abs() < 1e-3,
            "{v:?}"
        );
    }
}
