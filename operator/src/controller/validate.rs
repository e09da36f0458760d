//! The checks a reconcile starts with (pure, remembered once per
//! generation): the CRD's schema and CEL rules again, and the cluster-only
//! rules (s3:// storage, a trainer image the operator allows).

use heterotune_crds::validate::{check_object, Problem, ProblemKind};
use heterotune_crds::FederatedTune;

use super::context::{Context, JobConfig};
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
    let problems = validate(run.ft, &ctx.config.jobs);
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
/// again in case the CRD and the operator disagree), that a cluster run
/// stores its artifacts in `s3://`, and that the trainer image it names is
/// one `jobs` allows.
pub fn validate(ft: &FederatedTune, jobs: &JobConfig) -> Vec<Problem> {
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
    if let Some(image) = ft.spec.trainer.image.as_deref() {
        if !jobs.allows_image(image) {
            problems.push(Problem {
                path: "spec.trainer.image".into(),
                kind: ProblemKind::Rule,
                message: format!(
                    "is {image:?}: this operator runs only the trainer images its configuration \
                     allows (config.jobs.allowedTrainerImages: {:?}): name one of them, or leave \
                     the field unset for the default {:?}",
                    jobs.allowed_trainer_images, jobs.trainer_image
                ),
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(allowed: &[&str]) -> JobConfig {
        JobConfig {
            trainer_image: "ghcr.io/heterotune/trainer:1.0".into(),
            allowed_trainer_images: allowed.iter().map(|s| s.to_string()).collect(),
            ..JobConfig::default()
        }
    }

    #[test]
    fn an_allowed_image_is_a_listed_reference_or_one_under_a_listed_prefix() {
        let j = jobs(&["registry.example/ml", "ghcr.io/heterotune/trainer@sha256:"]);
        for ok in [
            "registry.example/ml",
            "registry.example/ml/trainer:1",
            "registry.example/ml:2",
            "ghcr.io/heterotune/trainer@sha256:abcd",
            // the default is always allowed
            "ghcr.io/heterotune/trainer:1.0",
        ] {
            assert!(j.allows_image(ok), "{ok}");
        }
        for refused in [
            "registry.example/ml-evil:1",
            "registry.example/m",
            "ghcr.io/heterotune/trainer:2.0",
            "docker.io/attacker/trainer:latest",
        ] {
            assert!(!j.allows_image(refused), "{refused}");
        }
        assert!(
            jobs(&[]).allows_image("anything:at-all"),
            "empty: any image"
        );
    }

    #[test]
    fn a_trainer_image_outside_the_allowed_list_is_refused_naming_the_field_and_the_fix() {
        let mut ft =
            crate::controller::fixtures::ft(&crate::controller::fixtures::three_clients(), "");
        let allowed = jobs(&["registry.example/ml/"]);
        ft.spec.trainer.image = None;
        assert!(validate(&ft, &allowed).is_empty(), "unset: the default");
        ft.spec.trainer.image = Some("registry.example/ml/trainer:3".into());
        assert!(validate(&ft, &allowed).is_empty());
        ft.spec.trainer.image = Some("docker.io/attacker/steal:latest".into());
        let problems = validate(&ft, &allowed);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "spec.trainer.image");
        let text = problems[0].to_string();
        for part in [
            "docker.io/attacker/steal:latest",
            "config.jobs.allowedTrainerImages",
            "registry.example/ml/",
            "leave the field unset",
        ] {
            assert!(text.contains(part), "{part} in {text}");
        }
        assert!(validate(&ft, &jobs(&[])).is_empty(), "no list: any image");
    }
}
