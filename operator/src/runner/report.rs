//! The run report: `report.json`, `report.md` and PNG plots, rewritten after
//! every round from the manifests in the store.
//!
//! Two accuracies on the common global test set, averaged per family and
//! overall:
//! * the **global model** of a round: the aggregated state as each client
//!   receives it (with its own private parts, if any), measured by the
//!   clients before their next round's training, and for the last round by
//!   the evaluation after it (`spec.evaluation`). This is what the
//!   federation delivers;
//! * **after local training**: each client's model after its local
//!   training in that round (personalised to its own, skewed data).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::runner::plots::{plot_accuracy, plot_bytes};

/// serde_json writes a NaN figure (not measured) as `null`: read it back as NaN.
fn nan_when_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// [`nan_when_null`] for each value of a map.
fn nan_map_when_null<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    let m = BTreeMap::<String, Option<f64>>::deserialize(d)?;
    Ok(m.into_iter()
        .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
        .collect())
}

/// One client's figures in one round.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientRecord {
    pub name: String,
    pub family: String,
    #[serde(deserialize_with = "nan_when_null")]
    pub test_accuracy: f64,
    #[serde(deserialize_with = "nan_when_null")]
    pub test_macro_f1: f64,
    #[serde(deserialize_with = "nan_when_null")]
    pub validation_accuracy: f64,
    #[serde(deserialize_with = "nan_when_null")]
    pub train_loss: f64,
    #[serde(deserialize_with = "nan_when_null")]
    pub steps_per_second: f64,
    #[serde(deserialize_with = "nan_when_null")]
    pub train_seconds: f64,
    #[serde(deserialize_with = "nan_when_null")]
    pub peak_rss_bytes: f64,
    pub bytes_uploaded: u64,
}

/// One completed round.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RoundRecord {
    pub round: u32,
    #[serde(deserialize_with = "nan_when_null")]
    pub duration_seconds: f64,
    #[serde(deserialize_with = "nan_when_null")]
    pub aggregation_seconds: f64,
    pub participants: Vec<String>,
    pub excluded: Vec<String>,
    pub clients: Vec<ClientRecord>,
    #[serde(deserialize_with = "nan_when_null")]
    pub accuracy: f64,
    #[serde(deserialize_with = "nan_when_null")]
    pub macro_f1: f64,
    #[serde(deserialize_with = "nan_map_when_null")]
    pub accuracy_by_family: BTreeMap<String, f64>,
    /// The global model of this round (known after the next round, or the
    /// final evaluation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_macro_f1: Option<f64>,
    #[serde(
        default,
        deserialize_with = "nan_map_when_null",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub global_accuracy_by_family: BTreeMap<String, f64>,
    pub bytes_uploaded: u64,
    pub bytes_downloaded: u64,
    /// The aggregator's statistics (cosines, conflicts, rejects).
    #[serde(default)]
    pub aggregation: serde_json::Value,
}

/// A model family in the run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FamilyInfo {
    pub key: String,
    /// The family as people read it (`FederatedTuneSpec::family_label`).
    #[serde(default)]
    pub label: String,
    pub architecture: String,
    pub model_uri: String,
    pub clients: Vec<String>,
    pub num_layers: u64,
    pub hidden_size: u64,
    pub parameters: u64,
    /// What full-model FedAvg would upload per client per round (bf16).
    pub full_model_bytes: u64,
    /// What LoRA (rank r on query and value, bf16) FedAvg would upload.
    pub lora_bytes: u64,
    /// The backbone dtype the spec gives (`auto`, `float32`, ...).
    #[serde(default)]
    pub dtype: String,
    /// The dtypes its trainers ran in (`auto` resolved), from their manifests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dtypes_run: Vec<String>,
}

impl FamilyInfo {
    /// Its name in tables: the label, else (older reports) the key.
    fn name(&self) -> &str {
        if self.label.is_empty() {
            &self.key
        } else {
            &self.label
        }
    }
}

/// One update the aggregator refused (from a round's statistics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub client: String,
    pub reason: String,
    pub detail: String,
}

/// The rejects in a round's aggregation statistics (`stats.rejects`).
pub fn rejects(aggregation: &serde_json::Value) -> Vec<Rejected> {
    let text = |v: &serde_json::Value, k: &str| {
        v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string()
    };
    aggregation
        .get("rejects")
        .and_then(|r| r.as_array())
        .map(|list| {
            list.iter()
                .map(|x| Rejected {
                    client: text(x, "client"),
                    reason: text(x, "reason"),
                    detail: text(x, "detail"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A family's dtype cell: `float32`, or `auto → bfloat16` once trainers ran.
fn dtype_cell(f: &FamilyInfo) -> String {
    match f.dtypes_run.join("/") {
        run if run.is_empty() || run == f.dtype => f.dtype.clone(),
        run => format!("{} → {run}", f.dtype),
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub run: String,
    pub name: String,
    pub algorithm: String,
    pub rounds_planned: u32,
    pub dataset: String,
    pub labels: Vec<String>,
    pub partition: String,
    pub seeds: BTreeMap<String, u64>,
    pub families: Vec<FamilyInfo>,
    /// Clients their own sites run (`spec.clients[].site`): client → site.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sites: BTreeMap<String, String>,
    pub rounds: Vec<RoundRecord>,
    /// Each client's evaluation of the final global model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub final_evaluation: Vec<heterotune_crds::manifest::EvaluationResult>,
    #[serde(deserialize_with = "nan_when_null")]
    pub total_seconds: f64,
    pub status: String,
    /// `spec.evaluation.roundTestExamples`: the rounds' scores are on this
    /// many test examples (the final evaluation on all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_test_examples: Option<u32>,
}

impl Report {
    /// Full-model FedAvg and LoRA FedAvg bytes per round over all clients.
    pub fn reference_bytes(&self) -> (u64, u64) {
        let mut full = 0;
        let mut lora = 0;
        for f in &self.families {
            full += f.full_model_bytes * f.clients.len() as u64;
            lora += f.lora_bytes * f.clients.len() as u64;
        }
        (full, lora)
    }

    /// Writes report.json, report.md, accuracy.png and bytes.png into `dir`.
    /// Plots that cannot be drawn (no font) are reported in the markdown.
    pub fn write(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let mut written = Vec::new();
        let path = dir.join("report.json");
        std::fs::write(&path, json)?;
        written.push(path);
        let mut plot_notes = Vec::new();
        for (file, result) in [
            (
                "accuracy.png",
                plot_accuracy(self, &dir.join("accuracy.png")),
            ),
            ("bytes.png", plot_bytes(self, &dir.join("bytes.png"))),
        ] {
            match result {
                Ok(()) => written.push(dir.join(file)),
                Err(e) => plot_notes.push(format!("{file} could not be drawn: {e}")),
            }
        }
        let path = dir.join("report.md");
        std::fs::write(&path, self.markdown(&plot_notes))?;
        written.push(path);
        Ok(written)
    }

    /// The markdown report.
    pub fn markdown(&self, plot_notes: &[String]) -> String {
        let mut md = String::new();
        md.push_str(&format!("# HeteroTune run `{}`\n\n", self.name));
        md.push_str(&format!(
            "Status: **{}** — {} of {} rounds, algorithm `{}`, {:.0} s in all.\n\n",
            self.status,
            self.rounds.len(),
            self.rounds_planned,
            self.algorithm,
            self.total_seconds
        ));
        md.push_str(&format!(
            "Data: `{}`, labels {}, partition {}; seeds {}.\n\n",
            self.dataset,
            self.labels.join(", "),
            self.partition,
            self.seeds
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if let Some(line) = self.privacy_line() {
            md.push_str(&line);
        }
        if !self.sites.is_empty() {
            let sites: Vec<String> = self
                .sites
                .iter()
                .map(|(client, site)| format!("{client} (site {site})"))
                .collect();
            md.push_str(&format!(
                "Run by their own sites (`heterotune site`; the run waits for their commits): {}.\n\n",
                sites.join(", ")
            ));
        }
        self.models_table(&mut md);
        self.rounds_table(&mut md);
        self.final_evaluation_table(&mut md);
        self.rejects_table(&mut md);
        self.last_round(&mut md);
        md.push_str("\n![accuracy](accuracy.png)\n\n![bytes](bytes.png)\n");
        for note in plot_notes {
            md.push_str(&format!("\nNote: {note}\n"));
        }
        md
    }

    /// `aggregation.privacy`: the guarantee after the last aggregated round,
    /// as the aggregator recorded it.
    fn privacy_line(&self) -> Option<String> {
        let (round, p) = self
            .rounds
            .iter()
            .rev()
            .find_map(|r| Some((r.round, r.aggregation.get("privacy")?)))?;
        let num = |k: &str| {
            p.get(k)
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(f64::NAN)
        };
        Some(format!(
            "Differential privacy (client level): **ε = {:.2}** at δ = {:e} after {round} \
             round(s) (clip norm {}, noise multiplier {}).\n\n",
            num("epsilon"),
            num("delta"),
            num("clipNorm"),
            num("noiseMultiplier"),
        ))
    }

    /// `## Models`: one row per family, with the reference uploads.
    fn models_table(&self, md: &mut String) {
        md.push_str("## Models\n\n| family | architecture | model | dtype | layers | hidden | parameters | clients | full-model FedAvg upload | LoRA FedAvg upload |\n|---|---|---|---|---|---|---|---|---|---|\n");
        for f in &self.families {
            md.push_str(&format!(
                "| {} | {} | `{}` | {} | {} | {} | {:.1} M | {} | {} | {} |\n",
                f.name(),
                f.architecture,
                f.model_uri,
                dtype_cell(f),
                f.num_layers,
                f.hidden_size,
                f.parameters as f64 / 1e6,
                f.clients.join(", "),
                human_bytes(f.full_model_bytes),
                human_bytes(f.lora_bytes)
            ));
        }
    }

    /// `## Rounds`: global-model and local accuracy per round and family.
    fn rounds_table(&self, md: &mut String) {
        md.push_str(
            "\n## Rounds\n\nGlobal-test accuracy, mean over clients: **global model** = the round's \
             aggregated model as the clients receive it (what the federation delivers; measured \
             before the next round's training, or by the final evaluation); **local** = each \
             client's model after its local training in the round. Per family: global / local.",
        );
        if let Some(n) = self.round_test_examples {
            md.push_str(&format!(
                " Each round scores the first {n} test examples (`evaluation.roundTestExamples`); \
                 the final evaluation scores the whole test set."
            ));
        }
        md.push_str("\n\n| round | global model | local | local macro-F1 |");
        for f in &self.families {
            md.push_str(&format!(" {} |", f.name()));
        }
        md.push_str(" participants | uploaded | round time | aggregation |\n|---|---|---|---|");
        for _ in &self.families {
            md.push_str("---|");
        }
        md.push_str("---|---|---|---|\n");
        let score = |v: Option<f64>| match v {
            Some(a) if a.is_finite() => format!("{a:.3}"),
            _ => "–".to_string(),
        };
        for r in &self.rounds {
            md.push_str(&format!(
                "| {} | {} | {} | {} |",
                r.round,
                score(r.global_accuracy),
                score(Some(r.accuracy)),
                score(Some(r.macro_f1))
            ));
            for f in &self.families {
                md.push_str(&format!(
                    " {} / {} |",
                    score(r.global_accuracy_by_family.get(&f.key).copied()),
                    score(r.accuracy_by_family.get(&f.key).copied())
                ));
            }
            md.push_str(&format!(
                " {} | {} | {} | {} |\n",
                r.participants.len(),
                human_bytes(r.bytes_uploaded),
                seconds(r.duration_seconds, 1),
                seconds(r.aggregation_seconds, 2)
            ));
        }
    }

    /// `## The final global model`: each client's evaluation of it.
    /// `## Rejected updates`: every update the aggregator refused, by round.
    fn rejects_table(&self, md: &mut String) {
        let rows: Vec<(u32, Rejected)> = self
            .rounds
            .iter()
            .flat_map(|r| {
                rejects(&r.aggregation)
                    .into_iter()
                    .map(move |x| (r.round, x))
            })
            .collect();
        if rows.is_empty() {
            return;
        }
        md.push_str(
            "\n## Rejected updates\n\n| round | client | reason | detail |\n|---|---|---|---|\n",
        );
        for (round, x) in rows {
            md.push_str(&format!(
                "| {round} | {} | {} | {} |\n",
                x.client,
                x.reason,
                x.detail.replace('|', "\\|")
            ));
        }
    }

    fn final_evaluation_table(&self, md: &mut String) {
        if !self.final_evaluation.is_empty() {
            md.push_str("\n## The final global model\n\n| client | family | global round | test acc | test macro-F1 | test examples |\n|---|---|---|---|---|---|\n");
            for e in &self.final_evaluation {
                md.push_str(&format!(
                    "| {} | {} | {} | {:.3} | {:.3} | {} |\n",
                    e.client, e.family, e.global_round, e.accuracy, e.macro_f1, e.test_examples
                ));
            }
        }
    }

    /// The bytes of the last round against the references, and its clients.
    fn last_round(&self, md: &mut String) {
        let (full, lora) = self.reference_bytes();
        if let Some(last) = self.rounds.last() {
            md.push_str(&format!(
                "\nBytes uploaded per round: {} (this run) vs {} for full-model FedAvg and {} for LoRA FedAvg on the same clients ({:.2} % and {:.1} % of them).\n",
                human_bytes(last.bytes_uploaded),
                human_bytes(full),
                human_bytes(lora),
                100.0 * last.bytes_uploaded as f64 / full.max(1) as f64,
                100.0 * last.bytes_uploaded as f64 / lora.max(1) as f64
            ));
            md.push_str("\n## Clients in the last round\n\n| client | family | test acc | test macro-F1 | val acc | loss | steps/s | train time | peak RSS | upload |\n|---|---|---|---|---|---|---|---|---|---|\n");
            for c in &last.clients {
                md.push_str(&format!(
                    "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.1} s | {:.0} MiB | {} |\n",
                    c.name,
                    c.family,
                    c.test_accuracy,
                    c.test_macro_f1,
                    c.validation_accuracy,
                    c.train_loss,
                    c.steps_per_second,
                    c.train_seconds,
                    c.peak_rss_bytes / (1024.0 * 1024.0),
                    human_bytes(c.bytes_uploaded)
                ));
            }
            if !last.excluded.is_empty() {
                md.push_str(&format!(
                    "\nExcluded in the last round: {}.\n",
                    last.excluded.join(", ")
                ));
            }
        }
    }
}

/// `12.3 s`, or `–` for a time not measured (a round completed by an
/// earlier, interrupted run).
fn seconds(s: f64, decimals: usize) -> String {
    if s.is_finite() && s > 0.0 {
        format!("{s:.decimals$} s")
    } else {
        "–".to_string()
    }
}

/// `1.2 MB`-style sizes (decimal units, as bandwidth is counted).
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} KB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::plots::ensure_font;

    fn sample() -> Report {
        let rounds = (1..=3)
            .map(|r| RoundRecord {
                round: r,
                duration_seconds: 2.0,
                aggregation_seconds: 0.01,
                participants: vec!["a".into(), "b".into()],
                excluded: vec![],
                clients: vec![],
                accuracy: 0.5 + 0.1 * r as f64,
                macro_f1: 0.4,
                accuracy_by_family: [("bert-l6".to_string(), 0.6 + 0.05 * r as f64)]
                    .into_iter()
                    .collect(),
                global_accuracy: (r < 3).then_some(0.6 + 0.1 * r as f64),
                global_macro_f1: None,
                global_accuracy_by_family: BTreeMap::new(),
                bytes_uploaded: 90_000,
                bytes_downloaded: 90_000,
                aggregation: serde_json::Value::Null,
            })
            .collect();
        Report {
            name: "t".into(),
            algorithm: "cmga".into(),
            rounds_planned: 3,
            families: vec![FamilyInfo {
                key: "bert-l6".into(),
                label: String::new(),
                architecture: "bert".into(),
                model_uri: "cache://models/x".into(),
                clients: vec!["a".into(), "b".into()],
                num_layers: 6,
                hidden_size: 384,
                parameters: 22_000_000,
                full_model_bytes: 88_000_000,
                lora_bytes: 147_000,
                dtype: "auto".into(),
                dtypes_run: vec!["bfloat16".into()],
            }],
            rounds,
            status: "Succeeded".into(),
            ..Report::default()
        }
    }

    #[test]
    fn writes_json_markdown_and_plots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = sample();
        let files = report.write(dir.path()).expect("write");
        let md = std::fs::read_to_string(dir.path().join("report.md")).expect("md");
        assert!(md.contains("| 3 | – | 0.800 |"), "{md}");
        assert!(md.contains("| 2 | 0.800 | 0.700 |"), "{md}");
        assert!(md.contains("176.0 MB for full-model FedAvg"), "{md}");
        assert!(
            md.contains("| `cache://models/x` | auto → bfloat16 | 6 |"),
            "{md}"
        );
        let back: Report =
            serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).expect("json"))
                .expect("parse");
        assert_eq!(back, report);
        if ensure_font().is_ok() {
            for png in ["accuracy.png", "bytes.png"] {
                let bytes = std::fs::read(dir.path().join(png)).expect("png written");
                assert_eq!(&bytes[1..4], b"PNG");
            }
            assert_eq!(files.len(), 4);
        } else {
            assert!(md.contains("could not be drawn"));
        }
    }

    #[test]
    fn rejected_updates_are_listed_and_privacy_stated() {
        let mut report = sample();
        assert!(!report.markdown(&[]).contains("Rejected updates"));
        report.rounds[0].aggregation = serde_json::json!({
            "rejects": [{"client": "b", "reason": "norm_exceeded", "detail": "shared above 5 | x", "bytes": 3}],
            "privacy": {"epsilon": 4.2, "delta": 1e-5, "clipNorm": 0.5, "noiseMultiplier": 2.0}
        });
        let md = report.markdown(&[]);
        assert!(
            md.contains("| 1 | b | norm_exceeded | shared above 5 \\| x |"),
            "{md}"
        );
        assert!(md.contains("**ε = 4.20**"), "{md}");
        assert_eq!(rejects(&report.rounds[0].aggregation)[0].client, "b");
        assert!(rejects(&serde_json::Value::Null).is_empty());
    }
}
