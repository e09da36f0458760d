//! The stand-in trainer of the fault matrices (`faults.rs` for the local
//! runner, `cluster_jobs.rs` for the controller's pods): a shell script
//! put where the real trainer would be, that logs every call and, on the
//! one named by `FAULT`, SIGKILLs its parent (the runner, or the pod's
//! `heterotune job`) before or after the real trainer runs, SIGKILLs itself,
//! hangs, or fills the disk.

use std::path::Path;

/// The stand-in trainer. `FAULT` is `<subcommand> <client or -> <round or
/// ->`, `WHEN` one of `before`, `after`, `self`, `hang` (the call becomes
/// `sleep $HANG`); `FIRED` is created when the fault fires, so it fires once.
pub const WRAPPER: &str = r#"#!/usr/bin/env bash
sub="${1:-}" client="-" round="-" prev=""
for a in "$@"; do
  case "$prev" in --client) client="$a" ;; --round) round="$a" ;; esac
  prev="$a"
done
echo "$sub $client $round" >> "$LOG"
if [ "$sub $client $round" = "${FAULT:-}" ] && [ ! -e "$FIRED" ]; then
  touch "$FIRED"
  case "$WHEN" in
    before) kill -9 "$PPID"; exit 1 ;;
    after) "$REAL" "$@"; kill -9 "$PPID"; exit 0 ;;
    self) kill -9 $$ ;;
    hang) exec sleep "$HANG" ;;
    fill) "$REAL" "$@"; rc=$?; dd if=/dev/zero of="$FILL" bs=64k 2>/dev/null; exit $rc ;;
  esac
fi
exec "$REAL" "$@"
"#;

/// Makes `path` executable (mode 755).
pub fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut perms = std::fs::metadata(path).expect("stat").permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(path, perms).expect("chmod");
}
