#!/usr/bin/env bash
# End-to-end test on a real cluster (kind or any other): installs the CRD and
# the operator chart, an S3 store (MinIO) and a FederatedTune, waits for it to
# succeed, checks status, Jobs and Events, deletes it and checks the finalizer
# ran. The FederatedTune (E2E_SPEC):
#   tests/e2e/federatedtune.yaml (default): three CPU clients on the packaged
#                   encoders, 2 rounds (a few minutes on kind)
#   quickstart      examples/quickstart.yaml as it runs locally: six clients on
#                   three real models, 6 rounds
#   any other FederatedTune file
# cluster_spec.py points its storage at the MinIO and its pods at TRAINER_IMAGE.
#
# Skips (exit 0, with the reason) when KUBECONFIG is unset or the cluster is
# unreachable. Needs kubectl and helm, and the images in reach of the nodes,
# as scripts/build-images.sh builds them (images/*.Dockerfile):
#   OPERATOR_IMAGE (default ghcr.io/heterotune/operator:dev)
#   TRAINER_IMAGE  (default ghcr.io/heterotune/trainer:dev: CPU libtorch, and the
#                   packaged models and TREC data baked into its HETEROTUNE_CACHE,
#                   which federatedtune.yaml's cache:// URIs use; docs/operator.md, "Images")
# On kind:  kind create cluster --name heterotune
#           scripts/build-images.sh --kind heterotune      (builds both, kind load)
#           KUBECONFIG=~/.kube/config tests/e2e/run.sh
# Elsewhere: HETEROTUNE_IMAGE_REGISTRY=<registry you push to> scripts/build-images.sh --push,
#           then OPERATOR_IMAGE=... TRAINER_IMAGE=... tests/e2e/run.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

if [ -z "${KUBECONFIG:-}" ]; then
  echo "SKIP tests/e2e: KUBECONFIG is not set (no cluster to test against; see tests/e2e/run.sh)"
  exit 0
fi
for tool in kubectl helm; do
  command -v "$tool" > /dev/null || { echo "SKIP tests/e2e: $tool is not installed"; exit 0; }
done
if ! kubectl version --request-timeout=10s > /dev/null 2>&1; then
  echo "SKIP tests/e2e: the cluster in KUBECONFIG=$KUBECONFIG does not answer"
  exit 0
fi

ns="heterotune-e2e-$RANDOM"
op_ns="heterotune-system"
operator_image="${OPERATOR_IMAGE:-ghcr.io/heterotune/operator:dev}"
trainer_image="${TRAINER_IMAGE:-ghcr.io/heterotune/trainer:dev}"
timeout="${E2E_TIMEOUT:-1800}"
cleanup() {
  echo "== cleanup"
  kubectl delete namespace "$ns" --wait=false > /dev/null 2>&1 || true
  helm uninstall heterotune -n "$op_ns" > /dev/null 2>&1 || true
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  kubectl -n "$ns" get ft,jobs,pods -o wide || true
  kubectl -n "$ns" describe ft || true
  kubectl -n "$op_ns" logs deploy/heterotune --tail=200 || true
  exit 1
}

echo "== CRD and operator"
kubectl apply --server-side -f "$root/manifests/crds/"
kubectl create namespace "$op_ns" --dry-run=client -o yaml | kubectl apply -f -
kubectl create namespace "$ns"
kubectl -n "$ns" apply -f "$here/minio.yaml"
kubectl -n "$ns" rollout status deploy/minio --timeout=300s
# The operator reads the store with its own credentials (same MinIO here).
kubectl -n "$op_ns" create secret generic operator-s3 \
  --from-literal=AWS_ACCESS_KEY_ID=heterotune --from-literal=AWS_SECRET_ACCESS_KEY=heterotune-e2e \
  --dry-run=client -o yaml | kubectl apply -f -
helm upgrade --install heterotune "$root/charts/heterotune" -n "$op_ns" --wait --timeout 300s \
  --set image.repository="${operator_image%:*}" --set image.tag="${operator_image##*:}" \
  --set config.jobs.trainerImage="$trainer_image" --set storage.credentialsSecret=operator-s3 \
  --set replicaCount=2
kubectl -n "$op_ns" get lease heterotune-operator > /dev/null || fail "no leader lease"

echo "== FederatedTune"
spec_file="${E2E_SPEC:-$here/federatedtune.yaml}"
[ "$spec_file" = quickstart ] && spec_file="$root/examples/quickstart.yaml"
python="$root/.venv/bin/python"
[ -x "$python" ] || python=python3
"$python" "$here/cluster_spec.py" "$spec_file" --namespace "$ns" --trainer-image "$trainer_image" \
  > "$here/.e2e-spec.yaml" || fail "cannot prepare $spec_file (needs PyYAML: scripts/setup.sh makes .venv)"
kubectl -n "$ns" apply -f "$here/.e2e-spec.yaml"
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
[ "$phase" = Succeeded ] || fail "not Succeeded after ${timeout}s (phase: ${phase:-none})"
kubectl -n "$ns" get ft e2e

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

echo "== deletion runs the retention policy"
kubectl -n "$ns" delete ft e2e --timeout=120s || fail "deletion did not finish (finalizer stuck)"
kubectl -n "$ns" get events -o jsonpath='{.items[*].reason}' | grep -q ArtifactsDeleted || fail "no ArtifactsDeleted event"
echo "OK tests/e2e"
