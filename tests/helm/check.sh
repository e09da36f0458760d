#!/usr/bin/env bash
# Checks the Helm chart: lint, render several value sets, validate every
# rendered object against the Kubernetes OpenAPI schemas (strict), check the
# schema rejects bad values and the chart refuses unsafe combinations, parse
# the Grafana dashboard, check the alert rules (promtool, when installed),
# and that manifests/operator/ is the chart rendered with defaults; that
# docs/install.md's commands are tests/e2e/run.sh's (tests/e2e/install_doc.py)
# and run.sh is a correct script (bash -n here; tests/shellcheck.sh lints
# every script) that passes against a fake cluster (tests/e2e/fake_cluster.py).
#
# Tools (see docs/operator.md, "Checking the chart"):
#   helm                 HELM=/path/to/helm, or on PATH
#   kubernetes-validate  KUBERNETES_VALIDATE=/path, or on PATH (pip install kubernetes-validate)
#   promtool             PROMTOOL=/path, or on PATH (Debian package prometheus):
#                        `promtool check rules` and the alert rules' unit tests
#                        (tests/helm/alerts-test.yaml, `promtool test rules`)
# Without a tool the script prints why and skips its checks (exit 0),
# unless HETEROTUNE_REQUIRE_TOOLS=1 (CI), where it fails.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
chart="$root/charts/heterotune"

# Alert rules and dashboard: need promtool and python3 only (no helm).
promtool="${PROMTOOL:-$(command -v promtool || true)}"
if [ -x "$promtool" ]; then
  echo "== promtool check rules, promtool test rules"
  "$promtool" check rules "$chart/dashboards/alerts.yaml"
  "$promtool" test rules "$root/tests/helm/alerts-test.yaml"
else
  echo "SKIP alert rule tests: promtool not installed (PROMTOOL=...)"
  [ "${HETEROTUNE_REQUIRE_TOOLS:-0}" = 1 ] && exit 1
fi
echo "== alerts: tested, runbooks, per-run labels"
python3 - "$root" <<'PY'
import json, re, sys, yaml
root = sys.argv[1]
rules = yaml.safe_load(open(f"{root}/charts/heterotune/dashboards/alerts.yaml"))["groups"][0]["rules"]
tests = yaml.safe_load(open(f"{root}/tests/helm/alerts-test.yaml"))["tests"]
values = yaml.safe_load(open(f"{root}/charts/heterotune/values.yaml"))
base = values["prometheusRule"]["runbookBaseUrl"]
runbook = open(f"{root}/docs/runbook.md").read()
anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", runbook, re.M)}
cases = [c for t in tests for c in t.get("alert_rule_test", [])]
for r in rules:
    name = r["alert"]
    url = r.get("annotations", {}).get("runbook_url", "")
    assert url == f"{base}#{name.lower()}", f"{name}: runbook_url {url!r} is not {base}#{name.lower()}"
    assert name.lower() in anchors, f"{name}: docs/runbook.md has no section '## {name}'"
    mine = [c for c in cases if c["alertname"] == name]
    assert any(c.get("exp_alerts") for c in mine), f"{name}: no unit test where it fires"
    assert any(not c.get("exp_alerts") for c in mine), f"{name}: no unit test where it stays silent"
# Per-run series are selected by ft_namespace/federatedtune: `namespace` and
# `name` are the scrape target's (the operator pod's) or absent.
dash = json.load(open(f"{root}/charts/heterotune/dashboards/heterotune.json"))
exprs = [r["expr"] for r in rules] + [t["expr"] for p in dash["panels"] for t in p["targets"]]
exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
for e in exprs:
    assert not re.search(r"(?<![\w])(namespace|name)\s*(=|!=|=~|!~|[,)])", e), f"selects by the target's namespace/name: {e}"
print(f"alerts: {len(rules)} rules, each with a firing and a silent unit test and a runbook section")
PY
echo "== values table (charts/heterotune/README.md)"
python3 "$root/tests/helm/values_table.py" --check
echo "== the install path: docs/install.md's commands are tests/e2e/run.sh's"
bash -n "$root/tests/e2e/run.sh"
python3 "$root/tests/e2e/install_doc.py" --self-test --fake-run
helm="${HELM:-$(command -v helm || true)}"
kv="${KUBERNETES_VALIDATE:-$(command -v kubernetes-validate || true)}"
k8s_version="${K8S_VERSION:-1.33.0}"

missing=()
[ -x "$helm" ] || missing+=("helm (HELM=...)")
[ -x "$kv" ] || missing+=("kubernetes-validate (KUBERNETES_VALIDATE=...)")
if [ ${#missing[@]} -gt 0 ]; then
  echo "SKIP tests/helm/check.sh: missing ${missing[*]}"
  [ "${HETEROTUNE_REQUIRE_TOOLS:-0}" = 1 ] && exit 1
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

echo "== helm lint"
"$helm" lint --strict "$chart" \
  --set serviceMonitor.enabled=true --set prometheusRule.enabled=true --set grafana.dashboard.enabled=true

render() { # name, then --set arguments
  local name="$1"; shift
  "$helm" template heterotune "$chart" --namespace heterotune-system --include-crds "$@" > "$tmp/$name.yaml"
  echo "== kubernetes-validate --strict ($name)"
  # Prometheus Operator kinds have no schema in kubernetes-validate: they are
  # reported as warnings and checked below instead.
  "$kv" --strict --quiet -k "$k8s_version" "$tmp/$name.yaml" 2>&1 | grep -v "Couldn't find schema for kind \(PrometheusRule\|ServiceMonitor\)" || true
  "$kv" --strict --quiet -k "$k8s_version" "$tmp/$name.yaml" > /dev/null 2>&1 || fail "$name does not validate"
}
render defaults
render everything --set replicaCount=2 --set serviceMonitor.enabled=true --set prometheusRule.enabled=true \
  --set grafana.dashboard.enabled=true --set storage.credentialsSecret=operator-s3
render one-namespace --set watchNamespace=team-a --set leaderElection.enabled=false
render gpus -f "$root/tests/helm/values-gpus.yaml"
# The values contract of an umbrella chart / Argo CD install.
render contract --set global.imageRegistry=mirror.example.com/hub --set 'global.imagePullSecrets[0].name=global-pull' \
  --set 'imagePullSecrets[0].name=own-pull' --set fullnameOverride=ht --set image.tag=9.9.9 \
  --set image.digest=sha256:0000000000000000000000000000000000000000000000000000000000000000 \
  --set networkPolicy.enabled=true --set rbac.aggregateToDefaultRoles=false
"$helm" template heterotune "$chart" --set prometheusRule.enabled=true \
  --set prometheusRule.runbookBaseUrl=https://runbooks.example.com/heterotune > "$tmp/runbooks.yaml"
grep -q "runbook_url: https://runbooks.example.com/heterotune#heterotuneroundstalled" "$tmp/runbooks.yaml" \
  || fail "prometheusRule.runbookBaseUrl is not applied to the rules' runbook_url"

echo "== rendered objects"
python3 - "$tmp" <<'PY'
import sys, yaml, json
d = sys.argv[1]
def docs(name):
    return [x for x in yaml.safe_load_all(open(f"{d}/{name}.yaml")) if x]
kinds = lambda name: sorted(x["kind"] for x in docs(name))
assert kinds("defaults") == ["ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "CustomResourceDefinition", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"], kinds("defaults")
every = {x["kind"]: x for x in docs("everything") if not x["metadata"]["name"].endswith(("-view", "-edit"))}
for k in ["ServiceMonitor", "PrometheusRule"]:
    assert k in every, k
assert every["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"
rules = every["PrometheusRule"]["spec"]["groups"][0]["rules"]
assert all("alert" in r and "expr" in r for r in rules), rules
assert all(r["annotations"]["runbook_url"].startswith("https://example.invalid/heterotune/blob/main/docs/runbook.md#") for r in rules), rules
# The metrics' own labels (ft_namespace, federatedtune) need no honorLabels,
# which would let a target overwrite job/instance.
assert not every["ServiceMonitor"]["spec"]["endpoints"][0].get("honorLabels"), every["ServiceMonitor"]
dash = [x for x in docs("everything") if x["kind"] == "ConfigMap" and x["metadata"]["name"].endswith("-dashboard")][0]
panels = json.loads(dash["data"]["heterotune.json"])["panels"]
assert len(panels) >= 8 and all(p["targets"] for p in panels)
dep = every["Deployment"]["spec"]["template"]["spec"]
c = dep["containers"][0]
assert "--leader-election" in c["args"], c["args"]
assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
assert dep["securityContext"]["runAsNonRoot"] and dep["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
assert {e["name"] for e in c["env"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "POD_NAME", "POD_NAMESPACE"}
# Least privilege: no secrets, no wildcards, jobs without update/patch.
role = every["ClusterRole"]
for rule in role["rules"]:
    assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
    assert "secrets" not in rule["resources"], rule
ns = {x["kind"]: x for x in docs("one-namespace")}
# One namespace: no cluster-wide grant to the operator (the aggregated user roles stay).
assert not [x for x in docs("one-namespace") if x["kind"] in ("ClusterRole", "ClusterRoleBinding")
            and not x["metadata"]["name"].endswith(("-view", "-edit"))]
assert ns["Role"]["metadata"]["namespace"] == "team-a"
assert "--watch-namespace=team-a" in ns["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
gpus = {x["kind"]: x for x in docs("gpus") if x["kind"] == "ConfigMap" and x["metadata"]["name"].endswith("-config")}
cfg = json.loads(gpus["ConfigMap"]["data"]["config.json"])
assert [p["name"] for p in cfg["sizing"]["gpuProfiles"]] == ["l4-24gb", "a100-80gb"], cfg
# One tag for both images, appVersion by default; no hard-coded UID (OpenShift assigns one).
defaults = {(x["kind"], x["metadata"]["name"]): x for x in docs("defaults")}
dep = defaults[("Deployment", "heterotune")]["spec"]["template"]["spec"]
cfg = json.loads(defaults[("ConfigMap", "heterotune-config")]["data"]["config.json"])
op_tag = dep["containers"][0]["image"].rsplit(":", 1)[1]
assert cfg["jobs"]["trainerImage"] == f"ghcr.io/heterotune/trainer:{op_tag}", (cfg["jobs"], op_tag)
assert "runAsUser" not in dep["securityContext"] and "runAsUser" not in dep["containers"][0]["securityContext"], dep
assert "imagePullSecrets" not in dep and "NetworkPolicy" not in kinds("defaults")
# Aggregated roles: view reads FederatedTunes, edit changes them, neither touches status writes.
view, edit = defaults[("ClusterRole", "heterotune-view")], defaults[("ClusterRole", "heterotune-edit")]
assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
assert set(view["rules"][0]["verbs"]) == {"get", "list", "watch"}
assert "federatedtunes/status" not in edit["rules"][0]["resources"]
con = {(x["kind"], x["metadata"]["name"]): x for x in docs("contract")}
dep = con[("Deployment", "ht")]["spec"]["template"]["spec"]
digest = "sha256:" + "0" * 64
assert dep["containers"][0]["image"] == f"mirror.example.com/hub/heterotune/operator@{digest}", dep["containers"][0]["image"]
assert dep["imagePullSecrets"] == [{"name": "global-pull"}, {"name": "own-pull"}], dep["imagePullSecrets"]
cfg = json.loads(con[("ConfigMap", "ht-config")]["data"]["config.json"])
assert cfg["jobs"]["trainerImage"] == "mirror.example.com/hub/heterotune/trainer:9.9.9", cfg["jobs"]
assert cfg["jobs"]["imagePullSecrets"] == ["global-pull", "own-pull"], cfg["jobs"]
np = con[("NetworkPolicy", "ht")]["spec"]
assert np["ingress"][0]["ports"][0]["port"] == "http" and np["policyTypes"] == ["Ingress", "Egress"], np
assert not any(k == "ClusterRole" and n.endswith(("-view", "-edit")) for k, n in con), "rbac.aggregateToDefaultRoles=false"
print("rendered objects: ok")
PY

echo "== refusals"
if "$helm" template x "$chart" --set replicaCount=2 --set leaderElection.enabled=false > /dev/null 2>&1; then
  fail "two replicas without leader election must be refused"
fi
if "$helm" template x "$chart" --set config.sizing.gpuProfiles[0].name=x > /dev/null 2>&1; then
  fail "a GPU profile without memory must be refused by values.schema.json"
fi
if "$helm" template x "$chart" --set unknownValue=1 > /dev/null 2>&1; then
  fail "unknown values must be refused by values.schema.json"
fi
if "$helm" template x "$chart" --set 'imagePullSecrets[0]=plain-string' > /dev/null 2>&1; then
  fail "imagePullSecrets must be [{name: ...}] objects (values.schema.json)"
fi
if "$helm" template x "$chart" --set image.digest=latest > /dev/null 2>&1; then
  fail "image.digest must be sha256:<64 hex> (values.schema.json)"
fi
echo "refusals: ok"

echo "== NOTES.txt"
"$helm" install heterotune "$chart" --dry-run=client --namespace heterotune-system > "$tmp/install.txt"
for want in "kubectl get ft -w" "kubectl apply --server-side -f charts/heterotune/crds/" "trainer image:  ghcr.io/heterotune/trainer:"; do
  grep -qF -- "$want" "$tmp/install.txt" || fail "NOTES.txt does not say: $want"
done
echo "NOTES.txt: ok"

echo "== the site chart (charts/heterotune-site)"
site="$root/charts/heterotune-site"
python3 "$root/tests/helm/values_table.py" --chart heterotune-site --check
site_set=(--set client=clinic-b --set-file "federation.spec=$root/examples/quickstart-sites.yaml")
"$helm" lint --strict "$site" "${site_set[@]}"
"$helm" template clinic "$site" --namespace clinic "${site_set[@]}" > "$tmp/site-defaults.yaml"
"$helm" template clinic "$site" --namespace clinic "${site_set[@]}" --set credentialsSecret=clinic-s3 \
  --set data.volume.persistentVolumeClaim.claimName=clinic-data --set data.uri=/data/clinic-b.jsonl \
  --set persistence.existingClaim=clinic-work --set allowUnconfinedCredentials=true --set device=cuda \
  --set 'resources.limits.nvidia\.com/gpu=1' --set 'imagePullSecrets[0].name=pull' > "$tmp/site-full.yaml"
for name in site-defaults site-full; do
  "$kv" --strict --quiet -k "$k8s_version" "$tmp/$name.yaml" || fail "$name does not validate"
done
python3 - "$tmp" <<'PY'
import sys, yaml
d = sys.argv[1]
docs = lambda name: {x["kind"]: x for x in yaml.safe_load_all(open(f"{d}/{name}.yaml")) if x}
base = docs("site-defaults")
assert sorted(base) == ["ConfigMap", "Job", "PersistentVolumeClaim"], sorted(base)
job = base["Job"]["spec"]
assert job["parallelism"] == 1 and job["completions"] == 1 and job["podReplacementPolicy"] == "Failed", job
pod = job["template"]["spec"]
assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "OnFailure", pod
c = pod["containers"][0]
assert c["command"] == ["heterotune"] and c["args"][1] == "site", c["args"]
assert "--client=clinic-b" in c["args"] and "--threads=2" in c["args"], c["args"]
assert not any(a.startswith(("--data", "--model", "--allow-unconfined")) for a in c["args"]), c["args"]
assert "AWS_ACCESS_KEY_ID" not in {e["name"] for e in c["env"]}
spec = yaml.safe_load(base["ConfigMap"]["data"]["federation.yaml"])
assert [x["name"] for x in spec["spec"]["clients"] if "site" in x] == ["clinic-b", "bank"], spec
vols = {v["name"]: v for v in pod["volumes"]}
assert vols["work"]["persistentVolumeClaim"]["claimName"] == base["PersistentVolumeClaim"]["metadata"]["name"]
assert base["PersistentVolumeClaim"]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
full = docs("site-full")
assert "PersistentVolumeClaim" not in full, "persistence.existingClaim: no claim of the chart's own"
pod = full["Job"]["spec"]["template"]["spec"]
c = pod["containers"][0]
for a in ["--data=/data/clinic-b.jsonl", "--allow-unconfined-credentials", "--device=cuda"]:
    assert a in c["args"], (a, c["args"])
assert {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e} == \
    {"AWS_ACCESS_KEY_ID": "clinic-s3", "AWS_SECRET_ACCESS_KEY": "clinic-s3"}, c["env"]
vols = {v["name"]: v for v in pod["volumes"]}
assert vols["work"]["persistentVolumeClaim"]["claimName"] == "clinic-work"
assert vols["data"]["persistentVolumeClaim"]["claimName"] == "clinic-data"
assert {"name": "data", "mountPath": "/data", "readOnly": True} in c["volumeMounts"], c["volumeMounts"]
assert pod["imagePullSecrets"] == [{"name": "pull"}]
print("site chart objects: ok")
PY
if "$helm" template x "$site" --set-file "federation.spec=$root/examples/quickstart-sites.yaml" > /dev/null 2>&1; then
  fail "the site chart must refuse a release without client"
fi
if "$helm" template x "$site" --set client=clinic-b > /dev/null 2>&1; then
  fail "the site chart must refuse a release without the federation's spec"
fi
if "$helm" template x "$site" "${site_set[@]}" --set device=tpu > /dev/null 2>&1; then
  fail "the site chart's values.schema.json must refuse device=tpu"
fi
echo "site chart: ok"

echo "== manifests/operator is the chart with defaults"
"$helm" template heterotune "$chart" --namespace heterotune-system > "$tmp/plain.yaml"
tail -n +3 "$root/manifests/operator/heterotune-operator.yaml" | diff -u - "$tmp/plain.yaml" \
  || fail "manifests/operator/heterotune-operator.yaml is stale: run tests/helm/render.sh"
echo "OK tests/helm/check.sh"
