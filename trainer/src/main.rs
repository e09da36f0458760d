//! `heterotune-trainer`: the trainer's command line. It parses the
//! arguments and calls the library: one client's local training for one
//! round (`train`, [`client::train_round`]), evaluation of a saved state
//! (`eval`, [`client::evaluate`]), the round-0 global (`init`,
//! [`init::write_initial_global`]) and one round's aggregation
//! (`aggregate`, [`aggregate::aggregate_round`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use heterotune_trainer::client::{self, ClientOptions, TrainRound};
use heterotune_trainer::{aggregate, init, job};

#[derive(Parser)]
#[command(
    name = "heterotune-trainer",
    version,
    about = "HeteroTune trainer: local training and evaluation of one client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Common {
    /// The FederatedTune (YAML or JSON; the whole object or its spec).
    #[arg(long)]
    spec: PathBuf,
    /// The client's name in the spec.
    #[arg(long)]
    client: String,
    /// libtorch intra-op threads (default: all cores).
    #[arg(long)]
    threads: Option<i32>,
    /// `cpu`, `cuda`, or `auto` (CUDA when available).
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Subcommand)]
enum Command {
    /// Train one client for one round and write its artifact.
    Train {
        #[command(flatten)]
        common: Common,
        /// The round being trained (1-based).
        #[arg(long)]
        round: u32,
        /// Directory of the previous round's global artifact.
        #[arg(long)]
        global: Option<PathBuf>,
        /// The client's private state after the previous round (adapter parts
        /// that are not shared; never uploaded).
        #[arg(long)]
        state_in: Option<PathBuf>,
        /// Where to save the client's private state after this round.
        #[arg(long)]
        state_out: Option<PathBuf>,
        /// Directory where frozen-prefix caches persist between rounds.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Where to write adapter.safetensors and manifest.json.
        #[arg(long)]
        out: PathBuf,
        /// The run this artifact belongs to (written into the manifest).
        #[arg(long, default_value = "local")]
        run: String,
    },
    /// Evaluate a client's model with a global (and private) state on the
    /// global test split; prints JSON.
    Eval {
        #[command(flatten)]
        common: Common,
        /// Directory of the global artifact to evaluate.
        #[arg(long)]
        global: Option<PathBuf>,
        /// The client's private state.
        #[arg(long)]
        state_in: Option<PathBuf>,
        /// Directory where frozen-prefix caches persist.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Also write the result as an evaluation record (JSON) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The run the record belongs to (written into it).
        #[arg(long, default_value = "local")]
        run: String,
    },
    /// Aggregate one round: verify the committed client artifacts under
    /// `--run-dir` (round-NNNN/clients/<client>/), combine them with the
    /// spec's algorithm, and write the round's global artifact.
    Aggregate {
        /// The FederatedTune (YAML or JSON; the whole object or its spec).
        #[arg(long)]
        spec: PathBuf,
        /// The run directory holding round-NNNN/clients/<client>/ artifacts.
        #[arg(long)]
        run_dir: PathBuf,
        /// The run name every client manifest must carry.
        #[arg(long)]
        run: String,
        /// The round to aggregate.
        #[arg(long)]
        round: u32,
        /// The previous round's global artifact directory.
        #[arg(long)]
        previous_global: PathBuf,
        /// Where to write the global artifact.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the round-0 global artifact: the initial shared parts and every
    /// family's parts, from the seed (what every client starts from).
    Init {
        /// The FederatedTune (YAML or JSON; the whole object or its spec).
        #[arg(long)]
        spec: PathBuf,
        /// Where to write adapter.safetensors and manifest.json.
        #[arg(long)]
        out: PathBuf,
        /// The run this artifact belongs to (written into the manifest).
        #[arg(long, default_value = "local")]
        run: String,
    },
    /// Time the GEMM that decides `dtype: auto` on this CPU afresh, and
    /// print it beside the timing kept for this machine and the choice.
    CpuDtype {
        /// libtorch threads (default: libtorch's own).
        #[arg(long)]
        threads: Option<usize>,
    },
}

impl Common {
    fn options(&self) -> ClientOptions {
        ClientOptions {
            spec: self.spec.clone(),
            client: self.client.clone(),
            threads: self.threads,
            device: self.device.clone(),
        }
    }
}

fn run(command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Train {
            common,
            round,
            global,
            state_in,
            state_out,
            cache_dir,
            out,
            run,
        } => {
            let args = TrainRound {
                round: *round,
                global: global.as_deref(),
                state_in: state_in.as_deref(),
                state_out: state_out.as_deref(),
                cache_dir: cache_dir.as_deref(),
                out,
                run,
            };
            print!("{}", client::train_round(&common.options(), &args)?);
        }
        Command::Eval {
            common,
            global,
            state_in,
            cache_dir,
            out,
            run,
        } => {
            let result = client::evaluate(
                &common.options(),
                global.as_deref(),
                state_in.as_deref(),
                cache_dir.as_deref(),
                out.as_deref(),
                run,
            )?;
            println!("{}", String::from_utf8_lossy(&client::to_json(&result)?));
        }
        Command::Init { spec, out, run } => {
            let spec = job::read_spec(spec)?;
            print!("{}", init::write_initial_global(&spec, out, run)?);
        }
        Command::CpuDtype { threads } => {
            if let Some(t) = threads {
                tch::set_num_threads(*t as i32);
            }
            print!("{}", heterotune_trainer::cpu_dtype::report());
        }
        Command::Aggregate {
            spec,
            run_dir,
            run,
            round,
            previous_global,
            out,
        } => {
            let spec = job::read_spec(spec)?;
            let outcome =
                aggregate::aggregate_round(&spec, run_dir, run, *round, previous_global, out)
                    .with_context(|| format!("aggregating round {round}"))?;
            print!("{}", outcome.stats);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("heterotune-trainer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
