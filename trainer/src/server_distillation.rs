//! The server's step on the bridge (`bridge.distillation.serverSteps`,
//! FedDF's ensemble distillation): after a round's average, the aggregator
//! trains the bridge's adapters and head on the public pool against the
//! round's ensemble before it writes the global.
//!
//! Why: each client's bridge spends its local steps on the client's own,
//! skewed labels, so the average of the clients' bridges sits below the
//! ensemble that taught them. Measured worse than without it on unseen seeds
//! (docs/method.md, "The server's step on the bridge"): off by default.
//! The step reads no label: the pool's texts and the ensemble the clients
//! sent. It is deterministic: the batch order is seeded by the spec's seed
//! and the round, and the same inputs give the same global.

use std::collections::BTreeMap;
use std::time::Instant;

use heterotune_crds::spec::FederatedTuneSpec;
use tch::{Device, Kind, Tensor};

use crate::aggregate::common::{BRIDGE_PREFIX, POOL_ENSEMBLE};
use crate::aggregate::{Array, ServerDistillationStats};
use crate::client::bridge::load_bridge;
use crate::client::settings;
use crate::data::partition::federate;
use crate::error::Context as _;
use crate::{job, mutual, Error, Result};

/// The spec field that turns the step on (in error messages).
const FIELD: &str = "spec.bridge.distillation.serverSteps";

/// Distils the bridge of the round's global `tensors` (`bridge.*`, already
/// averaged) on the public pool against the global's ensemble
/// ([`POOL_ENSEMBLE`]) for `serverSteps` steps and puts the result back;
/// `None` (nothing done) without a bridge or with `serverSteps: 0`.
///
/// # Errors
/// [`Error::Config`] naming `serverSteps` when the global holds no ensemble
/// or the aggregator cannot read the task's dataset or the bridge's model
/// (a cluster aggregation Job that cannot reach them); the errors of
/// loading and training otherwise.
pub fn distil_bridge(
    spec: &FederatedTuneSpec,
    round: u32,
    tensors: &mut BTreeMap<String, Array>,
) -> Result<Option<ServerDistillationStats>> {
    let Some(bridge_spec) = spec.bridge.as_ref() else {
        return Ok(None);
    };
    let steps = bridge_spec.distillation.server_steps;
    if steps == 0 {
        return Ok(None);
    }
    let start = Instant::now();
    let ensemble = tensors.get(POOL_ENSEMBLE).ok_or_else(|| {
        Error::config(
            FIELD,
            "the round's global holds no pool ensemble to distil from: it needs \
             poolTeacher ensemble and task.splits.pool above 0",
        )
    })?;
    let teacher = to_tensor(ensemble)?;
    let data = federate(&job::data_config(spec)?).context_with(|| {
        format!(
            "reading the public pool for the server's distillation ({FIELD}): the aggregator \
             must be able to read spec.task.dataset"
        )
    })?;
    let classes = data.labels.len();
    let mut bridge = load_bridge(spec, Device::Cpu, classes)
        .context_with(|| {
            format!(
                "loading the bridge for the server's distillation ({FIELD}): the aggregator \
                 must be able to read spec.bridge.model"
            )
        })?
        .ok_or_else(|| Error::config("spec.bridge", "no bridge model loaded"))?;
    let averaged: BTreeMap<String, Tensor> = tensors
        .range(BRIDGE_PREFIX.to_string()..)
        .take_while(|(name, _)| name.starts_with(BRIDGE_PREFIX))
        .map(|(name, a)| Ok((name.clone(), to_tensor(a)?)))
        .collect::<Result<_>>()?;
    let loaded = bridge.import(&averaged)?;
    if loaded != bridge.all_names.len() {
        return Err(Error::config(
            "spec.bridge",
            format!(
                "the round's global holds {loaded} of the bridge's {} tensors",
                bridge.all_names.len()
            ),
        ));
    }
    // The server is the run's member after the last client: its batch order
    // is seeded apart from every client's.
    let mut train = settings(spec, round, spec.clients.len(), None);
    train.steps = steps as usize;
    train.learning_rate = bridge_spec.learning_rate.unwrap_or(train.learning_rate);
    let model_id = bridge.model_id(bridge_spec);
    let pool = bridge.model.prepare(&data.pool, &train, &model_id)?;
    let temperature = bridge_spec.distillation.temperature;
    // The ensemble as logits (log-probabilities), once for both passes.
    let target = teacher.clamp_min(1e-8).log();
    let whole_pool = |model: &crate::train::ClientModel| -> Result<f64> {
        let logits = model.logits(&pool, train.eval_batch_size)?;
        Ok(mutual::distillation_loss(&logits, &target, temperature).double_value(&[]))
    };
    let kl_before = whole_pool(&bridge.model)?;
    let losses = mutual::distil_on_pool(&mut bridge.model, &pool, &teacher, &train, temperature)?;
    let kl_after = whole_pool(&bridge.model)?;
    for (name, value) in bridge.export()? {
        tensors.insert(name, to_array(&value)?);
    }
    Ok(Some(ServerDistillationStats {
        steps,
        pool_texts: pool.len(),
        last_batch_loss: losses.last().copied().unwrap_or(f64::NAN),
        kl_before,
        kl_after,
        seconds: start.elapsed().as_secs_f64(),
    }))
}

/// An f32 tensor of `a`'s shape and values.
fn to_tensor(a: &Array) -> Result<Tensor> {
    let shape: Vec<i64> = a.shape.iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_slice(&a.data)?.f_reshape(shape)?)
}

/// `t`'s values as an [`Array`] (f32, on the CPU).
fn to_array(t: &Tensor) -> Result<Array> {
    let shape = t.size().iter().map(|&d| d as usize).collect();
    let flat = t
        .f_to_kind(Kind::Float)?
        .f_to_device(Device::Cpu)?
        .f_contiguous()?
        .f_view([-1])?;
    Array::new(shape, Vec::<f32>::try_from(&flat)?)
}
