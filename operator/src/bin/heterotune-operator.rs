//! `heterotune-operator`: reconciles FederatedTunes into trainer and
//! aggregation Jobs. Serves `/metrics`, `/healthz` and `/readyz`; with
//! `--leader-election` only the replica holding the Lease acts.
//!
//! Exit codes: 0 after a signal (SIGTERM/SIGINT), 1 when leadership was lost
//! (the pod restarts as a standby), 2 on a start-up error.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use heterotune_operator::controller::http::{self, Health};
use heterotune_operator::controller::leader::{self, LeaderConfig};
use heterotune_operator::controller::metrics::Metrics;
use heterotune_operator::controller::{self, ObjectRunStore, OperatorConfig, RunOptions};
use heterotune_operator::telemetry;
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(
    name = "heterotune-operator",
    version,
    about = "Kubernetes operator for HeteroTune FederatedTunes"
)]
struct Args {
    /// Operator configuration (JSON: GPU profiles, job defaults, pacing).
    #[arg(long, env = "HETEROTUNE_OPERATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "HETEROTUNE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Watch only this namespace (default: all).
    #[arg(long, env = "HETEROTUNE_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Reconciles in flight at once.
    #[arg(long, env = "HETEROTUNE_CONCURRENCY", default_value_t = 8)]
    concurrency: u16,
    /// Elect a leader through a Lease (needed with more than one replica).
    #[arg(long, env = "HETEROTUNE_LEADER_ELECTION")]
    leader_election: bool,
    /// Lease name.
    #[arg(
        long,
        env = "HETEROTUNE_LEASE_NAME",
        default_value = "heterotune-operator"
    )]
    lease_name: String,
    /// Lease namespace (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format.
    #[arg(
        long,
        env = "HETEROTUNE_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    log_format: telemetry::LogFormat,
    /// Default log level (RUST_LOG overrides it).
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// Resolves on SIGTERM or SIGINT.
async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<OperatorConfig> {
    match path {
        None => Ok(OperatorConfig::default()),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            OperatorConfig::from_json(&text)
                .with_context(|| format!("{}: invalid operator configuration", p.display()))
        }
    }
}

/// How this replica came to run the controller.
enum Lead {
    /// Leader election is off.
    Alone,
    /// It holds the lease.
    Elected(leader::Leadership),
    /// A stop signal came while it waited (the lease was left).
    Stopped,
}

/// Joins the leader election when it is on and waits for the lease.
async fn lead(
    args: &Args,
    client: &kube::Client,
    identity: &str,
    ready: &AtomicBool,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Lead> {
    if !args.leader_election {
        return Ok(Lead::Alone);
    }
    let mut l = leader::join(
        client.clone(),
        &LeaderConfig {
            lease_name: args.lease_name.clone(),
            namespace: args.lease_namespace.clone(),
            identity: identity.to_string(),
            duration_seconds: 15,
            grace_seconds: 5,
        },
    )
    .await
    .context("cannot join the leader election")?;
    // A standby is healthy and ready: it is doing its job by waiting.
    ready.store(true, Ordering::Relaxed);
    tracing::info!(%identity, lease = %args.lease_name, "waiting for leadership");
    tokio::select! {
        acquired = l.acquired() => {
            if !acquired {
                anyhow::bail!("the leader election ended before this replica became leader");
            }
        }
        _ = stop.wait_for(|s| *s) => {
            l.release().await;
            return Ok(Lead::Stopped);
        }
    }
    tracing::info!(%identity, "became leader");
    Ok(Lead::Elected(l))
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = load_config(args.config.as_ref())?;
    tracing::info!(
        gpu_profiles = config.sizing.gpu_profiles.len(),
        image = %config.jobs.trainer_image,
        "configuration loaded"
    );
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));

    // Shutdown fan-out: a signal stops the HTTP server and the controller.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn({
        let stop_tx = stop_tx.clone();
        async move {
            signal().await;
            tracing::info!("shutdown signal received");
            let _ = stop_tx.send(true);
        }
    });
    let server = tokio::spawn(http::serve(
        args.http_addr,
        Health {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
        stopped(stop_rx.clone()),
    ));

    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("heterotune-operator-{}", std::process::id()));
    let leadership = match lead(&args, &client, &identity, &ready, stop_rx.clone()).await? {
        Lead::Stopped => {
            let _ = server.await;
            return Ok(ExitCode::SUCCESS);
        }
        Lead::Alone => None,
        Lead::Elected(l) => Some(l),
    };
    metrics.leader.set(1);

    let lost = leadership.as_ref().map(|l| l.lost());
    let lost_flag = Arc::new(AtomicBool::new(false));
    let shutdown = {
        let lost_flag = lost_flag.clone();
        let stop_rx = stop_rx.clone();
        async move {
            match lost {
                Some(lost) => tokio::select! {
                    _ = lost => {
                        tracing::error!("leadership lost: stopping the controller");
                        lost_flag.store(true, Ordering::Relaxed);
                    }
                    _ = stopped(stop_rx) => {}
                },
                None => stopped(stop_rx).await,
            }
        }
    };
    ready.store(true, Ordering::Relaxed);
    let result = controller::run(
        client,
        config,
        Arc::new(ObjectRunStore::default()),
        metrics.clone(),
        RunOptions {
            namespace: args.watch_namespace.clone(),
            concurrency: args.concurrency,
            instance: Some(identity),
        },
        shutdown,
    )
    .await;
    metrics.leader.set(0);
    ready.store(false, Ordering::Relaxed);
    if let Some(l) = leadership {
        l.release().await;
    }
    let _ = stop_tx.send(true);
    let _ = server.await;
    result?;
    Ok(if lost_flag.load(Ordering::Relaxed) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init(args.log_format, &args.log_level);
    heterotune_operator::tls::install_crypto_provider();
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "heterotune-operator failed");
            eprintln!("heterotune-operator: {e:#}");
            ExitCode::from(2)
        }
    }
}
