//! Planner tests: hand-written scenarios, then every combination of small
//! client states checked against the invariants the round protocol needs.

use heterotune_crds::spec::FederatedTuneSpec;
use heterotune_crds::status::Phase;

use super::*;

fn spec(clients: usize, min_clients: u32, wait: u32) -> FederatedTuneSpec {
    let names: Vec<String> = (0..clients)
        .map(|i| format!("    - name: c{i}\n      model: {{ family: bert, uri: \"/m\" }}\n"))
        .collect();
    let yaml = format!(
        "apiVersion: heterotune.dev/v1alpha1\nkind: FederatedTune\nmetadata: {{ name: t }}\nspec:\n  rounds: 3\n  minClients: {min_clients}\n  roundDeadlineSeconds: 100\n  waitAfterMinClientsSeconds: {wait}\n  maxRetriesPerClient: 1\n  clients:\n{}  task:\n    dataset: {{ uri: \"/d.jsonl\" }}\n    labels: [neg, pos]\n",
        names.concat()
    );
    heterotune_crds::validate::parse_federated_tune(&yaml)
        .expect("valid test spec")
        .spec
}

fn client(name: &str, committed: bool, running: bool, failed: u32) -> ClientObservation {
    ClientObservation {
        name: name.into(),
        remote: false,
        committed,
        running,
        failed_attempts: failed,
    }
}

/// A client its site's agent runs (never running here).
fn remote(name: &str, committed: bool, failed: u32) -> ClientObservation {
    ClientObservation {
        remote: true,
        ..client(name, committed, false, failed)
    }
}

fn obs(clients: Vec<ClientObservation>) -> Observation {
    Observation {
        now: 10.0,
        completed_rounds: 0,
        round_started_at: Some(0.0),
        quorum_reached_at: None,
        clients,
        aggregation: AggregationState::NotStarted,
        aggregation_failures: 0,
    }
}

#[test]
fn a_new_run_starts_every_client() {
    let s = spec(3, 2, 0);
    let mut o = obs((0..3)
        .map(|i| client(&format!("c{i}"), false, false, 0))
        .collect());
    o.round_started_at = None;
    let p = plan(&s, &o);
    assert_eq!(p.phase, Phase::Running);
    assert_eq!(p.round, 1);
    let starts: Vec<&Action> = p
        .actions
        .iter()
        .filter(|a| matches!(a, Action::StartClient { .. }))
        .collect();
    assert_eq!(starts.len(), 3);
    assert_eq!(
        starts[0],
        &Action::StartClient {
            client: "c0".into(),
            round: 1,
            attempt: 1
        }
    );
}

#[test]
fn all_committed_aggregates_over_exactly_them() {
    let s = spec(3, 2, 0);
    let o = obs(vec![
        client("c0", true, false, 0),
        client("c1", true, false, 1),
        client("c2", false, false, 2),
    ]);
    let p = plan(&s, &o);
    assert_eq!(p.phase, Phase::Aggregating);
    assert_eq!(
        p.actions,
        vec![
            Action::ExcludeClient {
                client: "c2".into(),
                round: 1,
                failures: 2
            },
            Action::StartAggregation {
                round: 1,
                participants: vec!["c0".into(), "c1".into()],
                attempt: 1
            }
        ]
    );
}

#[test]
fn quorum_waits_for_stragglers_until_the_deadline() {
    let s = spec(3, 2, 0);
    let mut o = obs(vec![
        client("c0", true, false, 0),
        client("c1", true, false, 0),
        client("c2", false, true, 0),
    ]);
    let p = plan(&s, &o);
    assert_eq!(p.phase, Phase::Running);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(p.requeue_after, Some(90.0));
    o.now = 100.0;
    let p = plan(&s, &o);
    assert_eq!(
        p.actions,
        vec![
            Action::CancelClient {
                client: "c2".into(),
                round: 1
            },
            Action::StartAggregation {
                round: 1,
                participants: vec!["c0".into(), "c1".into()],
                attempt: 1
            }
        ]
    );
}

#[test]
fn straggler_wait_after_quorum() {
    let s = spec(3, 2, 30);
    let mut o = obs(vec![
        client("c0", true, false, 0),
        client("c1", true, false, 0),
        client("c2", false, true, 0),
    ]);
    o.quorum_reached_at = Some(5.0);
    let p = plan(&s, &o);
    assert!(p.actions.is_empty());
    assert_eq!(p.requeue_after, Some(25.0));
    o.now = 35.0;
    let p = plan(&s, &o);
    assert!(matches!(
        p.actions.last(),
        Some(Action::StartAggregation { .. })
    ));
}

#[test]
fn failures_retry_then_exclude_then_fail_below_quorum() {
    let s = spec(2, 2, 0);
    let o = obs(vec![
        client("c0", true, false, 0),
        client("c1", false, false, 1),
    ]);
    let p = plan(&s, &o);
    assert_eq!(
        p.actions,
        vec![Action::StartClient {
            client: "c1".into(),
            round: 1,
            attempt: 2
        }]
    );
    let o = obs(vec![
        client("c0", true, false, 0),
        client("c1", false, false, 2),
    ]);
    let p = plan(&s, &o);
    assert_eq!(p.phase, Phase::Failed);
    assert!(matches!(
        p.actions.last(),
        Some(Action::Fail {
            reason: FailureReason::QuorumNotMet,
            ..
        })
    ));
}

#[test]
fn deadline_below_quorum_fails() {
    let s = spec(2, 2, 0);
    let mut o = obs(vec![
        client("c0", true, false, 0),
        client("c1", false, true, 0),
    ]);
    o.now = 150.0;
    let p = plan(&s, &o);
    assert!(matches!(
        p.actions.last(),
        Some(Action::Fail {
            reason: FailureReason::DeadlineExceeded,
            ..
        })
    ));
}

#[test]
fn aggregation_running_failed_and_retried() {
    let s = spec(2, 1, 0);
    let mut o = obs(vec![
        client("c0", true, false, 0),
        client("c1", true, false, 0),
    ]);
    o.aggregation = AggregationState::Running;
    assert_eq!(plan(&s, &o).phase, Phase::Aggregating);
    assert!(plan(&s, &o).actions.is_empty());
    o.aggregation = AggregationState::Failed;
    o.aggregation_failures = 1;
    let p = plan(&s, &o);
    assert!(matches!(
        p.actions.last(),
        Some(Action::StartAggregation { attempt: 2, .. })
    ));
    o.aggregation_failures = 2;
    let p = plan(&s, &o);
    assert!(matches!(
        p.actions.last(),
        Some(Action::Fail {
            reason: FailureReason::AggregationFailed,
            ..
        })
    ));
}

#[test]
fn finished_runs_complete_and_suspended_runs_start_nothing() {
    let mut s = spec(2, 1, 0);
    let mut o = obs(vec![
        client("c0", false, false, 0),
        client("c1", false, false, 0),
    ]);
    o.completed_rounds = 3;
    s.evaluation.after_last_round = false;
    assert_eq!(plan(&s, &o).actions, vec![Action::Complete]);
    s.evaluation.after_last_round = true;
    o.completed_rounds = 1;
    s.suspend = true;
    let p = plan(&s, &o);
    assert_eq!(p.phase, Phase::Suspended);
    assert_eq!(p.round, 2);
    assert!(p.actions.is_empty());
}

#[test]
fn the_last_round_is_followed_by_the_evaluation_of_the_final_model() {
    let s = spec(3, 2, 0);
    let mut o = obs(vec![
        client("c0", false, false, 0),
        client("c1", false, false, 0),
        client("c2", false, false, 0),
    ]);
    o.completed_rounds = 3;
    o.round_started_at = None;
    let p = plan(&s, &o);
    assert_eq!(p.phase, Phase::Evaluating);
    assert_eq!(p.round, 3);
    assert_eq!(p.requeue_after, None);
    assert_eq!(
        p.actions,
        (0..3)
            .map(|i| Action::StartEvaluation {
                client: format!("c{i}"),
                round: 3,
                attempt: 1
            })
            .collect::<Vec<_>>()
    );
    // One done, one running, one failed once (retried), then out of retries.
    o.round_started_at = Some(0.0);
    o.clients = vec![
        client("c0", true, false, 0),
        client("c1", false, true, 0),
        client("c2", false, false, 1),
    ];
    let p = plan(&s, &o);
    assert_eq!(p.phase, Phase::Evaluating);
    assert_eq!(
        p.actions,
        vec![Action::StartEvaluation {
            client: "c2".into(),
            round: 3,
            attempt: 2
        }]
    );
    assert_eq!(p.requeue_after, Some(90.0));
    o.clients[2].failed_attempts = 2;
    let p = plan(&s, &o);
    assert_eq!(p.phase, Phase::Evaluating);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    // The running one commits: done, the failed one left out.
    o.clients[1] = client("c1", true, false, 0);
    assert_eq!(plan(&s, &o).actions, vec![Action::Complete]);
    // At the deadline what still runs is stopped and the run completes.
    o.clients[1] = client("c1", false, true, 0);
    o.now = 100.0;
    let p = plan(&s, &o);
    assert_eq!(p.phase, Phase::Succeeded);
    assert_eq!(
        p.actions,
        vec![
            Action::CancelEvaluation {
                client: "c1".into(),
                round: 3
            },
            Action::Complete
        ]
    );
}

#[test]
fn a_suspended_evaluation_starts_nothing_and_a_disabled_one_is_skipped() {
    let mut s = spec(2, 1, 0);
    let mut o = obs(vec![
        client("c0", false, false, 0),
        client("c1", false, false, 0),
    ]);
    o.completed_rounds = 3;
    s.suspend = true;
    let p = plan(&s, &o);
    assert_eq!(p.phase, Phase::Suspended);
    assert!(p.actions.is_empty());
    s.suspend = false;
    s.evaluation.after_last_round = false;
    assert_eq!(plan(&s, &o).actions, vec![Action::Complete]);
}

/// Every combination of per-client states (committed / running / failed
/// 0..=3 times) for 1-3 clients, quorum 1..=n, suspend on/off, before and
/// after the deadline: the decision must respect the protocol's invariants.
/// A site's client is never started: the round waits for its commit (the
/// executor looks again soon), aggregates when it arrives, and at the
/// deadline goes on without it once a quorum is met.
#[test]
fn a_remote_client_is_awaited_never_started() {
    let s = spec(3, 2, 0);
    let o = obs(vec![
        client("c0", true, false, 0),
        remote("c1", false, 0),
        remote("c2", false, 0),
    ]);
    let p = plan(&s, &o);
    assert_eq!(p.phase, Phase::Running);
    assert!(p.actions.is_empty(), "{p:?}");
    assert_eq!(p.requeue_after, Some(REMOTE_POLL_SECONDS));
    let o = obs(vec![
        client("c0", true, false, 0),
        remote("c1", true, 0),
        remote("c2", false, 0),
    ]);
    assert_eq!(plan(&s, &o).phase, Phase::Running, "waits for c2");
    let mut late = o.clone();
    late.now = 100.0;
    let p = plan(&s, &late);
    assert_eq!(
        p.actions,
        vec![Action::StartAggregation {
            round: 1,
            participants: vec!["c0".into(), "c1".into()],
            attempt: 1
        }],
        "no cancel for a site's client"
    );
    // A site that never appears: below quorum at the deadline.
    let mut absent = obs(vec![
        client("c0", true, false, 0),
        remote("c1", false, 0),
        remote("c2", false, 0),
    ]);
    absent.now = 100.0;
    let p = plan(&s, &absent);
    assert!(
        matches!(
            p.actions.as_slice(),
            [Action::Fail {
                reason: FailureReason::DeadlineExceeded,
                ..
            }]
        ),
        "{p:?}"
    );
    // Rejected too often: excluded, and no longer awaited.
    let o = obs(vec![
        client("c0", true, false, 0),
        client("c1", true, false, 0),
        remote("c2", false, 2),
    ]);
    let p = plan(&s, &o);
    assert_eq!(p.phase, Phase::Aggregating, "{p:?}");
    // The evaluation of the final global waits for the site's too.
    let mut eval = obs(vec![client("c0", true, false, 0), remote("c1", false, 0)]);
    eval.completed_rounds = s.rounds;
    let p = plan(&spec(2, 1, 0), &eval);
    assert_eq!(p.phase, Phase::Evaluating);
    assert!(p.actions.is_empty(), "{p:?}");
}

#[test]
fn invariants_hold_over_all_small_states() {
    // (committed, running, failed attempts, remote)
    let states: Vec<(bool, bool, u32, bool)> = {
        let mut v = Vec::new();
        for failed in 0..=3 {
            v.push((true, false, failed, false));
            v.push((false, true, failed, false));
            v.push((false, false, failed, false));
            v.push((true, false, failed, true));
            v.push((false, false, failed, true));
        }
        v
    };
    let mut checked = 0usize;
    for n in 1..=3usize {
        for quorum in 1..=n as u32 {
            for suspend in [false, true] {
                let mut s = spec(n, quorum, 0);
                s.suspend = suspend;
                let combos = states.len().pow(n as u32);
                for mut code in 0..combos {
                    let mut clients = Vec::new();
                    for i in 0..n {
                        let (c, r, f, remote) = states[code % states.len()];
                        code /= states.len();
                        clients.push(ClientObservation {
                            remote,
                            ..client(&format!("c{i}"), c, r, f)
                        });
                    }
                    for now in [10.0, 500.0] {
                        // A round in progress, and the evaluation phase.
                        for completed in [0, s.rounds] {
                            let mut o = obs(clients.clone());
                            o.now = now;
                            o.completed_rounds = completed;
                            let p = plan(&s, &o);
                            if completed < s.rounds {
                                check_invariants(&s, &o, &p);
                            } else {
                                check_evaluation_invariants(&s, &o, &p);
                            }
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 100_000, "only {checked} states checked");
}

fn check_evaluation_invariants(s: &FederatedTuneSpec, o: &Observation, p: &Plan) {
    let mut started = 0;
    for a in &p.actions {
        match a {
            Action::StartEvaluation { client, round, .. } => {
                started += 1;
                assert_eq!(*round, s.rounds);
                let c = o.clients.iter().find(|c| &c.name == client).expect("known");
                assert!(!c.committed && !c.running, "evaluated twice: {o:?}");
                assert!(!c.remote, "started a site's evaluation here: {o:?}");
                assert!(c.failed_attempts <= s.max_retries_per_client, "{o:?}");
                assert!(!s.suspend, "suspended but starting: {p:?}");
            }
            Action::CancelEvaluation { client, .. } => {
                let c = o.clients.iter().find(|c| &c.name == client).expect("known");
                assert!(c.running && !c.committed && !c.remote, "{o:?}");
            }
            Action::Complete => {}
            other => panic!("a round action after the last round: {other:?}"),
        }
    }
    let complete = p.actions.contains(&Action::Complete);
    assert_eq!(complete, p.phase == Phase::Succeeded, "{p:?}");
    // Never complete while an evaluation that could still finish is left
    // behind (before the deadline), never stall.
    let past_deadline = o.now >= 100.0;
    let open = o
        .clients
        .iter()
        .any(|c| !c.committed && (c.running || c.failed_attempts <= s.max_retries_per_client));
    if complete && !past_deadline {
        assert!(!open, "completed with evaluations open: {o:?}");
    }
    if !complete && !s.suspend {
        let running = o.clients.iter().any(|c| c.running && !c.committed);
        let polling = waiting_for_a_site(s, o) && p.requeue_after.is_some();
        assert!(running || started > 0 || polling, "stuck: {o:?} -> {p:?}");
    }
}

/// A remote client may still commit, so the plan must look again.
fn waiting_for_a_site(s: &FederatedTuneSpec, o: &Observation) -> bool {
    o.clients
        .iter()
        .any(|c| c.remote && !c.committed && c.failed_attempts <= s.max_retries_per_client)
}

fn check_invariants(s: &FederatedTuneSpec, o: &Observation, p: &Plan) {
    let committed = o.clients.iter().filter(|c| c.committed).count();
    let starts: Vec<&String> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::StartClient { client, .. } => Some(client),
            _ => None,
        })
        .collect();
    let aggregations: Vec<&Vec<String>> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::StartAggregation { participants, .. } => Some(participants),
            _ => None,
        })
        .collect();
    for name in &starts {
        let c = o
            .clients
            .iter()
            .find(|c| &&c.name == name)
            .expect("known client");
        assert!(!c.committed, "restarted committed client {name}: {o:?}");
        assert!(!c.remote, "started a site's client {name} here: {o:?}");
        assert!(!c.running, "started a running client twice {name}: {o:?}");
        assert!(
            c.failed_attempts <= s.max_retries_per_client,
            "retried past the limit: {o:?}"
        );
    }
    assert!(aggregations.len() <= 1);
    if let Some(participants) = aggregations.first() {
        assert!(
            starts.is_empty(),
            "aggregating while starting clients: {p:?}"
        );
        assert!(
            participants.len() >= s.quorum() as usize,
            "aggregated below quorum: {o:?}"
        );
        assert_eq!(
            participants.len(),
            committed,
            "participants are exactly the committed clients"
        );
        for name in participants.iter() {
            assert!(o.clients.iter().any(|c| &c.name == name && c.committed));
        }
    }
    if s.suspend {
        assert!(
            starts.is_empty() && aggregations.is_empty(),
            "suspended but acting: {p:?}"
        );
    }
    let failed = p.actions.iter().any(|a| matches!(a, Action::Fail { .. }));
    assert_eq!(failed, p.phase == Phase::Failed);
    if failed {
        assert!(
            committed < s.quorum() as usize,
            "failed with a quorum: {o:?}"
        );
    }
    // Progress: unless failed or suspended, something is running, started,
    // or being aggregated.
    for a in &p.actions {
        if let Action::CancelClient { client, .. } = a {
            let c = o.clients.iter().find(|c| &c.name == client).expect("known");
            assert!(!c.remote, "cancelled a site's client {client}: {o:?}");
        }
    }
    if !failed && !s.suspend {
        let running = o.clients.iter().any(|c| c.running && !c.committed);
        let polling = waiting_for_a_site(s, o) && p.requeue_after.is_some();
        assert!(
            running || !starts.is_empty() || !aggregations.is_empty() || polling,
            "stuck: {o:?} -> {p:?}"
        );
    }
}
