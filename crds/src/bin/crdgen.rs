//! Writes the FederatedTune CRD YAML to the Helm chart and to manifests/.
//!
//! `crdgen` regenerates both copies; `crdgen --check` exits 1 if either
//! committed copy differs; `crdgen --stdout` prints it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where the generated CRD is committed, relative to the repository root.
const TARGETS: &[&str] = &[
    "charts/heterotune/crds/federatedtunes.heterotune.dev.yaml",
    "manifests/crds/federatedtunes.heterotune.dev.yaml",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn main() -> ExitCode {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let yaml = match heterotune_crds::crd::crd_yaml() {
        Ok(y) => y,
        Err(e) => {
            eprintln!("crdgen: cannot serialise the CRD: {e}");
            return ExitCode::FAILURE;
        }
    };
    match mode.as_str() {
        "--stdout" => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        "--check" => {
            let mut stale = Vec::new();
            for target in TARGETS {
                let path = repo_root().join(target);
                if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                    stale.push(*target);
                }
            }
            if stale.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "crdgen: out of date: {}\nrun `cargo run -p heterotune-crds --bin crdgen` and commit the result",
                    stale.join(", ")
                );
                ExitCode::FAILURE
            }
        }
        "" => {
            for target in TARGETS {
                let path = repo_root().join(target);
                if let Some(dir) = path.parent() {
                    if let Err(e) = std::fs::create_dir_all(dir) {
                        eprintln!("crdgen: {}: {e}", dir.display());
                        return ExitCode::FAILURE;
                    }
                }
                if let Err(e) = std::fs::write(&path, &yaml) {
                    eprintln!("crdgen: {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                println!("wrote {target}");
            }
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("crdgen: unknown argument `{other}`; use no argument, --check or --stdout");
            ExitCode::FAILURE
        }
    }
}
