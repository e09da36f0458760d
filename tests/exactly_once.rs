//! Exactly once on a real S3 server (SeaweedFS on loopback): create-only
//! writes (`If-None-Match: *`) keep the first object under racing writers,
//! a second committer of an artifact is told who won, and the run lease
//! refuses a second holder. Bounded reads, on S3 and on a folder store: an
//! object larger than a reader's limit is refused before its body is read,
//! or downloaded only one byte past the limit.

use std::path::Path;
use std::time::Duration;

use heterotune_crds::layout::{RunLayout, ADAPTER_FILE, MANIFEST_FILE};
use heterotune_crds::manifest::{ArtifactKind, ArtifactManifest, FileDigest};
use heterotune_crds::spec::StorageSpec;
use heterotune_operator::protocol::commit::{self, Commit};
use heterotune_operator::protocol::store::{Fetched, Store, StoreError};
use heterotune_operator::runner::lease::{Lease, LeaseError};
use heterotune_tests::s3::S3Server;

const BUCKET: &str = "once";

/// A local artifact folder holding `data` and its manifest.
fn artifact(dir: &Path, data: &[u8]) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join(ADAPTER_FILE), data).expect("data");
    let m = ArtifactManifest {
        artifact: FileDigest {
            path: ADAPTER_FILE.into(),
            sha256: heterotune_crds::digest::sha256_hex(data),
            bytes: data.len() as u64,
        },
        ..ArtifactManifest::new(ArtifactKind::Global, "ns/run", 1, 0, "test")
    };
    std::fs::write(
        dir.join(MANIFEST_FILE),
        serde_json::to_vec(&m).expect("json"),
    )
    .expect("manifest");
    dir.to_path_buf()
}

async fn checks(store: Store, root: &Path) {
    // Eight writers race to create one key: exactly one wins.
    let mut racers = Vec::new();
    for i in 0..8u8 {
        let s = store.clone();
        racers.push(tokio::spawn(async move {
            s.put_new("race/manifest.json", vec![i; 16].into()).await
        }));
    }
    let mut won = 0;
    for r in racers {
        won += usize::from(r.await.expect("task").expect("create"));
    }
    assert_eq!(
        won, 1,
        "create-only writes are not exclusive on this server"
    );

    // Two committers of one global: the first wins, the second is told.
    let key_dir = "runs/ns/run/round-0001/global";
    let first = artifact(&root.join("first"), b"first global");
    let second = artifact(&root.join("second"), b"second global");
    let done = commit::commit_artifact(&store, &first, key_dir, None)
        .await
        .expect("commit");
    assert!(matches!(done, Commit::Created { .. }), "{done:?}");
    let again = commit::commit_artifact(&store, &second, key_dir, None)
        .await
        .expect("a second writer is not an error");
    let note = again.second_writer_note("round 1's global").expect("note");
    assert!(note.contains(commit::writer_id()), "{note}");
    let down = root.join("down");
    assert!(commit::download_artifact(&store, key_dir, &down, u64::MAX)
        .await
        .expect("download"));
    assert_eq!(
        std::fs::read(down.join(ADAPTER_FILE)).expect("data"),
        b"first global"
    );

    // The run lease: a second holder is refused, a released lease is free.
    let layout = RunLayout::new(store.prefix(), "ns", "run", "uid");
    let beat = Duration::from_secs(10);
    let held = Lease::acquire(&store, &layout, beat).await.expect("free");
    match Lease::acquire(&store, &layout, beat).await {
        Err(LeaseError::Held { holder, .. }) => assert_eq!(holder, commit::writer_id()),
        Err(e) => panic!("expected Held, got {e}"),
        Ok(_) => panic!("a second holder got the lease"),
    }
    held.release().await;
    let next = Lease::acquire(&store, &layout, beat)
        .await
        .expect("released");
    assert_eq!(next.generation(), 1);
    next.release().await;
}

/// Reads of objects larger than the reader takes.
async fn bounded_reads(store: &Store, root: &Path) {
    let big = vec![7u8; 100_000];
    store
        .put("big/object", big.clone().into())
        .await
        .expect("put");
    match store.get_limited("big/object", 1000).await {
        Err(StoreError::TooLarge { size, limit, .. }) => assert_eq!((size, limit), (100_000, 1000)),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let err = store
        .get_limited("big/object", 1000)
        .await
        .expect_err("too large");
    assert!(err.to_string().contains("holds 100000 bytes"), "{err}");
    assert_eq!(
        store
            .get_limited("big/object", 100_000)
            .await
            .expect("fits")
            .as_deref(),
        Some(&big[..])
    );
    assert_eq!(
        store.get_limited("big/none", 10).await.expect("absent"),
        None
    );

    // A download stops one byte past the limit, for verification to reject.
    let local = root.join("bounded/object");
    let cut = store
        .download_limited("big/object", &local, 1000)
        .await
        .expect("download");
    assert_eq!(
        cut,
        Some(Fetched {
            written: 1001,
            truncated: true
        })
    );
    assert_eq!(std::fs::read(&local).expect("file"), &big[..1001]);
    let whole = store
        .download_limited("big/object", &local, 100_000)
        .await
        .expect("download");
    assert_eq!(
        whole,
        Some(Fetched {
            written: 100_000,
            truncated: false
        })
    );
    assert_eq!(std::fs::read(&local).expect("file"), big);
    assert!(store
        .download_limited("big/none", &local, 10)
        .await
        .expect("absent")
        .is_none());

    // A committed artifact whose data runs past the aggregation's limit:
    // its manifest arrives whole, its data cut one byte past the limit.
    let key_dir = "runs/ns/run/round-0002/clients/a";
    let art = artifact(&root.join("bounded-art"), &big);
    commit::commit_artifact(store, &art, key_dir, None)
        .await
        .expect("commit");
    let down = root.join("bounded-down");
    assert!(commit::download_artifact(store, key_dir, &down, 4096)
        .await
        .expect("download"));
    assert_eq!(
        std::fs::metadata(down.join(ADAPTER_FILE))
            .expect("data")
            .len(),
        4097
    );
    let manifest = std::fs::read(down.join(MANIFEST_FILE)).expect("manifest");
    let m = ArtifactManifest::from_slice(&manifest).expect("whole manifest");
    assert_eq!(m.artifact.bytes, 100_000);
    assert!(!down.join(format!("{MANIFEST_FILE}.fetching")).exists());
}

#[test]
fn bounded_reads_on_a_folder_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = StorageSpec {
        uri: "file://store".into(),
        ..StorageSpec::default()
    };
    let store = Store::from_spec(&spec, dir.path()).expect("folder store");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bounded_reads(&store, dir.path()));
}

#[test]
fn create_only_commits_and_the_lease_hold_on_s3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let server = S3Server::start(&root.join("s3"), BUCKET);
    // The server runs without auth; the client signs with any key.
    std::env::set_var("AWS_ACCESS_KEY_ID", "heterotune-test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "heterotune-test-secret");
    let spec = StorageSpec {
        uri: format!("s3://{BUCKET}/runs"),
        endpoint: Some(format!("http://127.0.0.1:{}", server.port)),
        region: Some("us-east-1".into()),
        force_path_style: true,
        ..StorageSpec::default()
    };
    let store = Store::from_spec(&spec, root).expect("s3 store");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        bounded_reads(&store, root).await;
        checks(store, root).await;
    });
}
