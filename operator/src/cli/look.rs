//! What `plan` and `status` read from a run's store, strictly read-only:
//! how many rounds are complete and the report an earlier `heterotune run`
//! left there. A local store is read only when its folder exists (a
//! missing one is a run that has not started: nothing is created); S3 only
//! with credentials in the environment (without them object_store would
//! probe the cloud metadata address).

use std::path::Path;

use heterotune_crds::layout::RunLayout;
use heterotune_crds::spec::StorageSpec;
use heterotune_crds::FederatedTune;
use serde::Serialize;

use crate::protocol::store::{Store, ACCESS_KEY_ENV, SECRET_KEY_ENV};
use crate::runner::report::Report;

/// The store `plan` and `status` may read, or why it is not read.
pub fn read_only_store(storage: &StorageSpec, cwd: &Path) -> Result<Store, String> {
    if storage.uri.starts_with("s3://") {
        if std::env::var_os(ACCESS_KEY_ENV).is_none() || std::env::var_os(SECRET_KEY_ENV).is_none()
        {
            return Err(format!(
                "no {ACCESS_KEY_ENV} / {SECRET_KEY_ENV} in the environment to read {}",
                storage.uri
            ));
        }
    } else {
        let local = storage.uri.strip_prefix("file://").unwrap_or(&storage.uri);
        if !cwd.join(local).exists() {
            return Err(format!(
                "the store folder {local} does not exist yet (no round has run; plan and status create nothing)"
            ));
        }
    }
    // A look answers at once: a store that does not answer is reported, not
    // waited for (a run's budget is for riding out outages).
    Store::from_spec(storage, cwd)
        .map(|s| s.with_retry_budget(LOOK_RETRY_BUDGET))
        .map_err(|e| e.to_string())
}

/// How long `plan` and `status` retry a store that does not answer,
/// unless `HETEROTUNE_STORE_RETRY_SECONDS` says otherwise.
const LOOK_RETRY_BUDGET: std::time::Duration = std::time::Duration::from_secs(3);

/// What a look at the store found.
pub struct Look {
    /// The run's layout (its prefix empty when the store was not read).
    pub layout: RunLayout,
    /// Rounds complete, or why the store was not read.
    pub completed: Result<u32, String>,
    /// The report an earlier `heterotune run` uploaded, when there is one.
    pub report: Option<Report>,
}

/// Looks at the store of the local run of `ft` (`heterotune run`'s uid),
/// from the folder `cwd` (where relative store folders are).
pub async fn look(ft: &FederatedTune, cwd: &Path) -> Look {
    let namespace = ft.metadata.namespace.as_deref().unwrap_or("default");
    let name = ft.metadata.name.as_deref().unwrap_or_default();
    let uid = crate::runner::local_uid(namespace, name);
    let store = match read_only_store(&ft.spec.storage, cwd) {
        Ok(store) => store,
        Err(why) => {
            return Look {
                layout: RunLayout::new("", namespace, name, &uid),
                completed: Err(why),
                report: None,
            }
        }
    };
    let layout = RunLayout::new(store.prefix(), namespace, name, &uid);
    let completed = store
        .completed_rounds(&layout, ft.spec.rounds)
        .await
        .map_err(|e| e.to_string());
    let key = format!("{}/report.json", layout.report_dir());
    let report = match store.get(&key).await {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).ok(),
        _ => None,
    };
    Look {
        layout,
        completed,
        report,
    }
}

/// `heterotune status`: where the local run of a spec stands.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunStatus {
    /// metadata.name.
    pub name: String,
    /// metadata.namespace (`default` when unset).
    pub namespace: String,
    /// spec.storage.uri.
    pub store: String,
    /// The run's folder in the store.
    pub run_folder: String,
    /// spec.rounds.
    pub rounds: u32,
    /// Rounds complete in the store (absent when the store was not read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_rounds: Option<u32>,
    /// Why the store was not read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_not_checked: Option<String>,
    /// The report's state: Running, Succeeded, Failed (…); absent before
    /// the first report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Seconds the run has taken so far, resumes included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_seconds: Option<f64>,
    /// The completed rounds the report records, oldest first.
    pub history: Vec<RoundStatus>,
}

/// One completed round in `status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RoundStatus {
    /// The round (1-based).
    pub round: u32,
    /// Wall time in seconds.
    pub duration_seconds: Option<f64>,
    /// Mean test accuracy after local training.
    pub accuracy: Option<f64>,
    /// Test accuracy of this round's global model, once evaluated.
    pub global_accuracy: Option<f64>,
    /// Clients aggregated.
    pub participants: Vec<String>,
    /// Bytes uploaded by clients.
    pub bytes_uploaded: u64,
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

impl RunStatus {
    /// The status of `ft` from a look at its store.
    pub fn of(ft: &FederatedTune, look: Look) -> RunStatus {
        let (completed_rounds, store_not_checked) = match look.completed {
            Ok(n) => (Some(n), None),
            Err(why) => (None, Some(why)),
        };
        let report = look.report;
        RunStatus {
            name: ft.metadata.name.clone().unwrap_or_default(),
            namespace: ft
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            store: ft.spec.storage.uri.clone(),
            run_folder: look.layout.run_dir().to_string(),
            rounds: ft.spec.rounds,
            completed_rounds,
            store_not_checked,
            state: report.as_ref().map(|r| r.status.clone()),
            total_seconds: report.as_ref().and_then(|r| finite(r.total_seconds)),
            history: report
                .iter()
                .flat_map(|r| &r.rounds)
                .map(|r| RoundStatus {
                    round: r.round,
                    duration_seconds: finite(r.duration_seconds),
                    accuracy: finite(r.accuracy),
                    global_accuracy: r.global_accuracy.and_then(finite),
                    participants: r.participants.clone(),
                    bytes_uploaded: r.bytes_uploaded,
                })
                .collect(),
        }
    }

    /// The human text: a headline and a table of rounds.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let cell = |v: Option<f64>, digits: usize| {
            v.map(|x| format!("{x:.digits$}"))
                .unwrap_or_else(|| "-".into())
        };
        let mut out = format!("FederatedTune {}/{}: ", self.namespace, self.name);
        match (&self.completed_rounds, &self.store_not_checked) {
            (Some(n), _) => {
                let _ = write!(out, "{n} of {} rounds complete", self.rounds);
            }
            (None, why) => {
                let _ = write!(out, "store not checked: {}", why.as_deref().unwrap_or("?"));
            }
        }
        if let Some(state) = &self.state {
            let _ = write!(out, "; {state}, {} s in all", cell(self.total_seconds, 0));
        }
        let _ = writeln!(
            out,
            "\nstore {} (run folder {})",
            self.store, self.run_folder
        );
        if self.history.is_empty() {
            return out;
        }
        let _ = writeln!(
            out,
            "\n{:>5} {:>10} {:>9} {:>9} {:>12} {:>10}",
            "round", "seconds", "accuracy", "global", "participants", "upload"
        );
        for r in &self.history {
            let _ = writeln!(
                out,
                "{:>5} {:>10} {:>9} {:>9} {:>12} {:>10}",
                r.round,
                cell(r.duration_seconds, 1),
                cell(r.accuracy, 3),
                cell(r.global_accuracy, 3),
                r.participants.len(),
                crate::runner::report::human_bytes(r.bytes_uploaded)
            );
        }
        let _ = writeln!(out, "\nunits: seconds of wall time; accuracy on the global test set (0-1); upload in SI bytes (1 MB = 10^6 B)");
        out
    }
}
