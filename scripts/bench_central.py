#!/usr/bin/env python3
"""Centralised references: one client holding the whole training split, `local-only`.

Runs `heterotune run` on a one-client version of examples/quickstart.yaml's task and training
settings (12 rounds x 20 local steps unless overridden) and prints the final global-test accuracy:
the ceiling a model reaches at this training budget without federation (docs/method.md, "The
capacity ladder and the decoder").

    scripts/bench_central.py L3                                  # paraphrase-MiniLM-L3-v2
    scripts/bench_central.py smol training.learningRate=0.01     # a setting, as PATH=VALUE under spec
    scripts/bench_central.py smol adapter.outputScale=residual

Models: L3, L6, mpnet, smol (SmolLM2, top-6 window), smol14 (its first 14 layers, top-6 window). Needs the release binaries and the asset cache.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "L3": {"family": "bert", "uri": "cache://models/paraphrase-MiniLM-L3-v2"},
    "L6": {"family": "bert", "uri": "cache://models/all-MiniLM-L6-v2"},
    "mpnet": {"family": "mpnet", "uri": "cache://models/all-mpnet-base-v2"},
    "smol": {"family": "llama", "uri": "cache://models/SmolLM2-135M-Instruct",
             "adaptedLayers": {"mode": "topWindow", "window": 6}},
    "smol14": {"family": "llama", "uri": "cache://models/SmolLM2-135M-Instruct-L14",
               "adaptedLayers": {"mode": "topWindow", "window": 6}},
}


def central_spec(base: dict, model: str, name: str, store: Path, overrides: list[str]) -> dict:
    doc = copy.deepcopy(base)
    doc["metadata"] = {"name": name, "namespace": "default"}
    s = doc["spec"]
    s["clients"] = [{"name": "central", "model": copy.deepcopy(MODELS[model])}]
    s["minClients"] = 1
    s["rounds"] = 12
    s["task"]["partition"]["minExamplesPerClient"] = 1
    s["aggregation"] = {"algorithm": "local-only"}
    s.pop("bridge", None)
    s["task"].setdefault("splits", {})["pool"] = 0.0  # the public pool exists for the bridge only
    s["storage"] = {"uri": f"file://{store}"}
    for item in overrides:
        path, _, value = item.partition("=")
        node = s
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = yaml.safe_load(value)
    return doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("overrides", nargs="*", help="PATH=VALUE under spec")
    p.add_argument("--spec", default=str(ROOT / "examples/quickstart.yaml"))
    p.add_argument("--work", default=str(ROOT / ".bench/central"))
    p.add_argument("--binary", default=str(ROOT / "target/release/heterotune"))
    args = p.parse_args()
    tag = "-".join([args.model.lower()] + [o.replace("=", "-").replace(".", "-").lower() for o in args.overrides])
    name = "central-" + "".join(c if c.isalnum() or c == "-" else "-" for c in tag)[:50].strip("-")
    work = Path(args.work).resolve() / name
    work.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(args.spec).read_text())
    spec_file = work / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(central_spec(base, args.model, name, work / "store", args.overrides)))
    started = time.time()
    cmd = [args.binary, "run", "-f", str(spec_file), "--fresh", "--work-dir", str(work / "work"),
           "--report-dir", str(work / "report")]
    with (work / "run.log").open("w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"{name}: heterotune run failed (exit {code}): see {work / 'run.log'}")
    report = json.loads((work / "report" / "report.json").read_text())
    acc = report["rounds"][-1].get("globalAccuracy")
    print(f"{args.model} {' '.join(args.overrides) or '(defaults)'}: final global-test accuracy "
          f"{acc:.3f} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
