//! The controller against a mock API server: each test states the exact
//! requests a reconcile must send, in order, and that nothing else is sent.

use std::sync::Arc;

use heterotune_crds::spec::RetentionPolicy;
use heterotune_crds::status::{Phase, RoundSummary};
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::controller::Action;
use serde_json::Value;

use super::error::Category;
use super::fixtures::*;
use super::names;
use super::reconcile::{error_policy, reconcile};
use crate::protocol::observe::MemoryRunStore;

const MINILM_L3: &str = r#"{"model_type":"bert","hidden_size":384,"intermediate_size":1536,"num_hidden_layers":3,
    "num_attention_heads":12,"vocab_size":30522,"max_position_embeddings":512,"type_vocab_size":2}"#;
const LLAMA_7B: &str = r#"{"model_type":"llama","hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,
    "num_attention_heads":32,"num_key_value_heads":32,"vocab_size":32000,"tie_word_embeddings":false}"#;

fn cond<'a>(
    s: &'a heterotune_crds::status::FederatedTuneStatus,
    t: &str,
) -> &'a heterotune_crds::status::Condition {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .unwrap_or_else(|| panic!("no {t} condition"))
}

fn container(job: &Job) -> &k8s_openapi::api::core::v1::Container {
    &job.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
        .containers[0]
}

fn pod(job: &Job) -> &k8s_openapi::api::core::v1::PodSpec {
    job.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
}

fn quantity(job: &Job, which: &str, key: &str) -> Option<String> {
    let r = container(job).resources.as_ref()?;
    let map = if which == "limits" {
        r.limits.as_ref()?
    } else {
        r.requests.as_ref()?
    };
    map.get(key).map(|q| q.0.clone())
}

/// Fails the test (instead of hanging it) when a reconcile waits for an
/// answer the script does not give.
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("reconcile hung: it sent a request the script does not answer"))
}

#[tokio::test]
async fn a_new_object_gets_the_finalizer_first() {
    let mut f = ft(&three_clients(), "");
    f.metadata.finalizers = None;
    let (ctx, mut api) = context(Arc::new(MemoryRunStore::default()), vec![], config());
    let answer = ft(&three_clients(), "");
    let server = tokio::spawn(async move {
        api.expect_finalizer_added(&answer).await;
        api
    });
    let action = bounded(reconcile(Arc::new(f), ctx.clone()))
        .await
        .expect("reconcile");
    assert_eq!(action, Action::await_change());
    drop(ctx);
    server.await.expect("server").expect_nothing_more().await;
}

#[tokio::test]
async fn a_new_run_creates_trainer_jobs_sized_to_each_model() {
    let clients = "    - name: small\n      model: { family: bert, uri: \"cache://models/all-MiniLM-L6-v2\" }\n    \
                   - name: big\n      model: { family: llama, uri: \"s3://models/llama-7b\", dtype: bfloat16 }\n    \
                   - name: huge\n      model: { family: llama, uri: \"s3://models/private-13b\", dtype: bfloat16, parameters: 13000000000 }\n      nodeSelector: { zone: a }\n";
    let f = ft(clients, "");
    let store = Arc::new(MemoryRunStore::default());
    store.put_model_config(
        "s3://models/llama-7b",
        serde_json::from_str(LLAMA_7B).expect("json"),
    );
    let (ctx, mut api) = context(store.clone(), vec![], config());
    let answer = f.clone();
    let server = tokio::spawn(async move {
        let cm = api.expect_spec_config_map().await;
        let small = api.expect_create_job("trec-r1-small", false).await;
        let big = api.expect_create_job("trec-r1-big", false).await;
        let huge = api.expect_create_job("trec-r1-huge", false).await;
        let status = api.expect_status(&answer).await;
        let note = api.expect_event("RoundStarted").await;
        (api, cm, [small, big, huge], status, note)
    });
    let action = bounded(reconcile(Arc::new(f.clone()), ctx.clone()))
        .await
        .expect("reconcile");
    assert_eq!(action, Action::requeue(std::time::Duration::from_secs(30)));
    drop(ctx);
    let (api, cm, [small, big, huge], status, note) = server.await.expect("server");
    api.expect_nothing_more().await;

    // The spec ConfigMap: the trainer's whole input, owned by the run.
    let spec_json: Value =
        serde_json::from_str(cm["data"]["spec.json"].as_str().expect("spec.json")).expect("json");
    assert_eq!(spec_json["metadata"]["uid"], UID);
    assert_eq!(spec_json["spec"]["clients"][1]["name"], "big");
    assert_eq!(cm["metadata"]["ownerReferences"][0]["uid"], UID);

    // The CPU client: memory from the estimate, no GPU.
    assert_eq!(quantity(&small, "requests", "cpu").as_deref(), Some("2"));
    assert!(quantity(&small, "requests", "memory").is_some_and(|m| m.ends_with("Mi")));
    assert!(quantity(&small, "limits", "nvidia.com/gpu").is_none());
    assert_eq!(
        small
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(names::ANNOTATION_PROFILE))
            .map(String::as_str),
        Some("cpu")
    );
    assert!(container(&small)
        .command
        .as_ref()
        .is_some_and(|c| c.contains(&"cpu".to_string())));

    // LLaMA-7B in bf16 (config.json from the store): one 24 GiB L4.
    assert_eq!(
        quantity(&big, "limits", "nvidia.com/gpu").as_deref(),
        Some("1")
    );
    assert_eq!(
        quantity(&big, "requests", "nvidia.com/gpu").as_deref(),
        Some("1")
    );
    let big_pod = pod(&big);
    assert_eq!(
        big_pod
            .node_selector
            .as_ref()
            .and_then(|n| n.get("gpu"))
            .map(String::as_str),
        Some("l4")
    );
    assert_eq!(
        big_pod.tolerations.as_ref().map(|t| t[0].key.as_deref()),
        Some(Some("nvidia.com/gpu"))
    );
    // 13B from `parameters`: the 80 GiB profile, the client's own selector merged in.
    assert_eq!(
        quantity(&huge, "limits", "nvidia.com/gpu").as_deref(),
        Some("1")
    );
    assert_eq!(quantity(&huge, "requests", "cpu").as_deref(), Some("8"));
    let sel = pod(&huge).node_selector.clone().unwrap_or_default();
    assert_eq!(
        (
            sel.get("gpu").map(String::as_str),
            sel.get("zone").map(String::as_str)
        ),
        (Some("a100"), Some("a"))
    );

    // What every trainer Job carries.
    for job in [&small, &big, &huge] {
        assert_trainer_basics(job);
    }

    assert_round_one_started(&status);
    assert_eq!(note, "round 1 started");
}

/// What every trainer Job of the first round carries: owner, labels,
/// command, store credentials by reference, restricted security.
fn assert_trainer_basics(job: &Job) {
    let spec = job.spec.as_ref().expect("job spec");
    assert_eq!(spec.backoff_limit, Some(0));
    assert_eq!(spec.pod_replacement_policy.as_deref(), Some("Failed"));
    assert_eq!(spec.active_deadline_seconds, Some(3600));
    let owner = &job.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("FederatedTune", UID, Some(true))
    );
    let labels = job.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get(names::LABEL_RUN_UID).map(String::as_str),
        Some(UID)
    );
    assert_eq!(
        labels.get(names::LABEL_ROUND).map(String::as_str),
        Some("1")
    );
    let c = container(job);
    assert_eq!(c.image.as_deref(), Some("trainer:test"));
    let cmd = c.command.clone().unwrap_or_default();
    let client = labels.get(names::LABEL_CLIENT).cloned().unwrap_or_default();
    let device = if client == "small" { "cpu" } else { "cuda" };
    let expected: Vec<String> = [
        "heterotune",
        "--log-format",
        "json",
        "job",
        "train",
        "--spec",
        "/etc/heterotune/spec/spec.json",
        "--work",
        "/work",
        "--client",
        &client,
        "--round",
        "1",
        "--device",
        device,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    assert_eq!(cmd, expected);
    let env = c.env.clone().unwrap_or_default();
    let key = env
        .iter()
        .find(|e| e.name == "AWS_SECRET_ACCESS_KEY")
        .expect("secret env");
    assert!(key.value.is_none(), "credentials only by reference");
    let r = key
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("secretKeyRef");
    assert_eq!(
        (r.name.as_str(), r.key.as_str()),
        ("s3-creds", "AWS_SECRET_ACCESS_KEY")
    );
    assert!(env.iter().any(
        |e| e.name == "AWS_VIRTUAL_HOSTED_STYLE_REQUEST" && e.value.as_deref() == Some("false")
    ));
    let sc = c.security_context.as_ref().expect("security context");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()])
    );
    let psc = pod(job).security_context.as_ref().expect("pod security");
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );
    assert_eq!(pod(job).restart_policy.as_deref(), Some("Never"));
}

/// Status after the first reconcile: round 1 running, every client
/// training, estimates shown.
fn assert_round_one_started(status: &heterotune_crds::status::FederatedTuneStatus) {
    // Status: running round 1, every client training, estimates shown.
    assert_eq!(status.phase, Some(Phase::Running));
    assert_eq!(
        (status.round, status.progress.as_deref()),
        (1, Some("0/10"))
    );
    let states: Vec<(&str, &str, u32, Option<&str>)> = status
        .clients
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.state.as_str(),
                c.attempts,
                c.gpu_profile.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            ("small", "Training", 1, Some("cpu")),
            ("big", "Training", 1, Some("l4-24gb")),
            ("huge", "Training", 1, Some("a100-80gb"))
        ]
    );
    assert!(status
        .clients
        .iter()
        .all(|c| c.estimated_memory_bytes.is_some()));
    assert_eq!(cond(status, "Ready").status, "True");
    assert_eq!(cond(status, "Progressing").reason, "RoundInProgress");
    assert_eq!(cond(status, "Degraded").status, "False");
    assert_eq!(status.start_time.as_deref(), Some("2023-11-14T22:13:20Z"));
    assert_eq!(
        status.artifacts.as_ref().map(|a| a.prefix.as_str()),
        Some("s3://artifacts/runs/default/trec-0f1e2d3c")
    );
}

/// Runs one reconcile of `f` against `script` (which plays the API server
/// and returns it with what it captured); `after` sees the result and the
/// context before the client goes; then no further request may come.
async fn scenario<T, Fut>(
    f: &heterotune_crds::FederatedTune,
    store: Arc<MemoryRunStore>,
    cached: Vec<Job>,
    script: impl FnOnce(ApiServer) -> Fut,
    after: impl FnOnce(&super::Result<Action>, &Arc<super::Context>),
) -> (super::Result<Action>, T)
where
    Fut: std::future::Future<Output = (ApiServer, T)> + Send + 'static,
    T: Send + 'static,
{
    let (ctx, api) = context(store, cached, config());
    let server = tokio::spawn(script(api));
    let result = bounded(reconcile(Arc::new(f.clone()), ctx.clone())).await;
    after(&result, &ctx);
    drop(ctx);
    let (api, captured) = server.await.expect("server");
    api.expect_nothing_more().await;
    (result, captured)
}

fn ok(r: &super::Result<Action>, _: &Arc<super::Context>) {
    if let Err(e) = r {
        panic!("reconcile failed: {e}");
    }
}

#[tokio::test]
async fn a_failed_job_is_retried_then_the_client_is_excluded() {
    let f = ft(&three_clients(), "  maxRetriesPerClient: 1\n");
    let store = Arc::new(MemoryRunStore::default());
    let t0 = NOW - 100.0;
    let first = vec![
        job(1, Some("c0"), 1, JobEnd::Failed, t0),
        job(1, Some("c1"), 1, JobEnd::Running, t0),
        job(1, Some("c2"), 1, JobEnd::Running, t0),
    ];
    // Attempt 2, with what is left of the round as its deadline.
    let answer = f.clone();
    let (_, s1) = scenario(
        &f,
        store.clone(),
        first.clone(),
        |mut api| async move {
            api.expect_spec_config_map().await;
            let retry = api.expect_create_job("trec-r1a2-c0", false).await;
            assert_eq!(
                retry.spec.as_ref().and_then(|s| s.active_deadline_seconds),
                Some(3500)
            );
            let attempt = retry
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(names::LABEL_ATTEMPT))
                .cloned();
            assert_eq!(attempt.as_deref(), Some("2"));
            let s = api.expect_status(&answer).await;
            api.expect_event("RoundStarted").await;
            assert_eq!(
                api.expect_event("ClientRetry").await,
                "client c0: attempt 2 of round 1"
            );
            (api, s)
        },
        ok,
    )
    .await;
    assert_eq!(
        (s1.clients[0].state.as_str(), s1.clients[0].attempts),
        ("Training", 2)
    );
    assert_eq!(
        s1.clients[0].message, None,
        "a running client shows no old failure"
    );
    assert_eq!(
        s1.start_time.as_deref(),
        Some("2023-11-14T22:11:40Z"),
        "the round began with its first Job"
    );

    // Attempt 2 failed too: excluded; the run is degraded but goes on.
    let mut second = first;
    second.push(job(1, Some("c0"), 2, JobEnd::OomKilled, NOW - 50.0));
    let f2 = with_status(f.clone(), s1);
    let answer = f2.clone();
    let (_, s2) = scenario(
        &f2,
        store,
        second,
        |mut api| async move {
            let s = api.expect_status(&answer).await;
            api.expect_event("ClientsExcluded").await;
            let note = api.expect_event("ClientExcluded").await;
            assert_eq!(
                note,
                "client c0 is out of round 1 after 2 failed attempts (last: attempt 2: \
                 OOMKilled (exit 137): out of memory; raise the client's memory \
                 (spec.clients[].resources or a larger GPU profile) or lower \
                 training.batchSize / maxSeqLength)"
            );
            (api, s)
        },
        ok,
    )
    .await;
    assert_eq!(s2.clients[0].state, "Excluded");
    assert_eq!(s2.phase, Some(Phase::Running));
    let degraded = cond(&s2, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "ClientsExcluded")
    );
    assert_eq!(cond(&s2, "Ready").status, "True");
}

/// A credential a failed pod printed (its termination message, the log's
/// tail) is redacted in everything the controller publishes: the client's
/// status message and the Event that excludes it.
#[tokio::test]
async fn a_credential_in_a_failed_pods_log_reaches_no_status_or_event() {
    const CANARY: &str = "htcanary-secret-9c41d2e8";
    let leak = format!("loading\nError: bad row: `AWS_SECRET_ACCESS_KEY={CANARY}`\n");
    let f = ft(&three_clients(), "  maxRetriesPerClient: 1\n");
    let jobs = vec![
        with_pod_message(job(1, Some("c0"), 1, JobEnd::Failed, NOW - 100.0), &leak),
        with_pod_message(job(1, Some("c0"), 2, JobEnd::Failed, NOW - 50.0), &leak),
        job(1, Some("c1"), 1, JobEnd::Running, NOW - 100.0),
        job(1, Some("c2"), 1, JobEnd::Running, NOW - 100.0),
    ];
    let answer = f.clone();
    let (_, (status, notes)) = scenario(
        &f,
        Arc::new(MemoryRunStore::default()),
        jobs,
        |mut api| async move {
            let s = api.expect_status(&answer).await;
            let mut notes = vec![api.expect_event("ClientsExcluded").await];
            notes.push(api.expect_event("RoundStarted").await);
            notes.push(api.expect_event("ClientExcluded").await);
            (api, (s, notes))
        },
        ok,
    )
    .await;
    assert_eq!(status.clients[0].state, "Excluded");
    let published = format!(
        "{}\n{}",
        serde_json::to_string(&status).expect("status"),
        notes.join("\n")
    );
    assert!(!published.contains(CANARY), "{published}");
    assert!(
        published.contains("AWS_SECRET_ACCESS_KEY=<redacted>"),
        "the failure is still shown: {published}"
    );
}

#[tokio::test]
async fn quorum_in_the_store_starts_the_aggregation_and_cancels_stragglers() {
    let f = ft(
        &three_clients(),
        "  minClients: 2\n  waitAfterMinClientsSeconds: 60\n",
    );
    let store = Arc::new(MemoryRunStore::default());
    store.commit(RUN_DIR, 1, "c0", NOW - 200.0);
    store.commit(RUN_DIR, 1, "c1", NOW - 120.0);
    let cached = vec![
        job(1, Some("c0"), 1, JobEnd::Succeeded, NOW - 300.0),
        job(1, Some("c1"), 1, JobEnd::Succeeded, NOW - 300.0),
        job(1, Some("c2"), 1, JobEnd::Running, NOW - 300.0),
    ];
    let answer = f.clone();
    let (_, (agg, status, note)) = scenario(
        &f,
        store,
        cached,
        |mut api| async move {
            api.expect_spec_config_map().await;
            let agg = api.expect_create_job("trec-agg-r1", false).await;
            api.expect_delete_job("trec-r1-c2").await;
            let status = api.expect_status(&answer).await;
            api.expect_event("Aggregating").await;
            let note = api.expect_event("StragglersCancelled").await;
            (api, (agg, status, note))
        },
        ok,
    )
    .await;
    let cmd = container(&agg).command.clone().unwrap_or_default();
    assert_eq!(
        cmd.join(" "),
        "heterotune --log-format json job aggregate --spec /etc/heterotune/spec/spec.json \
         --work /work --round 1 --attempt 1 --participants c0,c1"
    );
    let labels = agg.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get(names::LABEL_ROLE).map(String::as_str),
        Some("aggregator")
    );
    assert_eq!(quantity(&agg, "requests", "cpu").as_deref(), Some("1"));
    assert_eq!(status.phase, Some(Phase::Aggregating));
    assert_eq!(status.ready_clients, 2);
    assert_eq!(note, "round 1: stopped trec-r1-c2");
}

#[tokio::test]
async fn a_restart_mid_round_creates_nothing_twice() {
    let f = ft(&three_clients(), "");
    let store = Arc::new(MemoryRunStore::default());
    store.commit(RUN_DIR, 1, "c1", NOW - 10.0);
    let cached = vec![
        job(1, Some("c0"), 1, JobEnd::Running, NOW - 50.0),
        job(1, Some("c1"), 1, JobEnd::Succeeded, NOW - 50.0),
        job(1, Some("c2"), 1, JobEnd::Running, NOW - 50.0),
    ];
    // A fresh operator (no memory, status from before it started: none):
    // it reports what it sees and creates nothing.
    let answer = f.clone();
    let (_, status) = scenario(
        &f,
        store.clone(),
        cached.clone(),
        |mut api| async move {
            let s = api.expect_status(&answer).await;
            api.expect_event("RoundStarted").await;
            (api, s)
        },
        ok,
    )
    .await;
    let states: Vec<&str> = status.clients.iter().map(|c| c.state.as_str()).collect();
    assert_eq!(states, ["Training", "Committed", "Training"]);
    assert_eq!(status.ready_clients, 1);

    // Reconciled again with that status: nothing to say, not a single request.
    let f2 = with_status(f, status);
    let (result, ()) = scenario(&f2, store, cached, |api| async move { (api, ()) }, ok).await;
    assert_eq!(
        result.expect("reconcile"),
        Action::requeue(std::time::Duration::from_secs(30))
    );
}

#[tokio::test]
async fn a_restart_with_a_stale_cache_meets_already_exists_and_goes_on() {
    // The Jobs exist in the API server but the cache has not seen them yet:
    // the deterministic names turn the creates into 409s, not duplicates.
    let f = ft(&three_clients(), "");
    let answer = f.clone();
    let (_, status) = scenario(
        &f,
        Arc::new(MemoryRunStore::default()),
        vec![],
        |mut api| async move {
            api.expect_spec_config_map().await;
            for c in ["c0", "c1", "c2"] {
                api.expect_create_job(&format!("trec-r1-{c}"), true).await;
            }
            let s = api.expect_status(&answer).await;
            api.expect_event("RoundStarted").await;
            (api, s)
        },
        ok,
    )
    .await;
    assert_eq!(status.phase, Some(Phase::Running));
}

#[tokio::test]
async fn the_bridge_config_is_read_from_the_store_and_sizes_every_trainer() {
    // c2's own model is the bridge's: one URI, one entry.
    let l6 = "cache://models/all-MiniLM-L6-v2";
    let clients = format!(
        "    - name: c0\n      model: {{ family: bert, uri: \"{l6}\" }}\n    \
         - name: c1\n      model: {{ family: bert, uri: \"{l6}\" }}\n    \
         - name: c2\n      model: {{ family: bert, uri: \"s3://models/bridge-l3\" }}\n"
    );
    let bridge = "  bridge: { model: { family: bert, uri: \"s3://models/bridge-l3\" } }\n";
    let f = ft(&clients, bridge);
    let store = Arc::new(MemoryRunStore::default());
    store.put_model_config(
        "s3://models/bridge-l3",
        serde_json::from_str(MINILM_L3).expect("json"),
    );
    let cached: Vec<Job> = ["c0", "c1", "c2"]
        .iter()
        .map(|c| job(1, Some(c), 1, JobEnd::Running, NOW - 50.0))
        .collect();
    let answer = f.clone();
    let (_, status) = scenario(
        &f,
        store,
        cached,
        |mut api| async move {
            let s = api.expect_status(&answer).await;
            api.expect_event("RoundStarted").await;
            (api, s)
        },
        |r, ctx| {
            ok(r, ctx);
            let memory = ctx.memory();
            let read = memory.shapes.get("s3://models/bridge-l3");
            let layers = read.and_then(|(s, _)| s.as_ref()).map(|s| s.num_layers);
            assert_eq!(layers, Some(3), "the bridge's config.json from the store");
            assert_eq!(memory.shapes.len(), 2, "{:?}", memory.shapes.keys());
        },
    )
    .await;
    // By hand (sizing's tests, S = 3, float32 on a CPU): MiniLM-L6
    // 2,738,450,647 and MiniLM-L3 2,690,373,079 alone, each plus the
    // bridge's parts, 2,501,629,399.
    let estimates: Vec<Option<u64>> = status
        .clients
        .iter()
        .map(|c| c.estimated_memory_bytes)
        .collect();
    let bridge = 2_501_629_399;
    assert_eq!(
        estimates,
        [
            Some(2_738_450_647 + bridge),
            Some(2_738_450_647 + bridge),
            Some(2_690_373_079 + bridge)
        ]
    );
}

#[tokio::test]
async fn an_invalid_spec_is_degraded_with_field_paths_and_creates_nothing() {
    let mut f = ft(&three_clients(), "");
    f.spec.min_clients = Some(5);
    f.spec.storage.uri = "file:///data/runs".into();
    let answer = f.clone();
    let (result, (status, note)) = scenario(
        &f,
        Arc::new(MemoryRunStore::default()),
        vec![],
        |mut api| async move {
            let s = api.expect_status(&answer).await;
            let note = api.expect_event("InvalidSpec").await;
            (api, (s, note))
        },
        |r, ctx| {
            let err = r.as_ref().expect_err("invalid");
            assert_eq!(err.category(), Category::User);
            assert_eq!(err.metric_label(), "invalid_spec");
            let f = Arc::new(ft(&three_clients(), ""));
            assert_eq!(error_policy(f, err, ctx.clone()), Action::await_change());
            assert!(ctx
                .metrics
                .encode()
                .contains("heterotune_reconcile_errors_total{error=\"invalid_spec\"} 1"));
        },
    )
    .await;
    let degraded = cond(&status, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "InvalidSpec")
    );
    assert!(
        degraded
            .message
            .contains("spec.minClients: minClients must not exceed the number of clients"),
        "{}",
        degraded.message
    );
    assert!(
        degraded
            .message
            .contains("spec.storage.uri: is \"file:///data/runs\": a cluster run needs s3://"),
        "{}",
        degraded.message
    );
    assert_eq!(cond(&status, "Ready").reason, "InvalidSpec");
    assert_eq!(status.phase, Some(Phase::Pending));
    assert!(status.clients.is_empty());
    assert!(note.contains("spec.minClients"));
    assert!(result.is_err());
}

#[tokio::test]
async fn a_client_that_fits_no_gpu_blocks_the_round_with_a_clear_condition() {
    let clients = "    - name: small\n      model: { family: bert, uri: \"cache://models/all-MiniLM-L6-v2\" }\n    \
                   - name: giant\n      model: { family: llama, uri: \"s3://models/llama-70b\", dtype: bfloat16, parameters: 70000000000 }\n";
    let f = ft(clients, "");
    let answer = f.clone();
    let (_, status) = scenario(
        &f,
        Arc::new(MemoryRunStore::default()),
        vec![],
        |mut api| async move {
            let s = api.expect_status(&answer).await;
            api.expect_event("NoGpuProfileFits").await;
            (api, s)
        },
        |r, _| assert_eq!(r.as_ref().expect_err("no fit").category(), Category::User),
    )
    .await;
    let degraded = cond(&status, "Degraded");
    assert_eq!(degraded.reason, "NoGpuProfileFits");
    assert!(
        degraded.message.starts_with("client giant needs about"),
        "{}",
        degraded.message
    );
    assert!(
        degraded.message.contains("(a100-80gb) has 80.0 GiB"),
        "{}",
        degraded.message
    );
    assert_eq!(status.clients[1].state, "Pending");
    assert!(status.clients[1].message.is_some());
}

#[tokio::test]
async fn an_unavailable_store_is_degraded_and_retried_with_backoff() {
    let f = ft(&three_clients(), "");
    let store = Arc::new(MemoryRunStore::default());
    store.set_unavailable(Some("connection refused"));
    let answer = f.clone();
    let (_, status) = scenario(
        &f,
        store,
        vec![],
        |mut api| async move {
            let s = api.expect_status(&answer).await;
            api.expect_event("StorageUnavailable").await;
            (api, s)
        },
        |r, ctx| {
            let err = r.as_ref().expect_err("store down");
            assert_eq!(err.category(), Category::Transient);
            let f = Arc::new(ft(&three_clients(), ""));
            let secs = |a: Action| format!("{a:?}");
            assert_eq!(
                secs(error_policy(f.clone(), err, ctx.clone())),
                secs(Action::requeue(std::time::Duration::from_secs(5)))
            );
            assert_eq!(
                secs(error_policy(f, err, ctx.clone())),
                secs(Action::requeue(std::time::Duration::from_secs(10)))
            );
        },
    )
    .await;
    let degraded = cond(&status, "Degraded");
    assert_eq!(degraded.reason, "StorageUnavailable");
    assert!(degraded.message.contains("connection refused"));
}

#[tokio::test]
async fn a_completed_round_is_recorded_and_the_next_one_starts() {
    let f = ft(&three_clients(), "");
    let store = Arc::new(MemoryRunStore::default());
    let mut acc = std::collections::BTreeMap::new();
    acc.insert("bert".to_string(), 0.71);
    store.complete_round(
        RUN_DIR,
        RoundSummary {
            round: 1,
            accuracy: Some(0.71),
            accuracy_by_family: acc,
            global_accuracy: None,
            global_accuracy_by_family: Default::default(),
            bytes_uploaded: 3000,
            duration_seconds: 0.0,
            participants: 3,
            rejected: [("norm_bound".to_string(), 1)].into_iter().collect(),
        },
        NOW - 10.0,
    );
    let mut cached: Vec<Job> = ["c0", "c1", "c2"]
        .iter()
        .map(|c| job(1, Some(c), 1, JobEnd::Succeeded, NOW - 1000.0))
        .collect();
    cached.push(job(1, None, 1, JobEnd::Succeeded, NOW - 100.0));
    let mut prev = heterotune_crds::status::FederatedTuneStatus {
        phase: Some(Phase::Aggregating),
        round: 1,
        start_time: Some(super::status::rfc3339(NOW - 1000.0)),
        ..Default::default()
    };
    prev.clients = ["c0", "c1", "c2"]
        .iter()
        .map(|c| heterotune_crds::status::ClientStatus {
            name: c.to_string(),
            state: heterotune_crds::status::ClientState::Committed,
            attempts: 1,
            last_round: None,
            gpu_profile: Some("cpu".into()),
            estimated_memory_bytes: None,
            message: None,
        })
        .collect();
    let f = with_status(f, prev);
    let answer = f.clone();
    let (_, (status, notes)) = scenario(
        &f,
        store,
        cached,
        |mut api| async move {
            api.expect_spec_config_map().await;
            for c in ["c0", "c1", "c2"] {
                api.expect_create_job(&format!("trec-r2-{c}"), false).await;
            }
            let s = api.expect_status(&answer).await;
            let a = api.expect_event("RoundCompleted").await;
            let b = api.expect_event("RoundStarted").await;
            (api, (s, vec![a, b]))
        },
        |_, ctx| {
            let text = ctx.metrics.encode();
            assert!(text.contains("heterotune_rounds_completed_total{federatedtune=\"trec\",ft_namespace=\"default\"} 1"), "{text}");
            assert!(text.contains("heterotune_round_duration_seconds_sum{federatedtune=\"trec\",ft_namespace=\"default\"} 990"), "{text}");
            assert!(text.contains("heterotune_artifacts_rejected_total{federatedtune=\"trec\",ft_namespace=\"default\",reason=\"norm_bound\"} 1"));
            assert!(text.contains("heterotune_accuracy_ratio{family=\"bert\",federatedtune=\"trec\",ft_namespace=\"default\"} 0.71"));
            assert!(text.contains("heterotune_clients{federatedtune=\"trec\",ft_namespace=\"default\",state=\"Training\"} 3"));
            // Where the run stands: round 2 of 10 started now (its Jobs).
            for line in [
                "heterotune_phase{federatedtune=\"trec\",ft_namespace=\"default\",phase=\"Running\"} 1",
                "heterotune_phase{federatedtune=\"trec\",ft_namespace=\"default\",phase=\"Pending\"} 0",
                "heterotune_round{federatedtune=\"trec\",ft_namespace=\"default\"} 2",
                "heterotune_completed_rounds{federatedtune=\"trec\",ft_namespace=\"default\"} 1",
                "heterotune_planned_rounds{federatedtune=\"trec\",ft_namespace=\"default\"} 10",
                "heterotune_round_start_time_seconds{federatedtune=\"trec\",ft_namespace=\"default\"} 1700000000",
                "heterotune_round_deadline_seconds{federatedtune=\"trec\",ft_namespace=\"default\"} ",
            ] {
                assert!(text.contains(line), "{line} missing in {text}");
            }
        },
    )
    .await;
    assert_eq!(
        (status.phase, status.round, status.progress.as_deref()),
        (Some(Phase::Running), 2, Some("1/10"))
    );
    assert_eq!(status.history.len(), 1);
    assert_eq!(status.history[0].duration_seconds, 990.0);
    assert_eq!(status.last_accuracy, Some(0.71));
    assert_eq!(status.progress_percent, Some(10.0));
    // ETA: the round began now; 9 rounds of 990 s remain.
    assert_eq!(
        status.estimated_completion_time,
        Some(super::status::rfc3339(NOW + 9.0 * 990.0))
    );
    assert!(status
        .clients
        .iter()
        .all(|c| c.last_round == Some(1) && c.state == "Training"));
    assert_eq!(
        status.artifacts.and_then(|a| a.latest_global).as_deref(),
        Some("runs/default/trec-0f1e2d3c/round-0001/global/manifest.json")
    );
    assert_eq!(
        notes[0],
        "round 1 completed with 3 participants, accuracy 0.7100"
    );
}

fn round_summary(round: u32, accuracy: f64) -> RoundSummary {
    RoundSummary {
        round,
        accuracy: Some(accuracy),
        accuracy_by_family: [("bert".to_string(), accuracy)].into_iter().collect(),
        global_accuracy: None,
        global_accuracy_by_family: Default::default(),
        bytes_uploaded: 3000,
        duration_seconds: 60.0,
        participants: 3,
        rejected: Default::default(),
    }
}

fn evaluation(client: &str, accuracy: f64) -> heterotune_crds::manifest::EvaluationResult {
    heterotune_crds::manifest::EvaluationResult {
        schema_version: 1,
        run: RUN_DIR.into(),
        client: client.into(),
        family: "bert".into(),
        global_round: 2,
        test_examples: 500,
        accuracy,
        macro_f1: 0.5,
        loss: None,
        seconds: Some(3.0),
        variants: Default::default(),
        served: None,
        writer_version: "test".into(),
        created_at: "2023-11-14T22:13:00Z".into(),
    }
}

/// Every round aggregated: the clients evaluate the last global model;
/// round 1's global accuracy (measured in round 2) is recorded.
fn assert_evaluating(status: &heterotune_crds::status::FederatedTuneStatus) {
    assert_eq!(status.phase, Some(Phase::Evaluating));
    assert_eq!(cond(status, "Progressing").reason, "Evaluating");
    assert_eq!(cond(status, "Complete").status, "False");
    assert!(
        status.clients.iter().all(|c| c.state == "Evaluating"),
        "{:?}",
        status.clients
    );
    assert_eq!(status.history[0].global_accuracy, Some(0.74));
    assert_eq!(status.history[1].global_accuracy, None);
    assert_eq!(
        (status.last_global_accuracy, status.last_global_round),
        (Some(0.74), Some(1))
    );
}

/// The run succeeded with what c0 and c1 measured on the final global
/// model; c2 ran out of retries.
fn assert_succeeded_without_c2(status3: &heterotune_crds::status::FederatedTuneStatus) {
    assert_eq!(status3.phase, Some(Phase::Succeeded));
    assert_eq!(cond(status3, "Complete").status, "True");
    let last = status3.history.last().expect("history");
    assert_eq!(last.round, 2);
    assert!(
        (last.global_accuracy.unwrap_or(0.0) - 0.79).abs() < 1e-9,
        "{last:?}"
    );
    assert!((last.global_accuracy_by_family["bert"] - 0.79).abs() < 1e-9);
    assert_eq!(status3.last_global_round, Some(2));
    let states: Vec<&str> = status3.clients.iter().map(|c| c.state.as_str()).collect();
    assert_eq!(states, ["Evaluated", "Evaluated", "EvaluationFailed"]);
    assert_eq!(cond(status3, "Degraded").status, "False");
}

/// A two-round run whose second round was just aggregated (round 2's
/// participants measured round 1's global model), its Jobs, and the status
/// written before the aggregation ended.
fn two_rounds_aggregated() -> (
    heterotune_crds::FederatedTune,
    Arc<MemoryRunStore>,
    Vec<Job>,
    heterotune_crds::status::FederatedTuneStatus,
) {
    let f = ft(&three_clients(), "  rounds: 2\n  maxRetriesPerClient: 1\n");
    let store = Arc::new(MemoryRunStore::default());
    store.complete_round(RUN_DIR, round_summary(1, 0.70), NOW - 200.0);
    // Round 2's participants measured round 1's global model before training.
    let before: std::collections::BTreeMap<String, f64> =
        [("bert".to_string(), 0.74)].into_iter().collect();
    store.complete_round_with(
        RUN_DIR,
        round_summary(2, 0.72),
        NOW - 10.0,
        Some((0.74, before)),
    );
    let mut cached: Vec<Job> = ["c0", "c1", "c2"]
        .iter()
        .map(|c| job(2, Some(c), 1, JobEnd::Succeeded, NOW - 150.0))
        .collect();
    cached.push(job(2, None, 1, JobEnd::Succeeded, NOW - 20.0));
    let prev = heterotune_crds::status::FederatedTuneStatus {
        phase: Some(Phase::Aggregating),
        round: 2,
        start_time: Some(super::status::rfc3339(NOW - 300.0)),
        history: vec![round_summary(1, 0.70)],
        ..Default::default()
    };
    (f, store, cached, prev)
}

/// An evaluation Job of round 2: the evaluator's command, placed as its
/// trainer would be (the MiniLM clients train on CPU).
fn assert_placed_like_its_trainer(job0: &Job) {
    let labels = job0.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get(super::names::LABEL_ROLE).map(String::as_str),
        Some("evaluator")
    );
    assert_eq!(
        labels.get(super::names::LABEL_ROUND).map(String::as_str),
        Some("2")
    );
    let command = container(job0).command.clone().unwrap_or_default();
    assert!(
        command.windows(2).any(|w| w == ["job", "evaluate"]),
        "{command:?}"
    );
    assert!(
        command.windows(2).any(|w| w == ["--round", "2"]),
        "{command:?}"
    );
    // Placed as its trainer would be: the MiniLM clients train on CPU.
    let annotations = job0.metadata.annotations.as_ref().expect("annotations");
    assert_eq!(
        annotations
            .get(super::names::ANNOTATION_PROFILE)
            .map(String::as_str),
        Some("cpu")
    );
    assert!(quantity(job0, "requests", "memory").is_some());
    assert!(quantity(job0, "limits", "nvidia.com/gpu").is_none());
}

#[tokio::test]
async fn after_the_last_round_every_client_evaluates_the_final_global_model() {
    let (f, store, cached, prev) = two_rounds_aggregated();
    let f1 = with_status(f.clone(), prev);
    let answer = f1.clone();
    // 1. Every round is aggregated: one evaluation Job per client, placed
    // like its trainer.
    let (_, (status, created, notes)) = scenario(
        &f1,
        store.clone(),
        cached.clone(),
        |mut api| async move {
            api.expect_spec_config_map().await;
            let mut created = Vec::new();
            for c in ["c0", "c1", "c2"] {
                created.push(
                    api.expect_create_job(&format!("trec-eval-r2-{c}"), false)
                        .await,
                );
            }
            let s = api.expect_status(&answer).await;
            let mut notes = Vec::new();
            for reason in ["RoundCompleted", "GlobalModelEvaluated", "Evaluating"] {
                notes.push(api.expect_event(reason).await);
            }
            (api, (s, created, notes))
        },
        ok,
    )
    .await;
    assert_evaluating(&status);
    assert_eq!(notes[1], "the global model of round 1: accuracy 0.7400");
    assert_placed_like_its_trainer(&created[0]);

    // 2. c0 and c1 evaluated; c2's evaluation failed once and is retried.
    store.evaluate(RUN_DIR, evaluation("c0", 0.80));
    store.evaluate(RUN_DIR, evaluation("c1", 0.78));
    let mut cached2 = cached.clone();
    for c in ["c0", "c1"] {
        cached2.push(evaluation_job(2, c, 1, JobEnd::Succeeded, NOW - 5.0));
    }
    cached2.push(evaluation_job(2, "c2", 1, JobEnd::Failed, NOW - 5.0));
    let f2 = with_status(f.clone(), status.clone());
    let answer = f2.clone();
    let (_, status2) = scenario(
        &f2,
        store.clone(),
        cached2.clone(),
        |mut api| async move {
            // A fresh operator process: it applies the spec ConfigMap once.
            api.expect_spec_config_map().await;
            api.expect_create_job("trec-eval-r2a2-c2", false).await;
            let s = api.expect_status(&answer).await;
            (api, s)
        },
        ok,
    )
    .await;
    assert_eq!(status2.phase, Some(Phase::Evaluating));
    let states: Vec<&str> = status2.clients.iter().map(|c| c.state.as_str()).collect();
    assert_eq!(states, ["Evaluated", "Evaluated", "Evaluating"]);

    // 3. c2 fails again: out of retries, the run succeeds with what the
    // others measured on the final global model.
    cached2.push(evaluation_job(2, "c2", 2, JobEnd::Failed, NOW - 2.0));
    let f3 = with_status(f, status2);
    let answer = f3.clone();
    let (result, status3) = scenario(
        &f3,
        store,
        cached2,
        |mut api| async move {
            let s = api.expect_status(&answer).await;
            api.expect_event("GlobalModelEvaluated").await;
            api.expect_event("Succeeded").await;
            let note = api.expect_event("EvaluationFailed").await;
            assert!(note.contains("client c2"), "{note}");
            assert!(note.contains("attempt 2: Error (exit 1)"), "{note}");
            (api, s)
        },
        |_, ctx| {
            let text = ctx.metrics.encode();
            assert!(
                text.contains("heterotune_global_accuracy_ratio{family=\"all\",federatedtune=\"trec\",ft_namespace=\"default\"} 0.79"),
                "{text}"
            );
        },
    )
    .await;
    assert_eq!(result.expect("reconcile"), Action::await_change());
    assert_succeeded_without_c2(&status3);
}

#[tokio::test]
async fn a_suspended_run_starts_nothing() {
    let f = ft(&three_clients(), "  suspend: true\n");
    let answer = f.clone();
    let (result, status) = scenario(
        &f,
        Arc::new(MemoryRunStore::default()),
        vec![],
        |mut api| async move {
            let s = api.expect_status(&answer).await;
            api.expect_event("Suspended").await;
            (api, s)
        },
        ok,
    )
    .await;
    assert_eq!(result.expect("reconcile"), Action::await_change());
    assert_eq!(status.phase, Some(Phase::Suspended));
    assert_eq!(cond(&status, "Suspended").status, "True");
    assert_eq!(cond(&status, "Progressing").status, "False");
}

/// A run with site clients has its spec document recorded in the store by
/// the reconcile itself (a round of sites only has no Job to record it, and
/// `heterotune site` checks it before training); a run without sites
/// leaves that to its Jobs.
#[tokio::test]
async fn the_spec_of_a_run_with_sites_is_recorded_for_them() {
    let clients = three_clients().replace(
        "    - name: c2\n",
        "    - name: c2\n      site: { name: bank }\n",
    );
    for (clients, sites) in [(clients, true), (three_clients(), false)] {
        let f = ft(&clients, "  suspend: true\n");
        let answer = f.clone();
        let store = Arc::new(MemoryRunStore::default());
        let _ = scenario(
            &f,
            store.clone(),
            vec![],
            |mut api| async move {
                api.expect_status(&answer).await;
                api.expect_event("Suspended").await;
                (api, ())
            },
            ok,
        )
        .await;
        let recorded = store.spec_document(RUN_DIR);
        assert_eq!(recorded.is_some(), sites, "sites: {sites}");
        if let Some(bytes) = recorded {
            let doc: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
            assert_eq!(doc["metadata"]["uid"], UID);
            assert_eq!(doc["spec"], serde_json::to_value(&f.spec).expect("spec"));
        }
    }
}

#[tokio::test]
async fn deletion_applies_the_retention_policy_then_removes_the_finalizer() {
    let mut f = ft(&three_clients(), "  retention: { onDelete: delete }\n");
    f.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(NOW as i64).expect("time"),
    ));
    let store = Arc::new(MemoryRunStore::default());
    store.commit(RUN_DIR, 1, "c0", NOW - 5.0);
    let answer = f.clone();
    let (result, note) = scenario(
        &f,
        store.clone(),
        vec![],
        |mut api| async move {
            let note = api.expect_event("ArtifactsDeleted").await;
            api.expect_finalizer_removed(&answer).await;
            (api, note)
        },
        ok,
    )
    .await;
    assert_eq!(result.expect("reconcile"), Action::await_change());
    assert_eq!(
        store.retention_calls(),
        vec![(RUN_DIR.to_string(), RetentionPolicy::Delete)]
    );
    assert_eq!(
        note,
        format!("retention Delete: removed 1 object(s) under {RUN_DIR}")
    );

    // With the store down the finalizer stays, and the deletion is retried.
    store.set_unavailable(Some("timeout"));
    let (result, ()) = scenario(
        &f,
        store,
        vec![],
        |api| async move { (api, ()) },
        |r, _| {
            assert_eq!(
                r.as_ref().expect_err("store down").category(),
                Category::Transient
            )
        },
    )
    .await;
    assert!(result.is_err());
}

#[test]
fn job_names_are_bounded_distinct_and_stable() {
    assert_eq!(
        names::trainer_job_name("trec", 3, 1, "site-1"),
        "trec-r3-site-1"
    );
    assert_eq!(
        names::trainer_job_name("trec", 3, 2, "site-1"),
        "trec-r3a2-site-1"
    );
    assert_eq!(names::aggregation_job_name("trec", 3, 1), "trec-agg-r3");
    assert_eq!(names::aggregation_job_name("trec", 3, 2), "trec-agg-r3a2");
    assert_eq!(
        names::evaluation_job_name("trec", 3, 1, "site-1"),
        "trec-eval-r3-site-1"
    );
    assert_eq!(
        names::evaluation_job_name("trec", 3, 2, "site-1"),
        "trec-eval-r3a2-site-1"
    );
    let long = names::evaluation_job_name(&"f".repeat(70), 12, 3, &"c".repeat(40));
    assert!(long.len() <= 63, "{long}");
    assert!(
        long.ends_with(&format!("-eval-r12a3-{}", "c".repeat(40))),
        "{long}"
    );
    // A client named like a retry suffix does not collide.
    assert_ne!(
        names::trainer_job_name("t", 1, 2, "c"),
        names::trainer_job_name("t", 1, 1, "a2-c")
    );
    let long_ft = "a-very-long-federated-tune-name-that-goes-on-and-on-and-on-forever";
    let client = "c".repeat(40);
    let mut names = std::collections::BTreeSet::new();
    for round in [1, 9999] {
        for attempt in [1, 21] {
            let n = names::trainer_job_name(long_ft, round, attempt, &client);
            assert!(n.len() <= 63, "{n} ({})", n.len());
            assert!(n.ends_with(&client), "{n}");
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{n}"
            );
            assert!(n.starts_with(|c: char| c.is_ascii_alphanumeric()), "{n}");
            assert_eq!(
                n,
                names::trainer_job_name(long_ft, round, attempt, &client),
                "stable"
            );
            names.insert(n);
        }
    }
    assert_eq!(names.len(), 4);
    let dotted = names::trainer_job_name("team.trec", 1, 1, "a");
    assert!(!dotted.contains('.') && dotted.len() <= 63, "{dotted}");
    assert_ne!(dotted, names::trainer_job_name("team-trec", 1, 1, "a"));
}

#[test]
fn the_chart_configuration_is_the_operator_configuration() {
    // The chart renders `config` to JSON for `--config`: its defaults and the
    // GPU example must deserialize (deny_unknown_fields catches drift).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in [
        "charts/heterotune/values.yaml",
        "tests/helm/values-gpus.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).expect("values file");
        let values = heterotune_crds::validate::parse_document(&text).expect("YAML");
        let mut config: super::OperatorConfig = serde_json::from_value(values["config"].clone())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        if file.ends_with("values.yaml") {
            // The chart derives the trainer image from image.tag (one tag
            // source, checked by tests/helm/check.sh): empty in the values.
            assert_eq!(config.jobs.trainer_image, "", "{file}");
            config.jobs.trainer_image = super::OperatorConfig::default().jobs.trainer_image;
            assert_eq!(
                config,
                super::OperatorConfig::default(),
                "chart defaults = operator defaults"
            );
        } else {
            let names: Vec<&str> = config
                .sizing
                .gpu_profiles
                .iter()
                .map(|p| p.name.as_str())
                .collect();
            assert_eq!(names, ["l4-24gb", "a100-80gb"]);
            assert_eq!(
                config.sizing.gpu_profiles[0].memory,
                24 * crate::sizing::GIB
            );
        }
    }
}
