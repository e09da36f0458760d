//! Names, labels and annotations of the objects a run owns: the label keys
//! the operator selects by, the role values, and the deterministic Job names.
//!
//! Job names are deterministic, so a restarted operator re-creating a Job
//! gets `409 AlreadyExists` instead of a duplicate:
//!
//! | Job | name |
//! |---|---|
//! | trainer, first attempt | `<ft>-r<round>-<client>` |
//! | trainer, attempt n ≥ 2 | `<ft>-r<round>a<n>-<client>` |
//! | aggregation | `<ft>-agg-r<round>` (`…a<n>` for attempt n ≥ 2) |
//! | evaluation of the final global model | `<ft>-eval-r<round>-<client>` (`…r<round>a<n>-…`) |
//!
//! Within one FederatedTune the character after `<ft>-r<digits>` (`-` or
//! `a`) and after `<ft>-` (`r`, `a` or `e`) tells the forms apart, so no two
//! Jobs of a run share a name. Names longer than 63 characters (the limit of the
//! `job-name` label the Job controller adds) keep the round/client tail and
//! shorten the FederatedTune part, adding 8 hex digits of the SHA-256 of the
//! full name: `<ft-prefix>-<hash8>-r<round>-<client>`.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::context::MANAGER;
use super::run::Run;

/// Longest Job name (the Job controller copies it into a label value).
pub const MAX_NAME: usize = 63;

/// Label: the FederatedTune's UID (what the operator selects its Jobs by).
pub const LABEL_RUN_UID: &str = "heterotune.dev/run-uid";
/// Label: the FederatedTune's name (shortened with a hash when too long).
pub const LABEL_RUN: &str = "heterotune.dev/federatedtune";
/// Label: `trainer` or `aggregator`.
pub const LABEL_ROLE: &str = "heterotune.dev/role";
/// Label: the round (1-based).
pub const LABEL_ROUND: &str = "heterotune.dev/round";
/// Label: the client (trainer Jobs).
pub const LABEL_CLIENT: &str = "heterotune.dev/client";
/// Label: the attempt within the round (1-based).
pub const LABEL_ATTEMPT: &str = "heterotune.dev/attempt";
/// Label on everything the operator creates.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Annotation: the GPU profile chosen for a trainer.
pub const ANNOTATION_PROFILE: &str = "heterotune.dev/gpu-profile";
/// Annotation: the trainer's memory estimate in bytes.
pub const ANNOTATION_ESTIMATE: &str = "heterotune.dev/estimated-memory-bytes";
/// Annotation: the aggregation's participants (comma-separated).
pub const ANNOTATION_PARTICIPANTS: &str = "heterotune.dev/participants";
/// Role label value of trainer Jobs.
pub const ROLE_TRAINER: &str = "trainer";
/// Role label value of aggregation Jobs.
pub const ROLE_AGGREGATOR: &str = "aggregator";
/// Role label value of the Jobs that evaluate the final global model.
pub const ROLE_EVALUATOR: &str = "evaluator";

fn hash8(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))[..8].to_string()
}

/// `ft` followed by `tail`, within [`MAX_NAME`] characters (see the module docs).
pub fn bounded_name(ft: &str, tail: &str) -> String {
    let full = format!("{ft}{tail}");
    let clean = !ft.contains('.');
    if clean && full.len() <= MAX_NAME {
        return full;
    }
    let hash = hash8(&full);
    let keep = MAX_NAME.saturating_sub(tail.len() + hash.len() + 1);
    let prefix: String = ft.replace('.', "-").chars().take(keep).collect();
    let prefix = prefix.trim_end_matches('-');
    if prefix.is_empty() {
        format!("{hash}{tail}")
    } else {
        format!("{prefix}-{hash}{tail}")
    }
}

/// Name of client `client`'s trainer Job in `round`, attempt `attempt`.
pub fn trainer_job_name(ft: &str, round: u32, attempt: u32, client: &str) -> String {
    if attempt <= 1 {
        bounded_name(ft, &format!("-r{round}-{client}"))
    } else {
        bounded_name(ft, &format!("-r{round}a{attempt}-{client}"))
    }
}

/// Name of client `client`'s Job evaluating the global model of `round`.
pub fn evaluation_job_name(ft: &str, round: u32, attempt: u32, client: &str) -> String {
    if attempt <= 1 {
        bounded_name(ft, &format!("-eval-r{round}-{client}"))
    } else {
        bounded_name(ft, &format!("-eval-r{round}a{attempt}-{client}"))
    }
}

/// Name of the aggregation Job of `round`, attempt `attempt`.
pub fn aggregation_job_name(ft: &str, round: u32, attempt: u32) -> String {
    if attempt <= 1 {
        bounded_name(ft, &format!("-agg-r{round}"))
    } else {
        bounded_name(ft, &format!("-agg-r{round}a{attempt}"))
    }
}

/// Name of the ConfigMap holding the spec.
pub fn spec_config_map_name(ft: &str) -> String {
    bounded_name(ft, "-spec")
}

/// A label value for the FederatedTune's name (≤ 63 characters).
pub fn run_label(ft: &str) -> String {
    if ft.len() <= MAX_NAME {
        ft.to_string()
    } else {
        bounded_name(&ft[..MAX_NAME.min(ft.len())], "")
    }
}

/// Labels of a run's objects; `role`, `round`, `client`, `attempt` when given.
pub fn labels(
    run: &Run,
    role: Option<&str>,
    round: Option<u32>,
    client: Option<&str>,
    attempt: Option<u32>,
) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert("app.kubernetes.io/name".into(), "heterotune".into());
    l.insert(LABEL_MANAGED_BY.into(), MANAGER.into());
    l.insert(LABEL_RUN_UID.into(), run.uid.clone());
    l.insert(LABEL_RUN.into(), run_label(&run.name));
    if let Some(r) = role {
        l.insert("app.kubernetes.io/component".into(), r.into());
        l.insert(LABEL_ROLE.into(), r.into());
    }
    if let Some(r) = round {
        l.insert(LABEL_ROUND.into(), r.to_string());
    }
    if let Some(c) = client {
        l.insert(LABEL_CLIENT.into(), c.into());
    }
    if let Some(a) = attempt {
        l.insert(LABEL_ATTEMPT.into(), a.to_string());
    }
    l
}
