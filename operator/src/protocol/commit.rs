//! Exactly-once commits of the round protocol: an artifact's data is stored
//! under its digest ([`data_key`]), then its manifest is created only when
//! absent ([`Store::put_new`]), stamped with who wrote it ([`writer_id`])
//! and, for a client update, the digest of the global it was trained from.
//! The first writer wins; a second one gets [`Commit::AlreadyCommitted`]
//! naming the winner, never an error, and never overwrites the winner's data.

use std::path::Path;
use std::sync::OnceLock;

use bytes::Bytes;
use heterotune_crds::digest::sha256_hex;
use heterotune_crds::layout::{data_key, RunLayout, ADAPTER_FILE, MANIFEST_FILE, MAX_RECORD_BYTES};
use heterotune_crds::manifest::{now_rfc3339, ArtifactManifest};

use super::store::{Store, StoreError};

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// This writer committed; bytes uploaded (data and manifest).
    Created { bytes: u64 },
    /// Another writer had committed first (`writer`, at `at`): nothing of
    /// this writer's was kept.
    AlreadyCommitted { writer: String, at: String },
}

impl Commit {
    /// Who committed: this writer, or the first one.
    pub fn writer(&self) -> String {
        match self {
            Commit::Created { .. } => writer_id().to_string(),
            Commit::AlreadyCommitted { writer, at } => format!("{writer} at {at}"),
        }
    }

    /// The non-fatal note for a second writer of `what`; `None` when this
    /// writer committed.
    pub fn second_writer_note(&self, what: &str) -> Option<String> {
        match self {
            Commit::Created { .. } => None,
            Commit::AlreadyCommitted { writer, at } => Some(format!(
                "{what} was already committed by {writer} at {at}: this writer's copy is discarded"
            )),
        }
    }
}

/// This process as a writer: `host/pid/start time` (the host is the pod's
/// name in a cluster).
pub fn writer_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| format!("{}/{}/{}", host_name(), std::process::id(), now_rfc3339()))
}

/// The host's name (`HOSTNAME`, else the kernel's), for writer and lease ids.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Reads the local file `path` (its error names the path).
pub(crate) fn read_local(path: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| StoreError::Local {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Reads the manifest in the local artifact folder `dir`.
fn local_manifest(dir: &Path) -> Result<ArtifactManifest, StoreError> {
    let path = dir.join(MANIFEST_FILE);
    ArtifactManifest::from_slice(&read_local(&path)?).map_err(|e| StoreError::Local {
        path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// Who committed the manifest `key`, when it exists.
pub async fn committed_by(store: &Store, key: &str) -> Result<Option<Commit>, StoreError> {
    let Some(bytes) = store.get(key).await? else {
        return Ok(None);
    };
    let (writer, at) = match ArtifactManifest::from_slice(&bytes) {
        Ok(m) => (
            m.writer.unwrap_or_else(|| "an earlier writer".into()),
            m.created_at,
        ),
        Err(_) => ("an earlier writer".into(), "an unknown time".into()),
    };
    Ok(Some(Commit::AlreadyCommitted { writer, at }))
}

/// Commits the local artifact folder `local_dir` (`adapter.safetensors`,
/// `manifest.json`) to the store folder `key_dir`: the data under its
/// digest, then the manifest, create-only, stamped with [`writer_id`] and,
/// given the local folder of the global the client trained from (`base`),
/// that global's data digest (`baseSha256`).
pub async fn commit_artifact(
    store: &Store,
    local_dir: &Path,
    key_dir: &str,
    base: Option<&Path>,
) -> Result<Commit, StoreError> {
    let manifest_key = format!("{key_dir}/{MANIFEST_FILE}");
    if let Some(done) = committed_by(store, &manifest_key).await? {
        return Ok(done);
    }
    let data_path = local_dir.join(ADAPTER_FILE);
    let data = read_local(&data_path)?;
    let mut manifest = local_manifest(local_dir)?;
    let sha = sha256_hex(&data);
    let invalid = |message: String| StoreError::Local {
        path: data_path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, message),
    };
    if !manifest.artifact.sha256.eq_ignore_ascii_case(&sha) {
        return Err(invalid(format!(
            "sha256 {sha}, but its manifest declares {}: the trainer's output is damaged",
            manifest.artifact.sha256
        )));
    }
    manifest.writer = Some(writer_id().to_string());
    if let Some(base) = base {
        manifest.base_sha256 = Some(local_manifest(base)?.artifact.sha256.to_ascii_lowercase());
    }
    let key = data_key(key_dir, &sha).ok_or_else(|| invalid(format!("bad digest {sha}")))?;
    let data_bytes = data.len() as u64;
    store.put(&key, Bytes::from(data)).await?;
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| invalid(e.to_string()))?;
    let manifest_bytes = json.len() as u64;
    if store.put_new(&manifest_key, Bytes::from(json)).await? {
        return Ok(Commit::Created {
            bytes: data_bytes + manifest_bytes,
        });
    }
    Ok(committed_by(store, &manifest_key)
        .await?
        .unwrap_or(Commit::AlreadyCommitted {
            writer: "a writer that has since deleted it".into(),
            at: "an unknown time".into(),
        }))
}

/// Records in the manifest of the local artifact folder `local_dir` the
/// sha256 of the private state saved with it (`privateStateSha256`), before
/// [`commit_artifact`] commits it.
pub fn stamp_private_state(local_dir: &Path, sha256: &str) -> Result<(), StoreError> {
    let path = local_dir.join(MANIFEST_FILE);
    let mut manifest = local_manifest(local_dir)?;
    manifest.private_state_sha256 = Some(sha256.to_ascii_lowercase());
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| StoreError::Local {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    std::fs::write(&path, json).map_err(|source| StoreError::Local { path, source })
}

/// The clients among `participants` that a failed aggregation's `error`
/// (the trainer's "quorum not met: … (<client> rejected (<reason>: …); …)")
/// names as rejected.
pub fn rejected_in<'p>(error: &str, participants: &'p [String]) -> Vec<&'p str> {
    let Some((_, summary)) = error.split_once("quorum not met") else {
        return Vec::new();
    };
    participants
        .iter()
        .filter(|p| {
            let entry = format!("{p} rejected (");
            summary.contains(&format!("({entry}")) || summary.contains(&format!("; {entry}"))
        })
        .map(String::as_str)
        .collect()
}

/// Sets a rejected client's commit of `round` aside: its manifest moves to
/// [`RunLayout::rejected_manifest`] (attempt `attempt`), so the client is
/// no longer committed and may train and commit again.
pub async fn set_aside(
    store: &Store,
    layout: &RunLayout,
    round: u32,
    client: &str,
    attempt: u32,
) -> Result<(), StoreError> {
    let key = layout.client_manifest(round, client);
    let bytes = match store.get(&key).await {
        // A manifest too large to read (rejected as unreadable) is not kept:
        // a note of its size takes its place.
        Err(StoreError::TooLarge { size, limit, .. }) => Some(Bytes::from(format!(
            "{{\"setAside\":\"the rejected manifest held {size} bytes, more than the {limit} a record may hold: not kept\"}}"
        ))),
        other => other?,
    };
    if let Some(bytes) = bytes {
        let aside = layout.rejected_manifest(round, client, attempt);
        store.put(&aside, bytes).await?;
        store.delete(&key).await?;
    }
    Ok(())
}

/// After aggregation attempt `attempt` of `round` failed with `error`: sets
/// aside the commits of the `participants` that the error names as rejected
/// ([`rejected_in`]), so that each may train and commit again (within its
/// retries: the planner counts a client whose trainer succeeded but that is
/// not committed as a failed attempt). Both executors do this, the local
/// runner after its aggregation and the aggregation Job's pod under the
/// operator. Returns each named client with the outcome of its set-aside.
pub async fn set_aside_rejected<'p>(
    store: &Store,
    layout: &RunLayout,
    round: u32,
    participants: &'p [String],
    error: &str,
    attempt: u32,
) -> Vec<(&'p str, Result<(), StoreError>)> {
    let mut done = Vec::new();
    for client in rejected_in(error, participants) {
        done.push((
            client,
            set_aside(store, layout, round, client, attempt).await,
        ));
    }
    done
}

/// Downloads the committed artifact in the store folder `key_dir` into
/// `local_dir` (the manifest first: without it there is nothing; the data
/// as `adapter.safetensors`). False when absent. A manifest that does not
/// parse is downloaded alone, for verification to reject; runs written
/// before data keys had digests are read from `adapter.safetensors`.
///
/// Nothing is read whole into memory and nothing past the limits: the
/// manifest stops one byte past [`MAX_RECORD_BYTES`], the data one byte
/// past `max_data_bytes` (a client's: `spec.aggregation.maxArtifactBytes`;
/// `u64::MAX` for a global). Verification then rejects what was cut short
/// (the manifest does not parse; the data is too large).
pub async fn download_artifact(
    store: &Store,
    key_dir: &str,
    local_dir: &Path,
    max_data_bytes: u64,
) -> Result<bool, StoreError> {
    // The manifest takes its name last: a local folder with a manifest is a
    // complete download (`staging::ensure_global` trusts it).
    let manifest_path = local_dir.join(MANIFEST_FILE);
    let fetching = local_dir.join(format!("{MANIFEST_FILE}.fetching"));
    let manifest_key = format!("{key_dir}/{MANIFEST_FILE}");
    let Some(fetched) = store
        .download_limited(&manifest_key, &fetching, MAX_RECORD_BYTES)
        .await?
    else {
        return Ok(false);
    };
    let parsed = if fetched.truncated {
        None
    } else {
        ArtifactManifest::from_slice(&read_local(&fetching)?).ok()
    };
    let data_path = local_dir.join(ADAPTER_FILE);
    let mut found = false;
    if let Some(key) = parsed
        .as_ref()
        .and_then(|m| data_key(key_dir, &m.artifact.sha256))
    {
        found = store
            .download_limited(&key, &data_path, max_data_bytes)
            .await?
            .is_some();
    }
    if !found {
        found = store
            .download_limited(
                &format!("{key_dir}/{ADAPTER_FILE}"),
                &data_path,
                max_data_bytes,
            )
            .await?
            .is_some();
    }
    if !found && parsed.is_some() {
        // A manifest without its data is no commit.
        let _ = std::fs::remove_file(&fetching);
        return Ok(false);
    }
    std::fs::rename(&fetching, &manifest_path).map_err(|e| StoreError::Local {
        path: manifest_path,
        source: e,
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests;
