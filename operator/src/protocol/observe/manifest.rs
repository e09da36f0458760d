//! Reading the facts a global manifest records (as `heterotune-trainer
//! aggregate` writes it) and the times manifests carry.

use std::collections::BTreeMap;

use heterotune_crds::manifest::{valid_score, ArtifactManifest};
use heterotune_crds::status::RoundSummary;

use super::types::{CompletedRound, GlobalAccuracy};

/// Parses an RFC 3339 time into Unix seconds.
pub fn unix_seconds(text: &str) -> Option<f64> {
    text.parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond() as f64 / 1000.0)
}

/// Now, in Unix seconds.
pub fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A round summary from a global manifest as the aggregator writes it
/// (`heterotune-trainer aggregate`): `metrics.accuracy`,
/// `metrics["accuracy.<family>"]` and `metrics.round_seconds`, and in
/// `stats`: `participants` (a list), `rejectCounts` (`{reason: count}`),
/// `bytesReceived` and `bytesRejected`.
pub fn summary_from_manifest(round: u32, m: &ArtifactManifest) -> RoundSummary {
    let finite = |k: &str| m.metrics.get(k).copied().filter(|v| v.is_finite());
    let by_family = m
        .metrics
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("accuracy.")?.to_string(), *v)))
        .filter(|(_, v)| v.is_finite())
        .collect();
    let stats = &m.stats;
    let count = |k: &str| stats.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let rejected = stats
        .get("rejectCounts")
        .and_then(|v| v.as_object())
        .map(|o| {
            o.iter()
                .map(|(reason, n)| (reason.clone(), n.as_u64().unwrap_or(0) as u32))
                .collect()
        })
        .unwrap_or_default();
    RoundSummary {
        round,
        accuracy: finite("accuracy"),
        accuracy_by_family: by_family,
        global_accuracy: None,
        global_accuracy_by_family: BTreeMap::new(),
        bytes_uploaded: count("bytesReceived") + count("bytesRejected"),
        duration_seconds: finite("round_seconds").unwrap_or(0.0),
        participants: stats
            .get("participants")
            .and_then(|v| v.as_array())
            .map_or(0, |a| a.len() as u32),
        rejected,
    }
}

/// The previous round's global accuracy a global manifest records
/// (`metrics.previous_global_accuracy` and `previous_global_accuracy.<family>`).
pub fn previous_global_from_manifest(m: &ArtifactManifest) -> Option<GlobalAccuracy> {
    let mean = m
        .metrics
        .get("previous_global_accuracy")
        .copied()
        .and_then(valid_score)?;
    let by_family = m
        .metrics
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("previous_global_accuracy.")?.to_string(), *v)))
        .filter_map(|(k, v)| valid_score(v).map(|v| (k, v)))
        .collect();
    Some((mean, by_family))
}

/// The controller's record of a completed round, from its global manifest.
pub fn completed_round(round: u32, m: &ArtifactManifest) -> CompletedRound {
    CompletedRound {
        summary: summary_from_manifest(round, m),
        completed_at: unix_seconds(&m.created_at),
        previous_global: previous_global_from_manifest(m),
    }
}

/// The clients a global manifest names as participants (`stats.participants`:
/// names, or objects with a `client`).
pub fn participants(m: &ArtifactManifest) -> Vec<String> {
    m.stats
        .get("participants")
        .and_then(|p| p.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| {
                    v.as_str()
                        .or_else(|| v.get("client").and_then(|c| c.as_str()))
                })
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}
