#!/usr/bin/env python3
"""A stand-in for kubectl, helm, kind and curl, for running tests/e2e/run.sh here.

There is no Kubernetes API server on the machines that run the test suite, so
`install_doc.py --fake-run` puts links named kubectl, helm, kind and curl to
this file first on PATH and runs `tests/e2e/run.sh --kind --no-build`. Each
call appends its argv (JSON, one line) to $FAKE_CLUSTER_LOG and answers as a
cluster where the trial federation (three clients, two rounds) succeeded
would. Background calls are awaited as on a cluster: curl cannot connect
until the port-forward to its port has started, and the run stays Running
until the watch has started, so the log's order is the script's. That runs the script's own logic (arguments, traps, set -e, the
checks it makes of each answer) end to end; what a real cluster does is the
e2e's to show.
"""
from __future__ import annotations

import json
import os
import sys
import time

NS = "heterotune-trial"
CLIENTS = ["a", "b", "c"]
ROUNDS = 2
JSONPATH = {
    "{.spec.rounds}": str(ROUNDS),
    "{.spec.clients[*].name}": " ".join(CLIENTS),
    "{.status.phase}": "Succeeded",
    "{.status.progress}": f"{ROUNDS}/{ROUNDS}",
    '{.status.conditions[?(@.type=="Complete")].status}': "True",
    "{.status.history[*].round}": " ".join(str(r) for r in range(1, ROUNDS + 1)),
    "{.status.history[-1:].accuracy}": "0.61",
    "{.status.history[-1:].globalAccuracy}": "0.58",
    "{.status.lastGlobalRound}": str(ROUNDS),
    "{.spec.holderIdentity}": "heterotune-5d9c7b-x2x4q",
    "{.items[*].reason}": "RoundCompleted ArtifactsDeleted",
    "{.data.heterotune\\.json}": '{"panels": []}',
    "{.data.config\\.json}": '{"sizing": {"gpuProfiles": [{"name": "l4-24gb"}]}}',
}
METRICS = (
    'heterotune_build_info{version="0.1.0"} 1\n'
    f'heterotune_completed_rounds{{federatedtune="e2e",ft_namespace="{NS}"}} {ROUNDS}\n'
)


def jobs() -> str:
    """The Job names of operator/src/controller/names.rs for the trial run."""
    names = [f"e2e-r{r}-{c}" for r in range(1, ROUNDS + 1) for c in CLIENTS]
    names += [f"e2e-agg-r{r}" for r in range(1, ROUNDS + 1)]
    names += [f"e2e-eval-r{ROUNDS}-{c}" for c in CLIENTS]
    return "".join(f"job.batch/{n}\n" for n in names)


def marker(name: str) -> str:
    """A file that says a background call has started."""
    folder = os.environ["FAKE_CLUSTER_LOG"] + ".d"
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def kubectl(args: list[str]) -> int:
    verb = next((a for a in args if not a.startswith("-") and a not in (NS, "heterotune-system")), "")
    output = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "-o"), "")
    if "-f" in args and args[args.index("-f") + 1] == "-":
        sys.stdin.read()
    if verb == "port-forward":
        local = next(a for a in args if ":" in a).split(":")[0]
        open(marker(f"port-{local}"), "w").close()
        time.sleep(120)  # killed by run.sh
    elif "-w" in args:
        open(marker("watch"), "w").close()
        print(f"NAME   PHASE       ROUND\ne2e    Succeeded   {ROUNDS}/{ROUNDS}")
    elif output == "jsonpath={.status.phase}" and not os.path.exists(marker("watch")):
        print("Running", end="")
    elif output.startswith("jsonpath="):
        path = output[len("jsonpath="):]
        if path not in JSONPATH:
            sys.exit(f"fake kubectl: no answer for jsonpath {path!r}")
        print(JSONPATH[path], end="")
    elif output == "name":
        print(jobs(), end="")
    elif output == "yaml":
        print("apiVersion: v1\nkind: Namespace\nmetadata: { name: fake }")
    elif verb == "get" and any(a in ("namespace", "crd") for a in args):
        return 1  # not found: a fresh cluster, and after the uninstall
    else:
        print(f"fake kubectl {' '.join(args)}")
    return 0


def main() -> int:
    tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
    with open(os.environ["FAKE_CLUSTER_LOG"], "a", encoding="utf-8") as log:
        log.write(json.dumps([tool, *args]) + "\n")
    if tool == "kubectl":
        return kubectl(args)
    if tool == "helm":
        return 1 if args[:1] == ["status"] else 0  # no release yet
    if tool == "kind":
        if args[:2] == ["get", "kubeconfig"]:
            print("apiVersion: v1\nkind: Config\ncurrent-context: kind-heterotune")
        return 0  # `get clusters`: none
    if tool == "curl":
        port = args[-1].split("localhost:")[1].split("/")[0]
        if not os.path.exists(marker(f"port-{port}")):
            print(f"curl: (7) Failed to connect to localhost port {port}", file=sys.stderr)
            return 7
        print(METRICS, end="")
        return 0
    sys.exit(f"fake_cluster.py: called as {tool}")


if __name__ == "__main__":
    sys.exit(main())
