//! `FederatedTune` (`heterotune.dev/v1alpha1`): the desired state.
//!
//! Field names follow what users of neighbouring tools already know:
//! `rounds` and `minClients` (Flower's `num_rounds`, FLARE's `min_clients`),
//! `roundDeadlineSeconds` (FLARE's `train_timeout`), `suspend` and
//! `storage.uri` + `credentialsSecret` (Kubeflow Trainer's TrainJob).

mod adapter;
mod aggregation;
mod bridge;
mod client;
mod evaluation;
mod storage;
mod task;
mod training;

pub use adapter::{
    AdapterKind, AdapterSpec, LayerSelectionMode, LayerSelectionSpec, OutputScale, SharePolicy,
};
pub use aggregation::{
    AggregationAlgorithm, AggregationSpec, AlignmentRule, FamilyWeighting, NormBoundAction,
    PrivacySpec, RobustCombine, RobustSpec,
};
pub use bridge::{
    BridgeSpec, Calibration, DistillationSpec, PoolTeacher, PoolWeighting, ServedModel,
};
pub use client::{
    ClientDataSpec, ClientResources, ClientSpec, Dtype, ModelFamily, ModelSpec, SiteSpec,
    Toleration,
};
pub use evaluation::EvaluationSpec;
pub use storage::{RetentionPolicy, RetentionSpec, SecretKeyRef, StorageSpec, TrainerSpec};
pub use task::{DatasetFormat, DatasetSpec, PartitionSpec, PartitionStrategy, SplitSpec, TaskSpec};
pub use training::{LogitAdjustment, Pooling, PrefixCacheSpec, TrainingSpec};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[cfg(feature = "kube")]
use crate::status::FederatedTuneStatus;

/// A federated fine-tuning run over heterogeneous clients.
///
/// Each round every client fine-tunes its own frozen backbone's adapters on
/// its own data and uploads only the shared adapter part; an aggregation job
/// combines the uploads (CMGA by default) into the next round's global state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "heterotune.dev",
        version = "v1alpha1",
        kind = "FederatedTune",
        plural = "federatedtunes",
        singular = "federatedtune",
        namespaced,
        status = "FederatedTuneStatus",
        shortname = "ft",
        shortname = "fedtune",
        category = "heterotune",
        doc = "A federated fine-tuning run: clients on heterogeneous pretrained models train adapters on their own data; each round the operator starts one trainer Job per client and an aggregation Job, with artifacts in an S3-compatible store (docs/operator.md).",
        printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
        printcolumn = r#"{"name":"Round","type":"string","jsonPath":".status.progress","description":"completed rounds / rounds"}"#,
        printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyClients","description":"clients whose artifact for the current round is committed"}"#,
        printcolumn = r#"{"name":"Global","type":"number","jsonPath":".status.lastGlobalAccuracy","description":"global-test accuracy of the newest evaluated global (aggregated) model"}"#,
        printcolumn = r#"{"name":"Local","type":"number","jsonPath":".status.lastAccuracy","description":"global-test accuracy of the clients' models after local training in the last completed round"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
        printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Progressing\")].reason","description":"why the run is or is not progressing (kubectl get -o wide)"}"#,
        printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Progressing\")].message","description":"the Progressing condition's message (kubectl get -o wide)"}"#
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.minClients) || self.minClients <= size(self.clients)",
        "message": "minClients must not exceed the number of clients",
        "fieldPath": ".minClients",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "self.task.partition.strategy != 'shards' || self.clients.all(c, has(c.data))",
        "message": "partition strategy 'shards' needs data.uri on every client",
        "fieldPath": ".clients",
        "reason": "FieldValueRequired"
    },
    {
        "rule": "!(self.aggregation.algorithm in ['cmga', 'fedavg']) || self.adapter.type == 'dema'",
        "message": "algorithms cmga and fedavg aggregate DeMA's shared part: set adapter.type to dema",
        "fieldPath": ".aggregation.algorithm",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!(self.aggregation.algorithm in ['hetlora', 'flexlora']) || self.adapter.type == 'lora'",
        "message": "algorithms hetlora and flexlora aggregate LoRA factors: set adapter.type to lora",
        "fieldPath": ".aggregation.algorithm",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "self.aggregation.serverMomentum == 0.0 || self.aggregation.algorithm in ['cmga', 'fedavg', 'family-fedavg']",
        "message": "serverMomentum applies to cmga, fedavg and family-fedavg only",
        "fieldPath": ".aggregation.serverMomentum",
        "reason": "FieldValueForbidden"
    },
    {
        "rule": "!has(self.bridge) || self.aggregation.algorithm != 'local-only'",
        "message": "a bridge is averaged over all clients: use an aggregation algorithm other than local-only (DeMA own models: fedavg, cmga or family-fedavg; LoRA own models, adapter.type lora: hetlora or flexlora)",
        "fieldPath": ".bridge",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.task.splits) || !has(self.task.splits.pool) || self.task.splits.pool == 0.0 || has(self.bridge)",
        "message": "task.splits.pool holds training examples out for the bridge to teach on: set spec.bridge, or set pool to 0",
        "fieldPath": ".task.splits.pool",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.bridge) || !has(self.aggregation.privacy) || !has(self.task.splits) || !has(self.task.splits.pool) || self.task.splits.pool == 0.0 || (has(self.bridge.distillation) && has(self.bridge.distillation.poolTeacher) && self.bridge.distillation.poolTeacher != 'ensemble')",
        "message": "poolTeacher ensemble (the default) sends every client's class probabilities on the public pool without noise: with aggregation.privacy set bridge.distillation.poolTeacher to bridge or validated, or set task.splits.pool to 0",
        "fieldPath": ".bridge.distillation.poolTeacher",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.bridge) || !has(self.bridge.distillation) || !has(self.bridge.distillation.serverSteps) || self.bridge.distillation.serverSteps == 0 || (has(self.task.splits) && has(self.task.splits.pool) && self.task.splits.pool > 0.0 && (!has(self.bridge.distillation.poolTeacher) || self.bridge.distillation.poolTeacher == 'ensemble'))",
        "message": "bridge.distillation.serverSteps distils the averaged bridge on the public pool against the federation's ensemble: it needs task.splits.pool above 0 and poolTeacher ensemble (the default); set serverSteps to 0 otherwise",
        "fieldPath": ".bridge.distillation.serverSteps",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.aggregation.privacy) || (self.aggregation.algorithm in ['fedavg', 'family-fedavg'] && (!has(self.aggregation.robust) || !has(self.aggregation.robust.combine) || self.aggregation.robust.combine == 'mean'))",
        "message": "aggregation.privacy adds noise to sums of clipped updates: it needs algorithm fedavg or family-fedavg and robust.combine mean",
        "fieldPath": ".aggregation.privacy",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.aggregation.privacy) || (self.aggregation.privacy.clipNorm > 0.0 && self.aggregation.privacy.noiseMultiplier > 0.0 && self.aggregation.privacy.delta > 0.0)",
        "message": "aggregation.privacy needs clipNorm, noiseMultiplier and delta above 0",
        "fieldPath": ".aggregation.privacy",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "self.adapter.type == 'lora' || self.clients.all(c, !has(c.loraRank))",
        "message": "clients[].loraRank applies to adapter.type lora only",
        "fieldPath": ".clients",
        "reason": "FieldValueForbidden"
    }
]))]
pub struct FederatedTuneSpec {
    /// Number of federated rounds (Flower `num_rounds`). Raising it on a
    /// finished run continues it from the last global state.
    #[serde(default = "defaults::rounds")]
    #[schemars(range(min = 1, max = 10000))]
    pub rounds: u32,

    /// Quorum: the number of committed client artifacts a round needs before
    /// it is aggregated (FLARE `min_clients`). Defaults to every client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_clients: Option<u32>,

    /// Wall-clock limit of one round. At the deadline the round is aggregated
    /// with what arrived if quorum holds, else it fails (FLARE `train_timeout`).
    #[serde(default = "defaults::round_deadline_seconds")]
    #[schemars(range(min = 10, max = 604800))]
    pub round_deadline_seconds: u32,

    /// After quorum is reached, wait this long for stragglers before
    /// aggregating (FLARE `wait_time_after_min_received`). 0 aggregates as
    /// soon as every client has reported or quorum holds and the deadline passed.
    #[serde(default)]
    #[schemars(range(max = 86400))]
    pub wait_after_min_clients_seconds: u32,

    /// How often a failed client run is retried within a round before the
    /// client is excluded from that round.
    #[serde(default = "defaults::max_retries_per_client")]
    #[schemars(range(max = 20))]
    pub max_retries_per_client: u32,

    /// Pause the run: no new trainer or aggregation jobs start; running ones finish.
    #[serde(default)]
    pub suspend: bool,

    /// The participants. Each runs its own model family and size.
    #[schemars(
        length(min = 1, max = 1000),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"])
    )]
    pub clients: Vec<ClientSpec>,

    /// What is learned: dataset, label set, splits and the non-IID partition.
    pub task: TaskSpec,

    /// Local training settings shared by all clients.
    #[serde(default)]
    pub training: TrainingSpec,

    /// The adapter every client trains (DeMA by default).
    #[serde(default)]
    pub adapter: AdapterSpec,

    /// How client updates are combined each round.
    #[serde(default)]
    pub aggregation: AggregationSpec,

    /// A small common model every client co-trains next to its own, averaged
    /// over all clients, with mutual distillation (cross-architecture transfer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<BridgeSpec>,

    /// How the aggregated model is evaluated (each round, and after the last).
    #[serde(default)]
    pub evaluation: EvaluationSpec,

    /// Where artifacts live (the round protocol's object store).
    #[serde(default)]
    pub storage: StorageSpec,

    /// The trainer container (used in a cluster; ignored by the local runner).
    #[serde(default)]
    pub trainer: TrainerSpec,

    /// What happens to artifacts over time and when the resource is deleted.
    #[serde(default)]
    pub retention: RetentionSpec,
}

impl FederatedTuneSpec {
    /// The quorum in force: `minClients`, or every client when unset.
    pub fn quorum(&self) -> u32 {
        self.min_clients.unwrap_or(self.clients.len() as u32)
    }

    /// The layer selection in force for client `index`: its own, else `adapter.layers`.
    pub fn layer_selection(&self, index: usize) -> &LayerSelectionSpec {
        self.clients[index]
            .model
            .adapted_layers
            .as_ref()
            .unwrap_or(&self.adapter.layers)
    }

    /// Whether the clients exchange probabilities on the public pool for the
    /// federation's ensemble: a bridge with `poolTeacher: ensemble` (the
    /// default) and a pool (`task.splits.pool` above 0).
    pub fn uses_pool_ensemble(&self) -> bool {
        self.task.splits.pool > 0.0
            && self
                .bridge
                .as_ref()
                .is_some_and(|b| b.distillation.pool_teacher == PoolTeacher::Ensemble)
    }

    /// The layer selection of the bridge model (`spec.bridge`): its own,
    /// else `adapter.layers`; `None` without a bridge. The bridge has one
    /// slot per adapted layer (it meets only other clients' bridges).
    pub fn bridge_layer_selection(&self) -> Option<&LayerSelectionSpec> {
        self.bridge.as_ref().map(|b| {
            b.model
                .adapted_layers
                .as_ref()
                .unwrap_or(&self.adapter.layers)
        })
    }

    /// A short, stable key naming client `index`'s model family in
    /// artifacts and reports: the model directory's name plus 6 hex digits of
    /// a hash of the model URI and the adapted-layer selection, so two
    /// checkpoints with the same directory name, or one checkpoint adapted at
    /// different layers (different family tensors), never mix.
    pub fn family_key(&self, index: usize) -> String {
        let model = &self.clients[index].model;
        let sel = self.layer_selection(index);
        let uri = model.uri.trim_end_matches('/');
        let base = crate::uri::file_safe(uri.rsplit('/').next().unwrap_or("model"));
        let identity = format!(
            "{uri}|{:?}|{:?}|{}",
            sel.mode, sel.window, sel.every_layer_in_group
        );
        // FNV-1a: stable across platforms and releases, unlike std's hasher.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in identity.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{base}.{:06x}", hash & 0xff_ffff)
    }

    /// Client `index`'s family as people read it: the model's name
    /// (`all-MiniLM-L6-v2`), with [`Self::family_key`]'s hash only where
    /// another family of this spec has the same name (other weights, or
    /// other adapted layers).
    pub fn family_label(&self, index: usize) -> String {
        let name = |key: &str| key.rsplit_once('.').map_or(key, |(n, _)| n).to_string();
        let key = self.family_key(index);
        let clash = (0..self.clients.len()).any(|j| {
            let other = self.family_key(j);
            other != key && name(&other) == name(&key)
        });
        if clash {
            key
        } else {
            name(&key)
        }
    }
}

/// Default values, shared by serde and the generated schema.
pub(crate) mod defaults {
    pub fn rounds() -> u32 {
        10
    }
    pub fn round_deadline_seconds() -> u32 {
        3600
    }
    pub fn max_retries_per_client() -> u32 {
        2
    }
    pub fn yes() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::FederatedTuneSpec;

    fn spec(uris: &[&str]) -> FederatedTuneSpec {
        let clients: Vec<String> = uris
            .iter()
            .enumerate()
            .map(|(i, u)| {
                format!(r#"{{"name": "c{i}", "model": {{"family": "bert", "uri": "{u}"}}}}"#)
            })
            .collect();
        let text = format!(
            r#"{{"clients": [{}], "task": {{"dataset": {{"uri": "/d.jsonl"}}, "labels": ["x", "z"]}}}}"#,
            clients.join(",")
        );
        serde_json::from_str(&text).expect("spec")
    }

    #[test]
    fn family_labels_are_model_names_with_the_hash_only_where_names_clash() {
        let s = spec(&[
            "cache://models/all-MiniLM-L6-v2",
            "cache://models/SmolLM2-135M-Instruct/",
        ]);
        assert_eq!(s.family_label(0), "all-MiniLM-L6-v2");
        assert_eq!(s.family_label(1), "SmolLM2-135M-Instruct");
        let s = spec(&[
            "/a/all-MiniLM-L6-v2",
            "/b/all-MiniLM-L6-v2",
            "/a/all-MiniLM-L6-v2",
        ]);
        assert_eq!(s.family_label(0), s.family_key(0));
        assert_ne!(s.family_label(0), s.family_label(1));
        assert_eq!(s.family_label(0), s.family_label(2));
    }
}
