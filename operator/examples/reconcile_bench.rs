//! Reconcile benchmark against an in-process mock API server.
//!
//! For a FederatedTune of 10, 100 and 1000 clients, and for 100
//! FederatedTunes of 10 clients reconciled concurrently, prints the wall time
//! of a reconcile and the API requests it sends, in four situations:
//!
//! * `new run`: no Jobs yet: the spec ConfigMap, one create per client, the status, one Event;
//! * `steady`: Jobs running, nothing new in the store: no request at all;
//! * `progress`: one more client committed: one status patch;
//! * `round end`: every client committed: the aggregation Job, the status, one Event.
//!
//! The mock answers at once (`latency 0 ms`, the operator's own cost) or
//! after a fixed delay per request (`latency 5 ms`, a busy API server; Job
//! creates go 16 at a time).
//!
//! Run: `cargo run --release -p heterotune-operator --features testing --example reconcile_bench`

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use heterotune_crds::FederatedTune;
use heterotune_operator::controller::metrics::Metrics;
use heterotune_operator::controller::{self, Context, MemoryRunStore, OperatorConfig};
use http::{Request, Response, StatusCode};
use k8s_openapi::api::batch::v1::{Job, JobStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use kube::Client;

const NOW: f64 = 1_700_000_000.0;

/// Requests seen by the mock, by kind.
#[derive(Default)]
struct Counts {
    total: AtomicU64,
    creates: AtomicU64,
    patches: AtomicU64,
    deletes: AtomicU64,
    events: AtomicU64,
}

impl Counts {
    fn snapshot(&self) -> [u64; 5] {
        [
            self.total.load(Ordering::Relaxed),
            self.creates.load(Ordering::Relaxed),
            self.patches.load(Ordering::Relaxed),
            self.deletes.load(Ordering::Relaxed),
            self.events.load(Ordering::Relaxed),
        ]
    }
}

/// The mock API server: answers every request as the API server would.
struct Mock {
    counts: Arc<Counts>,
    objects: Arc<Mutex<HashMap<String, serde_json::Value>>>,
    created: Arc<Mutex<Vec<Job>>>,
}

fn spawn_mock(latency: Duration) -> (Client, Mock) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mock = Mock {
        counts: Arc::default(),
        objects: Arc::default(),
        created: Arc::default(),
    };
    let (counts, objects, created) = (
        mock.counts.clone(),
        mock.objects.clone(),
        mock.created.clone(),
    );
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (counts, objects, created) = (counts.clone(), objects.clone(), created.clone());
            tokio::spawn(async move {
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                let method = request.method().clone();
                let path = request.uri().path().to_string();
                let bytes = request
                    .into_body()
                    .collect_bytes()
                    .await
                    .unwrap_or_default();
                let body: serde_json::Value =
                    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                counts.total.fetch_add(1, Ordering::Relaxed);
                let (code, answer) = if path.contains("/events") {
                    counts.events.fetch_add(1, Ordering::Relaxed);
                    (StatusCode::CREATED, body)
                } else if method == http::Method::POST {
                    counts.creates.fetch_add(1, Ordering::Relaxed);
                    if let Ok(job) = serde_json::from_value::<Job>(body.clone()) {
                        created.lock().unwrap_or_else(|e| e.into_inner()).push(job);
                    }
                    (StatusCode::CREATED, body)
                } else if method == http::Method::PATCH {
                    counts.patches.fetch_add(1, Ordering::Relaxed);
                    if path.ends_with("/status") {
                        let name = path
                            .trim_end_matches("/status")
                            .rsplit('/')
                            .next()
                            .unwrap_or_default()
                            .to_string();
                        let mut objects = objects.lock().unwrap_or_else(|e| e.into_inner());
                        let obj = objects.entry(name).or_insert(serde_json::Value::Null);
                        obj["status"] = body["status"].clone();
                        (StatusCode::OK, obj.clone())
                    } else {
                        (StatusCode::OK, body)
                    }
                } else {
                    counts.deletes.fetch_add(1, Ordering::Relaxed);
                    (
                        StatusCode::OK,
                        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                    )
                };
                let bytes = serde_json::to_vec(&answer).unwrap_or_default();
                send.send_response(
                    Response::builder()
                        .status(code)
                        .body(Body::from(bytes))
                        .unwrap_or_else(|_| Response::new(Body::empty())),
                );
            });
        }
    });
    (Client::new(service, "default"), mock)
}

fn federated_tune(name: &str, clients: usize) -> FederatedTune {
    let list: String = (0..clients)
        .map(|i| {
            let uri = ["all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2", "SmolLM2-135M"][i % 3];
            let family = if i % 3 == 2 { "llama" } else { "bert" };
            format!("    - name: client-{i:04}\n      model: {{ family: {family}, uri: \"cache://models/{uri}\" }}\n")
        })
        .collect();
    let yaml = format!(
        "apiVersion: heterotune.dev/v1alpha1\nkind: FederatedTune\nmetadata: {{ name: {name} }}\nspec:\n  rounds: 10\n  clients:\n{list}  task:\n    dataset: {{ uri: \"s3://datasets/trec.jsonl\" }}\n    labels: [ABBR, DESC, ENTY, HUM, LOC, NUM]\n  storage:\n    uri: \"s3://artifacts/runs\"\n    credentialsSecret: {{ name: s3 }}\n"
    );
    let mut ft = match heterotune_crds::validate::parse_federated_tune(&yaml) {
        Ok(ft) => ft,
        Err(p) => panic!("benchmark spec invalid: {p}"),
    };
    ft.metadata.namespace = Some("bench".into());
    ft.metadata.uid = Some(format!("{:08x}-0000-4000-8000-000000000000", fxhash(name)));
    ft.metadata.generation = Some(1);
    ft.metadata.finalizers = Some(vec![controller::FINALIZER.into()]);
    ft
}

fn fxhash(s: &str) -> u32 {
    s.bytes().fold(2166136261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16777619)
    })
}

fn running(mut job: Job) -> Job {
    job.metadata.creation_timestamp = Some(Time(
        k8s_openapi::jiff::Timestamp::from_second(NOW as i64 - 60).unwrap_or_default(),
    ));
    job.status = Some(JobStatus {
        active: Some(1),
        ..JobStatus::default()
    });
    job
}

struct Bench {
    client: Client,
    mock: Mock,
    store: Arc<MemoryRunStore>,
    writer: Writer<Job>,
    ctx: Arc<Context>,
}

fn bench(latency: Duration) -> Bench {
    let (client, mock) = spawn_mock(latency);
    let store = Arc::new(MemoryRunStore::default());
    let (reader, mut writer) = reflector::store::<Job>();
    writer.apply_watcher_event(&watcher::Event::Init);
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            Arc::new(Metrics::new()),
            OperatorConfig::default(),
            store.clone(),
            reader,
            None,
        )
        .with_clock(Arc::new(|| NOW)),
    );
    Bench {
        client,
        mock,
        store,
        writer,
        ctx,
    }
}

impl Bench {
    /// Reconciles `fts` concurrently; returns (wall time, requests by kind).
    async fn round(&self, fts: &[FederatedTune]) -> (Duration, [u64; 5]) {
        {
            let mut objects = self.mock.objects.lock().unwrap_or_else(|e| e.into_inner());
            for ft in fts {
                objects.insert(
                    ft.metadata.name.clone().unwrap_or_default(),
                    serde_json::to_value(ft).unwrap_or_default(),
                );
            }
        }
        let before = self.mock.counts.snapshot();
        let start = Instant::now();
        let results = futures::future::join_all(
            fts.iter()
                .map(|ft| controller::reconcile(Arc::new(ft.clone()), self.ctx.clone())),
        )
        .await;
        let elapsed = start.elapsed();
        for r in results {
            if let Err(e) = r {
                panic!("reconcile failed: {e}");
            }
        }
        let after = self.mock.counts.snapshot();
        (elapsed, std::array::from_fn(|i| after[i] - before[i]))
    }

    /// Takes the Jobs the mock saw created into the controller's cache, running.
    fn absorb_created(&mut self) {
        let jobs: Vec<Job> =
            std::mem::take(&mut *self.mock.created.lock().unwrap_or_else(|e| e.into_inner()));
        for j in jobs {
            self.writer
                .apply_watcher_event(&watcher::Event::Apply(running(j)));
        }
    }

    /// The FederatedTunes with the status the mock holds.
    fn refreshed(&self, fts: &[FederatedTune]) -> Vec<FederatedTune> {
        let objects = self.mock.objects.lock().unwrap_or_else(|e| e.into_inner());
        fts.iter()
            .map(|ft| {
                let mut ft = ft.clone();
                if let Some(s) = objects
                    .get(ft.metadata.name.as_deref().unwrap_or_default())
                    .and_then(|o| o.get("status"))
                {
                    ft.status = serde_json::from_value(s.clone()).ok();
                }
                ft
            })
            .collect()
    }
}

/// The store layout of a bench FederatedTune (storage prefix `runs`).
fn layout(ft: &FederatedTune) -> heterotune_crds::layout::RunLayout {
    heterotune_crds::layout::RunLayout::new(
        "runs",
        "bench",
        ft.metadata.name.as_deref().unwrap_or_default(),
        ft.metadata.uid.as_deref().unwrap_or_default(),
    )
}

fn row(label: &str, fts: usize, (t, c): (Duration, [u64; 5])) {
    let per = |x: u64| x as f64 / fts as f64;
    println!(
        "  {label:<10} {:>10.2} ms  {:>9.2} ms/FT  {:>8.1} req/FT  (create {:.1}, patch {:.1}, delete {:.1}, event {:.1})",
        t.as_secs_f64() * 1000.0,
        t.as_secs_f64() * 1000.0 / fts as f64,
        per(c[0]),
        per(c[1]),
        per(c[2]),
        per(c[3]),
        per(c[4])
    );
}

async fn scenario(title: &str, fts_count: usize, clients: usize, latency: Duration) {
    let mut b = bench(latency);
    let fts: Vec<FederatedTune> = (0..fts_count)
        .map(|i| federated_tune(&format!("ft-{i:03}"), clients))
        .collect();
    println!(
        "{title} ({} FT x {clients} clients, latency {} ms)",
        fts_count,
        latency.as_millis()
    );
    row("new run", fts_count, b.round(&fts).await);
    b.absorb_created();
    let fts = b.refreshed(&fts);
    row("steady", fts_count, b.round(&fts).await);
    for ft in &fts {
        let run_dir = layout(ft);
        b.store
            .commit(run_dir.run_dir(), 1, "client-0000", NOW - 5.0);
    }
    row("progress", fts_count, b.round(&fts).await);
    let fts = b.refreshed(&fts);
    for ft in &fts {
        let run_dir = layout(ft);
        for c in &ft.spec.clients {
            b.store.commit(run_dir.run_dir(), 1, &c.name, NOW - 1.0);
        }
    }
    row("round end", fts_count, b.round(&fts).await);
    drop(b.ctx);
    drop(b.client);
}

#[tokio::main]
async fn main() {
    println!(
        "reconcile benchmark ({} build); columns: wall time of all reconciles, per FederatedTune, requests per reconcile",
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    for latency in [Duration::ZERO, Duration::from_millis(5)] {
        for clients in [10, 100, 1000] {
            scenario("one FederatedTune", 1, clients, latency).await;
        }
        scenario("100 concurrent FederatedTunes", 100, 10, latency).await;
    }
}
