//! A client's evaluation of a global model on the global test set: the
//! evaluation record (`heterotune-trainer eval`).

use std::path::Path;

use heterotune_crds::manifest::{now_rfc3339, EvaluationResult, MANIFEST_SCHEMA_VERSION};
use heterotune_crds::spec::ServedModel;

use super::load::{load_client, settings, ClientOptions};
use crate::artifact::{self, WRITER_VERSION};
use crate::calibration::fit_bias;
use crate::data::source::Example;
use crate::mutual::{evidence, PairLogits, PairScores};
use crate::Result;

/// Evaluates client `opts.client` with the global in `global` (and its
/// private state `state_in`) on the global test set; writes the result as
/// an evaluation record (JSON) to `out` when given.
pub fn evaluate(
    opts: &ClientOptions,
    global: Option<&Path>,
    state_in: Option<&Path>,
    cache_dir: Option<&Path>,
    out: Option<&Path>,
    run: &str,
) -> Result<EvaluationResult> {
    let start = std::time::Instant::now();
    let loaded = load_client(opts, global, state_in)?;
    let client = loaded.spec_client();
    let settings = settings(&loaded.spec, loaded.base_round, loaded.index, cache_dir);
    let (batch, classes) = (settings.eval_batch_size, loaded.num_classes);
    let ((scores, loss), variants, served) = match (&loaded.bridge, &loaded.spec.bridge) {
        (Some(b), Some(spec)) => {
            let bridge_id = b.model_id(spec);
            let (calibration, teacher) = (loaded.calibration_teacher(), loaded.agreement_teacher());
            let own_pool = match (calibration, teacher) {
                (None, None) => None,
                _ => Some(
                    loaded.model.logits(
                        &loaded
                            .model
                            .prepare(&loaded.pool, &settings, &loaded.model_id())?,
                        batch,
                    )?,
                ),
            };
            // The own model's calibration bias (`bridge.calibration`).
            let bias = match (calibration, &own_pool) {
                (Some(t), Some(logits)) => Some(fit_bias(logits, t)?),
                _ => None,
            };
            let agreement = match (teacher, own_pool) {
                (Some(t), Some(own)) => {
                    let pool = b.model.prepare(&loaded.pool, &settings, &bridge_id)?;
                    let bridge = b.model.logits(&pool, batch)?;
                    PairLogits { own, bridge }.agreement(bias.as_ref(), t)?
                }
                _ => Vec::new(),
            };
            let pair = |examples: &[Example]| -> Result<PairScores> {
                let own = loaded
                    .model
                    .prepare(examples, &settings, &loaded.model_id())?;
                let bridge = b.model.prepare(examples, &settings, &bridge_id)?;
                let logits = PairLogits::of((&loaded.model, &own), (&b.model, &bridge), batch)?;
                PairScores::from_logits(&logits, bias.as_ref(), &own, classes)
            };
            let test_scores = pair(&loaded.test)?;
            // `validated` reads the client's validation split, as in training.
            let val = match spec.serve {
                ServedModel::Validated => Some(pair(&loaded.validation)?),
                _ => None,
            };
            let served = spec
                .serve
                .choose(&client.model.uri, &spec.model.uri, |v| match &val {
                    Some(s) => s.get(v).0.accuracy,
                    None => evidence(&agreement, v),
                });
            (
                *test_scores.get(served),
                test_scores.accuracies(),
                Some(served.as_str().to_string()),
            )
        }
        _ => {
            let test = loaded
                .model
                .prepare(&loaded.test, &settings, &loaded.model_id())?;
            (
                loaded.model.evaluate(&test, batch, classes)?,
                Default::default(),
                None,
            )
        }
    };
    let result = EvaluationResult {
        schema_version: MANIFEST_SCHEMA_VERSION,
        run: run.to_string(),
        client: client.name.clone(),
        family: loaded.family_key.clone(),
        global_round: loaded.base_round,
        test_examples: scores.examples as u64,
        accuracy: scores.accuracy,
        macro_f1: scores.macro_f1,
        loss: loss.is_finite().then_some(loss),
        seconds: Some(start.elapsed().as_secs_f64()),
        variants,
        served,
        writer_version: WRITER_VERSION.to_string(),
        created_at: now_rfc3339(),
    };
    if let Some(file) = out {
        artifact::write_atomic(file, &to_json(&result)?)?;
    }
    Ok(result)
}

/// An evaluation record as the trainer writes and prints it (compact JSON).
pub fn to_json(result: &EvaluationResult) -> Result<Vec<u8>> {
    serde_json::to_vec(result)
        .map_err(|e| crate::Error::config("evaluation", format!("cannot serialise: {e}")))
}
