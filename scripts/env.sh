# shellcheck shell=bash
# Source this file to build and run against the project's libtorch:
#   source scripts/env.sh
# It points tch at the PyTorch wheel in the project venv (.venv, made by
# scripts/setup.sh) and sets the model/data cache location.
_ht_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HETEROTUNE_ROOT="$_ht_root"
export HETEROTUNE_VENV="${HETEROTUNE_VENV:-$_ht_root/.venv}"
export HETEROTUNE_CACHE="${HETEROTUNE_CACHE:-$HOME/.cache/heterotune}"
export LIBTORCH_USE_PYTORCH=1
export PATH="$HETEROTUNE_VENV/bin:$PATH"
_ht_torch_lib="$("$HETEROTUNE_VENV/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)"
if [ -n "$_ht_torch_lib" ]; then
  export LD_LIBRARY_PATH="$_ht_torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
unset _ht_root _ht_torch_lib
