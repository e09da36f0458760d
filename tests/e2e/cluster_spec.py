#!/usr/bin/env python3
"""Prints the cluster version of a FederatedTune file for tests/e2e/run.sh.

The run is named `e2e`, its artifacts go to the test MinIO of the namespace
(`s3://artifacts/e2e`, credentials from the Secret `s3`), its pods use the
trainer image given, and deleting it deletes its artifacts. Everything else
(clients, task, training, adapter, aggregation, rounds) is the file's own, so
`examples/quickstart.yaml` runs on the cluster exactly as it runs locally.

    cluster_spec.py SPEC.yaml --namespace NS --trainer-image IMAGE
"""

from __future__ import annotations

import argparse
import sys

import yaml


def cluster_spec(doc: dict, namespace: str, trainer_image: str) -> dict:
    if doc.get("kind") != "FederatedTune" or not isinstance(doc.get("spec"), dict):
        raise ValueError("not a FederatedTune document (kind and spec are required)")
    doc = dict(doc)
    doc["metadata"] = {"name": "e2e"}
    spec = dict(doc["spec"])
    spec["storage"] = {
        "uri": "s3://artifacts/e2e",
        "endpoint": f"http://minio.{namespace}.svc:9000",
        "region": "us-east-1",
        "forcePathStyle": True,
        "credentialsSecret": {"name": "s3"},
    }
    spec["trainer"] = {**spec.get("trainer", {}), "image": trainer_image}
    spec["retention"] = {**spec.get("retention", {}), "onDelete": "delete"}
    doc["spec"] = spec
    return doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec")
    p.add_argument("--namespace", required=True)
    p.add_argument("--trainer-image", required=True)
    args = p.parse_args()
    with open(args.spec, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    try:
        out = cluster_spec(doc, args.namespace, args.trainer_image)
    except ValueError as e:
        sys.exit(f"{args.spec}: {e}")
    yaml.safe_dump(out, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
