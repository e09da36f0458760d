//! The `heterotune site` command line: its flags and how its outcome maps
//! to an exit code (the binary only registers it).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::join::{SiteError, SiteOptions};
use super::SiteOutcome;
use crate::execution::pod_job::default_trainer;
use crate::execution::trainer::check_starts;
use crate::input::spec_file::SpecFileError;

/// Take part in a federation as a site: pull each round's global from the
/// store, train this site's client on local data, commit its artifact
/// (docs/sites.md). Store credentials come from AWS_ACCESS_KEY_ID and
/// AWS_SECRET_ACCESS_KEY.
#[derive(Debug, clap::Args)]
pub struct SiteArgs {
    /// The FederatedTune the coordinator runs (the same file).
    #[arg(long)]
    pub spec: PathBuf,
    /// This site's client in spec.clients (it must have `site`).
    #[arg(long)]
    pub client: String,
    /// The site's work folder: staged inputs, private state, caches.
    #[arg(long, default_value = ".heterotune-site")]
    pub work: PathBuf,
    /// The site's own data file (replaces the client's data.uri; partition
    /// strategy shards).
    #[arg(long)]
    pub data: Option<String>,
    /// A local copy of the client's s3:// checkpoint (not downloaded then).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The heterotune-trainer binary (default: next to this one, else on PATH).
    #[arg(long)]
    pub trainer: Option<PathBuf>,
    /// libtorch threads (default: the cores of this machine).
    #[arg(long)]
    pub threads: Option<usize>,
    /// `cpu`, `cuda`, or `auto` (CUDA when available).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// The shortest wait between looks at the store, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub poll_min: f64,
    /// The longest wait between looks at the store, in seconds (the wait
    /// doubles while nothing changes).
    #[arg(long, default_value_t = 30.0)]
    pub poll_max: f64,
    /// Run even when this site's store key can read other clients' uploads
    /// (the agent refuses by default: docs/sites.md has the policies that
    /// confine a key to its own prefix).
    #[arg(long)]
    pub allow_unconfined_credentials: bool,
}

/// Exit codes as `heterotune`'s: 0 done, 1 invalid input, 3 a runtime
/// failure (including a run that failed or a spec that changed).
pub fn main(args: SiteArgs) -> anyhow::Result<ExitCode> {
    let trainer = match args.trainer {
        Some(t) => t,
        None => default_trainer(&std::env::current_exe()?),
    };
    check_starts(&trainer).map_err(anyhow::Error::msg)?;
    let seconds = |s: f64, flag: &str| {
        (s.is_finite() && s > 0.0)
            .then(|| Duration::from_secs_f64(s))
            .ok_or_else(|| anyhow::anyhow!("{flag} {s}: use a positive number of seconds"))
    };
    let opts = SiteOptions {
        spec_file: args.spec,
        client: args.client,
        work: args.work,
        trainer,
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        device: args.device,
        data_uri: args.data,
        model_dir: args.model,
        poll: (
            seconds(args.poll_min, "--poll-min")?,
            seconds(args.poll_max, "--poll-max")?,
        ),
        allow_unconfined_credentials: args.allow_unconfined_credentials,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match runtime.block_on(super::run(opts)) {
        Ok(SiteOutcome::Finished { trained, evaluated }) => {
            let rounds: Vec<String> = trained.iter().map(u32::to_string).collect();
            println!(
                "site done: trained rounds [{}]{}",
                rounds.join(", "),
                if evaluated {
                    ", evaluated the final global"
                } else {
                    ""
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(SiteOutcome::RunFailed { status }) => {
            anyhow::bail!("the coordinator's run ended: {status}")
        }
        Err(SiteError::Spec(e @ SpecFileError::Invalid { .. })) => {
            eprintln!("heterotune site: {e}");
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e.into()),
    }
}
