//! `heterotune`: validate, plan and run FederatedTune specs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use heterotune_crds::validate::{parse_federated_tune, Problems};
use heterotune_crds::FederatedTune;
use heterotune_operator::cli::output::{self, Output};
use heterotune_operator::input::checks;
use heterotune_operator::input::documents::documents;
use heterotune_operator::input::spec_file::SpecFileError;
use heterotune_operator::{runner, telemetry};

/// Exit codes: 0 success; 1 invalid input (a spec, a file it names, a
/// source that cannot be read); 2 usage (clap's: unknown flag, missing
/// argument); 3 a runtime failure (store, trainer, a run that failed).
const EXIT_INVALID: u8 = 1;
const EXIT_RUNTIME: u8 = 3;

#[derive(Parser)]
#[command(
    name = "heterotune",
    after_help = "Exit codes: 0 success, 1 invalid input, 2 usage, 3 runtime failure.",
    version,
    about = "Federated fine-tuning of heterogeneous pretrained models"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check FederatedTune documents against the CRD schema and its CEL
    /// rules (the same checks the API server runs); exits 1 listing every
    /// problem of every document.
    Validate {
        /// A YAML or JSON file (several documents split by `---`), a folder
        /// (its .yaml, .yml and .json files) or `-` for standard input;
        /// repeatable, and one `-f` takes several (`-f examples/*.yaml`).
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Also check that local models and datasets exist and fit the spec.
        #[arg(long)]
        check_files: bool,
        /// Output: `table` (text; `text` is an alias), or `json` / `yaml`
        /// (one list, an entry per document, on stdout).
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
    /// Run a FederatedTune on this machine: local trainer processes and a
    /// local-folder or S3 object store.
    Run {
        /// The FederatedTune YAML file.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Trainers running at once (default: the number of cores, at most one per client).
        #[arg(long)]
        parallel: Option<usize>,
        /// libtorch threads per trainer (default: cores / parallel).
        #[arg(long)]
        threads: Option<usize>,
        /// The heterotune-trainer binary (default: next to this one).
        #[arg(long)]
        trainer: Option<PathBuf>,
        /// Local working folder: staged artifacts, private client state, caches.
        #[arg(long, default_value = ".heterotune-work")]
        work_dir: PathBuf,
        /// Where to write the report (default: in the working folder; it is
        /// also uploaded to the store).
        #[arg(long)]
        report_dir: Option<PathBuf>,
        /// Delete this run's artifacts and start over instead of resuming.
        #[arg(long)]
        fresh: bool,
    },
    /// Show what `run` would do: clients, model families, adapted layers,
    /// trainable parameters, upload size, memory estimate and placement, and
    /// how far a previous run in the store has come.
    Plan {
        /// The FederatedTune YAML file.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Plan against a cluster: the operator's configuration (the JSON
        /// the chart renders from its `config` values, that YAML, or a Helm
        /// values file); its sizing (GPU profiles, CPU policy, margins) is used.
        #[arg(long, value_name = "FILE")]
        operator_config: Option<PathBuf>,
        /// GPU profiles to plan against (a YAML or JSON list, as under the
        /// chart's config.sizing.gpuProfiles); replaces the operator
        /// configuration's.
        #[arg(long, value_name = "FILE")]
        gpu_profiles: Option<PathBuf>,
        /// Output: `table` (text), `json` or `yaml`.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
    /// Show how far the local run of a FederatedTune has come: rounds
    /// complete in its store and the report's rounds (read-only).
    Status {
        /// The FederatedTune YAML file.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Output: `table` (text), `json` or `yaml`.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
    /// Bytes a client uploads per round, per method and backbone (exact, from config.json).
    Bytes(heterotune_operator::bytes::BytesArgs),
    /// Run a remote site's agent: train this site's client of a federation
    /// from the object store alone (docs/sites.md).
    Site(heterotune_operator::site::SiteArgs),
    /// Print the FederatedTune CustomResourceDefinition.
    Crd,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// What the operator's pods run: stage from the object store, run the
    /// trainer, commit to the store (idempotent).
    #[command(hide = true)]
    Job {
        #[command(subcommand)]
        job: JobCommand,
    },
}

#[derive(clap::Args)]
struct JobArgs {
    /// The FederatedTune document (with metadata name, namespace and uid).
    #[arg(long)]
    spec: PathBuf,
    /// Scratch folder: staged inputs, artifacts, private state, caches.
    #[arg(long, default_value = "/work")]
    work: PathBuf,
    /// The heterotune-trainer binary (default: next to this one, else on PATH).
    #[arg(long)]
    trainer: Option<PathBuf>,
    /// libtorch threads (default: the CPUs this process may use, cgroup limits included).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum JobCommand {
    /// Train one client for one round and commit its artifact.
    Train {
        #[command(flatten)]
        args: JobArgs,
        /// The client's name in spec.clients.
        #[arg(long)]
        client: String,
        /// The round (1-based).
        #[arg(long)]
        round: u32,
        /// `cpu`, `cuda`, or `auto` (CUDA when available).
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Aggregate one round over its participants and commit the global artifact.
    Aggregate {
        #[command(flatten)]
        args: JobArgs,
        /// The round (1-based).
        #[arg(long)]
        round: u32,
        /// The aggregation attempt (1-based): names where the artifacts it
        /// rejects are set aside.
        #[arg(long, default_value_t = 1)]
        attempt: u32,
        /// The clients whose artifacts to aggregate (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        participants: Vec<String>,
    },
    /// Evaluate one client's model with the last round's global state on
    /// the global test set and commit the result.
    Evaluate {
        #[command(flatten)]
        args: JobArgs,
        /// The client's name in spec.clients.
        #[arg(long)]
        client: String,
        /// The round whose global model to evaluate (the last: spec.rounds).
        #[arg(long)]
        round: u32,
        /// `cpu`, `cuda`, or `auto` (CUDA when available).
        #[arg(long, default_value = "auto")]
        device: String,
    },
}

fn read(file: &Path) -> anyhow::Result<String> {
    heterotune_crds::bounded::read_text(file, heterotune_crds::bounded::MAX_SPEC_BYTES)
        .with_context(|| format!("cannot read {}", file.display()))
}

fn report(file: &Path, problems: &Problems) {
    eprintln!("{}: {} problem(s):", file.display(), problems.0.len());
    for p in &problems.0 {
        eprintln!("  {p}");
    }
}

/// The FederatedTune in `file`, validated; `None` after printing why not
/// (unreadable, or its problems).
fn load(file: &Path) -> anyhow::Result<Option<FederatedTune>> {
    let text = match read(file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("heterotune: {e:#}");
            return Ok(None);
        }
    };
    match parse_federated_tune(&text) {
        Ok(ft) => Ok(Some(ft)),
        Err(problems) => {
            report(file, &problems);
            Ok(None)
        }
    }
}

/// One document's verdict: its FederatedTune, or its problems.
fn check_document(text: &str, check_files: bool) -> Result<FederatedTune, Problems> {
    let ft = parse_federated_tune(text)?;
    if check_files {
        let problems = checks::check_local_references(&ft.spec);
        if !problems.is_empty() {
            return Err(Problems(problems));
        }
    }
    Ok(ft)
}

/// `validate`: every document of every source; 0 when all are valid, 1
/// when one is not or a source cannot be read.
fn validate(files: &[PathBuf], check_files: bool, output: Output) -> ExitCode {
    let docs = match documents(files, std::io::stdin().lock()) {
        Ok(docs) => docs,
        Err(e) => {
            eprintln!("heterotune: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let mut all_valid = true;
    let mut verdicts = Vec::new();
    for doc in &docs {
        let verdict = check_document(&doc.text, check_files);
        all_valid &= verdict.is_ok();
        match (output, verdict) {
            (Output::Table, Ok(ft)) => println!(
                "{}: valid FederatedTune {:?} ({} clients, {} rounds, algorithm {})",
                doc.source,
                ft.metadata.name.as_deref().unwrap_or_default(),
                ft.spec.clients.len(),
                ft.spec.rounds,
                ft.spec.aggregation.algorithm.as_str()
            ),
            (Output::Table, Err(problems)) => report(Path::new(&doc.source), &problems),
            (_, verdict) => verdicts.push(serde_json::json!({
                "source": doc.source,
                "valid": verdict.is_ok(),
                "name": verdict.as_ref().ok().and_then(|ft| ft.metadata.name.clone()),
                "problems": verdict
                    .as_ref()
                    .err()
                    .map(|p| p.0.iter().map(ToString::to_string).collect::<Vec<_>>())
                    .unwrap_or_default(),
            })),
        }
    }
    if output != Output::Table {
        match output::render(output, &verdicts, |_| String::new()) {
            Ok(text) => print!("{text}"),
            Err(e) => {
                eprintln!("heterotune: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        }
    }
    if all_valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    file: &Path,
    parallel: Option<usize>,
    threads: Option<usize>,
    trainer: Option<PathBuf>,
    work_dir: PathBuf,
    report_dir: Option<PathBuf>,
    fresh: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let trainer = match trainer {
        Some(t) => t,
        None => {
            let exe = std::env::current_exe().context("locating this executable")?;
            exe.with_file_name("heterotune-trainer")
        }
    };
    if !trainer.is_file() {
        anyhow::bail!(
            "the trainer binary {} does not exist: build it (cargo build --release -p heterotune-trainer) or pass --trainer",
            trainer.display()
        );
    }
    heterotune_operator::execution::trainer::check_starts(&trainer).map_err(anyhow::Error::msg)?;
    let parallel = parallel.unwrap_or(cores).max(1);
    let threads = threads.unwrap_or((cores / parallel).max(1));
    let opts = runner::RunOptions {
        spec_file: file.to_path_buf(),
        parallel,
        threads_per_trainer: threads,
        trainer,
        work_dir,
        report_dir,
        json,
        fresh,
        lease_heartbeat: runner::lease::heartbeat_from_env(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match runtime.block_on(runner::run(opts)) {
        Ok(summary) => {
            let last = summary.report.rounds.last();
            let score = |v: Option<f64>| {
                v.filter(|a| a.is_finite())
                    .map(|a| format!("{a:.3}"))
                    .unwrap_or_else(|| "n/a".into())
            };
            let report_md = summary.report_dir.join("report.md");
            if json {
                // stdout stays machine-readable: one JSON object.
                let finite = |v: Option<f64>| v.filter(|a| a.is_finite());
                println!(
                    "{}",
                    serde_json::json!({
                        "done": true,
                        "rounds": summary.rounds,
                        "totalSeconds": summary.report.total_seconds,
                        "globalAccuracy": finite(last.and_then(|r| r.global_accuracy)),
                        "localAccuracy": finite(last.map(|r| r.accuracy)),
                        "report": report_md.display().to_string(),
                    })
                );
            } else {
                println!(
                    "done: {} rounds in {:.0} s; global model accuracy {} (after local training {}); report in {}",
                    summary.rounds,
                    summary.report.total_seconds,
                    score(last.and_then(|r| r.global_accuracy)),
                    score(last.map(|r| r.accuracy)),
                    report_md.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(runner::RunError::Spec(SpecFileError::Invalid { file, problems })) => {
            report(&file, &problems);
            Ok(ExitCode::from(EXIT_INVALID))
        }
        Err(runner::RunError::Spec(e)) => {
            eprintln!("heterotune: {e}");
            Ok(ExitCode::from(EXIT_INVALID))
        }
        Err(e) => Err(e.into()),
    }
}

/// A runtime for one read-only look at a store.
fn look(ft: &FederatedTune) -> anyhow::Result<heterotune_operator::cli::look::Look> {
    let cwd = std::env::current_dir().context("current directory")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(runtime.block_on(heterotune_operator::cli::look::look(ft, &cwd)))
}

/// `bytes`: the upload table; 1 when the spec or a model cannot be read.
fn bytes(args: &heterotune_operator::bytes::BytesArgs) -> anyhow::Result<ExitCode> {
    let Some(ft) = load(&args.file)? else {
        return Ok(ExitCode::from(EXIT_INVALID));
    };
    let result = heterotune_operator::bytes::command(&ft.spec, args);
    let code = result.as_ref().map_or(EXIT_INVALID, |_| 0);
    match result {
        Ok(text) => print!("{text}"),
        Err(e) => eprintln!("heterotune: {e}"),
    }
    Ok(ExitCode::from(code))
}

/// `plan`: 0 when every client fits and local references exist, 1 when not
/// (or the spec or a sizing file is invalid).
fn plan(
    file: &Path,
    operator_config: Option<&Path>,
    gpu_profiles: Option<&Path>,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let mut config =
        match heterotune_operator::cli::cluster_sizing::resolve(operator_config, gpu_profiles) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("heterotune: {e}");
                return Ok(ExitCode::from(EXIT_INVALID));
            }
        };
    let Some(ft) = load(file)? else {
        return Ok(ExitCode::from(EXIT_INVALID));
    };
    let look = look(&ft)?;
    // `auto` on a CPU is sized as this machine's CPU runs it.
    config.cpu.auto_dtype =
        heterotune_crds::dtype::resolve_this_cpu(heterotune_crds::spec::Dtype::Auto).dtype;
    let completed = look.completed.as_ref().copied().map_err(String::as_str);
    let plan = heterotune_operator::dry_run::Plan::of(&ft, &config, completed, &look.layout);
    print!("{}", output::render(output, &plan, |p| p.text())?);
    let problems = checks::check_local_references(&ft.spec);
    if !problems.is_empty() {
        report(file, &Problems(problems));
        return Ok(ExitCode::from(EXIT_INVALID));
    }
    Ok(ExitCode::SUCCESS)
}

/// `status`: where the local run of the spec in `file` stands.
fn status(file: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let Some(ft) = load(file)? else {
        return Ok(ExitCode::from(EXIT_INVALID));
    };
    let look = look(&ft)?;
    let status = heterotune_operator::cli::look::RunStatus::of(&ft, look);
    print!("{}", output::render(output, &status, |s| s.text())?);
    Ok(ExitCode::SUCCESS)
}

fn job(command: JobCommand) -> anyhow::Result<ExitCode> {
    use heterotune_operator::execution::pod_job::{self as pod_job, JobError, JobOptions};
    let args = match &command {
        JobCommand::Train { args, .. }
        | JobCommand::Aggregate { args, .. }
        | JobCommand::Evaluate { args, .. } => args,
    };
    let trainer = match &args.trainer {
        Some(t) => t.clone(),
        None => {
            pod_job::default_trainer(&std::env::current_exe().context("locating this executable")?)
        }
    };
    if !trainer.is_file() {
        anyhow::bail!(
            "the trainer binary {} does not exist: install heterotune-trainer next to heterotune or on PATH, or pass --trainer",
            trainer.display()
        );
    }
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let opts = JobOptions {
        spec_file: args.spec.clone(),
        work: args.work.clone(),
        trainer,
        threads,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        match &command {
            JobCommand::Train {
                client,
                round,
                device,
                ..
            } => pod_job::train(&opts, client, *round, device).await,
            JobCommand::Aggregate {
                round,
                attempt,
                participants,
                ..
            } => pod_job::aggregate(&opts, *round, *attempt, participants).await,
            JobCommand::Evaluate {
                client,
                round,
                device,
                ..
            } => pod_job::evaluate(&opts, client, *round, device).await,
        }
    });
    match result {
        Ok(outcome) => {
            tracing::info!("{outcome}");
            Ok(ExitCode::SUCCESS)
        }
        Err(JobError::Spec(SpecFileError::Invalid { file, problems })) => {
            report(&file, &problems);
            Ok(ExitCode::from(EXIT_INVALID))
        }
        Err(JobError::Spec(e)) => {
            eprintln!("heterotune: {e}");
            Ok(ExitCode::from(EXIT_INVALID))
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes `bytes` to stdout; a reader that stopped early (`| head`) is not
/// an error.
fn emit(bytes: &[u8]) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("writing to stdout"))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, "info");
    heterotune_operator::tls::install_crypto_provider();
    let result = match cli.command {
        Command::Validate {
            files,
            check_files,
            output,
        } => Ok(validate(&files, check_files, output)),
        Command::Run {
            file,
            parallel,
            threads,
            trainer,
            work_dir,
            report_dir,
            fresh,
        } => run(
            &file,
            parallel,
            threads,
            trainer,
            work_dir,
            report_dir,
            fresh,
            cli.log_format == telemetry::LogFormat::Json,
        ),
        Command::Plan {
            file,
            operator_config,
            gpu_profiles,
            output,
        } => plan(
            &file,
            operator_config.as_deref(),
            gpu_profiles.as_deref(),
            output,
        ),
        Command::Status { file, output } => status(&file, output),
        Command::Bytes(args) => bytes(&args),
        Command::Site(args) => heterotune_operator::site::main(args),
        Command::Crd => match heterotune_crds::crd::crd_yaml() {
            Ok(yaml) => emit(yaml.as_bytes()),
            Err(e) => Err(anyhow::anyhow!("cannot serialise the CRD: {e}")),
        },
        Command::Completions { shell } => {
            let mut cli = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cli, "heterotune", &mut script);
            emit(&script)
        }
        Command::Job { job: command } => job(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("heterotune: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
