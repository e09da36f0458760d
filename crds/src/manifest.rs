//! The artifact manifest: the commit marker of every upload in the round
//! protocol, written last, after the data it describes.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Version of the manifest format written by this build.
pub const MANIFEST_SCHEMA_VERSION: u32 = 1;

/// Who wrote an artifact.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// A client's update for one round.
    Client,
    /// The aggregated state after one round.
    Global,
}

/// A tensor inside an artifact.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct TensorInfo {
    /// Name, e.g. `shared.slot0.experts.weight`.
    pub name: String,
    /// safetensors dtype name, e.g. `BF16`, `F32`.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
}

/// Digest of a stored file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct FileDigest {
    /// File name relative to the manifest's directory.
    pub path: String,
    /// Lower-case hex SHA-256 of the file's bytes.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// The manifest of one artifact.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactManifest {
    /// Format version ([`MANIFEST_SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// Client update or global state.
    pub kind: ArtifactKind,
    /// The run directory this artifact belongs to (guards against mixing runs).
    pub run: String,
    /// The round the artifact belongs to.
    pub round: u32,
    /// The global round the client started from (0: the initial state).
    pub base_round: u32,
    /// Client artifacts: the sha256 of the global data file the client
    /// trained from (stamped by the committer; verification rejects a
    /// client whose base is not the previous global).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_sha256: Option<String>,
    /// Who committed the artifact (`host/pid/start`, stamped at commit): a
    /// second writer of the same key is told this one won.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
    /// Client artifacts of cluster runs: the sha256 of the private state
    /// the client saved with this update (stamped by `heterotune job
    /// train`), so the next round resumes from the committed writer's state,
    /// not from a duplicate pod's that lost the commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_state_sha256: Option<String>,
    /// Client name (client artifacts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Model family (client artifacts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// The data file.
    pub artifact: FileDigest,
    /// The tensors in the data file.
    pub tensors: Vec<TensorInfo>,
    /// Training examples behind the update (the aggregation weight).
    #[serde(default)]
    pub num_examples: u64,
    /// Metrics: loss, accuracy, macro_f1, steps_per_second, peak_rss_bytes, ...
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Free-form statistics of the writer (aggregation: participants, rejects, cosines).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub stats: serde_json::Value,
    /// Version of the program that wrote the artifact.
    pub writer_version: String,
    /// Creation time (RFC 3339).
    pub created_at: String,
}

impl ArtifactManifest {
    /// The manifest of a `kind` artifact of round `round` of run `run`,
    /// started from global round `base_round`, written now by
    /// `writer_version`. It names no client or family and holds no examples,
    /// metrics or stats (set those with struct update syntax:
    /// `ArtifactManifest { num_examples, ..ArtifactManifest::new(..) }`); its
    /// data file digest and tensor list are empty until the artifact's data
    /// is written.
    pub fn new(
        kind: ArtifactKind,
        run: impl Into<String>,
        round: u32,
        base_round: u32,
        writer_version: impl Into<String>,
    ) -> Self {
        ArtifactManifest {
            schema_version: MANIFEST_SCHEMA_VERSION,
            kind,
            run: run.into(),
            round,
            base_round,
            base_sha256: None,
            writer: None,
            private_state_sha256: None,
            client: None,
            family: None,
            artifact: FileDigest {
                path: String::new(),
                sha256: String::new(),
                bytes: 0,
            },
            tensors: Vec::new(),
            num_examples: 0,
            metrics: BTreeMap::new(),
            stats: serde_json::Value::Null,
            writer_version: writer_version.into(),
            created_at: now_rfc3339(),
        }
    }

    /// Parses a manifest, dropping non-numeric entries of `metrics` first: a
    /// writer serialises a NaN metric as `null`, and metrics are
    /// informational, so such a value must not make the manifest unreadable.
    pub fn from_slice(bytes: &[u8]) -> serde_json::Result<ArtifactManifest> {
        let mut value: serde_json::Value = serde_json::from_slice(bytes)?;
        if let Some(metrics) = value
            .get_mut("metrics")
            .and_then(serde_json::Value::as_object_mut)
        {
            metrics.retain(|_, v| v.is_number());
        }
        serde_json::from_value(value)
    }
}

/// One client's evaluation of a global model on the global test set
/// (`<run>/round-NNNN/evaluation/<client>.json`; written by
/// `heterotune-trainer eval --out`). Untrusted like every client output:
/// readers take scores only when finite and in [0, 1].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvaluationResult {
    /// Format version ([`MANIFEST_SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// The run directory (guards against mixing runs).
    pub run: String,
    /// The client that evaluated.
    pub client: String,
    /// Its model family key.
    pub family: String,
    /// The global round whose model was evaluated.
    pub global_round: u32,
    /// Examples in the global test set.
    pub test_examples: u64,
    /// Accuracy on the global test set.
    pub accuracy: f64,
    /// Macro-F1 on the global test set.
    pub macro_f1: f64,
    /// Mean cross-entropy on the global test set.
    #[serde(default)]
    pub loss: Option<f64>,
    /// Seconds the evaluation took (model load included).
    #[serde(default)]
    pub seconds: Option<f64>,
    /// With a bridge (`spec.bridge`): the accuracy of each model the client
    /// can serve (`own`, `bridge`, `ensemble`, `confident`); `accuracy` is the
    /// served one's. With `bridge.calibration` applied, those variants use
    /// the calibrated own model and `own-uncalibrated`,
    /// `ensemble-uncalibrated` and `confident-uncalibrated` hold the same
    /// without the correction.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variants: BTreeMap<String, f64>,
    /// With a bridge: the model served (`bridge.serve` resolved on the
    /// client's validation split), whose scores `accuracy` holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<String>,
    /// Version of the program that wrote it.
    pub writer_version: String,
    /// Creation time (RFC 3339).
    pub created_at: String,
}

/// A score a reader accepts from an untrusted writer: finite and in [0, 1].
pub fn valid_score(v: f64) -> Option<f64> {
    (v.is_finite() && (0.0..=1.0).contains(&v)).then_some(v)
}

/// Mean accuracy over `results` and the mean per family (clients of one
/// family count once each), over the results with a valid score; `None`
/// when there is none.
pub fn mean_accuracy<'a>(
    results: impl IntoIterator<Item = &'a EvaluationResult>,
) -> Option<(f64, BTreeMap<String, f64>)> {
    let mut all = (0.0, 0usize);
    let mut by_family: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for r in results {
        let Some(a) = valid_score(r.accuracy) else {
            continue;
        };
        all = (all.0 + a, all.1 + 1);
        let f = by_family.entry(r.family.clone()).or_default();
        *f = (f.0 + a, f.1 + 1);
    }
    (all.1 > 0).then(|| {
        (
            all.0 / all.1 as f64,
            by_family
                .into_iter()
                .map(|(k, (s, n))| (k, s / n as f64))
                .collect(),
        )
    })
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time as [`rfc3339`]
/// writes it (`YYYY-MM-DDTHH:MM:SSZ`); `None` for anything else.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { text.get(r)?.parse().ok() };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days since the epoch from a civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// The current UTC time as RFC 3339, to the second (for `createdAt`).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// `secs` since the Unix epoch as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_by_hand() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_597_200), "2026-11-25T09:00:00Z");
    }

    #[test]
    fn rfc3339_parses_what_it_writes() {
        for secs in [0, 59, 86_399, 951_782_400, 1_795_597_200, 4_102_444_800] {
            assert_eq!(super::parse_rfc3339(&super::rfc3339(secs)), Some(secs));
        }
        for bad in [
            "",
            "2026-11-25 09:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-25T09:00:00+01:00",
        ] {
            assert_eq!(super::parse_rfc3339(bad), None, "{bad}");
        }
    }

    fn result(client: &str, family: &str, accuracy: f64) -> super::EvaluationResult {
        super::EvaluationResult {
            schema_version: 1,
            run: "r".into(),
            client: client.into(),
            family: family.into(),
            global_round: 3,
            test_examples: 500,
            accuracy,
            macro_f1: 0.5,
            loss: None,
            seconds: None,
            variants: Default::default(),
            served: None,
            writer_version: "t".into(),
            created_at: "x".into(),
        }
    }

    #[test]
    fn evaluations_average_per_family_and_skip_invalid_scores() {
        let rs = [
            result("a", "L6", 0.8),
            result("b", "L6", 0.6),
            result("c", "Smol", 0.5),
            result("d", "Smol", f64::NAN),
            result("e", "L3", 1.5),
        ];
        let (mean, by_family) = super::mean_accuracy(&rs).expect("some valid");
        assert!((mean - (0.8 + 0.6 + 0.5) / 3.0).abs() < 1e-12);
        assert_eq!(by_family.len(), 2);
        assert!((by_family["L6"] - 0.7).abs() < 1e-12);
        assert_eq!(by_family["Smol"], 0.5);
        assert!(super::mean_accuracy(&rs[3..]).is_none());
    }

    #[test]
    fn a_new_manifest_is_empty_but_for_what_it_was_given() {
        let m = super::ArtifactManifest::new(super::ArtifactKind::Global, "r", 3, 2, "w 1");
        assert_eq!(m.schema_version, super::MANIFEST_SCHEMA_VERSION);
        assert_eq!((m.run.as_str(), m.round, m.base_round), ("r", 3, 2));
        assert_eq!((m.client.clone(), m.family.clone()), (None, None));
        assert!(m.tensors.is_empty() && m.metrics.is_empty() && m.stats.is_null());
        assert_eq!((m.num_examples, m.artifact.bytes), (0, 0));
        assert_eq!(m.writer_version, "w 1");
        assert!(super::parse_rfc3339(&m.created_at).is_some());
    }

    #[test]
    fn a_null_metric_does_not_make_a_manifest_unreadable() {
        let text = br#"{"schemaVersion":1,"kind":"client","run":"r","round":1,"baseRound":0,
            "artifact":{"path":"adapter.safetensors","sha256":"00","bytes":1},"tensors":[],
            "metrics":{"loss":null,"accuracy":0.5},"writerVersion":"t","createdAt":"x"}"#;
        let m = super::ArtifactManifest::from_slice(text).expect("readable");
        assert_eq!(m.metrics.len(), 1);
        assert_eq!(m.metrics.get("accuracy"), Some(&0.5));
    }
}
