//! The pure decide step on its own: what was dereferenced in, intents out,
//! no API server.

use std::time::Duration;

use heterotune_crds::status::Phase;
use heterotune_crds::FederatedTune;
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::controller::Action;

use super::decide::{decide, placements, remaining_deadline, stale_jobs, Decision};
use super::dereference::Dereferenced;
use super::error::Category;
use super::fixtures::*;
use super::job_facts::{job_facts, JobFacts};
use super::names::{LABEL_ROLE, ROLE_AGGREGATOR, ROLE_TRAINER};
use super::observation::observation;
use super::run::Run;
use crate::protocol::observe::{CommitInfo, StoreObservation};
use crate::protocol::planner;
use crate::sizing::{self, ModelShape};

/// The Jobs the controller's cache would hold.
fn facts(jobs: &[Job]) -> Vec<JobFacts> {
    jobs.iter().filter_map(job_facts).collect()
}

/// A store observation of round `completed + 1` with `commits` (client, at).
fn store(completed: u32, commits: &[(&str, f64)]) -> StoreObservation {
    StoreObservation {
        completed_rounds: completed,
        committed: commits
            .iter()
            .map(|(c, at)| {
                let info = CommitInfo {
                    committed_at: *at,
                    ..CommitInfo::default()
                };
                (c.to_string(), info)
            })
            .collect(),
        ..StoreObservation::default()
    }
}

/// Decides for `f` as the reconcile would (shapes from the packaged table
/// or `model.parameters`, as with an empty store).
fn decided(f: &FederatedTune, store: StoreObservation, jobs: &[Job]) -> Decision {
    let run = Run::new(f).expect("run");
    let shapes = f
        .spec
        .clients
        .iter()
        .map(|c| {
            sizing::packaged_model(&c.model.uri).or_else(|| {
                c.model
                    .parameters
                    .map(|p| ModelShape::from_parameters(c.model.family, p))
            })
        })
        .collect();
    let world = Dereferenced {
        store,
        jobs: facts(jobs),
        shapes,
        bridge: f
            .spec
            .bridge
            .as_ref()
            .and_then(|b| sizing::packaged_model(&b.model.uri)),
        now: NOW,
    };
    decide(&run, &world, &config())
}

fn names(jobs: &[Job]) -> Vec<String> {
    jobs.iter()
        .map(|j| j.metadata.name.clone().unwrap_or_default())
        .collect()
}

fn role(job: &Job) -> Option<&str> {
    job.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_ROLE))
        .map(String::as_str)
}

#[test]
fn a_new_run_creates_one_trainer_per_client_and_deletes_nothing() {
    let d = decided(&ft(&three_clients(), ""), store(0, &[]), &[]);
    assert_eq!(
        names(&d.jobs.create),
        ["trec-r1-c0", "trec-r1-c1", "trec-r1-c2"]
    );
    assert!(d.jobs.create.iter().all(|j| role(j) == Some(ROLE_TRAINER)));
    assert!(d.jobs.cancel.is_empty() && d.jobs.stale.is_empty());
    assert!(d.events.is_empty() && d.unplaceable.is_empty());
    assert_eq!(d.status.phase, Some(Phase::Running));
    assert_eq!(d.status.round, 1);
    assert!(d.status.clients.iter().all(|c| c.state == "Training"));
    assert!(d.status.clients.iter().all(|c| c.attempts == 1));
    // The round starts now.
    assert_eq!(d.status.start_time.as_deref(), Some("2023-11-14T22:13:20Z"));
    assert_eq!(
        d.outcome(30).expect("ok"),
        Action::requeue(Duration::from_secs(30))
    );
}

#[test]
fn running_trainers_are_left_alone() {
    let jobs = [
        job(1, Some("c0"), 1, JobEnd::Running, NOW - 50.0),
        job(1, Some("c1"), 1, JobEnd::Succeeded, NOW - 50.0),
        job(1, Some("c2"), 1, JobEnd::Running, NOW - 50.0),
    ];
    let d = decided(
        &ft(&three_clients(), ""),
        store(0, &[("c1", NOW - 10.0)]),
        &jobs,
    );
    assert!(d.jobs.create.is_empty(), "{:?}", names(&d.jobs.create));
    assert!(d.jobs.cancel.is_empty() && d.jobs.stale.is_empty());
    let states: Vec<&str> = d.status.clients.iter().map(|c| c.state.as_str()).collect();
    assert_eq!(states, ["Training", "Committed", "Training"]);
}

#[test]
fn a_failed_attempt_is_retried_within_what_is_left_of_the_round() {
    let t0 = NOW - 100.0;
    let jobs = [
        job(1, Some("c0"), 1, JobEnd::Failed, t0),
        job(1, Some("c1"), 1, JobEnd::Running, t0),
        job(1, Some("c2"), 1, JobEnd::Running, t0),
    ];
    let f = ft(&three_clients(), "  maxRetriesPerClient: 1\n");
    let d = decided(&f, store(0, &[]), &jobs);
    assert_eq!(names(&d.jobs.create), ["trec-r1a2-c0"]);
    let deadline = d.jobs.create[0]
        .spec
        .as_ref()
        .and_then(|s| s.active_deadline_seconds);
    assert_eq!(deadline, Some(3500));
    assert_eq!(d.events.len(), 1);
    assert_eq!(d.events[0].reason, "ClientRetry");
    assert_eq!(d.events[0].note, "client c0: attempt 2 of round 1");
    assert_eq!(d.status.clients[0].state, "Training");
    assert_eq!(d.status.clients[0].attempts, 2);
}

/// A failed attempt whose pod is still terminating is not retried yet
/// (Jobs carry `podReplacementPolicy: Failed`): never two pods at once.
#[test]
fn a_retry_waits_for_the_failed_pod_to_end() {
    let t0 = NOW - 100.0;
    let mut failing = job(1, Some("c0"), 1, JobEnd::Failed, t0);
    if let Some(status) = failing.status.as_mut() {
        status.terminating = Some(1);
    }
    let jobs = [
        failing,
        job(1, Some("c1"), 1, JobEnd::Running, t0),
        job(1, Some("c2"), 1, JobEnd::Running, t0),
    ];
    let f = ft(
        &three_clients(),
        "  maxRetriesPerClient: 1
",
    );
    let d = decided(&f, store(0, &[]), &jobs);
    assert!(d.jobs.create.is_empty(), "{:?}", names(&d.jobs.create));
    // Once it has ended, the retry starts.
    let mut ended = jobs.clone();
    if let Some(status) = ended[0].status.as_mut() {
        status.terminating = Some(0);
    }
    let d = decided(&f, store(0, &[]), &ended);
    assert_eq!(names(&d.jobs.create), ["trec-r1a2-c0"]);
}

/// An aggregation failed on a rejected artifact: its pod set the artifact
/// aside (`pod_job::aggregate`), so the store no longer shows c2 committed
/// although its trainer succeeded. That counts as c2's failed attempt: a
/// new trainer Job retrains it, and no aggregation starts before it
/// commits; then the aggregation's second attempt runs over all three.
#[test]
fn a_client_set_aside_by_the_aggregation_trains_again() {
    let f = ft(
        &three_clients(),
        "  minClients: 3\n  maxRetriesPerClient: 1\n",
    );
    let mut jobs = vec![
        job(1, Some("c0"), 1, JobEnd::Succeeded, NOW - 300.0),
        job(1, Some("c1"), 1, JobEnd::Succeeded, NOW - 300.0),
        job(1, Some("c2"), 1, JobEnd::Succeeded, NOW - 300.0),
        job(1, None, 1, JobEnd::Failed, NOW - 100.0),
    ];
    let commits = [("c0", NOW - 200.0), ("c1", NOW - 200.0)];
    let d = decided(&f, store(0, &commits), &jobs);
    assert_eq!(names(&d.jobs.create), ["trec-r1a2-c2"]);
    assert_eq!(d.status.phase, Some(Phase::Running));
    // Out of retries, the same state excludes c2 and the round fails its quorum.
    let strict = ft(
        &three_clients(),
        "  minClients: 3\n  maxRetriesPerClient: 0\n",
    );
    let d = decided(&strict, store(0, &commits), &jobs);
    assert!(d.jobs.create.is_empty(), "{:?}", names(&d.jobs.create));
    assert_eq!(d.status.phase, Some(Phase::Failed));

    jobs.push(job(1, Some("c2"), 2, JobEnd::Succeeded, NOW - 50.0));
    let commits = [("c0", NOW - 200.0), ("c1", NOW - 200.0), ("c2", NOW - 40.0)];
    let d = decided(&f, store(0, &commits), &jobs);
    assert_eq!(names(&d.jobs.create), ["trec-agg-r1a2"]);
    assert_eq!(role(&d.jobs.create[0]), Some(ROLE_AGGREGATOR));
}

/// A round whose clients are all run by sites has no Job to start its
/// clock: it opens when the operator first sees it (recorded in
/// `status.roundStartTime`), and its deadline ends it like any other.
#[test]
fn a_round_of_sites_only_opens_when_seen_and_reaches_its_deadline() {
    let clients = "    - name: bank\n      site: { name: bank }\n      model: { family: bert, uri: \"cache://models/all-MiniLM-L6-v2\" }\n    \
                   - name: clinic\n      site: { name: clinic }\n      model: { family: bert, uri: \"cache://models/all-MiniLM-L6-v2\" }\n";
    let f = ft(clients, "  minClients: 2\n  roundDeadlineSeconds: 600\n");
    let d = decided(&f, store(0, &[]), &[]);
    assert!(d.jobs.create.is_empty());
    assert_eq!(d.status.round_start_time, Some(status_time(NOW)));
    assert_eq!(d.round_started_at, Some(NOW));

    // Later, with the opening recorded and no site heard from: still open
    // before the deadline, failed after it.
    let seen = |at: f64| {
        let mut f = f.clone();
        f.status = Some(heterotune_crds::status::FederatedTuneStatus {
            round: 1,
            round_start_time: Some(status_time(at)),
            ..d.status.clone()
        });
        f
    };
    let d = decided(&seen(NOW - 300.0), store(0, &[("bank", NOW - 10.0)]), &[]);
    assert_eq!(d.status.phase, Some(Phase::Running));
    assert_eq!(d.status.round_start_time, Some(status_time(NOW - 300.0)));
    let d = decided(&seen(NOW - 700.0), store(0, &[("bank", NOW - 10.0)]), &[]);
    assert_eq!(d.status.phase, Some(Phase::Failed));
    assert_eq!(d.status.round_start_time, None, "no step in progress");
    // A round completed since the recorded opening: the new round opens now.
    let mut done = store(1, &[]);
    done.new_rounds = vec![crate::protocol::observe::CompletedRound {
        summary: heterotune_crds::status::RoundSummary {
            round: 1,
            accuracy: None,
            accuracy_by_family: Default::default(),
            global_accuracy: None,
            global_accuracy_by_family: Default::default(),
            bytes_uploaded: 0,
            duration_seconds: 0.0,
            participants: 1,
            rejected: Default::default(),
        },
        completed_at: Some(NOW - 5.0),
        previous_global: None,
    }];
    let d = decided(&seen(NOW - 700.0), done, &[]);
    assert_eq!(d.status.round, 2);
    assert_eq!(d.status.round_start_time, Some(status_time(NOW)));
}

fn status_time(at: f64) -> String {
    super::status::rfc3339(at)
}

#[test]
fn quorum_starts_the_aggregation_and_cancels_the_stragglers() {
    let f = ft(
        &three_clients(),
        "  minClients: 2\n  waitAfterMinClientsSeconds: 60\n",
    );
    let jobs = [
        job(1, Some("c0"), 1, JobEnd::Succeeded, NOW - 300.0),
        job(1, Some("c1"), 1, JobEnd::Succeeded, NOW - 300.0),
        job(1, Some("c2"), 1, JobEnd::Running, NOW - 300.0),
    ];
    let commits = [("c0", NOW - 200.0), ("c1", NOW - 120.0)];
    let d = decided(&f, store(0, &commits), &jobs);
    assert_eq!(names(&d.jobs.create), ["trec-agg-r1"]);
    assert_eq!(role(&d.jobs.create[0]), Some(ROLE_AGGREGATOR));
    assert_eq!(d.jobs.cancel, ["trec-r1-c2"]);
    assert!(d.jobs.stale.is_empty());
    assert_eq!(d.events.len(), 1);
    assert_eq!(d.events[0].reason, "StragglersCancelled");
    assert_eq!(d.events[0].note, "round 1: stopped trec-r1-c2");
    assert_eq!(d.status.phase, Some(Phase::Aggregating));
}

#[test]
fn a_client_that_fits_nowhere_holds_back_every_client_job() {
    let clients = "    - name: small\n      model: { family: bert, uri: \"cache://models/all-MiniLM-L6-v2\" }\n    \
                   - name: giant\n      model: { family: llama, uri: \"s3://models/llama-70b\", dtype: bfloat16, parameters: 70000000000 }\n";
    let d = decided(&ft(clients, ""), store(0, &[]), &[]);
    assert!(d.jobs.create.is_empty(), "{:?}", names(&d.jobs.create));
    assert_eq!(d.unplaceable.len(), 1);
    assert!(d.unplaceable[0].starts_with("client giant needs about"));
    // Nothing started: still Pending, no start time, nobody training.
    assert_eq!(d.status.phase, Some(Phase::Pending));
    assert_eq!(d.status.start_time, None);
    assert_eq!(d.status.clients[0].state, "Pending");
    assert_eq!(d.status.clients[0].attempts, 0);
    let degraded = d.status.conditions.iter().find(|c| c.type_ == "Degraded");
    assert_eq!(
        degraded.map(|c| c.reason.as_str()),
        Some("NoGpuProfileFits")
    );
    let error = d.outcome(30).expect_err("no fit");
    assert_eq!(error.category(), Category::User);
}

/// `spec.bridge` on the model at `uri`.
fn bridge(uri: &str) -> String {
    format!("  bridge: {{ model: {{ family: bert, uri: \"{uri}\" }} }}\n")
}

#[test]
fn a_bridge_is_counted_in_every_client_placement() {
    let l3 = "cache://models/paraphrase-MiniLM-L3-v2";
    let with = ft(&three_clients(), &bridge(l3));
    let without = ft(&three_clients(), "");
    let d = decided(&with, store(0, &[]), &[]);
    assert_eq!(d.jobs.create.len(), 3);
    assert!(d.unplaceable.is_empty());
    let estimates = |f: &FederatedTune, bridge| {
        let shapes = vec![sizing::packaged_model("cache://models/all-MiniLM-L6-v2"); 3];
        placements(&f.spec, &shapes, bridge, &config().sizing)
            .into_iter()
            .map(|p| p.expect("placed").estimated_bytes().expect("estimate"))
            .collect::<Vec<u64>>()
    };
    let (alone, both) = (
        estimates(&without, None),
        estimates(&with, sizing::packaged_model(l3)),
    );
    // The bridge's parts on a CPU (float32), by hand in sizing's tests.
    let bridge_parts = 2_274_208_544 + 227_420_855;
    for (a, b) in alone.iter().zip(&both) {
        assert_eq!(*b, a + bridge_parts);
    }
    let reported: Vec<Option<u64>> = d
        .status
        .clients
        .iter()
        .map(|c| c.estimated_memory_bytes)
        .collect();
    assert_eq!(reported, both.into_iter().map(Some).collect::<Vec<_>>());
}

#[test]
fn an_unknown_bridge_holds_back_every_client_job_and_names_its_field() {
    let f = ft(&three_clients(), &bridge("s3://models/private-bridge"));
    let d = decided(&f, store(0, &[]), &[]);
    assert!(d.jobs.create.is_empty(), "{:?}", names(&d.jobs.create));
    assert_eq!(d.unplaceable.len(), 1, "{:?}", d.unplaceable);
    assert!(
        d.unplaceable[0].contains("s3://models/private-bridge (spec.bridge.model.uri) is unknown"),
        "{}",
        d.unplaceable[0]
    );
    assert_eq!(d.status.phase, Some(Phase::Pending));
    assert_eq!(
        d.outcome(30).expect_err("unknown").category(),
        Category::User
    );
}

#[test]
fn running_jobs_of_rounds_already_over_are_stale() {
    let f = ft(&three_clients(), "  rounds: 3\n");
    let jobs = facts(&[
        job(1, Some("c0"), 1, JobEnd::Running, NOW - 900.0),
        job(1, None, 1, JobEnd::Running, NOW - 900.0),
        job(2, Some("c0"), 1, JobEnd::Running, NOW - 90.0),
        job(1, Some("c1"), 1, JobEnd::Succeeded, NOW - 900.0),
        evaluation_job(2, "c2", 1, JobEnd::Running, NOW - 90.0),
        evaluation_job(3, "c2", 1, JobEnd::Running, NOW - 90.0),
    ]);
    let running = planner::Plan {
        phase: Phase::Running,
        round: 2,
        actions: Vec::new(),
        requeue_after: None,
    };
    // Round 1 is over: its running trainer and aggregation go, as does the
    // evaluation of a global model that is not the last.
    assert_eq!(
        stale_jobs(&f.spec, &running, &jobs, 1),
        ["trec-r1-c0", "trec-agg-r1", "trec-eval-r2-c2"]
    );
    // A finished run stops the evaluation of the last global model too.
    let done = planner::Plan {
        phase: Phase::Succeeded,
        ..running
    };
    assert_eq!(
        stale_jobs(&f.spec, &done, &jobs, 1),
        [
            "trec-r1-c0",
            "trec-agg-r1",
            "trec-eval-r2-c2",
            "trec-eval-r3-c2"
        ]
    );
}

#[test]
fn a_late_job_gets_what_is_left_of_the_round_and_at_least_a_second() {
    let f = ft(&three_clients(), "  roundDeadlineSeconds: 600\n");
    let started = |at: f64| {
        let jobs = facts(&[job(1, Some("c0"), 1, JobEnd::Running, at)]);
        observation(&f.spec, &store(0, &[]), &jobs, NOW, None)
    };
    let fresh = observation(&f.spec, &store(0, &[]), &[], NOW, None);
    assert_eq!(remaining_deadline(&f.spec, &fresh, NOW), 600);
    assert_eq!(remaining_deadline(&f.spec, &started(NOW - 100.0), NOW), 500);
    assert_eq!(remaining_deadline(&f.spec, &started(NOW - 5000.0), NOW), 1);
}

#[test]
fn the_outcome_waits_for_a_change_of_finished_runs_and_polls_the_others() {
    let mut d = decided(&ft(&three_clients(), ""), store(0, &[]), &[]);
    d.plan.requeue_after = Some(12.5);
    assert_eq!(
        d.outcome(30).expect("ok"),
        Action::requeue(Duration::from_secs_f64(12.5))
    );
    d.plan.requeue_after = Some(0.1);
    assert_eq!(
        d.outcome(30).expect("ok"),
        Action::requeue(Duration::from_secs(1))
    );
    for phase in [Phase::Succeeded, Phase::Failed, Phase::Suspended] {
        d.plan.phase = phase;
        assert_eq!(d.outcome(30).expect("ok"), Action::await_change());
    }
}

/// A client with `site` gets no Job: its site's agent runs it. Status shows
/// it waiting for its site until it commits, and the round goes on with it.
#[test]
fn a_site_client_gets_no_job_and_waits_for_its_site() {
    let clients = three_clients().replace(
        "    - name: c2\n",
        "    - name: c2\n      site: { name: bank }\n",
    );
    let f = ft(&clients, "");
    let d = decided(&f, store(0, &[]), &[]);
    assert_eq!(names(&d.jobs.create), ["trec-r1-c0", "trec-r1-c1"]);
    let states: Vec<&str> = d.status.clients.iter().map(|c| c.state.as_str()).collect();
    assert_eq!(states, ["Training", "Training", "WaitingForSite"]);
    // Its commit counts like any other: with all three in, the round aggregates.
    let jobs = [
        job(1, Some("c0"), 1, JobEnd::Succeeded, NOW - 50.0),
        job(1, Some("c1"), 1, JobEnd::Succeeded, NOW - 50.0),
    ];
    let commits = [("c0", NOW - 20.0), ("c1", NOW - 20.0), ("c2", NOW - 5.0)];
    let d = decided(&f, store(0, &commits), &jobs);
    assert_eq!(d.status.phase, Some(Phase::Aggregating));
    assert!(d
        .jobs
        .create
        .iter()
        .all(|j| role(j) == Some(ROLE_AGGREGATOR)));
    assert_eq!(d.status.clients[2].state, "Committed");
}
