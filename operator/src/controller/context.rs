//! What every reconcile shares: the client, the event recorder, metrics, the
//! operator's configuration, the store, the Job cache, and a little memory
//! (model shapes, applied spec hashes, error counts) that is only an
//! optimisation: a restarted operator rebuilds it from the cluster and store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store as Cache;
use kube::Client;
use serde::{Deserialize, Serialize};

use crate::controller::metrics::Metrics;
use crate::protocol::observe::{now_seconds, RunStore};
use crate::sizing::{ModelShape, SizingConfig};

/// Name of the controller (field manager, event reporter).
pub const MANAGER: &str = "heterotune-operator";

/// The operator's configuration (the chart's `config` values, as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperatorConfig {
    /// GPU profiles and CPU placement.
    #[serde(default)]
    pub sizing: SizingConfig,
    /// Trainer and aggregation pods.
    #[serde(default)]
    pub jobs: JobConfig,
    /// Reconcile pacing.
    #[serde(default)]
    pub reconcile: ReconcileConfig,
}

/// Settings of the Jobs the operator creates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobConfig {
    /// Trainer image when `spec.trainer.image` is unset.
    #[serde(default = "default_image")]
    pub trainer_image: String,
    /// UID (and group) the trainer and aggregation pods run as; `null`
    /// leaves it to the platform (OpenShift assigns one per namespace). The
    /// pods are non-root either way.
    #[serde(default = "default_uid")]
    pub run_as_user: Option<i64>,
    /// Finished Jobs are deleted this long after they end, but never before
    /// their round can have ended (the deadline plus the straggler wait plus
    /// an hour): a round's failure counts live in its Jobs.
    #[serde(default = "default_ttl")]
    pub ttl_seconds_after_finished: i32,
    /// CPU request of the aggregation pod.
    #[serde(default = "default_agg_cpu")]
    pub aggregator_cpu: String,
    /// Memory request and limit of the aggregation pod.
    #[serde(default = "default_agg_memory")]
    pub aggregator_memory: String,
    /// Size limit of the scratch volume (`/work`) of trainer pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_size_limit: Option<String>,
    /// Image pull secrets of trainer and aggregation pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
    /// The trainer images a FederatedTune may name (`spec.trainer.image`):
    /// each entry an image reference, or a prefix of one that ends at a
    /// `/`, `:` or `@` boundary (`registry.example/ml` allows
    /// `registry.example/ml/trainer:1`, not `registry.example/ml-evil`).
    /// Empty: any image, which makes whoever may create a FederatedTune as
    /// trusted as a pod creator in its namespace (docs/operator.md, "Threat
    /// model"). The default image (`trainerImage`) is always allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_trainer_images: Vec<String>,
}

impl JobConfig {
    /// Whether a FederatedTune may run its Jobs in `image`
    /// ([`JobConfig::allowed_trainer_images`]).
    pub fn allows_image(&self, image: &str) -> bool {
        self.allowed_trainer_images.is_empty()
            || image == self.trainer_image
            || self.allowed_trainer_images.iter().any(|entry| {
                let entry = entry.as_str();
                image == entry
                    || image.strip_prefix(entry).is_some_and(|rest| {
                        entry.ends_with(['/', ':', '@']) || rest.starts_with(['/', ':', '@'])
                    })
            })
    }
}

fn default_image() -> String {
    format!("ghcr.io/heterotune/trainer:{}", env!("CARGO_PKG_VERSION"))
}
fn default_uid() -> Option<i64> {
    Some(65532)
}
fn default_ttl() -> i32 {
    86400
}
fn default_agg_cpu() -> String {
    "1".into()
}
fn default_agg_memory() -> String {
    "2Gi".into()
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            trainer_image: default_image(),
            run_as_user: default_uid(),
            ttl_seconds_after_finished: default_ttl(),
            aggregator_cpu: default_agg_cpu(),
            aggregator_memory: default_agg_memory(),
            work_size_limit: None,
            image_pull_secrets: Vec::new(),
            allowed_trainer_images: Vec::new(),
        }
    }
}

/// Reconcile pacing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReconcileConfig {
    /// How often a running round looks at the store (commits do not raise
    /// Kubernetes events; Job completions do).
    #[serde(default = "default_poll")]
    pub store_poll_seconds: u64,
    /// API calls in flight at once when creating or deleting many Jobs.
    #[serde(default = "default_concurrency")]
    pub api_concurrency: usize,
    /// First retry delay after a transient error (doubles up to the maximum).
    #[serde(default = "default_backoff")]
    pub error_backoff_seconds: u64,
    /// Longest retry delay after transient errors.
    #[serde(default = "default_backoff_max")]
    pub error_backoff_max_seconds: u64,
}

fn default_poll() -> u64 {
    30
}
fn default_concurrency() -> usize {
    16
}
fn default_backoff() -> u64 {
    5
}
fn default_backoff_max() -> u64 {
    300
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            store_poll_seconds: default_poll(),
            api_concurrency: default_concurrency(),
            error_backoff_seconds: default_backoff(),
            error_backoff_max_seconds: default_backoff_max(),
        }
    }
}

impl OperatorConfig {
    /// Reads the configuration file (JSON).
    pub fn from_json(text: &str) -> Result<OperatorConfig, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// A clock in Unix seconds (replaced in tests).
pub type Clock = Arc<dyn Fn() -> f64 + Send + Sync>;

/// Memory kept between reconciles; losing it costs only extra reads.
#[derive(Default)]
pub(crate) struct Memory {
    /// Model shapes by URI (`None`: not readable), with when they were looked up.
    pub shapes: HashMap<String, (Option<ModelShape>, f64)>,
    /// The spec ConfigMap content last applied, by FederatedTune UID.
    pub applied_specs: HashMap<String, u64>,
    /// Consecutive transient failures, by FederatedTune UID.
    pub failures: HashMap<String, u32>,
    /// The generation last found valid, by FederatedTune UID (validation
    /// depends on the spec alone, which changes only with the generation).
    pub valid_generations: HashMap<String, i64>,
}

/// Shared state of the reconciler.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Operator configuration.
    pub config: OperatorConfig,
    /// The object store.
    pub store: Arc<dyn RunStore>,
    /// Jobs the operator manages (a reflector fed by the controller's watch).
    pub jobs: Cache<Job>,
    /// Their pods (a reflector; read to explain failed Jobs).
    pub pods: Cache<Pod>,
    /// Now, in Unix seconds.
    pub clock: Clock,
    pub(crate) memory: Mutex<Memory>,
}

impl Context {
    /// A context with the system clock.
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        config: OperatorConfig,
        store: Arc<dyn RunStore>,
        jobs: Cache<Job>,
        instance: Option<String>,
    ) -> Context {
        let reporter = Reporter {
            controller: MANAGER.to_string(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            config,
            store,
            jobs,
            pods: kube::runtime::reflector::store::<Pod>().0,
            clock: Arc::new(now_seconds),
            memory: Mutex::new(Memory::default()),
        }
    }

    /// Reads pods from `pods` (the controller's pod reflector).
    pub fn with_pods(mut self, pods: Cache<Pod>) -> Context {
        self.pods = pods;
        self
    }

    /// Replaces the clock.
    pub fn with_clock(mut self, clock: Clock) -> Context {
        self.clock = clock;
        self
    }

    /// Now, in Unix seconds.
    pub fn now(&self) -> f64 {
        (self.clock)()
    }

    pub(crate) fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }
}
