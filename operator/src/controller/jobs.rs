//! The desired objects of a run, built by pure functions: trainer, evaluator
//! and aggregation Jobs (owner, deadline, store environment, resources,
//! placement, security context) and the ConfigMap that hands the spec to the
//! trainer. Their names and labels come from [`super::names`].

use std::collections::BTreeMap;

use heterotune_crds::spec::StorageSpec;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, KeyToPath, LocalObjectReference, PodSecurityContext, PodSpec, PodTemplateSpec,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext, Toleration, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::context::JobConfig;
use super::names::{
    aggregation_job_name, evaluation_job_name, labels, spec_config_map_name, trainer_job_name,
    ANNOTATION_ESTIMATE, ANNOTATION_PARTICIPANTS, ANNOTATION_PROFILE, LABEL_ROLE,
};
use crate::sizing::{quantity_mib, Placement};

// What the builders' callers name next to them (the role picks the Job).
pub use super::names::{ROLE_AGGREGATOR, ROLE_EVALUATOR, ROLE_TRAINER};
pub use super::run::Run;

/// Where the spec ConfigMap is mounted in trainer and aggregation pods.
pub const SPEC_DIR: &str = "/etc/heterotune/spec";
/// The spec file inside [`SPEC_DIR`].
pub const SPEC_FILE: &str = "spec.json";
/// The pods' writable scratch directory (models staged from the store, state).
pub const WORK_DIR: &str = "/work";

/// The trainer pod's command line for one client and round. This is the
/// single place that knows the pods' CLI (`heterotune job`, which stages
/// from the store, runs `heterotune-trainer` and commits; see
/// [`crate::execution::pod_job`]):
///
/// ```text
/// heterotune --log-format json job train --spec /etc/heterotune/spec/spec.json \
///     --client <client> --round <round> --device <cuda|cpu> --work /work
/// ```
///
/// The run's place in the store follows from the spec document (storage URI,
/// namespace, name and UID), so the command names no keys.
pub fn trainer_command(client: &str, round: u32, device: &str) -> Vec<String> {
    let mut v = job_command("train");
    v.extend([
        "--client".into(),
        client.into(),
        "--round".into(),
        round.to_string(),
        "--device".into(),
        device.into(),
    ]);
    v
}

/// The evaluation pod's command line (see [`trainer_command`]): `client`
/// evaluates the global model of `round` on the global test set.
///
/// ```text
/// heterotune --log-format json job evaluate --spec /etc/heterotune/spec/spec.json \
///     --work /work --client <client> --round <round> --device <cuda|cpu>
/// ```
pub fn evaluator_command(client: &str, round: u32, device: &str) -> Vec<String> {
    let mut v = job_command("evaluate");
    v.extend([
        "--client".into(),
        client.into(),
        "--round".into(),
        round.to_string(),
        "--device".into(),
        device.into(),
    ]);
    v
}

/// The aggregation pod's command line (see [`trainer_command`]):
///
/// ```text
/// heterotune --log-format json job aggregate --spec /etc/heterotune/spec/spec.json \
///     --work /work --round <round> --participants <a,b,c>
/// ```
pub fn aggregator_command(round: u32, attempt: u32, participants: &[String]) -> Vec<String> {
    let mut v = job_command("aggregate");
    v.extend([
        "--round".into(),
        round.to_string(),
        "--attempt".into(),
        attempt.to_string(),
        "--participants".into(),
        participants.join(","),
    ]);
    v
}

fn job_command(sub: &str) -> Vec<String> {
    vec![
        "heterotune".into(),
        "--log-format".into(),
        "json".into(),
        "job".into(),
        sub.into(),
        "--spec".into(),
        format!("{SPEC_DIR}/{SPEC_FILE}"),
        "--work".into(),
        WORK_DIR.into(),
    ]
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// The store's environment (object_store's `AWS_*` variables); credentials
/// only as `secretKeyRef`s to `spec.storage.credentialsSecret`.
pub fn store_env(storage: &StorageSpec) -> Vec<EnvVar> {
    let mut v = Vec::new();
    if let Some(endpoint) = &storage.endpoint {
        v.push(env("AWS_ENDPOINT_URL", endpoint.clone()));
        if endpoint.starts_with("http://") {
            v.push(env("AWS_ALLOW_HTTP", "true"));
        }
    }
    if let Some(region) = &storage.region {
        v.push(env("AWS_REGION", region.clone()));
    }
    v.push(env(
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
        (!storage.force_path_style).to_string(),
    ));
    if let Some(secret) = &storage.credentials_secret {
        for (name, key) in [
            ("AWS_ACCESS_KEY_ID", &secret.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", &secret.secret_access_key_key),
        ] {
            v.push(EnvVar {
                name: name.into(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.name.clone(),
                        key: key.clone(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
            });
        }
    }
    v
}

fn quantities(map: BTreeMap<String, String>) -> Option<BTreeMap<String, Quantity>> {
    (!map.is_empty()).then(|| map.into_iter().map(|(k, v)| (k, Quantity(v))).collect())
}

/// Resources, node selector and tolerations of a trainer placed by `placement`.
pub fn placement_resources(
    run: &Run,
    client_index: usize,
    placement: &Placement,
    cpu_request: &str,
) -> (
    ResourceRequirements,
    BTreeMap<String, String>,
    Vec<Toleration>,
) {
    let client = &run.ft.spec.clients[client_index];
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    let mut selector = BTreeMap::new();
    let mut tolerations: Vec<Toleration> = Vec::new();
    match placement {
        Placement::Gpu {
            profile,
            host_memory,
            ..
        } => {
            let n = profile.gpus_per_pod.to_string();
            requests.insert(profile.resource_name.clone(), n.clone());
            limits.insert(profile.resource_name.clone(), n);
            requests.insert("cpu".into(), profile.cpu.clone());
            requests.insert("memory".into(), quantity_mib(*host_memory));
            selector.extend(profile.node_selector.clone());
            tolerations.extend(profile.tolerations.iter().map(toleration));
        }
        Placement::Cpu { estimate } => {
            requests.insert("cpu".into(), cpu_request.to_string());
            requests.insert("memory".into(), quantity_mib(estimate.total));
            limits.insert(
                "memory".into(),
                quantity_mib(estimate.total + estimate.total / 4),
            );
        }
        Placement::Explicit { .. } => {
            if let Some(r) = &client.resources {
                requests = r.requests.clone();
                limits = r.limits.clone();
            }
        }
    }
    selector.extend(client.node_selector.clone());
    tolerations.extend(client.tolerations.iter().map(toleration));
    (
        ResourceRequirements {
            requests: quantities(requests),
            limits: quantities(limits),
            ..ResourceRequirements::default()
        },
        selector,
        tolerations,
    )
}

fn toleration(t: &heterotune_crds::spec::Toleration) -> Toleration {
    Toleration {
        key: t.key.clone(),
        operator: t.operator.clone(),
        value: t.value.clone(),
        effect: t.effect.clone(),
        toleration_seconds: t.toleration_seconds,
    }
}

/// The restricted security context of every container.
pub fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

/// The spec (read-only), the scratch directory and `/tmp` of every pod.
fn volume_mounts() -> Vec<VolumeMount> {
    vec![
        VolumeMount {
            name: "spec".into(),
            mount_path: SPEC_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "work".into(),
            mount_path: WORK_DIR.into(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    ]
}

/// The volumes behind [`volume_mounts`].
fn volumes(run: &Run, config: &JobConfig) -> Vec<Volume> {
    vec![
        Volume {
            name: "spec".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: spec_config_map_name(&run.name),
                items: Some(vec![KeyToPath {
                    key: SPEC_FILE.into(),
                    path: SPEC_FILE.into(),
                    mode: None,
                }]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "work".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: None,
                size_limit: config.work_size_limit.clone().map(Quantity),
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ]
}

/// The restricted security context of every pod, as user and group `uid`
/// (`None`: the platform's choice, e.g. OpenShift's per-namespace UID).
fn pod_security(uid: Option<i64>) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: uid,
        run_as_group: uid,
        fs_group: uid,
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

struct PodParts {
    name: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    command: Vec<String>,
    resources: ResourceRequirements,
    node_selector: BTreeMap<String, String>,
    tolerations: Vec<Toleration>,
    active_deadline: i64,
    ttl: i32,
}

fn job(run: &Run, config: &JobConfig, parts: PodParts) -> Job {
    let spec = &run.ft.spec;
    let image = spec
        .trainer
        .image
        .clone()
        .unwrap_or_else(|| config.trainer_image.clone());
    // HETEROTUNE_CACHE is the image's (a baked, read-only model cache for
    // `cache://` URIs); models from the store are staged under /work.
    let mut env_vars = vec![
        env("HOME", WORK_DIR),
        env("HETEROTUNE_RUN", run.layout.run_dir()),
        env("RUST_LOG", "info"),
    ];
    env_vars.extend(store_env(&spec.storage));
    let container = Container {
        name: parts
            .labels
            .get(LABEL_ROLE)
            .cloned()
            .unwrap_or_else(|| ROLE_TRAINER.into()),
        image: Some(image),
        image_pull_policy: Some(spec.trainer.image_pull_policy.clone()),
        command: Some(parts.command),
        env: Some(env_vars),
        resources: Some(parts.resources),
        security_context: Some(container_security()),
        // A failed container's last log lines become its termination
        // message, which the operator puts into the client's status.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(volume_mounts()),
        ..Container::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        restart_policy: Some("Never".into()),
        service_account_name: spec.trainer.service_account_name.clone(),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        node_selector: (!parts.node_selector.is_empty()).then_some(parts.node_selector),
        tolerations: (!parts.tolerations.is_empty()).then_some(parts.tolerations),
        image_pull_secrets: (!config.image_pull_secrets.is_empty()).then(|| {
            config
                .image_pull_secrets
                .iter()
                .map(|n| LocalObjectReference { name: n.clone() })
                .collect()
        }),
        security_context: Some(pod_security(config.run_as_user)),
        volumes: Some(volumes(run, config)),
        ..PodSpec::default()
    };
    Job {
        metadata: ObjectMeta {
            name: Some(parts.name),
            namespace: Some(run.namespace.clone()),
            labels: Some(parts.labels.clone()),
            annotations: (!parts.annotations.is_empty()).then_some(parts.annotations),
            owner_references: Some(vec![run.owner.clone()]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            // One pod at a time: a replacement (and the operator's retry,
            // which waits for the Job to end) only after the old pod has
            // fully terminated, so two pods never write the same artifact.
            pod_replacement_policy: Some("Failed".into()),
            completions: Some(1),
            parallelism: Some(1),
            active_deadline_seconds: Some(parts.active_deadline.max(1)),
            ttl_seconds_after_finished: Some(parts.ttl),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(parts.labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// How long finished Jobs stay: the configured TTL, but never less than a
/// round can last (deadline + straggler wait + one hour), since a round's
/// failure counts and start time are read from its Jobs.
pub fn job_ttl(run: &Run, config: &JobConfig) -> i32 {
    let spec = &run.ft.spec;
    let round = i64::from(spec.round_deadline_seconds)
        + i64::from(spec.wait_after_min_clients_seconds)
        + 3600;
    i64::from(config.ttl_seconds_after_finished)
        .max(round)
        .min(i64::from(i32::MAX)) as i32
}

/// Client `client_index`'s trainer Job for `round`, attempt `attempt`,
/// allowed to run `active_deadline` seconds (what is left of the round).
#[allow(clippy::too_many_arguments)]
pub fn trainer_job(
    run: &Run,
    client_index: usize,
    round: u32,
    attempt: u32,
    placement: &Placement,
    active_deadline: i64,
    config: &JobConfig,
    cpu_request: &str,
) -> Job {
    client_job(
        run,
        client_index,
        ROLE_TRAINER,
        round,
        attempt,
        placement,
        active_deadline,
        config,
        cpu_request,
    )
}

/// Client `client_index`'s Job of `role`: a trainer ([`ROLE_TRAINER`]) for
/// `round`, or an evaluator ([`ROLE_EVALUATOR`]) of `round`'s global model,
/// placed like its trainer (the same model on the same kind of device).
#[allow(clippy::too_many_arguments)]
pub fn client_job(
    run: &Run,
    client_index: usize,
    role: &'static str,
    round: u32,
    attempt: u32,
    placement: &Placement,
    active_deadline: i64,
    config: &JobConfig,
    cpu_request: &str,
) -> Job {
    let client = &run.ft.spec.clients[client_index].name;
    let device = placement.device();
    let (name, command) = if role == ROLE_EVALUATOR {
        (
            evaluation_job_name(&run.name, round, attempt, client),
            evaluator_command(client, round, device),
        )
    } else {
        (
            trainer_job_name(&run.name, round, attempt, client),
            trainer_command(client, round, device),
        )
    };
    let (resources, node_selector, tolerations) =
        placement_resources(run, client_index, placement, cpu_request);
    let mut annotations = BTreeMap::new();
    annotations.insert(ANNOTATION_PROFILE.to_string(), placement.profile_name());
    if let Some(b) = placement.estimated_bytes() {
        annotations.insert(ANNOTATION_ESTIMATE.to_string(), b.to_string());
    }
    job(
        run,
        config,
        PodParts {
            name,
            labels: labels(run, Some(role), Some(round), Some(client), Some(attempt)),
            annotations,
            command,
            resources,
            node_selector,
            tolerations,
            active_deadline,
            ttl: job_ttl(run, config),
        },
    )
}

/// The aggregation Job of `round` over `participants`.
pub fn aggregation_job(
    run: &Run,
    round: u32,
    attempt: u32,
    participants: &[String],
    active_deadline: i64,
    config: &JobConfig,
) -> Job {
    let mut requests = BTreeMap::new();
    requests.insert("cpu".to_string(), config.aggregator_cpu.clone());
    requests.insert("memory".to_string(), config.aggregator_memory.clone());
    let mut limits = BTreeMap::new();
    limits.insert("memory".to_string(), config.aggregator_memory.clone());
    let mut annotations = BTreeMap::new();
    annotations.insert(ANNOTATION_PARTICIPANTS.to_string(), participants.join(","));
    job(
        run,
        config,
        PodParts {
            name: aggregation_job_name(&run.name, round, attempt),
            labels: labels(run, Some(ROLE_AGGREGATOR), Some(round), None, Some(attempt)),
            annotations,
            command: aggregator_command(round, attempt, participants),
            resources: ResourceRequirements {
                requests: quantities(requests),
                limits: quantities(limits),
                ..ResourceRequirements::default()
            },
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            active_deadline,
            ttl: job_ttl(run, config),
        },
    )
}

/// The spec as the trainer reads it: the object's identity and spec, JSON.
pub fn spec_document(run: &Run) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": heterotune_crds::API_VERSION,
        "kind": heterotune_crds::KIND,
        "metadata": { "name": run.name, "namespace": run.namespace, "uid": run.uid },
        "spec": run.ft.spec,
    })
}

/// The ConfigMap that hands the spec to trainer and aggregation pods.
pub fn spec_config_map(run: &Run) -> ConfigMap {
    let mut data = BTreeMap::new();
    data.insert(SPEC_FILE.to_string(), spec_document(run).to_string());
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(spec_config_map_name(&run.name)),
            namespace: Some(run.namespace.clone()),
            labels: Some(labels(run, None, None, None, None)),
            owner_references: Some(vec![run.owner.clone()]),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod security_tests {
    use super::*;

    #[test]
    fn the_pods_uid_is_the_configs_or_the_platforms() {
        let fixed = pod_security(Some(65532));
        assert_eq!(
            (fixed.run_as_user, fixed.run_as_group, fixed.fs_group),
            (Some(65532), Some(65532), Some(65532))
        );
        // `runAsUser: null` (OpenShift): no UID, still non-root.
        let config: super::super::JobConfig =
            serde_json::from_value(serde_json::json!({ "runAsUser": null })).expect("config");
        let platform = pod_security(config.run_as_user);
        assert_eq!(
            (
                platform.run_as_user,
                platform.run_as_group,
                platform.fs_group
            ),
            (None, None, None)
        );
        assert_eq!(platform.run_as_non_root, Some(true));
        let default: super::super::JobConfig =
            serde_json::from_value(serde_json::json!({})).expect("config");
        assert_eq!(default.run_as_user, Some(65532));
    }
}
