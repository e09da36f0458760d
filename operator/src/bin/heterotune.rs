//! `heterotune`: validate, plan and run FederatedTune specs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use heterotune_crds::validate::{parse_federated_tune, Problems};
use heterotune_operator::{checks, telemetry};

#[derive(Parser)]
#[command(name = "heterotune", version, about = "Federated fine-tuning of heterogeneous pretrained models")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a FederatedTune file against the CRD schema and its CEL rules
    /// (the same checks the API server runs); exits 1 listing every problem.
    Validate {
        /// The FederatedTune YAML file.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Also check that local models and datasets exist and fit the spec.
        #[arg(long)]
        check_files: bool,
    },
    /// Run a FederatedTune on this machine: local trainer processes and a
    /// local-folder or S3 object store.
    Run {
        /// The FederatedTune YAML file.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Print the FederatedTune CustomResourceDefinition.
    Crd,
}

fn read(file: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
}

fn report(file: &Path, problems: &Problems) {
    eprintln!("{}: {} problem(s):", file.display(), problems.0.len());
    for p in &problems.0 {
        eprintln!("  {p}");
    }
}

fn validate(file: &Path, check_files: bool) -> anyhow::Result<ExitCode> {
    let text = read(file)?;
    let ft = match parse_federated_tune(&text) {
        Ok(ft) => ft,
        Err(problems) => {
            report(file, &problems);
            return Ok(ExitCode::from(1));
        }
    };
    if check_files {
        let problems = checks::check_local_references(&ft.spec);
        if !problems.is_empty() {
            report(file, &Problems(problems));
            return Ok(ExitCode::from(1));
        }
    }
    println!(
        "{}: valid FederatedTune {:?} ({} clients, {} rounds, algorithm {})",
        file.display(),
        ft.metadata.name.as_deref().unwrap_or_default(),
        ft.spec.clients.len(),
        ft.spec.rounds,
        ft.spec.aggregation.algorithm.as_str()
    );
    Ok(ExitCode::SUCCESS)
}

fn run(file: &Path) -> anyhow::Result<ExitCode> {
    let text = read(file)?;
    let ft = match parse_federated_tune(&text) {
        Ok(ft) => ft,
        Err(problems) => {
            report(file, &problems);
            return Ok(ExitCode::from(1));
        }
    };
    let problems = checks::check_local_references(&ft.spec);
    if !problems.is_empty() {
        report(file, &Problems(problems));
        return Ok(ExitCode::from(1));
    }
    anyhow::bail!(
        "{}: the spec is valid and its models and data are in place, but the local runner is not built yet \
         (the trainer and the round runner are in progress); nothing was run",
        file.display()
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, "info");
    let result = match cli.command {
        Command::Validate { file, check_files } => validate(&file, check_files),
        Command::Run { file } => run(&file),
        Command::Crd => match heterotune_crds::crd::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Err(anyhow::anyhow!("cannot serialise the CRD: {e}")),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("heterotune: {e:#}");
            ExitCode::from(2)
        }
    }
}
