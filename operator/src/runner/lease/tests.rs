use std::path::Path;
use std::time::Duration;

use heterotune_crds::layout::RunLayout;
use heterotune_crds::spec::StorageSpec;

use super::*;

fn setup(dir: &Path) -> (Store, RunLayout) {
    let spec = StorageSpec {
        uri: "file://store".into(),
        ..StorageSpec::default()
    };
    let store = Store::from_spec(&spec, dir).expect("local store");
    (store, RunLayout::new("", "ns", "run", "uid"))
}

/// Writes the lease of generation `generation` as another process would.
async fn foreign_lease(store: &Store, layout: &RunLayout, generation: u64, pid: u32, age: u64) {
    let r = LeaseRecord {
        generation,
        holder: format!("{}/{pid}/then", host_name()),
        host: host_name(),
        pid,
        heartbeat_seconds: 10,
        renewed_at: now_secs() - age,
    };
    let bytes = serde_json::to_vec(&r).expect("json");
    assert!(store
        .put_new(&layout.lease_key(generation), bytes.into())
        .await
        .expect("lease"));
}

#[tokio::test]
async fn a_second_runner_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, layout) = setup(dir.path());
    let beat = Duration::from_secs(10);
    let held = Lease::acquire(&store, &layout, beat).await.expect("free");
    assert_eq!(held.generation(), 1);
    let err = Lease::acquire(&store, &layout, beat)
        .await
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(
        text.contains("is being run by") && text.contains(writer_id()),
        "{text}"
    );
    // A live holder on this host, renewed long ago: stale by time.
    held.release().await;
    foreign_lease(&store, &layout, 5, std::process::id(), 31).await;
    let taken = Lease::acquire(&store, &layout, beat).await.expect("stale");
    assert_eq!(taken.generation(), 6);
    assert!(!store.exists(&layout.lease_key(5)).await.expect("exists"));
    taken.release().await;
    assert!(store
        .file_names(&layout.lease_dir())
        .await
        .expect("list")
        .is_empty());
}

/// A killed holder's lease (its process gone from this host) is taken
/// over at once, without waiting for it to go stale.
#[tokio::test]
async fn a_killed_holders_lease_is_taken_over_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, layout) = setup(dir.path());
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("sleep starts");
    let pid = child.id();
    foreign_lease(&store, &layout, 1, pid, 0).await;
    let beat = Duration::from_secs(10);
    assert!(matches!(
        Lease::acquire(&store, &layout, beat).await,
        Err(LeaseError::Held { .. })
    ));
    child.kill().expect("kill");
    child.wait().expect("reaped");
    let taken = Lease::acquire(&store, &layout, beat)
        .await
        .expect("taken over");
    assert_eq!(taken.generation(), 2);
    taken.release().await;
}

/// A holder whose lease another process took over stops at its next
/// heartbeat, naming the new holder.
#[tokio::test]
async fn a_holder_that_was_taken_over_finds_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, layout) = setup(dir.path());
    let held = Lease::acquire(&store, &layout, Duration::from_secs(1))
        .await
        .expect("free");
    held.check().await.expect("still held");
    foreign_lease(&store, &layout, 2, 1, 0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = held.check().await.expect_err("taken over");
    assert!(err.to_string().contains("taken over by"), "{err}");
    // Releasing a lost lease leaves the new holder's alone.
    held.release().await;
    assert!(store.exists(&layout.lease_key(2)).await.expect("exists"));
}
