#!/usr/bin/env bash
# End-to-end test on a real cluster, and the install path of docs/install.md:
# every command in that doc's ```sh blocks is one this script runs
# (tests/e2e/install_doc.py checks it, and runs this script against a fake
# cluster, tests/e2e/fake_cluster.py; tests/helm/check.sh runs both).
#
#   tests/e2e/run.sh                  the cluster in KUBECONFIG (skips, exit 0, saying why,
#                                     when KUBECONFIG is unset, the cluster does not answer or
#                                     kubectl/helm are missing)
#   tests/e2e/run.sh --kind           a kind cluster (E2E_KIND_CLUSTER, default heterotune),
#                                     created when missing and deleted at the end if this run
#                                     created it (E2E_KEEP_CLUSTER=1 keeps it); the images built
#                                     and loaded with scripts/build-images.sh --kind; at the end
#                                     the whole uninstall: FederatedTunes, release, CRD, namespaces
#   tests/e2e/run.sh --kind --no-build   the same, loading images already built with docker
#                                     (kind load docker-image) instead of building them
#
# It installs the CRD (server-side apply) and the operator chart (two replicas,
# leader election, the Grafana dashboard ConfigMap), an S3 store (MinIO) and a
# FederatedTune, waits for it to succeed, checks status, Jobs, Events and the
# metrics, upgrades the release with GPU profiles (CRD first), deletes the
# FederatedTune and checks its finalizer applied retention. The FederatedTune
# (E2E_SPEC):
#   tests/e2e/federatedtune.yaml (default): three CPU clients on the packaged
#                   encoders, 2 rounds (a few minutes on kind)
#   quickstart      examples/quickstart.yaml as it runs locally: six clients on
#                   three real models, 6 rounds
#   any other FederatedTune file
# cluster_spec.py points its storage at the MinIO and its pods at TRAINER_IMAGE.
#
# Environment (the defaults are what docs/install.md spells out):
#   OPERATOR_IMAGE   default ghcr.io/heterotune/operator:dev   } as scripts/build-images.sh
#   TRAINER_IMAGE    default ghcr.io/heterotune/trainer:dev    } builds them; one tag for both
#                    (the chart's image.tag). The trainer image holds CPU libtorch and the
#                    packaged models and TREC data in its HETEROTUNE_CACHE, which
#                    federatedtune.yaml's cache:// URIs use (docs/operator.md, "Images")
#   E2E_NAMESPACE    default heterotune-trial: the MinIO and the FederatedTune (must not exist)
#   E2E_METRICS_PORT default 8080: local port of the metrics port-forward (and the next one)
#   E2E_TIMEOUT      default 1800: seconds the FederatedTune may take
# Elsewhere than kind: HETEROTUNE_IMAGE_REGISTRY=<registry you push to> scripts/build-images.sh
#   --push, then OPERATOR_IMAGE=... TRAINER_IMAGE=... KUBECONFIG=... tests/e2e/run.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# Every path below is relative to the repository root, as in docs/install.md.
cd "$root"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
die() { echo "tests/e2e: $*" >&2; exit 2; }
kind_mode=0 build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --kind) kind_mode=1 ;;
    --no-build) build=0 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

# --- settings: docs/install.md writes each of these as its default value
# (tests/e2e/install_doc.py evaluates this block with an empty environment
# and substitutes the values before comparing the commands; assignments only)
kind_cluster="${E2E_KIND_CLUSTER:-heterotune}"
ns="${E2E_NAMESPACE:-heterotune-trial}"
op_ns=heterotune-system
operator_image="${OPERATOR_IMAGE:-ghcr.io/heterotune/operator:dev}"
trainer_image="${TRAINER_IMAGE:-ghcr.io/heterotune/trainer:dev}"
operator_repo="${operator_image%:*}"
trainer_repo="${trainer_image%:*}"
registry="${operator_repo%/*}"
tag="${operator_image##*:}"
spec_file="${E2E_SPEC:-tests/e2e/federatedtune.yaml}"
metrics_port="${E2E_METRICS_PORT:-8080}"
timeout="${E2E_TIMEOUT:-1800}"
# --- end of settings

[ "${trainer_image##*:}" = "$tag" ] \
  || die "OPERATOR_IMAGE ($operator_image) and TRAINER_IMAGE ($trainer_image) must share one tag (the chart's image.tag)"
if [ "$spec_file" = quickstart ]; then spec_file=examples/quickstart.yaml; fi
[ -f "$spec_file" ] || die "E2E_SPEC=$spec_file: no such file"
# cluster_spec.py needs PyYAML: the venv of scripts/setup.sh has it.
if [ -x "$root/.venv/bin/python3" ]; then PATH="$root/.venv/bin:$PATH"; fi

work="$(mktemp -d)"
bg_pids=()
ns_created=0 release_installed=0 cluster_created=0 finished=0
stop_background() {
  local pid
  for pid in "${bg_pids[@]+"${bg_pids[@]}"}"; do kill "$pid" 2> /dev/null || true; done
  bg_pids=()
}
cleanup() {
  stop_background
  if [ "$finished" = 0 ] && [ "$ns_created$release_installed" != 00 ]; then
    echo "== cleanup"
    if [ "$ns_created" = 1 ]; then kubectl delete namespace "$ns" --wait=false > /dev/null 2>&1 || true; fi
    if [ "$release_installed" = 1 ]; then helm uninstall heterotune -n "$op_ns" > /dev/null 2>&1 || true; fi
  fi
  if [ "$cluster_created" = 1 ] && [ "${E2E_KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$kind_cluster" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  kubectl -n "$ns" get ft,jobs,pods -o wide || true
  kubectl -n "$ns" describe ft || true
  kubectl -n "$op_ns" logs deploy/heterotune --tail=200 || true
  exit 1
}

# ------------------------------------------------------------------ the cluster
if [ "$kind_mode" = 1 ]; then
  for tool in kind kubectl helm curl; do
    command -v "$tool" > /dev/null || die "--kind needs $tool (docs/install.md, 'What you need')"
  done
  echo "== kind cluster $kind_cluster"
  if ! kind get clusters 2> /dev/null | grep -qx "$kind_cluster"; then
    kind create cluster --name "$kind_cluster"
    cluster_created=1
  fi
  kind get kubeconfig --name "$kind_cluster" > "$work/kubeconfig"
  export KUBECONFIG="$work/kubeconfig"
  kubectl cluster-info --context "kind-$kind_cluster"

  echo "== images"
  if [ "$build" = 1 ]; then
    if [ "$operator_repo" != "$registry/operator" ] || [ "$trainer_repo" != "$registry/trainer" ]; then
      die "--kind builds <registry>/operator and <registry>/trainer: OPERATOR_IMAGE=$operator_image and TRAINER_IMAGE=$trainer_image differ (or pass --no-build)"
    fi
    HETEROTUNE_IMAGE_REGISTRY="$registry" HETEROTUNE_IMAGE_TAG="$tag" scripts/build-images.sh --kind "$kind_cluster"
  else
    kind load docker-image "$operator_image" "$trainer_image" --name "$kind_cluster"
  fi
else
  if [ -z "${KUBECONFIG:-}" ]; then
    echo "SKIP tests/e2e: KUBECONFIG is not set (no cluster to test against; --kind makes one; see tests/e2e/run.sh --help)"
    exit 0
  fi
  for tool in kubectl helm curl; do
    command -v "$tool" > /dev/null || { echo "SKIP tests/e2e: $tool is not installed"; exit 0; }
  done
  if ! kubectl version --request-timeout=10s > /dev/null 2>&1; then
    echo "SKIP tests/e2e: the cluster in KUBECONFIG=$KUBECONFIG does not answer"
    exit 0
  fi
fi

# ------------------------------------------------------------------ install
echo "== CRD (server-side apply)"
kubectl apply --server-side -f charts/heterotune/crds/

echo "== namespaces, the trial store (MinIO), the operator's store credentials"
kubectl create namespace "$op_ns" --dry-run=client -o yaml | kubectl apply -f -
if kubectl get namespace "$ns" > /dev/null 2>&1; then
  echo "namespace $ns exists (an earlier run's, terminating?): waiting up to 300 s for it to go"
  kubectl wait --for=delete "namespace/$ns" --timeout=300s > /dev/null 2>&1 \
    || die "namespace $ns exists: delete it or set E2E_NAMESPACE"
fi
kubectl create namespace "$ns"
ns_created=1
kubectl -n "$ns" apply -f tests/e2e/minio.yaml
kubectl -n "$ns" rollout status deploy/minio --timeout=300s
# The operator reads the store with its own credentials (the same MinIO here).
kubectl -n "$op_ns" create secret generic operator-s3 --from-literal=AWS_ACCESS_KEY_ID=heterotune \
  --from-literal=AWS_SECRET_ACCESS_KEY=heterotune-e2e --dry-run=client -o yaml | kubectl apply -f -

echo "== the operator (helm install)"
if helm status heterotune -n "$op_ns" > /dev/null 2>&1; then
  die "a release heterotune exists in $op_ns: uninstall it first (docs/install.md, 'Uninstall')"
fi
release_installed=1
helm install heterotune charts/heterotune -n "$op_ns" --wait --timeout 300s \
  --set image.repository="$operator_repo" \
  --set trainerImage.repository="$trainer_repo" \
  --set image.tag="$tag" \
  --set storage.credentialsSecret=operator-s3 \
  --set grafana.dashboard.enabled=true \
  --set replicaCount=2
kubectl -n "$op_ns" rollout status deployment/heterotune --timeout=300s
for _ in $(seq 30); do
  kubectl -n "$op_ns" get lease heterotune-operator > /dev/null 2>&1 && break
  sleep 1
done
kubectl -n "$op_ns" get lease heterotune-operator || fail "no leader lease"

# ------------------------------------------------------------------ a federation
echo "== FederatedTune ($spec_file)"
python3 tests/e2e/cluster_spec.py "$spec_file" --namespace "$ns" --trainer-image "$trainer_image" | kubectl -n "$ns" apply -f - \
  || fail "cannot apply $spec_file (cluster_spec.py needs PyYAML: scripts/setup.sh makes .venv)"
kubectl -n "$ns" get ft -w &
bg_pids+=("$!")
rounds="$(kubectl -n "$ns" get ft e2e -o jsonpath='{.spec.rounds}')"
clients="$(kubectl -n "$ns" get ft e2e -o jsonpath='{.spec.clients[*].name}' | wc -w)"
deadline=$((SECONDS + timeout))
phase=""
while [ $SECONDS -lt $deadline ]; do
  phase="$(kubectl -n "$ns" get ft e2e -o jsonpath='{.status.phase}' 2>/dev/null || true)"
  [ "$phase" = Succeeded ] && break
  [ "$phase" = Failed ] && fail "the run failed"
  sleep 10
done
stop_background
[ "$phase" = Succeeded ] || fail "not Succeeded after ${timeout}s (phase: ${phase:-none})"
kubectl -n "$ns" get ft e2e -o wide
kubectl -n "$ns" describe ft e2e
kubectl -n "$ns" get jobs -l heterotune.dev/federatedtune=e2e

echo "== status, Jobs, Events"
[ "$(kubectl -n "$ns" get ft e2e -o jsonpath='{.status.progress}')" = "$rounds/$rounds" ] || fail "progress is not $rounds/$rounds"
[ "$(kubectl -n "$ns" get ft e2e -o jsonpath='{.status.conditions[?(@.type=="Complete")].status}')" = True ] || fail "Complete is not True"
[ "$(kubectl -n "$ns" get ft e2e -o jsonpath='{.status.history[*].round}')" = "$(seq -s ' ' 1 "$rounds")" ] \
  || fail "history is not rounds 1..$rounds"
kubectl -n "$ns" get ft e2e -o jsonpath='{.status.history[-1:].accuracy}' | grep -Eq '^0?\.[0-9]+|^1' \
  || fail "the last round in the history has no accuracy"
kubectl -n "$ns" get ft e2e -o jsonpath='{.status.history[-1:].globalAccuracy}' | grep -Eq '^0?\.[0-9]+|^1' \
  || fail "the final global model was not evaluated (history[-1].globalAccuracy)"
[ "$(kubectl -n "$ns" get ft e2e -o jsonpath='{.status.lastGlobalRound}')" = "$rounds" ] \
  || fail "lastGlobalRound is not $rounds"
jobs="$(kubectl -n "$ns" get jobs -l heterotune.dev/federatedtune=e2e -o name | sort)"
[ "$(echo "$jobs" | grep -c -- '-r1-')" -eq "$clients" ] || fail "expected $clients trainer Jobs in round 1: $jobs"
[ "$(echo "$jobs" | grep -c -- '-agg-r')" -ge 2 ] || fail "expected an aggregation Job per round: $jobs"
[ "$(echo "$jobs" | grep -c -- "-eval-r$rounds")" -ge "$clients" ] || fail "expected $clients evaluation Jobs: $jobs"
kubectl -n "$ns" get events --field-selector involvedObject.name=e2e -o jsonpath='{.items[*].reason}' | grep -q RoundCompleted \
  || fail "no RoundCompleted event"

# ------------------------------------------------------------------ metrics, dashboard
echo "== metrics (port-forward) and the Grafana dashboard ConfigMap"
# curl URL: wait for a port-forward started in the background to answer.
scrape() {
  local _
  for _ in $(seq 20); do
    curl -fsS "$1" > "$work/metrics.txt" 2> /dev/null && return 0
    sleep 1
  done
  return 1
}
kubectl -n "$op_ns" port-forward svc/heterotune "$metrics_port":8080 > "$work/port-forward.log" 2>&1 &
bg_pids+=("$!")
scrape "http://localhost:$metrics_port/metrics" || fail "no /metrics through the Service: $(cat "$work/port-forward.log")"
curl -fsS "http://localhost:$metrics_port/metrics" | grep '^heterotune_' | head -n 5
# The Service may pick the standby; the run's series are the leader's.
leader="$(kubectl -n "$op_ns" get lease heterotune-operator -o jsonpath='{.spec.holderIdentity}')"
kubectl -n "$op_ns" port-forward "pod/$leader" "$((metrics_port + 1))":8080 > "$work/port-forward.log" 2>&1 &
bg_pids+=("$!")
scrape "http://localhost:$((metrics_port + 1))/metrics" || fail "no /metrics from the leader $leader"
grep -q "^heterotune_completed_rounds{federatedtune=\"e2e\",ft_namespace=\"$ns\"} $rounds\$" "$work/metrics.txt" \
  || fail "the leader's /metrics has no heterotune_completed_rounds $rounds for e2e"
stop_background
kubectl -n "$op_ns" get configmap heterotune-dashboard
kubectl -n "$op_ns" get configmap heterotune-dashboard -o jsonpath='{.data.heterotune\.json}' | grep -q '"panels"' \
  || fail "the dashboard ConfigMap holds no dashboard"

# ------------------------------------------------------------------ upgrade
echo "== upgrade: the CRD first, then the release (adding GPU profiles)"
kubectl apply --server-side -f charts/heterotune/crds/
helm upgrade heterotune charts/heterotune -n "$op_ns" --reuse-values -f examples/sizing/l4-cluster.yaml --wait --timeout 300s
kubectl -n "$op_ns" rollout status deployment/heterotune --timeout=300s
kubectl -n "$op_ns" get configmap heterotune-config -o jsonpath='{.data.config\.json}' | grep -q l4-24gb \
  || fail "helm upgrade -f examples/sizing/l4-cluster.yaml did not reach the operator's configuration"
[ "$(kubectl -n "$ns" get ft e2e -o jsonpath='{.status.phase}')" = Succeeded ] || fail "the upgrade changed a finished run"

# ------------------------------------------------------------------ deletion, uninstall
echo "== deletion runs the retention policy (the finalizer, while the operator runs)"
if [ "$kind_mode" = 1 ]; then
  # This cluster is the run's own: the uninstall of docs/install.md, in its order.
  kubectl delete ft --all -A --wait --timeout=300s || fail "deletion did not finish (finalizer stuck)"
else
  kubectl -n "$ns" delete ft e2e --timeout=120s || fail "deletion did not finish (finalizer stuck)"
fi
kubectl -n "$ns" get events -o jsonpath='{.items[*].reason}' | grep -q ArtifactsDeleted || fail "no ArtifactsDeleted event"
if [ "$kind_mode" = 1 ]; then
  echo "== uninstall: release, CRD, namespaces"
  helm uninstall heterotune -n "$op_ns" --wait
  release_installed=0
  kubectl delete crd federatedtunes.heterotune.dev
  kubectl delete namespace "$ns" "$op_ns"
  ns_created=0
  if kubectl get crd federatedtunes.heterotune.dev > /dev/null 2>&1; then fail "the CRD is still there"; fi
fi
finished=1
if [ "$kind_mode" = 0 ]; then
  kubectl delete namespace "$ns" --wait=false
  helm uninstall heterotune -n "$op_ns"
fi
if [ "$cluster_created" = 1 ] && [ "${E2E_KEEP_CLUSTER:-0}" != 1 ]; then
  kind delete cluster --name "$kind_cluster"
  cluster_created=0
fi
echo "OK tests/e2e"
