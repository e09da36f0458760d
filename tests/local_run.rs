//! Helpers of the tests that drive `heterotune run` as a user does: the built
//! binaries, the command line, and reading what a run left behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::binary;

/// A binary of this workspace that `cargo build --workspace --bins` made.
pub fn built(name: &str) -> PathBuf {
    let bin = binary(name);
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// `heterotune run -f spec` with `trainer`, its work and report folders under
/// `root`, two clients at a time, one thread each.
pub fn run_command(root: &Path, spec: &Path, trainer: &Path) -> Command {
    let mut cmd = Command::new(built("heterotune"));
    cmd.arg("run")
        .arg("-f")
        .arg(spec)
        .arg("--trainer")
        .arg(trainer)
        .arg("--work-dir")
        .arg(root.join("work"))
        .arg("--report-dir")
        .arg(root.join("report"))
        .arg("--parallel")
        .arg("2")
        .arg("--threads")
        .arg("1")
        .current_dir(root);
    cmd
}

/// The run's report.json in `root/report`.
pub fn report(root: &Path) -> serde_json::Value {
    let bytes = std::fs::read(root.join("report/report.json")).expect("report.json written");
    serde_json::from_slice(&bytes).expect("report.json parses")
}

/// Files under `dir` whose path ends with `suffix`, sorted.
pub fn find(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(find(&p, suffix));
        } else if p.to_string_lossy().ends_with(suffix) {
            out.push(p);
        }
    }
    out.sort();
    out
}
