#!/usr/bin/env bash
# The main job: the local quickstart federation.
#   ./scripts/quickstart.sh
# Installs what is missing (scripts/setup.sh), builds the release binaries,
# and runs examples/quickstart.yaml with `heterotune run`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
cargo build --release --quiet -p heterotune-operator -p heterotune-trainer
exec ./target/release/heterotune run -f examples/quickstart.yaml "$@"
