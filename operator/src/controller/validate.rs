//! The checks a reconcile starts with (pure, remembered once per
//! generation): the CRD's schema and CEL rules again, and the cluster-only
//! rules (s3:// storage).

use heterotune_crds::validate::{check_object, Problem, ProblemKind};
use heterotune_crds::FederatedTune;

use super::context::Context;
use super::error::{Error, Result};
use super::run::Run;

/// Checks `run`'s spec, once per generation (validation depends on the spec
/// alone, which changes only with the generation): an invalid spec is
/// [`Error::InvalidSpec`] with every problem and its field path.
pub fn check(ctx: &Context, run: &Run) -> Result<()> {
    let generation = run.ft.metadata.generation.unwrap_or(0);
    if ctx.memory().valid_generations.get(&run.uid) == Some(&generation) {
        return Ok(());
    }
    let problems = validate(run.ft);
    if !problems.is_empty() {
        return Err(Error::InvalidSpec(problems_message(&problems)));
    }
    ctx.memory()
        .valid_generations
        .insert(run.uid.clone(), generation);
    Ok(())
}

/// Cluster-level checks on top of the CRD's own: the schema and CEL rules
/// (what the API server enforced when the object was written, evaluated
/// again in case the CRD and the operator disagree) and that a cluster run
/// stores its artifacts in `s3://`.
pub fn validate(ft: &FederatedTune) -> Vec<Problem> {
    let mut value = match serde_json::to_value(ft) {
        Ok(v) => v,
        Err(e) => {
            return vec![Problem {
                path: "spec".into(),
                kind: ProblemKind::Type,
                message: e.to_string(),
            }]
        }
    };
    if let Some(map) = value.as_object_mut() {
        map.remove("status");
        if let Some(meta) = map.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.retain(|k, _| k == "name" || k == "namespace");
        }
    }
    let mut problems = check_object(&mut value, None);
    if !ft.spec.storage.is_s3() {
        problems.push(Problem {
            path: "spec.storage.uri".into(),
            kind: ProblemKind::Rule,
            message: format!(
                "is {:?}: a cluster run needs s3:// storage (local folders exist on one machine only)",
                ft.spec.storage.uri
            ),
        });
    }
    problems
}

fn problems_message(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}
