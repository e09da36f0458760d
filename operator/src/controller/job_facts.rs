//! What the Jobs of a run say, read from the Job objects (pure): role,
//! round, client, attempt, whether they run, succeeded or failed, and why a
//! failed one failed (from its pod's container termination).

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::names::{LABEL_ATTEMPT, LABEL_CLIENT, LABEL_ROLE, LABEL_ROUND};

/// A Job of the run, as the planner needs it.
#[derive(Debug, Clone)]
pub struct JobFacts {
    /// Job name.
    pub name: String,
    /// `trainer` or `aggregator`.
    pub role: String,
    /// Round label.
    pub round: u32,
    /// Client label (trainers).
    pub client: Option<String>,
    /// Attempt label.
    pub attempt: u32,
    /// Still running (not finished, not being deleted).
    pub active: bool,
    /// Finished successfully.
    pub succeeded: bool,
    /// Creation time (Unix seconds).
    pub created: Option<f64>,
    /// Why it failed, when it did (see [`failure_reason`]).
    pub failure: Option<String>,
}

/// Longest failure text kept in a client's status message.
const MAX_FAILURE: usize = 400;

/// Why a failed Job failed, in one line: its pod's container termination
/// (`OOMKilled`, the exit code and the last lines of the log, which the
/// container reports through `FallbackToLogsOnError`) or else the Job's
/// `Failed` condition (`DeadlineExceeded`, ...), credentials redacted
/// ([`heterotune_crds::redact`]). `None` for Jobs that did not fail.
pub fn failure_reason(job: &Job, pods: &[Arc<Pod>]) -> Option<String> {
    let status = job.status.as_ref()?;
    let condition = status.conditions.as_ref().and_then(|cs| {
        cs.iter()
            .find(|c| c.type_ == "Failed" && c.status == "True")
    });
    if condition.is_none() && status.failed.unwrap_or(0) == 0 {
        return None;
    }
    let name = job.metadata.name.as_deref();
    let uid = job.metadata.uid.as_deref();
    let mine = |p: &&Arc<Pod>| {
        let by_owner = uid.is_some()
            && p.metadata
                .owner_references
                .as_ref()
                .is_some_and(|o| o.iter().any(|r| Some(r.uid.as_str()) == uid));
        let by_label = p.metadata.labels.as_ref().is_some_and(|l| {
            ["batch.kubernetes.io/job-name", "job-name"]
                .iter()
                .any(|k| l.get(*k).map(String::as_str) == name)
        });
        by_owner || by_label
    };
    let terminated = pods
        .iter()
        .filter(mine)
        .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .find(|t| t.exit_code != 0);
    let text = match (terminated, condition) {
        (Some(t), _) => {
            let reason = t.reason.as_deref().unwrap_or("Error");
            let hint = if reason == "OOMKilled" {
                ": out of memory; raise the client's memory (spec.clients[].resources or a larger \
                 GPU profile) or lower training.batchSize / maxSeqLength"
                    .to_string()
            } else {
                t.message
                    .as_deref()
                    .map(|m| {
                        let lines: Vec<&str> = m.lines().filter(|l| !l.trim().is_empty()).collect();
                        format!(": {}", lines[lines.len().saturating_sub(2)..].join(" | "))
                    })
                    .unwrap_or_default()
            };
            format!("{reason} (exit {}){hint}", t.exit_code)
        }
        (None, Some(c)) => format!(
            "{}{}",
            c.reason.as_deref().unwrap_or("Failed"),
            c.message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ),
        (None, None) => "Failed".to_string(),
    };
    // The log's tail is a child process's words: no credential leaves in it.
    let text = heterotune_crds::redact::credentials(&text).into_owned();
    Some(if text.len() > MAX_FAILURE {
        let mut end = MAX_FAILURE;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &text[..end])
    } else {
        text
    })
}

/// Reads a Job's labels and state.
pub fn job_facts(job: &Job) -> Option<JobFacts> {
    let labels = job.metadata.labels.as_ref()?;
    let round = labels.get(LABEL_ROUND)?.parse().ok()?;
    let status = job.status.as_ref();
    let has = |t: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .map(|cs| cs.iter().any(|c| c.type_ == t && c.status == "True"))
            .unwrap_or(false)
    };
    let succeeded = has("Complete") || status.and_then(|s| s.succeeded).unwrap_or(0) > 0;
    let failed = has("Failed") || status.and_then(|s| s.failed).unwrap_or(0) > 0;
    let deleting = job.metadata.deletion_timestamp.is_some();
    // A failed Job whose pod is still terminating is not over: its retry
    // waits, so that two pods never write the same artifact at once.
    let terminating = status.and_then(|s| s.terminating).unwrap_or(0) > 0;
    Some(JobFacts {
        name: job.name_any(),
        role: labels.get(LABEL_ROLE)?.clone(),
        round,
        client: labels.get(LABEL_CLIENT).cloned(),
        attempt: labels
            .get(LABEL_ATTEMPT)
            .and_then(|a| a.parse().ok())
            .unwrap_or(1),
        active: !succeeded && (!failed || terminating) && !deleting,
        succeeded,
        created: job
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_millisecond() as f64 / 1000.0),
        failure: None,
    })
}

/// The client Jobs of `role` in `round`, by client.
pub(crate) fn jobs_by_client<'j>(
    jobs: &'j [JobFacts],
    round: u32,
    role: &str,
) -> HashMap<&'j str, Vec<&'j JobFacts>> {
    let mut map: HashMap<&str, Vec<&JobFacts>> = HashMap::new();
    for j in jobs.iter().filter(|j| j.round == round && j.role == role) {
        if let Some(c) = j.client.as_deref() {
            map.entry(c).or_default().push(j);
        }
    }
    map
}

/// Names of `client`'s active Jobs of `role` in `round`.
pub(crate) fn active_jobs<'j>(
    jobs: &'j [JobFacts],
    role: &'j str,
    round: u32,
    client: &'j str,
) -> impl Iterator<Item = String> + 'j {
    jobs.iter()
        .filter(move |j| {
            j.active && j.role == role && j.round == round && j.client.as_deref() == Some(client)
        })
        .map(|j| j.name.clone())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::batch::v1::JobStatus;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus,
    };

    use super::*;

    /// A failed Job named `j` and its pod, whose container's termination
    /// message (its log's tail) is `message`.
    fn failed(message: &str) -> (Job, Vec<Arc<Pod>>) {
        let mut job = Job::default();
        job.metadata.name = Some("j".into());
        job.status = Some(JobStatus {
            failed: Some(1),
            ..JobStatus::default()
        });
        let mut pod = Pod::default();
        pod.metadata.labels = Some([("job-name".to_string(), "j".to_string())].into());
        pod.status = Some(PodStatus {
            container_statuses: Some(vec![ContainerStatus {
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 1,
                        message: Some(message.into()),
                        ..ContainerStateTerminated::default()
                    }),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        });
        (job, vec![Arc::new(pod)])
    }

    #[test]
    fn a_credential_in_a_pods_last_lines_never_reaches_the_status() {
        let canary = "htcanary-secret-9c41d2e8";
        let (job, pods) = failed(&format!(
            "loading\nError: available columns: `AWS_SECRET_ACCESS_KEY={canary}`\n"
        ));
        let why = failure_reason(&job, &pods).expect("failed");
        assert!(!why.contains(canary), "{why}");
        assert!(
            why.contains("Error (exit 1)") && why.contains("AWS_SECRET_ACCESS_KEY=<redacted>"),
            "{why}"
        );
    }
}
