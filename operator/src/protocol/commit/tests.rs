use std::path::{Path, PathBuf};

use bytes::Bytes;
use heterotune_crds::digest::sha256_hex;
use heterotune_crds::layout::{data_key, ADAPTER_FILE, MANIFEST_FILE};
use heterotune_crds::manifest::{ArtifactKind, ArtifactManifest, FileDigest};
use heterotune_crds::spec::StorageSpec;

use super::*;

fn local_store(dir: &Path) -> Store {
    let spec = StorageSpec {
        uri: "file://store".into(),
        ..StorageSpec::default()
    };
    Store::from_spec(&spec, dir).expect("local store")
}

/// A local artifact folder holding `data` and its manifest.
fn artifact(dir: &Path, name: &str, kind: ArtifactKind, data: &[u8]) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::write(out.join(ADAPTER_FILE), data).expect("data");
    let m = ArtifactManifest {
        artifact: FileDigest {
            path: ADAPTER_FILE.into(),
            sha256: sha256_hex(data),
            bytes: data.len() as u64,
        },
        client: (kind == ArtifactKind::Client).then(|| "a".to_string()),
        ..ArtifactManifest::new(kind, "ns/run", 1, 0, "test")
    };
    std::fs::write(
        out.join(MANIFEST_FILE),
        serde_json::to_vec(&m).expect("json"),
    )
    .expect("manifest");
    out
}

async fn stored_manifest(store: &Store, key_dir: &str) -> ArtifactManifest {
    let bytes = store
        .get(&format!("{key_dir}/{MANIFEST_FILE}"))
        .await
        .expect("get")
        .expect("committed");
    ArtifactManifest::from_slice(&bytes).expect("parses")
}

#[tokio::test]
async fn create_only_writes_keep_the_first_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = local_store(dir.path());
    let one = Bytes::from_static(b"one");
    assert!(store
        .put_new("k/m.json", one.clone())
        .await
        .expect("create"));
    assert!(!store
        .put_new("k/m.json", Bytes::from_static(b"two"))
        .await
        .expect("second create"));
    assert_eq!(store.get("k/m.json").await.expect("get"), Some(one.clone()));
    // The same bytes again: this writer's own create, retried.
    assert!(store.put_new("k/m.json", one).await.expect("retry"));
}

/// Two writers of one client's round: the first commits, the second is
/// told who did and the first one's data and manifest stay as they were.
#[tokio::test]
async fn the_first_commit_wins_and_the_second_writer_is_told_by_whom() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = local_store(dir.path());
    let base = artifact(dir.path(), "base", ArtifactKind::Global, b"global zero");
    let first = artifact(dir.path(), "first", ArtifactKind::Client, b"first update");
    let second = artifact(dir.path(), "second", ArtifactKind::Client, b"second update");
    let key_dir = "ns/run/round-0001/clients/a";

    let done = commit_artifact(&store, &first, key_dir, Some(&base))
        .await
        .expect("commit");
    assert!(
        matches!(done, Commit::Created { bytes } if bytes > 12),
        "{done:?}"
    );
    assert_eq!(done.second_writer_note("x"), None);
    let m = stored_manifest(&store, key_dir).await;
    assert_eq!(m.writer.as_deref(), Some(writer_id()));
    assert_eq!(m.base_sha256, Some(sha256_hex(b"global zero")));
    let data = data_key(key_dir, &sha256_hex(b"first update")).expect("key");
    assert_eq!(
        store.get(&data).await.expect("get").as_deref(),
        Some(&b"first update"[..])
    );

    let again = commit_artifact(&store, &second, key_dir, Some(&base))
        .await
        .expect("second writer is not an error");
    let note = again
        .second_writer_note("round 1: client a")
        .expect("a note");
    assert!(
        note.contains("already committed by") && note.contains(writer_id()),
        "{note}"
    );
    assert_eq!(stored_manifest(&store, key_dir).await, m);
    // Nothing of the second writer's landed.
    let second_data = data_key(key_dir, &sha256_hex(b"second update")).expect("key");
    assert!(!store.exists(&second_data).await.expect("exists"));

    assert_eq!(
        downloaded(&store, key_dir, dir.path()).await,
        b"first update"
    );
}

/// The data of the committed artifact in `key_dir`, downloaded under `dir`.
async fn downloaded(store: &Store, key_dir: &str, dir: &Path) -> Vec<u8> {
    let down = dir.join("down");
    let _ = std::fs::remove_dir_all(&down);
    assert!(download_artifact(store, key_dir, &down, u64::MAX)
        .await
        .expect("download"));
    std::fs::read(down.join(ADAPTER_FILE)).expect("data")
}

/// A writer that lost the race after uploading its data (both checked the
/// manifest absent) leaves the winner's data intact: data keys are digests.
#[tokio::test]
async fn a_racing_writer_never_overwrites_the_committed_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = local_store(dir.path());
    let key_dir = "ns/run/round-0001/global";
    let loser = artifact(dir.path(), "loser", ArtifactKind::Global, b"loser");
    let winner = artifact(dir.path(), "winner", ArtifactKind::Global, b"winner");
    // The loser's data lands first, then the winner commits, then the
    // loser's manifest create fails.
    let loser_key = data_key(key_dir, &sha256_hex(b"loser")).expect("key");
    store
        .put(&loser_key, Bytes::from_static(b"loser"))
        .await
        .expect("put");
    commit_artifact(&store, &winner, key_dir, None)
        .await
        .expect("commit");
    let json = std::fs::read(loser.join(MANIFEST_FILE)).expect("manifest");
    assert!(!store
        .put_new(&format!("{key_dir}/{MANIFEST_FILE}"), json.into())
        .await
        .expect("create"));
    assert_eq!(downloaded(&store, key_dir, dir.path()).await, b"winner");
}

#[tokio::test]
async fn damaged_output_is_not_committed_and_old_layouts_still_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = local_store(dir.path());
    let out = artifact(dir.path(), "out", ArtifactKind::Global, b"data");
    std::fs::write(out.join(ADAPTER_FILE), b"datx").expect("damage");
    let err = commit_artifact(&store, &out, "ns/run/round-0001/global", None)
        .await
        .expect_err("damaged");
    assert!(err.to_string().contains("manifest declares"), "{err}");
    assert!(!store
        .exists("ns/run/round-0001/global/manifest.json")
        .await
        .expect("exists"));
    // A run written before data keys had digests.
    let legacy = artifact(dir.path(), "legacy", ArtifactKind::Global, b"old");
    for name in [ADAPTER_FILE, MANIFEST_FILE] {
        let bytes = std::fs::read(legacy.join(name)).expect("read");
        store
            .put(&format!("ns/run/round-0000/global/{name}"), bytes.into())
            .await
            .expect("put");
    }
    let old = downloaded(&store, "ns/run/round-0000/global", dir.path()).await;
    assert_eq!(old, b"old");
    let down = dir.path().join("down");
    assert!(
        !download_artifact(&store, "ns/run/round-0009/global", &down, u64::MAX)
            .await
            .expect("absent")
    );
}

#[test]
fn rejected_clients_are_read_from_the_quorum_error() {
    let participants = ["a".to_string(), "b".to_string(), "ab".to_string()];
    let error = "aggregating round 2: round 2: quorum not met: 1 client update(s) accepted, 3 required \
        (b rejected (stale_base: trained from a rejected (x) global); ab rejected (non_finite: NaN); missing: c)";
    assert_eq!(rejected_in(error, &participants), ["b", "ab"]);
    assert!(rejected_in("a rejected (x)", &participants).is_empty());
}

#[tokio::test]
async fn a_rejected_commit_is_set_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = local_store(dir.path());
    let layout = heterotune_crds::layout::RunLayout::new("", "ns", "run", "uid");
    let key = layout.client_manifest(1, "a");
    store
        .put(&key, Bytes::from_static(b"{}"))
        .await
        .expect("put");
    set_aside(&store, &layout, 1, "a", 2)
        .await
        .expect("set aside");
    assert!(!store.exists(&key).await.expect("exists"));
    assert_eq!(
        store
            .get(&layout.rejected_manifest(1, "a", 2))
            .await
            .expect("get")
            .as_deref(),
        Some(&b"{}"[..])
    );
}

#[tokio::test]
async fn an_oversized_rejected_manifest_is_set_aside_as_a_note() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = local_store(dir.path());
    let layout = heterotune_crds::layout::RunLayout::new("", "ns", "run", "uid");
    let key = layout.client_manifest(1, "a");
    let huge = vec![b' '; MAX_RECORD_BYTES as usize + 1];
    store.put(&key, Bytes::from(huge)).await.expect("put");
    set_aside(&store, &layout, 1, "a", 1)
        .await
        .expect("set aside without reading it");
    assert!(!store.exists(&key).await.expect("exists"));
    let note = store
        .get(&layout.rejected_manifest(1, "a", 1))
        .await
        .expect("get")
        .expect("a note");
    let note = String::from_utf8_lossy(&note);
    assert!(
        note.contains(&format!("held {} bytes", MAX_RECORD_BYTES + 1)),
        "{note}"
    );
}
