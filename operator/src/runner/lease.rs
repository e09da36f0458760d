//! The run lease of `heterotune run`: one process drives a run at a time.
//!
//! A lease is an object `<run>/lease/<generation>.json` created create-only
//! ([`Store::put_new`]); the newest generation holds the run. Its holder
//! (`host/pid/start`, [`writer_id`]) renews it every heartbeat. A second
//! `heterotune run` of the same run refuses, naming the holder, unless the
//! lease is stale: not renewed for [`STALE_AFTER_BEATS`] heartbeats, or its
//! holder's process is gone from this host. It then creates the next
//! generation, create-only, so of two processes taking a stale lease over
//! only one wins. A holder whose lease was taken over (it was silent for
//! too long) finds a newer generation at its next heartbeat and stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use heterotune_crds::layout::RunLayout;
use serde::{Deserialize, Serialize};

use crate::protocol::commit::{host_name, writer_id};
use crate::protocol::store::{Store, StoreError};

/// Seconds between renewals unless [`HEARTBEAT_ENV`] says otherwise.
pub const DEFAULT_HEARTBEAT_SECONDS: u64 = 10;
/// Environment variable overriding the heartbeat (whole seconds, ≥ 1).
pub const HEARTBEAT_ENV: &str = "HETEROTUNE_LEASE_HEARTBEAT_SECONDS";
/// A lease not renewed for this many of its heartbeats is stale.
pub const STALE_AFTER_BEATS: u64 = 3;

/// The heartbeat [`HEARTBEAT_ENV`] sets, else the default.
pub fn heartbeat_from_env() -> Duration {
    let secs = std::env::var(HEARTBEAT_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s >= 1)
        .unwrap_or(DEFAULT_HEARTBEAT_SECONDS);
    Duration::from_secs(secs)
}

/// What a lease object holds.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRecord {
    /// The generation (its object's name).
    pub generation: u64,
    /// The holder, `host/pid/start`.
    pub holder: String,
    /// The holder's host and process id (a dead process on the same host
    /// frees the lease at once).
    pub host: String,
    pub pid: u32,
    /// Seconds between the holder's renewals.
    pub heartbeat_seconds: u64,
    /// When it was last renewed (seconds since the Unix epoch).
    pub renewed_at: u64,
}

impl LeaseRecord {
    /// True when nobody holds the run any more at `now`.
    fn is_stale(&self, now: u64) -> bool {
        let silent = now.saturating_sub(self.renewed_at);
        silent > STALE_AFTER_BEATS * self.heartbeat_seconds.max(1)
            || (self.host == host_name() && !process_alive(self.pid))
    }
}

/// Whether process `pid` runs on this host (and is no zombie). Where
/// `/proc` is missing, every process counts as alive (staleness by time).
fn process_alive(pid: u32) -> bool {
    if !std::path::Path::new("/proc/self").exists() {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(true),
        Err(_) => false,
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Lease errors: each names the holder and what to do.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("the run {run} in {store} is being run by {holder} (lease renewed {silent} s ago; it is taken over once not renewed for {stale} s, or at once when that process is gone from this host): wait for it to finish or stop it")]
    Held {
        run: String,
        store: String,
        holder: String,
        silent: u64,
        stale: u64,
    },
    #[error("the lease of the run {run} was taken over by {holder} (this process did not renew it in time): this process stops; the other one continues the run")]
    Lost { run: String, holder: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A held lease, renewed in the background until released.
pub struct Lease {
    store: Store,
    layout: RunLayout,
    generation: u64,
    lost: Arc<AtomicBool>,
    renewer: tokio::task::JoinHandle<()>,
}

/// The newest lease of the run: its generation and record (`None` for a
/// record that does not parse: stale).
async fn newest(
    store: &Store,
    layout: &RunLayout,
) -> Result<Option<(u64, Option<LeaseRecord>)>, StoreError> {
    let names = store.file_names(&layout.lease_dir()).await?;
    let Some(generation) = names
        .iter()
        .filter_map(|n| n.strip_suffix(".json")?.parse::<u64>().ok())
        .max()
    else {
        return Ok(None);
    };
    let record = store
        .get(&layout.lease_key(generation))
        .await?
        .and_then(|b| serde_json::from_slice(&b).ok());
    Ok(Some((generation, record)))
}

fn record(generation: u64, heartbeat: Duration) -> Bytes {
    let r = LeaseRecord {
        generation,
        holder: writer_id().to_string(),
        host: host_name(),
        pid: std::process::id(),
        heartbeat_seconds: heartbeat.as_secs().max(1),
        renewed_at: now_secs(),
    };
    Bytes::from(serde_json::to_vec_pretty(&r).unwrap_or_default())
}

impl Lease {
    /// Takes the lease of the run in `layout` (free or stale), renewing it
    /// every `heartbeat`; refuses when another live process holds it.
    pub async fn acquire(
        store: &Store,
        layout: &RunLayout,
        heartbeat: Duration,
    ) -> Result<Lease, LeaseError> {
        loop {
            let generation = match newest(store, layout).await? {
                None => 1,
                Some((g, None)) => g + 1,
                Some((g, Some(r))) if r.is_stale(now_secs()) => {
                    tracing::warn!(holder = %r.holder, generation = g, "taking over a stale run lease");
                    g + 1
                }
                Some((_, Some(r))) => {
                    return Err(LeaseError::Held {
                        run: layout.run_dir().to_string(),
                        store: store.uri().to_string(),
                        holder: r.holder,
                        silent: now_secs().saturating_sub(r.renewed_at),
                        stale: STALE_AFTER_BEATS * r.heartbeat_seconds.max(1),
                    })
                }
            };
            let key = layout.lease_key(generation);
            if store.put_new(&key, record(generation, heartbeat)).await? {
                for old in 1..generation {
                    let _ = store.delete(&layout.lease_key(old)).await;
                }
                return Ok(Lease::renewing(store, layout, generation, heartbeat));
            }
            // Another process took this generation first: look again.
        }
    }

    fn renewing(store: &Store, layout: &RunLayout, generation: u64, heartbeat: Duration) -> Lease {
        let lost = Arc::new(AtomicBool::new(false));
        let (s, l, flag) = (store.clone(), layout.clone(), lost.clone());
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(heartbeat).await;
                match newest(&s, &l).await {
                    Ok(Some((g, _))) if g > generation => {
                        flag.store(true, Ordering::SeqCst);
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "could not read the run lease"),
                }
                let key = l.lease_key(generation);
                if let Err(e) = s.put(&key, record(generation, heartbeat)).await {
                    tracing::warn!(error = %e, "could not renew the run lease");
                }
            }
        });
        Lease {
            store: store.clone(),
            layout: layout.clone(),
            generation,
            lost,
            renewer,
        }
    }

    /// The lease's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// An error once another process has taken the lease over.
    pub async fn check(&self) -> Result<(), LeaseError> {
        if !self.lost.load(Ordering::SeqCst) {
            return Ok(());
        }
        let holder = match newest(&self.store, &self.layout).await {
            Ok(Some((_, Some(r)))) => r.holder,
            _ => "another process".into(),
        };
        Err(LeaseError::Lost {
            run: self.layout.run_dir().to_string(),
            holder,
        })
    }

    /// Stops renewing and deletes the lease (unless it was taken over), so
    /// the next `heterotune run` of the run starts at once.
    pub async fn release(self) {
        self.renewer.abort();
        if !self.lost.load(Ordering::SeqCst) {
            let key = self.layout.lease_key(self.generation);
            if let Err(e) = self.store.delete(&key).await {
                tracing::warn!(error = %e, "could not release the run lease");
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

#[cfg(test)]
mod tests;
