#!/usr/bin/env python3
"""The method comparison of docs/method.md's reference table, run with the Rust system.

Runs `heterotune run` on the quickstart federation (TREC-6, 6 clients: 2x MiniLM-L6,
2x MiniLM-L3, 2x SmolLM2 top-6 window; Dirichlet alpha=0.5; r=8, K=4, S=3; batch 16,
32 tokens; global test set n=500) for each method and seed, with the same rounds and
local steps as the PyTorch prototype (12 x 20), and prints per-family and overall
global-test accuracy as mean +- std over seeds, paired differences per seed, bytes sent
per client per round, and seconds per local step per family.

Two accuracies are reported (see docs/benchmarks.md): the final global model (the
aggregated model as each client receives it, evaluated after the last round: what the
federation delivers, the primary figure) and each client's model after its local
training in the last round.

A seed sets both the partition seed and the training seed (the split, hence the global
test set, stays fixed), as in the prototype's measurements.

    scripts/bench_methods.py                       # 4 methods x 3 seeds x 12 rounds (docs used --seeds 0,1,2,3,4)
    scripts/bench_methods.py --seeds 0 --rounds 6  # a quicker look
    scripts/bench_methods.py --set training.maxGradNorm=0 --tag noclip   # a setting, side by side
    scripts/bench_methods.py --set adapter.layers.everyLayerInGroup=true \
        --set 'clients[*].model.adaptedLayers.everyLayerInGroup=true' --tag every

Needs the release binaries (cargo build --release --bins) and the asset cache
(scripts/setup.sh). Results are appended as JSON lines to <work>/results.jsonl, so an
interrupted benchmark resumes where it stopped (finished runs are not repeated).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    # label: (aggregation algorithm, extra aggregation settings)
    "local-only": ("local-only", {}),
    "family-FedAvg": ("family-fedavg", {}),
    "DeMA+FedAvg": ("fedavg", {}),
    "DeMA+CMGA (PCGrad)": ("cmga", {"alignment": "pcgrad", "conflictThreshold": 0.0}),
}
FAMILY_ORDER = ["all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2", "SmolLM2-135M-Instruct"]
FAMILY_LABEL = {
    "all-MiniLM-L6-v2": "MiniLM-L6",
    "paraphrase-MiniLM-L3-v2": "MiniLM-L3",
    "SmolLM2-135M-Instruct": "SmolLM2",
}


def spec_for(base: dict, method: str, seed: int, rounds: int, store: Path,
             overrides: list[tuple[str, object]], tag: str) -> dict:
    spec = json.loads(json.dumps(base))
    algorithm, extra = METHODS[method]
    slug = algorithm.replace("-", "")
    suffix = f"-{tag}" if tag else ""
    spec["metadata"]["name"] = f"bench-{slug}-s{seed}-r{rounds}{suffix}"
    s = spec["spec"]
    s["rounds"] = rounds
    # Every client every round: the methods are compared on the same updates.
    s["minClients"] = len(s["clients"])
    s["task"]["partition"]["seed"] = seed
    s["training"]["seed"] = seed
    s["aggregation"] = {"algorithm": algorithm, **extra}
    s["storage"] = {"uri": f"file://{store}"}
    for path, value in overrides:
        set_path(s, path.split("."), value)
    return spec


def set_path(node, keys: list[str], value) -> None:
    """Sets `value` at `keys` under `node`; a key `name[*]` walks every item of the list `name`."""
    key, rest = keys[0], keys[1:]
    if key.endswith("[*]"):
        for item in node.get(key[:-3], []):
            set_path(item, rest, value)
    elif not rest:
        node[key] = value
    else:
        set_path(node.setdefault(key, {}), rest, value)


def parse_override(text: str) -> tuple[str, object]:
    """`training.maxGradNorm=0` -> ("training.maxGradNorm", 0) (the value as YAML); a
    segment `clients[*]` sets the field on every client."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: use PATH=VALUE under spec, e.g. training.maxGradNorm=0")
    path, value = text.split("=", 1)
    return path.strip(), yaml.safe_load(value)


def family_of(key: str) -> str:
    # Family keys are `<model dir>.<hash6>`.
    return key.rsplit(".", 1)[0]


def summarise(report: dict) -> dict:
    last = report["rounds"][-1]
    by_family = {family_of(k): v for k, v in last["accuracyByFamily"].items()}
    clients = [c for r in report["rounds"] for c in r["clients"]]
    step_seconds: dict[str, list[float]] = {}
    upload: dict[str, list[int]] = {}
    peak: dict[str, float] = {}
    for c in clients:
        f = family_of(c["family"])
        if c.get("stepsPerSecond"):
            step_seconds.setdefault(f, []).append(1.0 / c["stepsPerSecond"])
        upload.setdefault(f, []).append(c["bytesUploaded"])
        peak[f] = max(peak.get(f, 0.0), c.get("peakRssBytes") or 0.0)
    global_by_family = {family_of(k): v for k, v in last.get("globalAccuracyByFamily", {}).items()}
    return {
        "global": last.get("globalAccuracy", float("nan")),
        "global_families": global_by_family,
        "overall": last["accuracy"],
        "macro_f1": last["macroF1"],
        "families": by_family,
        "seconds_per_step": {f: statistics.median(v) for f, v in step_seconds.items()},
        "upload_bytes": {f: statistics.mean(v) for f, v in upload.items()},
        "peak_rss": peak,
        "total_seconds": report["totalSeconds"],
        "round_seconds": statistics.median(r["durationSeconds"] for r in report["rounds"][1:])
        if len(report["rounds"]) > 1
        else report["rounds"][0]["durationSeconds"],
    }


def run_one(binary: Path, trainer: Path, spec: dict, work: Path, threads: int | None) -> dict:
    name = spec["metadata"]["name"]
    spec_file = work / "specs" / f"{name}.yaml"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    report_dir = work / "reports" / name
    cmd = [
        str(binary), "--log-format", "json", "run", "-f", str(spec_file), "--fresh",
        "--trainer", str(trainer), "--work-dir", str(work / "work"),
        "--report-dir", str(report_dir),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with log.open("w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=work)
    if code != 0:
        sys.exit(f"{name} failed (exit {code}): see {log}")
    report = json.loads((report_dir / "report.json").read_text())
    result = summarise(report)
    result["wall_seconds"] = time.time() - started
    return result


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f}±{statistics.pstdev(values):.3f}"


def table(results: dict, methods: list[str], seeds: list[int], which: str) -> str:
    """`which`: "global" (the final global model) or "local" (after local training)."""
    overall, families = ("global", "global_families") if which == "global" else ("overall", "families")
    lines = [
        "| method | MiniLM-L6 | MiniLM-L3 | SmolLM2 | overall | bytes up/client/round (L6 / L3 / SmolLM2) |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        rs = [results[(m, s)] for s in seeds if (m, s) in results]
        if not rs:
            continue
        cells = [mean_std([r[families].get(f, float("nan")) for r in rs]) for f in FAMILY_ORDER]
        up = " / ".join(
            f"{statistics.mean(r['upload_bytes'].get(f, 0) for r in rs) / 1000:.1f} KB"
            for f in FAMILY_ORDER
        )
        lines.append(f"| {m} | {' | '.join(cells)} | {mean_std([r[overall] for r in rs])} | {up} |")
    return "\n".join(lines)


def paired(results: dict, a: str, b: str, seeds: list[int], key: str) -> str | None:
    diffs = [
        100 * (results[(a, s)][key] - results[(b, s)][key])
        for s in seeds
        if (a, s) in results and (b, s) in results
    ]
    if not diffs:
        return None
    return (f"{a} − {b}: " + ", ".join(f"{d:+.1f}" for d in diffs)
            + f" points (per seed; mean {statistics.mean(diffs):+.1f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(ROOT / "examples/quickstart.yaml"))
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated labels of: " + ", ".join(METHODS))
    p.add_argument("--work", default=str(ROOT / ".bench/methods"))
    p.add_argument("--threads", type=int, default=None, help="libtorch threads per trainer")
    p.add_argument("--binary", default=str(ROOT / "target/release/heterotune"))
    p.add_argument("--trainer", default=str(ROOT / "target/release/heterotune-trainer"))
    p.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                   metavar="PATH=VALUE", help="override a spec field for every run (repeatable)")
    p.add_argument("--tag", default="", help="names the runs of this setting (needed with --set)")
    args = p.parse_args()
    if args.overrides and not args.tag:
        sys.exit("--set needs --tag (the runs of another setting must not share names or results)")

    binary, trainer = Path(args.binary), Path(args.trainer)
    for b in (binary, trainer):
        if not b.is_file():
            sys.exit(f"{b} is missing: run `cargo build --release --bins` first")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            sys.exit(f"--methods: unknown method {m!r}; use: {', '.join(METHODS)}")
    base = yaml.safe_load(Path(args.spec).read_text())
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.jsonl"
    results: dict = {}
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            r = json.loads(line)
            if r["rounds"] == args.rounds and r.get("tag", "") == args.tag and "global" in r["result"]:
                results[(r["method"], r["seed"])] = r["result"]

    for seed in seeds:
        for m in methods:
            if (m, seed) in results:
                continue
            spec = spec_for(base, m, seed, args.rounds, work / "store", args.overrides, args.tag)
            print(f"== {m}, seed {seed}, {args.rounds} rounds ...", flush=True)
            r = run_one(binary, trainer, spec, work, args.threads)
            results[(m, seed)] = r
            with results_file.open("a") as f:
                f.write(json.dumps({"method": m, "seed": seed, "rounds": args.rounds, "tag": args.tag,
                                    "result": r}) + "\n")
            fams = ", ".join(f"{FAMILY_LABEL.get(k, k)} {v:.3f}" for k, v in sorted(r["global_families"].items()))
            print(f"   global model {r['global']:.3f} ({fams}); after local training {r['overall']:.3f};"
                  f" {r['wall_seconds']:.0f} s", flush=True)

    print()
    setting = f" [{args.tag}: {', '.join(f'{k}={v}' for k, v in args.overrides)}]" if args.tag else ""
    print(f"TREC-6, 6 clients, Dirichlet α=0.5, {args.rounds} rounds × 20 local steps, "
          f"global test n=500, seeds {seeds} (mean ± population std){setting}:")
    for which, title in [("global", "The final global model (primary)"),
                         ("local", "Each client's model after its local training in the last round")]:
        print()
        print(f"{title}:")
        print()
        print(table(results, methods, seeds, which))
        print()
        key = "global" if which == "global" else "overall"
        for a, b in [("family-FedAvg", "local-only"), ("DeMA+FedAvg", "family-FedAvg"),
                     ("DeMA+CMGA (PCGrad)", "DeMA+FedAvg")]:
            line = paired(results, a, b, seeds, key)
            if line:
                print("- " + line)
    steps: dict[str, list[float]] = {}
    for r in results.values():
        for f, v in r["seconds_per_step"].items():
            steps.setdefault(f, []).append(v)
    print("- seconds per local step (median over clients, rounds and runs; includes the "
          "forward of the adapted window, backward, optimiser): "
          + ", ".join(f"{FAMILY_LABEL.get(f, f)} {statistics.median(v):.3f}" for f, v in sorted(steps.items())))
    rounds = [r["round_seconds"] for r in results.values()]
    print(f"- median round wall time {statistics.median(rounds):.1f} s (6 trainers on "
          f"{os.cpu_count()} cores, then the aggregation)")


if __name__ == "__main__":
    main()
