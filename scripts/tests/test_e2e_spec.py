"""tests/e2e/cluster_spec.py: the cluster versions of the e2e FederatedTune and of the
quickstart are valid FederatedTunes (checked by `heterotune validate`, the CRD's own schema
and CEL rules) that keep the run's own settings and point at the test MinIO."""
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))

import cluster_spec  # noqa: E402

HETEROTUNE = os.path.join(ROOT, "target", "debug", "heterotune")


@pytest.mark.parametrize("name", ["tests/e2e/federatedtune.yaml", "examples/quickstart.yaml"])
def test_cluster_spec_is_valid_and_keeps_the_run(tmp_path, name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    out = cluster_spec.cluster_spec(doc, "ns-1", "registry.example/trainer:dev")
    assert out["metadata"] == {"name": "e2e"}
    for key in ("clients", "task", "training", "adapter", "rounds"):
        assert out["spec"][key] == doc["spec"][key]
    assert out["spec"]["storage"]["uri"] == "s3://artifacts/e2e"
    assert out["spec"]["storage"]["endpoint"] == "http://minio.ns-1.svc:9000"
    assert out["spec"]["trainer"]["image"] == "registry.example/trainer:dev"
    assert out["spec"]["retention"]["onDelete"] == "delete"
    if not os.path.exists(HETEROTUNE):
        if os.environ.get("HETEROTUNE_REQUIRE_CACHE") == "1":
            pytest.fail(f"{HETEROTUNE} is not built (scripts/test.sh builds it first)")
        pytest.skip(f"{HETEROTUNE} is not built: cargo build --workspace --bins")
    spec = tmp_path / "e2e.yaml"
    spec.write_text(yaml.safe_dump(out, sort_keys=False))
    r = subprocess.run([HETEROTUNE, "validate", "-f", str(spec)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_document_that_is_not_a_federatedtune_is_refused():
    with pytest.raises(ValueError, match="not a FederatedTune"):
        cluster_spec.cluster_spec({"kind": "ConfigMap"}, "ns", "img")
