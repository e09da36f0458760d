//! Cross-crate and end-to-end tests of HeteroTune live in this package's
//! test targets (`cli.rs`, ...); this library only locates the built binaries.

pub mod fixtures;
pub mod local_run;
pub mod mutate;
pub mod pods;
pub mod s3;
pub mod stand_in;

use std::path::PathBuf;
use std::process::Output;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Path of a binary built by this workspace (`target/<profile>/<name>`),
/// found next to the running test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test-binary> -> target/<profile>/<name>
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// A finished command's exit status, stdout and stderr, for assertion
/// messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
