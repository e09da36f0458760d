//! Which waiting trainer takes a free process slot first: the longest.
//!
//! The local runner has fewer process slots (`--parallel`, one per core by
//! default) than a federation has clients, and a round lasts until its last
//! trainer ends. The planner lists the clients to start in spec order, so
//! the quickstart's two small edge sites started first and its MPNet
//! hospital last, alone on one core at the end of every round. Starting the
//! longest trainers first (the LPT rule of scheduling) lets the short ones
//! fill the other slots around it.
//!
//! How long a trainer takes is what it took last time: each client's last
//! successful training process, measured by the runner. A client not
//! measured yet (the first round, a resumed run) counts as longer than any
//! measured one (unknown work is safest started early); among those, the
//! larger backbone goes first. The order only changes which process starts
//! first, never what a round trains or commits.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use heterotune_crds::spec::FederatedTuneSpec;

use crate::dry_run::model_shape;
use crate::protocol::planner::Action;

/// What the runner knows of each client's trainer time.
#[derive(Debug, Default)]
pub struct Schedule {
    /// Seconds of the client's last successful training process.
    measured: BTreeMap<String, f64>,
    /// Backbone parameters of the client's model (0 where unknown).
    parameters: BTreeMap<String, u64>,
}

impl Schedule {
    /// The schedule of `spec`'s clients, none measured yet.
    pub fn new(spec: &FederatedTuneSpec) -> Self {
        Schedule {
            measured: BTreeMap::new(),
            parameters: spec
                .clients
                .iter()
                .map(|c| {
                    let p = model_shape(&c.model).map_or(0, |s| s.parameters);
                    (c.name.clone(), p)
                })
                .collect(),
        }
    }

    /// `client`'s training process took `seconds`.
    pub fn record(&mut self, client: &str, seconds: f64) {
        if seconds.is_finite() && seconds >= 0.0 {
            self.measured.insert(client.to_string(), seconds);
        }
    }

    /// Puts the trainer starts among `actions` longest first; every other
    /// action keeps its place, and clients that tie keep the planner's order.
    pub fn order(&self, actions: &mut [Action]) {
        let slots: Vec<usize> = (0..actions.len())
            .filter(|&i| starts(&actions[i]).is_some())
            .collect();
        let mut picked: Vec<Action> = slots.iter().map(|&i| actions[i].clone()).collect();
        picked.sort_by(|a, b| self.longer_first(starts(a), starts(b)));
        for (slot, action) in slots.into_iter().zip(picked) {
            actions[slot] = action;
        }
    }

    fn longer_first(&self, a: Option<&str>, b: Option<&str>) -> Ordering {
        let key = |c: Option<&str>| {
            let c = c.unwrap_or_default();
            match self.measured.get(c) {
                // Unmeasured before measured, then by size or by time.
                None => (1, self.parameters.get(c).copied().unwrap_or(0) as f64),
                Some(s) => (0, *s),
            }
        };
        let (ka, kb) = (key(a), key(b));
        kb.0.cmp(&ka.0).then(kb.1.total_cmp(&ka.1))
    }
}

/// The client a trainer-starting action starts.
fn starts(action: &Action) -> Option<&str> {
    match action {
        Action::StartClient { client, .. } | Action::StartEvaluation { client, .. } => {
            Some(client.as_str())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FederatedTuneSpec {
        // Parameters given in the spec: no model folder is read.
        let yaml = r#"
apiVersion: heterotune.dev/v1alpha1
kind: FederatedTune
metadata: { name: t }
spec:
  clients:
    - { name: edge, model: { family: bert, uri: "s3://m/l3", parameters: 17000000 } }
    - { name: clinic, model: { family: bert, uri: "s3://m/l6", parameters: 22000000 } }
    - { name: hospital, model: { family: bert, uri: "s3://m/mpnet", parameters: 109000000 } }
    - { name: bank, model: { family: llama, uri: "s3://m/smol", parameters: 134000000 } }
  task: { dataset: { uri: "s3://d/d.jsonl" }, labels: [neg, pos] }
"#;
        heterotune_crds::validate::parse_federated_tune(yaml)
            .expect("valid")
            .spec
    }

    fn start(client: &str) -> Action {
        Action::StartClient {
            client: client.into(),
            round: 1,
            attempt: 1,
        }
    }

    fn names(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::StartClient { client, .. } => client.clone(),
                Action::StartEvaluation { client, .. } => format!("eval:{client}"),
                Action::CancelClient { client, .. } => format!("cancel:{client}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// Unmeasured, the larger backbone starts first; measured, the longer
    /// trainer does, and unmeasured clients go before measured ones.
    #[test]
    fn the_longest_trainer_starts_first() {
        let mut schedule = Schedule::new(&spec());
        let mut actions: Vec<Action> = ["edge", "clinic", "hospital", "bank"]
            .into_iter()
            .map(start)
            .collect();
        schedule.order(&mut actions);
        assert_eq!(names(&actions), ["bank", "hospital", "clinic", "edge"]);

        schedule.record("edge", 12.0);
        schedule.record("clinic", 18.0);
        schedule.record("hospital", 70.0);
        schedule.record("bank", 45.0);
        schedule.order(&mut actions);
        assert_eq!(names(&actions), ["hospital", "bank", "clinic", "edge"]);

        let mut fresh = Schedule::new(&spec());
        fresh.record("hospital", 70.0);
        let mut actions: Vec<Action> = ["edge", "hospital"].into_iter().map(start).collect();
        fresh.order(&mut actions);
        assert_eq!(names(&actions), ["edge", "hospital"], "unmeasured first");
    }

    /// Other actions keep their places; evaluations are ordered like
    /// trainings; equal clients keep the planner's order.
    #[test]
    fn only_the_starts_move() {
        let mut schedule = Schedule::new(&spec());
        schedule.record("edge", 5.0);
        schedule.record("clinic", 5.0);
        schedule.record("hospital", 9.0);
        let mut actions = vec![
            Action::CancelClient {
                client: "bank".into(),
                round: 1,
            },
            start("edge"),
            start("clinic"),
            Action::StartEvaluation {
                client: "hospital".into(),
                round: 1,
                attempt: 1,
            },
            Action::Complete,
        ];
        schedule.order(&mut actions);
        assert_eq!(
            names(&actions),
            ["cancel:bank", "eval:hospital", "edge", "clinic", "Complete"]
        );
        schedule.record("edge", f64::NAN);
        schedule.record("clinic", -1.0);
        assert_eq!(schedule.measured["edge"], 5.0, "NaN is not a time");
        assert_eq!(schedule.measured["clinic"], 5.0, "nor is a negative one");
    }
}
