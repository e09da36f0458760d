//! Leader election over a `coordination.k8s.io/v1` Lease, with
//! kube-lease-manager: only the replica that holds the Lease runs the
//! controller, so two replicas never both create Jobs or write status.
//!
//! A replica that loses the Lease stops its controller and exits (its pod
//! restarts as a standby); the Lease is released on a clean shutdown so a
//! standby takes over at once rather than after the Lease expires.

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Where the Lease is and who this replica is.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Lease name.
    pub lease_name: String,
    /// Lease namespace (the operator's).
    pub namespace: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a holder's claim lasts without renewal.
    pub duration_seconds: u64,
    /// How long before expiry the holder renews.
    pub grace_seconds: u64,
}

/// This replica's part in the election.
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

/// Joins the election (creates the Lease when it does not exist).
pub async fn join(client: Client, config: &LeaderConfig) -> Result<Leadership, LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(client, &config.lease_name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(config.duration_seconds)
        .with_grace(config.grace_seconds)
        .with_field_manager(format!("heterotune-operator-{}", config.identity))
        .build()
        .await?;
    let (state, task) = manager.watch().await;
    Ok(Leadership { state, task })
}

impl Leadership {
    /// True while this replica holds the Lease.
    pub fn is_leader(&self) -> bool {
        *self.state.borrow()
    }

    /// Waits until this replica holds the Lease; false when the election
    /// ended (its task stopped) first.
    pub async fn acquired(&mut self) -> bool {
        self.state.wait_for(|leader| *leader).await.is_ok()
    }

    /// A future that resolves when this replica no longer holds the Lease.
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
        let mut state = self.state.clone();
        async move {
            let _ = state.wait_for(|leader| !*leader).await;
        }
    }

    /// Leaves the election, releasing the Lease if held.
    pub async fn release(self) {
        drop(self.state);
        match self.task.await {
            Ok(Ok(_)) => tracing::info!("leader lease released"),
            Ok(Err(e)) => tracing::warn!(error = %e, "leader lease not released cleanly"),
            Err(e) => tracing::warn!(error = %e, "leader election task failed"),
        }
    }
}
