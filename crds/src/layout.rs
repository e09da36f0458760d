//! The object-store layout of the round protocol.
//!
//! ```text
//! <prefix>/<namespace>/<name>-<uid8>/lease/00000001.json
//!                                   /round-0003/clients/<client>/data-<sha256>.safetensors
//!                                              /clients/<client>/manifest.json
//!                                   /round-0003/global/data-<sha256>.safetensors
//!                                              /global/manifest.json
//!                                              /rejected/<client>/attempt-1.json
//!                                   /round-0012/evaluation/<client>.json
//!                                   /private/<client>/state-round-0003.safetensors
//! ```
//!
//! `round-NNNN/evaluation/<client>.json` is a client's evaluation of the
//! global model of round NNNN (written after the last round; one object, so
//! its existence is its commit).
//!
//! A writer uploads its data first and its manifest last: the manifest is the
//! commit marker, written create-only (the first writer wins; a second one
//! is told who committed). The data file is named by its sha256
//! ([`data_key`]), so a second writer racing the first never overwrites the
//! data a committed manifest describes. A round is complete exactly when its
//! global manifest exists. The newest `lease/<generation>.json` names the
//! `heterotune run` process driving the run (see `operator::runner::lease`).
//! The run directory includes the first 8 characters of the resource's UID,
//! so a re-created resource with the same name never reads an old run.

/// File name of an adapter artifact.
pub const ADAPTER_FILE: &str = "adapter.safetensors";
/// File name of a manifest (the commit marker).
pub const MANIFEST_FILE: &str = "manifest.json";
/// The most bytes a reader takes of one JSON record of the store
/// (manifests, evaluations, leases, reports, specs): a larger one is
/// refused before its body is read (a hostile client's 1.5 GB manifest
/// must not become 1.5 GB of a reader's memory), and verification rejects
/// a larger client manifest (`manifest_unreadable`). Adapter data has its
/// own limit, `spec.aggregation.maxArtifactBytes`.
pub const MAX_RECORD_BYTES: u64 = 16 * 1024 * 1024;

/// The store key of the data file with digest `sha256` in the artifact
/// folder `key_dir` (locally the file is [`ADAPTER_FILE`]). `None` unless
/// `sha256` is 64 hex digits (it comes from an untrusted manifest).
pub fn data_key(key_dir: &str, sha256: &str) -> Option<String> {
    (sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("{key_dir}/data-{}.safetensors", sha256.to_ascii_lowercase()))
}

/// File name of a client's private state after `round`.
pub fn state_file_name(round: u32) -> String {
    format!("state-round-{round:04}.safetensors")
}

/// The store object name of a private state of `round` with digest
/// `sha256`: every writer's state has its own key, and the committed client
/// manifest names the one that counts (`privateStateSha256`).
pub fn state_object_name(round: u32, sha256: &str) -> String {
    format!(
        "state-round-{round:04}-{}.safetensors",
        sha256.to_ascii_lowercase()
    )
}

/// The round and digest of a private-state name written by
/// [`state_file_name`] (no digest) or [`state_object_name`].
pub fn parse_state_name(name: &str) -> Option<(u32, Option<&str>)> {
    let rest = name
        .strip_prefix("state-round-")?
        .strip_suffix(".safetensors")?;
    let (round, sha) = match rest.split_once('-') {
        Some((round, sha)) if sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()) => {
            (round, Some(sha))
        }
        Some(_) => return None,
        None => (rest, None),
    };
    round.parse().ok().map(|r| (r, sha))
}

/// The round of a private-state name ([`parse_state_name`]).
pub fn state_file_round(name: &str) -> Option<u32> {
    parse_state_name(name).map(|(round, _)| round)
}

/// The newest of `names` (private-state file names) saved before `round`:
/// what a client resumes from. A client that missed rounds (excluded, or
/// cut off) resumes from its last completed one.
pub fn latest_state_before<'a>(
    names: impl IntoIterator<Item = &'a str>,
    round: u32,
) -> Option<(u32, &'a str)> {
    names
        .into_iter()
        .filter_map(|n| state_file_round(n).map(|r| (r, n)))
        .filter(|(r, _)| *r < round)
        .max_by_key(|(r, _)| *r)
}

/// Paths (object keys, `/`-separated, relative to the store root) of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLayout {
    run_dir: String,
}

impl RunLayout {
    /// The layout of run `name` in `namespace` whose UID starts with `uid`.
    /// `prefix` is the path part of the storage URI (may be empty).
    pub fn new(prefix: &str, namespace: &str, name: &str, uid: &str) -> Self {
        let uid8: String = uid.chars().filter(|c| *c != '-').take(8).collect();
        let prefix = prefix.trim_matches('/');
        let run = format!("{namespace}/{name}-{uid8}");
        let run_dir = if prefix.is_empty() {
            run
        } else {
            format!("{prefix}/{run}")
        };
        RunLayout { run_dir }
    }

    /// The run's directory.
    pub fn run_dir(&self) -> &str {
        &self.run_dir
    }

    /// Directory of round `round` (1-based; round 0 holds the initial state).
    pub fn round_dir(&self, round: u32) -> String {
        format!("{}/round-{round:04}", self.run_dir)
    }

    /// Directory of `client`'s artifact in `round`.
    pub fn client_dir(&self, round: u32, client: &str) -> String {
        format!("{}/clients/{client}", self.round_dir(round))
    }

    /// Where `client`'s rejected manifests of `round` are set aside (so
    /// that it can commit again), one per aggregation attempt.
    pub fn rejected_manifest(&self, round: u32, client: &str, attempt: u32) -> String {
        format!(
            "{}/rejected/{client}/attempt-{attempt}.json",
            self.round_dir(round)
        )
    }

    /// Directory of the global artifact of `round`.
    pub fn global_dir(&self, round: u32) -> String {
        format!("{}/global", self.round_dir(round))
    }

    /// `client`'s manifest in `round`.
    pub fn client_manifest(&self, round: u32, client: &str) -> String {
        format!("{}/{MANIFEST_FILE}", self.client_dir(round, client))
    }

    /// The global manifest after `round` (its existence completes the round).
    pub fn global_manifest(&self, round: u32) -> String {
        format!("{}/{MANIFEST_FILE}", self.global_dir(round))
    }

    /// Directory of the evaluations of the global model of `round`.
    pub fn evaluation_dir(&self, round: u32) -> String {
        format!("{}/evaluation", self.round_dir(round))
    }

    /// `client`'s evaluation of the global model of `round`.
    pub fn evaluation_result(&self, round: u32, client: &str) -> String {
        format!("{}/{client}.json", self.evaluation_dir(round))
    }

    /// The client an object key under [`Self::evaluation_dir`] belongs to.
    pub fn evaluation_client<'k>(&self, round: u32, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.evaluation_dir(round))?
            .strip_prefix('/')?
            .strip_suffix(".json")
            .filter(|c| !c.is_empty() && !c.contains('/'))
    }

    /// Where a cluster client keeps its private state between rounds (the
    /// adapter parts it never shares; the aggregator never reads them).
    pub fn private_dir(&self, client: &str) -> String {
        format!("{}/private/{client}", self.run_dir)
    }

    /// `client`'s private state after `round` with digest `sha256`
    /// ([`state_object_name`]).
    pub fn client_state(&self, client: &str, round: u32, sha256: &str) -> String {
        format!(
            "{}/{}",
            self.private_dir(client),
            state_object_name(round, sha256)
        )
    }

    /// The leases of the process driving the run (`heterotune run`).
    pub fn lease_dir(&self) -> String {
        format!("{}/lease", self.run_dir)
    }

    /// The lease of generation `generation` (the newest one holds the run).
    pub fn lease_key(&self, generation: u64) -> String {
        format!("{}/{generation:08}.json", self.lease_dir())
    }

    /// The spec the run was started with (checked on resume).
    pub fn spec_file(&self) -> String {
        format!("{}/spec.json", self.run_dir)
    }

    /// The run's report folder.
    pub fn report_dir(&self) -> String {
        format!("{}/report", self.run_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_documented_layout() {
        let l = RunLayout::new(
            "/runs/",
            "team-a",
            "trec",
            "0f1e2d3c-4b5a-6978-8091-a2b3c4d5e6f7",
        );
        assert_eq!(l.run_dir(), "runs/team-a/trec-0f1e2d3c");
        let sha = "ab".repeat(32);
        assert_eq!(
            data_key(&l.client_dir(3, "site-1"), &sha).as_deref(),
            Some(
                format!(
                    "runs/team-a/trec-0f1e2d3c/round-0003/clients/site-1/data-{sha}.safetensors"
                )
                .as_str()
            )
        );
        assert_eq!(data_key("k", "../x"), None);
        assert_eq!(data_key("k", &"g".repeat(64)), None);
        assert_eq!(
            l.lease_key(2),
            "runs/team-a/trec-0f1e2d3c/lease/00000002.json"
        );
        assert_eq!(
            l.global_manifest(12),
            "runs/team-a/trec-0f1e2d3c/round-0012/global/manifest.json"
        );
        assert_eq!(
            l.client_state("site-1", 2, &"AB".repeat(32)),
            format!(
                "runs/team-a/trec-0f1e2d3c/private/site-1/state-round-0002-{}.safetensors",
                "ab".repeat(32)
            )
        );
        assert_eq!(
            l.evaluation_result(12, "site-1"),
            "runs/team-a/trec-0f1e2d3c/round-0012/evaluation/site-1.json"
        );
        let key = l.evaluation_result(12, "site-1");
        assert_eq!(l.evaluation_client(12, &key), Some("site-1"));
        assert_eq!(l.evaluation_client(11, &key), None);
        assert_eq!(
            l.evaluation_client(
                12,
                "runs/team-a/trec-0f1e2d3c/round-0012/evaluation/a/b.json"
            ),
            None
        );
        let bare = RunLayout::new("", "ns", "x", "abc");
        assert_eq!(bare.round_dir(1), "ns/x-abc/round-0001");
    }

    #[test]
    fn a_client_resumes_from_its_newest_earlier_state() {
        let names = [
            "state-round-0001.safetensors",
            "state-round-0003.safetensors",
            "state-round-0004.safetensors",
            "notes.txt",
            "state-round-x.safetensors",
        ];
        assert_eq!(
            latest_state_before(names, 4),
            Some((3, "state-round-0003.safetensors"))
        );
        assert_eq!(
            latest_state_before(names, 2),
            Some((1, "state-round-0001.safetensors"))
        );
        assert_eq!(latest_state_before(names, 1), None);
        assert_eq!(state_file_round(&state_file_name(12)), Some(12));
        let sha = "c".repeat(64);
        let named = state_object_name(7, &sha);
        assert_eq!(parse_state_name(&named), Some((7, Some(sha.as_str()))));
        assert_eq!(parse_state_name(&state_file_name(7)), Some((7, None)));
        assert_eq!(
            latest_state_before([named.as_str()], 8),
            Some((7, named.as_str()))
        );
        for bad in [
            "state-round-0007-cc.safetensors",
            "state-round-0007-.safetensors",
            "state-round--1.safetensors",
            &format!("state-round-x-{sha}.safetensors"),
        ] {
            assert_eq!(parse_state_name(bad), None, "{bad}");
        }
    }
}
