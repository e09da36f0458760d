//! Test fixtures: FederatedTunes, Jobs in given states, a context whose
//! client talks to `tower_test`'s mock service, and an API-server verifier
//! that checks every request (method, path, body) and answers it.

use std::collections::BTreeMap;
use std::sync::Arc;

use heterotune_crds::status::FederatedTuneStatus;
use heterotune_crds::FederatedTune;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStatus, Pod, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::client::Body;
use kube::runtime::reflector;
use kube::runtime::watcher;
use kube::Client;
use serde_json::Value;

use super::context::{Context, OperatorConfig};
use super::reconcile::FINALIZER;
use crate::controller::metrics::Metrics;
use crate::protocol::observe::MemoryRunStore;

pub const NOW: f64 = 1_700_000_000.0;
pub const UID: &str = "0f1e2d3c-4b5a-6978-8091-a2b3c4d5e6f7";
pub const RUN_DIR: &str = "runs/default/trec-0f1e2d3c";
pub const FT_PATH: &str = "/apis/heterotune.dev/v1alpha1/namespaces/default/federatedtunes/trec";
pub const JOBS_PATH: &str = "/apis/batch/v1/namespaces/default/jobs";
pub const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
pub const MANAGER_QUERY: &str = "?&force=true&fieldManager=heterotune-operator";

/// A FederatedTune named `trec` in `default` with `clients` (YAML list items)
/// and `extra` lines under `spec:`; finalizer present, generation 1.
pub fn ft(clients: &str, extra: &str) -> FederatedTune {
    let yaml = format!(
        "apiVersion: heterotune.dev/v1alpha1\nkind: FederatedTune\nmetadata: {{ name: trec }}\nspec:\n  clients:\n{clients}  task:\n    dataset: {{ uri: \"s3://datasets/trec.jsonl\" }}\n    labels: [ABBR, DESC, ENTY, HUM, LOC, NUM]\n  storage:\n    uri: \"s3://artifacts/runs\"\n    endpoint: \"http://minio.storage:9000\"\n    forcePathStyle: true\n    credentialsSecret: {{ name: s3-creds }}\n  trainer: {{ image: \"trainer:test\" }}\n{extra}"
    );
    let mut ft = heterotune_crds::validate::parse_federated_tune(&yaml).expect("valid test spec");
    ft.metadata.namespace = Some("default".into());
    ft.metadata.uid = Some(UID.into());
    ft.metadata.generation = Some(1);
    ft.metadata.finalizers = Some(vec![FINALIZER.into()]);
    ft
}

/// Three small clients c0, c1, c2 (MiniLM: CPU).
pub fn three_clients() -> String {
    (0..3)
        .map(|i| format!("    - name: c{i}\n      model: {{ family: bert, uri: \"cache://models/all-MiniLM-L6-v2\" }}\n"))
        .collect()
}

/// `ft` with `status` (what a previous reconcile wrote).
pub fn with_status(mut ft: FederatedTune, status: FederatedTuneStatus) -> FederatedTune {
    ft.status = Some(status);
    ft
}

fn time(seconds: f64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(seconds as i64).expect("time"))
}

/// How a fixture Job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobEnd {
    Running,
    Succeeded,
    /// Failed: its pod's container exited 1 with a log line.
    Failed,
    /// Failed: its pod's container was OOMKilled.
    OomKilled,
}

/// Annotation on fixture Jobs: how their pod's container ended.
const POD_END: &str = "test.heterotune.dev/pod-end";
/// Annotation on fixture Jobs: their failed pod's termination message
/// (the log's tail), instead of the default one.
const POD_MESSAGE: &str = "test.heterotune.dev/pod-message";

/// `job` (a [`JobEnd::Failed`] one) whose pod's termination message is
/// `message`.
pub fn with_pod_message(mut job: Job, message: &str) -> Job {
    job.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(POD_MESSAGE.into(), message.into());
    job
}

/// A trainer (client Some) or aggregation Job of run `trec`, created at `created`.
pub fn job(round: u32, client: Option<&str>, attempt: u32, end: JobEnd, created: f64) -> Job {
    let (name, role) = match client {
        Some(c) => (
            super::names::trainer_job_name("trec", round, attempt, c),
            "trainer",
        ),
        None => (
            super::names::aggregation_job_name("trec", round, attempt),
            "aggregator",
        ),
    };
    let mut labels = BTreeMap::new();
    labels.insert(super::names::LABEL_RUN_UID.to_string(), UID.to_string());
    labels.insert(super::names::LABEL_ROLE.to_string(), role.to_string());
    labels.insert(super::names::LABEL_ROUND.to_string(), round.to_string());
    labels.insert(super::names::LABEL_ATTEMPT.to_string(), attempt.to_string());
    if let Some(c) = client {
        labels.insert(super::names::LABEL_CLIENT.to_string(), c.to_string());
    }
    let condition = |t: &str| JobCondition {
        type_: t.into(),
        status: "True".into(),
        ..JobCondition::default()
    };
    let mut job = Job {
        metadata: kube::api::ObjectMeta {
            name: Some(name),
            namespace: Some("default".into()),
            labels: Some(labels),
            creation_timestamp: Some(time(created)),
            ..Default::default()
        },
        spec: None,
        status: Some(match end {
            JobEnd::Running => JobStatus {
                active: Some(1),
                ..JobStatus::default()
            },
            JobEnd::Succeeded => JobStatus {
                succeeded: Some(1),
                conditions: Some(vec![condition("Complete")]),
                ..JobStatus::default()
            },
            JobEnd::Failed | JobEnd::OomKilled => JobStatus {
                failed: Some(1),
                conditions: Some(vec![JobCondition {
                    reason: Some("BackoffLimitExceeded".into()),
                    message: Some("Job has reached the specified backoff limit".into()),
                    ..condition("Failed")
                }]),
                ..JobStatus::default()
            },
        }),
    };
    let pod_end = match end {
        JobEnd::Failed => Some("Error"),
        JobEnd::OomKilled => Some("OOMKilled"),
        _ => None,
    };
    if let Some(e) = pod_end {
        job.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(POD_END.into(), e.into());
    }
    job
}

/// `client`'s Job evaluating the global model of `round` (run `trec`).
pub fn evaluation_job(round: u32, client: &str, attempt: u32, end: JobEnd, created: f64) -> Job {
    let mut j = job(round, Some(client), attempt, end, created);
    j.metadata.name = Some(super::names::evaluation_job_name(
        "trec", round, attempt, client,
    ));
    if let Some(l) = j.metadata.labels.as_mut() {
        l.insert(
            super::names::LABEL_ROLE.to_string(),
            super::names::ROLE_EVALUATOR.to_string(),
        );
    }
    j
}

/// The pod the Job controller would have made for a failed fixture Job.
fn failed_pod(job: &Job) -> Option<Pod> {
    let end = job.metadata.annotations.as_ref()?.get(POD_END)?;
    let name = job.metadata.name.clone()?;
    let mut labels = job.metadata.labels.clone().unwrap_or_default();
    labels.insert("batch.kubernetes.io/job-name".into(), name.clone());
    let custom = job.metadata.annotations.as_ref()?.get(POD_MESSAGE).cloned();
    let (exit_code, message) = if end == "OOMKilled" {
        (137, None)
    } else {
        (
            1,
            Some(custom.unwrap_or_else(|| {
                "loading\nError: spec.task.dataset.uri: /data/x.csv: no such file\n".to_string()
            })),
        )
    };
    Some(Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("{name}-x7k2p")),
            namespace: job.metadata.namespace.clone(),
            labels: Some(labels),
            ..Default::default()
        },
        spec: None,
        status: Some(PodStatus {
            phase: Some("Failed".into()),
            container_statuses: Some(vec![ContainerStatus {
                name: "trainer".into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code,
                        reason: Some(end.clone()),
                        message,
                        ..ContainerStateTerminated::default()
                    }),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        }),
    })
}

/// Sizing profiles of the tests: a 24 GiB L4 (tainted) and an 80 GiB A100.
pub fn config() -> OperatorConfig {
    let mut c: OperatorConfig = serde_json::from_value(serde_json::json!({
        "sizing": {
            "gpuProfiles": [
                { "name": "l4-24gb", "memory": "24Gi", "nodeSelector": { "gpu": "l4" },
                  "tolerations": [{ "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" }] },
                { "name": "a100-80gb", "memory": "80Gi", "nodeSelector": { "gpu": "a100" }, "cpu": "8" }
            ]
        },
        "jobs": { "trainerImage": "trainer:default" }
    }))
    .expect("config");
    // One request at a time, so the verifier sees them in a fixed order.
    c.reconcile.api_concurrency = 1;
    c
}

/// A context over a mock API server; `jobs` are the cached Jobs.
pub fn context(
    store: Arc<MemoryRunStore>,
    jobs: Vec<Job>,
    config: OperatorConfig,
) -> (Arc<Context>, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (reader, mut writer) = reflector::store::<Job>();
    let (pod_reader, mut pod_writer) = reflector::store::<Pod>();
    writer.apply_watcher_event(&watcher::Event::Init);
    pod_writer.apply_watcher_event(&watcher::Event::Init);
    for j in jobs {
        if let Some(p) = failed_pod(&j) {
            pod_writer.apply_watcher_event(&watcher::Event::InitApply(p));
        }
        writer.apply_watcher_event(&watcher::Event::InitApply(j));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    pod_writer.apply_watcher_event(&watcher::Event::InitDone);
    // Keep the writers alive (a dropped writer makes the reader unready).
    std::mem::forget(writer);
    std::mem::forget(pod_writer);
    let ctx = Context::new(
        client,
        Arc::new(Metrics::new()),
        config,
        store,
        reader,
        Some("test".into()),
    )
    .with_pods(pod_reader)
    .with_clock(Arc::new(|| NOW));
    (
        Arc::new(ctx),
        ApiServer {
            handle,
            log: Vec::new(),
        },
    )
}

/// One request as the verifier saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub body: Value,
}

/// Plays the API server: each `expect_*` takes the next request, checks it
/// and answers it.
pub struct ApiServer {
    handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    pub log: Vec<Seen>,
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, code: StatusCode, body: &Value) {
    let bytes = serde_json::to_vec(body).expect("json");
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(bytes))
            .expect("response"),
    );
}

impl ApiServer {
    async fn next(&mut self) -> (Seen, tower_test::mock::SendResponse<Response<Body>>) {
        let (request, send) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            self.handle.next_request(),
        )
        .await
        .expect("timed out waiting for a request")
        .expect("the client hung up: a request was expected");
        let method = request.method().clone();
        let uri = request.uri().to_string();
        let bytes = request.into_body().collect_bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("json body")
        };
        let seen = Seen { method, uri, body };
        self.log.push(seen.clone());
        (seen, send)
    }

    /// A Job create; answered with the Job (or `409` when `exists`).
    pub async fn expect_create_job(&mut self, name: &str, exists: bool) -> Job {
        let (seen, send) = self.next().await;
        assert_eq!(
            (seen.method.as_str(), seen.uri.as_str()),
            ("POST", format!("{JOBS_PATH}?").as_str()),
            "{seen:?}"
        );
        let job: Job = serde_json::from_value(seen.body.clone()).expect("a Job");
        assert_eq!(job.metadata.name.as_deref(), Some(name), "job name");
        if exists {
            let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("jobs.batch \"{name}\" already exists"), "reason": "AlreadyExists", "code": 409});
            respond(send, StatusCode::CONFLICT, &status);
        } else {
            respond(send, StatusCode::CREATED, &seen.body);
        }
        job
    }

    /// A Job delete.
    pub async fn expect_delete_job(&mut self, name: &str) {
        let (seen, send) = self.next().await;
        assert_eq!(seen.method, Method::DELETE, "{seen:?}");
        assert!(
            seen.uri.starts_with(&format!("{JOBS_PATH}/{name}?")),
            "{seen:?}"
        );
        assert_eq!(
            seen.body.get("propagationPolicy").and_then(Value::as_str),
            Some("Background"),
            "{seen:?}"
        );
        let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200});
        respond(send, StatusCode::OK, &status);
    }

    /// The spec ConfigMap, applied server-side.
    pub async fn expect_spec_config_map(&mut self) -> Value {
        let (seen, send) = self.next().await;
        assert_eq!(seen.method, Method::PATCH, "{seen:?}");
        assert_eq!(
            seen.uri,
            format!("/api/v1/namespaces/default/configmaps/trec-spec{MANAGER_QUERY}")
        );
        respond(send, StatusCode::OK, &seen.body);
        seen.body
    }

    /// The status, applied server-side; returns it.
    pub async fn expect_status(&mut self, ft: &FederatedTune) -> FederatedTuneStatus {
        let (seen, send) = self.next().await;
        assert_eq!(seen.method, Method::PATCH, "{seen:?}");
        assert_eq!(seen.uri, format!("{FT_PATH}/status{MANAGER_QUERY}"));
        assert_eq!(
            seen.body.get("apiVersion").and_then(Value::as_str),
            Some("heterotune.dev/v1alpha1")
        );
        assert_eq!(
            seen.body.get("kind").and_then(Value::as_str),
            Some("FederatedTune")
        );
        let status: FederatedTuneStatus =
            serde_json::from_value(seen.body["status"].clone()).expect("a status");
        let mut answer = ft.clone();
        answer.status = Some(status.clone());
        respond(
            send,
            StatusCode::OK,
            &serde_json::to_value(&answer).expect("json"),
        );
        status
    }

    /// An Event with `reason`; returns its note.
    pub async fn expect_event(&mut self, reason: &str) -> String {
        let (seen, send) = self.next().await;
        assert_eq!(
            (seen.method.as_str(), seen.uri.as_str()),
            ("POST", format!("{EVENTS_PATH}?").as_str()),
            "{seen:?}"
        );
        assert_eq!(
            seen.body.get("reason").and_then(Value::as_str),
            Some(reason),
            "{seen:?}"
        );
        respond(send, StatusCode::CREATED, &seen.body);
        seen.body
            .get("note")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }

    /// The finalizer added (a JSON patch on the object).
    pub async fn expect_finalizer_added(&mut self, ft: &FederatedTune) {
        let (seen, send) = self.next().await;
        assert_eq!(
            (seen.method.as_str(), seen.uri.as_str()),
            ("PATCH", format!("{FT_PATH}?").as_str()),
            "{seen:?}"
        );
        assert_eq!(
            seen.body,
            serde_json::json!([
                { "op": "test", "path": "/metadata/finalizers", "value": null },
                { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] }
            ])
        );
        respond(
            send,
            StatusCode::OK,
            &serde_json::to_value(ft).expect("json"),
        );
    }

    /// The finalizer removed (a JSON patch on the object).
    pub async fn expect_finalizer_removed(&mut self, ft: &FederatedTune) {
        let (seen, send) = self.next().await;
        assert_eq!(
            (seen.method.as_str(), seen.uri.as_str()),
            ("PATCH", format!("{FT_PATH}?").as_str()),
            "{seen:?}"
        );
        assert_eq!(
            seen.body,
            serde_json::json!([
                { "op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER },
                { "op": "remove", "path": "/metadata/finalizers/0" }
            ])
        );
        respond(
            send,
            StatusCode::OK,
            &serde_json::to_value(ft).expect("json"),
        );
    }

    /// No further request: the client (held by `ctx`) must be gone.
    pub async fn expect_nothing_more(mut self) -> Vec<Seen> {
        let next = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            self.handle.next_request(),
        )
        .await
        .expect("the client was not dropped");
        if let Some((request, _)) = next {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
        self.log
    }
}
