//! The run report's bookkeeping: its skeleton from the spec, then each
//! completed round and the final evaluation from the facts the shared
//! observation ([`crate::protocol::observe`]) read from the store.

use std::collections::BTreeMap;

use heterotune_crds::manifest::{mean_accuracy, valid_score, ArtifactManifest, EvaluationResult};
use heterotune_crds::model::facts::stored_weights;
use heterotune_crds::model::ModelFacts;
use heterotune_crds::uri::{self, Location};
use heterotune_crds::FederatedTune;

use crate::protocol::observe::RoundFacts;
use crate::runner::report::{ClientRecord, FamilyInfo, Report, RoundRecord};

/// Depth, width, value-projection width and stored parameter count of the
/// model in `dir` (zeros for what cannot be read: the report still runs).
fn model_dims(dir: &std::path::Path) -> (u64, u64, u64, u64) {
    let params = stored_weights(dir).map(|h| h.parameters()).unwrap_or(0);
    match ModelFacts::read(dir) {
        Ok(f) => (f.num_layers, f.hidden_size, f.value_width(), params),
        Err(_) => (0, 0, 0, params),
    }
}

/// The report skeleton: the run, its data and its model families.
pub fn new_report(ft: &FederatedTune, run: &str) -> Report {
    let spec = &ft.spec;
    let mut families: BTreeMap<String, FamilyInfo> = BTreeMap::new();
    for (i, c) in spec.clients.iter().enumerate() {
        let key = spec.family_key(i);
        let entry = families.entry(key.clone()).or_insert_with(|| {
            let (layers, hidden, value_width, params) = match uri::resolve(&c.model.uri) {
                Ok(Location::Local(dir)) => model_dims(&dir),
                _ => (0, 0, 0, c.model.parameters.unwrap_or(0)),
            };
            let rank = u64::from(spec.adapter.rank);
            FamilyInfo {
                key: key.clone(),
                label: spec.family_label(i),
                architecture: c.model.family.as_str().to_string(),
                model_uri: c.model.uri.clone(),
                clients: Vec::new(),
                num_layers: layers,
                hidden_size: hidden,
                parameters: params,
                // Both references in bf16, as this run's uploads are.
                full_model_bytes: params * 2,
                // LoRA on query and value of every layer: A [r, d] + B [d_out, r]
                // each (d_out = d for the query, kv_heads x head_dim for the value).
                lora_bytes: layers * rank * (hidden + hidden + hidden + value_width) * 2,
                dtype: c.model.dtype.as_str().to_string(),
                dtypes_run: Vec::new(),
            }
        });
        entry.clients.push(c.name.clone());
    }
    let mut seeds = BTreeMap::new();
    seeds.insert("split".to_string(), spec.task.splits.seed);
    seeds.insert("partition".to_string(), spec.task.partition.seed);
    seeds.insert("training".to_string(), spec.training.seed);
    Report {
        run: run.to_string(),
        name: ft.metadata.name.clone().unwrap_or_default(),
        algorithm: spec.aggregation.algorithm.as_str().to_string(),
        rounds_planned: spec.rounds,
        dataset: spec.task.dataset.uri.clone(),
        labels: spec.task.labels.clone(),
        partition: match spec.task.partition.strategy {
            heterotune_crds::spec::PartitionStrategy::Dirichlet => {
                format!("Dirichlet(α={})", spec.task.partition.alpha)
            }
            heterotune_crds::spec::PartitionStrategy::Iid => "IID".to_string(),
            heterotune_crds::spec::PartitionStrategy::Shards => "client shards".to_string(),
        },
        seeds,
        families: families.into_values().collect(),
        sites: spec
            .clients
            .iter()
            .filter_map(|c| Some((c.name.clone(), c.site.as_ref()?.name.clone())))
            .collect(),
        rounds: Vec::new(),
        final_evaluation: Vec::new(),
        total_seconds: 0.0,
        status: "Running".into(),
        round_test_examples: spec.evaluation.round_test_examples,
    }
}

/// Adds a completed round to the report from its facts (the manifests the
/// store holds): `duration` and `excluded` are what this runner saw of it;
/// a NaN `duration` (a round this runner did not see) keeps what an earlier
/// run measured ([`resume`]).
pub fn record_round(report: &mut Report, facts: &RoundFacts, duration: f64, excluded: &[String]) {
    let round = facts.round;
    let global = facts.global.as_ref();
    let clients: Vec<ClientRecord> = facts
        .clients
        .iter()
        .map(|(name, m)| client_record(name, m))
        .collect();
    let mean = |xs: &[f64]| {
        if xs.is_empty() {
            f64::NAN
        } else {
            xs.iter().sum::<f64>() / xs.len() as f64
        }
    };
    let mut by_family: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for c in &clients {
        by_family
            .entry(c.family.clone())
            .or_default()
            .push(c.test_accuracy);
    }
    let accuracy = mean(&clients.iter().map(|c| c.test_accuracy).collect::<Vec<_>>());
    let macro_f1 = mean(&clients.iter().map(|c| c.test_macro_f1).collect::<Vec<_>>());
    let bytes_uploaded = clients.iter().map(|c| c.bytes_uploaded).sum();
    let global_bytes = global.map(|g| g.artifact.bytes).unwrap_or(0);
    let kept = report.rounds.iter().find(|r| r.round == round).cloned();
    let (duration, excluded) = match &kept {
        Some(k) if duration.is_nan() => (k.duration_seconds, k.excluded.as_slice()),
        _ => (duration, excluded),
    };
    let record = RoundRecord {
        round,
        duration_seconds: duration,
        aggregation_seconds: kept.as_ref().map(|r| r.aggregation_seconds).unwrap_or(0.0),
        participants: clients.iter().map(|c| c.name.clone()).collect(),
        excluded: excluded.to_vec(),
        accuracy,
        macro_f1,
        accuracy_by_family: by_family.into_iter().map(|(k, v)| (k, mean(&v))).collect(),
        // A final evaluation recorded before (a resumed run) stays.
        global_accuracy: kept.as_ref().and_then(|k| k.global_accuracy),
        global_macro_f1: kept.as_ref().and_then(|k| k.global_macro_f1),
        global_accuracy_by_family: kept
            .map(|k| k.global_accuracy_by_family)
            .unwrap_or_default(),
        bytes_uploaded,
        bytes_downloaded: global_bytes * clients.len() as u64,
        clients,
        aggregation: global.map(|g| g.stats.clone()).unwrap_or_default(),
    };
    record_dtypes(report, facts);
    report.rounds.retain(|r| r.round != round);
    report.rounds.push(record);
    report.rounds.sort_by_key(|r| r.round);
    // This round's clients measured the previous round's global model.
    if let (Some(g), Some(previous)) = (
        global,
        report.rounds.iter_mut().find(|r| r.round + 1 == round),
    ) {
        let metric = |k: &str| g.metrics.get(k).copied().filter(|v| v.is_finite());
        if let Some(a) = metric("previous_global_accuracy") {
            previous.global_accuracy = Some(a);
            previous.global_macro_f1 = metric("previous_global_macro_f1");
            previous.global_accuracy_by_family = g
                .metrics
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix("previous_global_accuracy.")
                        .map(|f| (f.to_string(), *v))
                })
                .collect();
        }
    }
}

/// Adds the dtypes the round's trainers ran in (their manifests' `dtype`
/// stat) to their families.
fn record_dtypes(report: &mut Report, facts: &RoundFacts) {
    for (_, m) in &facts.clients {
        let (Some(family), Some(dtype)) = (&m.family, m.stats["dtype"].as_str()) else {
            continue;
        };
        if let Some(f) = report.families.iter_mut().find(|f| &f.key == family) {
            if !f.dtypes_run.iter().any(|d| d == dtype) {
                f.dtypes_run.push(dtype.to_string());
                f.dtypes_run.sort();
            }
        }
    }
}

/// One client's figures in a round, from its manifest.
fn client_record(name: &str, m: &ArtifactManifest) -> ClientRecord {
    let metric = |k: &str| m.metrics.get(k).copied().unwrap_or(f64::NAN);
    ClientRecord {
        name: name.to_string(),
        family: m.family.clone().unwrap_or_default(),
        test_accuracy: metric("test_accuracy"),
        test_macro_f1: metric("test_macro_f1"),
        validation_accuracy: metric("accuracy"),
        train_loss: metric("mean_train_loss"),
        steps_per_second: metric("steps_per_second"),
        train_seconds: metric("train_seconds"),
        peak_rss_bytes: metric("peak_rss_bytes"),
        bytes_uploaded: m.artifact.bytes,
    }
}

/// Records the final evaluation (the clients' evaluations of the last
/// round's global model, in spec order) in the report.
pub fn record_evaluation(report: &mut Report, last_round: u32, results: &[EvaluationResult]) {
    if let (Some((mean, by_family)), Some(last)) = (
        mean_accuracy(results),
        report.rounds.iter_mut().find(|r| r.round == last_round),
    ) {
        last.global_accuracy = Some(mean);
        let f1: Vec<f64> = results
            .iter()
            .filter_map(|r| valid_score(r.macro_f1))
            .collect();
        last.global_macro_f1 = (!f1.is_empty()).then(|| f1.iter().sum::<f64>() / f1.len() as f64);
        last.global_accuracy_by_family = by_family;
    }
    report.final_evaluation = results.to_vec();
}

/// Takes over what an earlier run of the same run measured (its report in
/// the store): each completed round's time, aggregation time and excluded
/// clients, which no manifest holds. Returns the earlier runs' total time.
/// Everything else is re-read from the manifests by [`record_round`].
pub fn resume(report: &mut Report, earlier: Report, completed: u32) -> f64 {
    if earlier.run != report.run {
        return 0.0;
    }
    report.rounds = earlier
        .rounds
        .into_iter()
        .filter(|r| r.round <= completed)
        .collect();
    if earlier.total_seconds.is_finite() {
        earlier.total_seconds.max(0.0)
    } else {
        0.0
    }
}

/// Records the aggregation time of `round` (before the round's record exists).
pub fn note_aggregation(report: &mut Report, round: u32, seconds: f64) {
    if let Some(r) = report.rounds.iter_mut().find(|r| r.round == round) {
        r.aggregation_seconds = seconds;
    } else {
        report.rounds.push(RoundRecord {
            round,
            duration_seconds: 0.0,
            aggregation_seconds: seconds,
            participants: Vec::new(),
            excluded: Vec::new(),
            clients: Vec::new(),
            accuracy: f64::NAN,
            macro_f1: f64::NAN,
            accuracy_by_family: BTreeMap::new(),
            global_accuracy: None,
            global_macro_f1: None,
            global_accuracy_by_family: BTreeMap::new(),
            bytes_uploaded: 0,
            bytes_downloaded: 0,
            aggregation: serde_json::Value::Null,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use heterotune_crds::manifest::{ArtifactKind, FileDigest};

    fn manifest(
        client: Option<&str>,
        metrics: &[(&str, f64)],
        stats: serde_json::Value,
    ) -> ArtifactManifest {
        let kind = if client.is_some() {
            ArtifactKind::Client
        } else {
            ArtifactKind::Global
        };
        ArtifactManifest {
            client: client.map(str::to_string),
            family: client.map(|_| "bert".to_string()),
            artifact: FileDigest {
                path: "adapter.safetensors".into(),
                sha256: "00".into(),
                bytes: 100,
            },
            num_examples: 10,
            metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            stats,
            created_at: "2023-11-14T22:13:20Z".into(),
            ..ArtifactManifest::new(kind, "r", 2, 1, "test")
        }
    }

    #[test]
    fn a_round_is_recorded_from_its_facts_and_fills_in_the_previous_global_model() {
        let mut report = Report::default();
        note_aggregation(&mut report, 2, 0.5);
        let empty = RoundFacts {
            round: 1,
            global: None,
            clients: vec![],
        };
        record_round(&mut report, &empty, f64::NAN, &[]);
        let global = manifest(
            None,
            &[
                ("previous_global_accuracy", 0.6),
                ("previous_global_macro_f1", 0.5),
                ("previous_global_accuracy.bert", 0.7),
            ],
            serde_json::json!({ "participants": [{ "client": "a" }] }),
        );
        let a = manifest(
            Some("a"),
            &[("test_accuracy", 0.8)],
            serde_json::json!({ "dtype": "bfloat16" }),
        );
        report.families.push(FamilyInfo {
            key: "bert".into(),
            label: String::new(),
            architecture: "bert".into(),
            model_uri: "s3://m".into(),
            clients: vec!["a".into()],
            num_layers: 1,
            hidden_size: 1,
            parameters: 1,
            full_model_bytes: 2,
            lora_bytes: 2,
            dtype: "auto".into(),
            dtypes_run: Vec::new(),
        });
        let facts = RoundFacts {
            round: 2,
            global: Some(global),
            clients: vec![("a".into(), a)],
        };
        record_round(&mut report, &facts, 3.0, &["c".to_string()]);
        let [first, second] = &report.rounds[..] else {
            panic!("two rounds: {:?}", report.rounds);
        };
        assert_eq!(first.global_accuracy, Some(0.6));
        assert_eq!(first.global_macro_f1, Some(0.5));
        assert_eq!(first.global_accuracy_by_family.get("bert"), Some(&0.7));
        assert_eq!(second.participants, ["a"]);
        assert_eq!(second.excluded, ["c"]);
        assert_eq!(second.accuracy, 0.8);
        assert_eq!(second.aggregation_seconds, 0.5);
        assert_eq!((second.bytes_uploaded, second.bytes_downloaded), (100, 100));
        assert_eq!(report.families[0].dtypes_run, ["bfloat16"]);

        let result = |client: &str, accuracy: f64| EvaluationResult {
            schema_version: 1,
            run: "r".into(),
            client: client.into(),
            family: "bert".into(),
            global_round: 2,
            test_examples: 10,
            accuracy,
            macro_f1: accuracy,
            loss: None,
            seconds: None,
            variants: Default::default(),
            served: None,
            writer_version: "test".into(),
            created_at: "2023-11-14T22:13:20Z".into(),
        };
        record_evaluation(&mut report, 2, &[result("a", 0.75), result("b", 0.25)]);
        let last = &report.rounds[1];
        assert_eq!(last.global_accuracy, Some(0.5));
        assert_eq!(report.final_evaluation.len(), 2);

        // A later run of the same run keeps what this one measured.
        report.run = "r".into();
        report.total_seconds = 7.0;
        let mut again = Report {
            run: "r".into(),
            ..Report::default()
        };
        let earlier: Report =
            serde_json::from_slice(&serde_json::to_vec(&report).expect("json")).expect("parse");
        assert_eq!(resume(&mut again, earlier.clone(), 1), 7.0);
        assert_eq!(
            again.rounds.len(),
            1,
            "round 2 is not complete in the store"
        );
        assert_eq!(resume(&mut again, earlier, 2), 7.0);
        record_round(&mut again, &facts, f64::NAN, &[]);
        let second = &again.rounds[1];
        assert_eq!(second.duration_seconds, 3.0);
        assert_eq!(second.excluded, ["c"]);
        assert_eq!(second.aggregation_seconds, 0.5);
        let other = Report {
            run: "another".into(),
            ..Report::default()
        };
        assert_eq!(resume(&mut again, other, 2), 0.0);
        assert_eq!(again.rounds.len(), 2, "another run's report is ignored");
    }
}
