#!/usr/bin/env python3
"""The Byzantine benchmark (issue 15, item 6): one hostile client in a federation, the defences of
`spec.aggregation.robust`, the honest clients' accuracy against the all-honest run. Two
federations (`--federation`), each with its own results, data file and block of
docs/benchmarks.md:

  smallest  the heterogeneity benchmark's S1 on TREC-6 under smallest-common FedAvg (8 clients,
            all on paraphrase-MiniLM-L3-v2, Dirichlet α = 0.5, 12 rounds × 20 local steps, the
            quickstart's training settings), client `edge-a` hostile;
            attacks   none; scale:10; scale:1000; flip (×−1); random (Gaussian of each tensor's RMS)
            defences  none (robust off: no norm bound, no weight cap, the mean); norm bound (the
                      default: 5 × the lower-median RMS, clip; weights capped at half); median,
                      trimmedMean (0.2), multiKrum (f = 1), each alone (bound and cap off)
  default   the heterogeneous default method (the calibrated bridge + pool ensemble arm of the
            heterogeneity benchmark) on its S2 (one client per model: MiniLM-L3 edge, MiniLM-L6
            clinic, MPNet hospital, SmolLM2 bank) on TREC-6, 6 rounds × 20 steps, client `edge`
            hostile: what it sends is the bridge's update, its own family's, and its
            probabilities on the public pool, which every client distils from;
            attacks   none; scale:1000; flip; pool (pool.probs one-hot on class 0 for every text,
                      pool.counts all on class 0: the client's whole weight on one class of the
                      ensemble)
            defences  none (as above); norm bound; norm bound and the pool's ensemble
                      weighted by agreement (`distillation.poolWeighting: agreement`); counts:
                      the same settings as norm bound, run with a build that replaces each
                      client's reported class counts by its partition's (`--binary`/`--trainer`
                      of commit 2e61c68 or later; the other columns ran on 7391226, before it)

The hostile client (scripts/bench/attack_trainer.py) rewrites its update after training:
well-formed, right shapes, correct sha256. Each (attack, defence) is one `bench_methods.py` run
tagged `byz-<attack>-<defence>` in <work>/results.jsonl (resumable); this script then writes the
table into the federation's block of docs/benchmarks.md and copies the results to its data file.

    scripts/bench_byzantine.py --binary target/release/heterotune --trainer target/release/heterotune-trainer
    scripts/bench_byzantine.py --federation default --binary … --trainer …
    scripts/bench_byzantine.py --report-only [--federation default]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench.results import cpus  # noqa: E402
from bench.spec import BRIDGE_CAL, SMALLEST_COMMON  # noqa: E402

OFF = {"normBoundMultiple": 0.0, "maxExamplesShare": 1.0}
LABELS = {"none": "none", "x10": "×10", "x1000": "×1000", "flip": "sign flip", "random": "random",
          "pool": "pool poisoning", "norm-bound": "norm bound (default)", "median": "median",
          "trimmed-mean": "trimmed mean 0.2", "multi-krum": "multi-Krum f=1",
          "agreement": "norm bound + agreement-weighted pool",
          "counts": "norm bound + class counts from the partition (the default)"}


@dataclass(frozen=True)
class Federation:
    """One federation of the benchmark: what runs, who attacks, with what, against which defences
    (`aggregation.robust` values; `set` adds other spec fields), and where its results go."""
    name: str
    scenario: str
    task: str
    method: str
    attacker: str
    rounds: int
    title: str
    attacks: dict[str, str]
    defences: dict[str, dict]
    sets: dict[str, list[str]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def label(self, key: str) -> str:
        return self.labels.get(key) or LABELS.get(key, key)

    @property
    def block(self) -> tuple[str, str]:
        key = "byzantine" if self.name == "smallest" else f"byzantine-{self.name}"
        return f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"

    @property
    def work(self) -> Path:
        return ROOT / (".bench/byzantine" if self.name == "smallest" else f".bench/byzantine-{self.name}")

    @property
    def data(self) -> Path:
        stem = "bench-byzantine" if self.name == "smallest" else f"bench-byzantine-{self.name}"
        return ROOT / f"docs/data/{stem}.jsonl"


FEDERATIONS = {f.name: f for f in [
    Federation(
        "smallest", "S1", "trec", SMALLEST_COMMON, "edge-a", 12,
        "S1 TREC-6, smallest-common FedAvg: 8 clients on MiniLM-L3, seed 0, 12 rounds × 20 steps; "
        "client `edge-a` hostile in every round",
        {"none": "none", "x10": "scale:10", "x1000": "scale:1000", "flip": "flip", "random": "random"},
        {"none": {**OFF, "combine": "mean"}, "norm-bound": {},
         "median": {**OFF, "combine": "median"},
         "trimmed-mean": {**OFF, "combine": "trimmedMean", "trimFraction": 0.2},
         "multi-krum": {**OFF, "combine": "multiKrum", "byzantineClients": 1}}),
    Federation(
        "default", "S2", "trec", BRIDGE_CAL, "edge", 6,
        "S2 TREC-6, the heterogeneous default (calibrated bridge + pool ensemble): 4 clients, one per "
        "model, seed 0, 6 rounds × 20 steps; client `edge` (MiniLM-L3, the bridge's backbone) hostile "
        "in every round",
        {"none": "none", "x1000": "scale:1000", "flip": "flip", "pool": "pool"},
        {"none": {**OFF, "combine": "mean"}, "norm-bound": {}, "agreement": {}, "counts": {}},
        {"agreement": ["bridge.distillation.poolWeighting=agreement"]},
        {"norm-bound": "norm bound, reported class counts (before 2e61c68)"}),
]}
# The first federation's names, as the tests and older notes use them.
ATTACKER = FEDERATIONS["smallest"].attacker


def tag(attack: str, defence: str) -> str:
    return f"byz-{attack}-{defence}"


def cells(fed: Federation, only: str | None) -> list[tuple[str, str]]:
    """The (attack, defence) runs to make, in order: every one, or those `only` names
    (`attack/defence,…`, in that order)."""
    every = [(a, d) for a in fed.attacks for d in fed.defences]
    if not only:
        return every
    out = []
    for item in only.split(","):
        attack, _, defence = item.strip().partition("/")
        if (attack, defence) not in every:
            sys.exit(f"--cells {item!r}: use attack/defence with an attack of {list(fed.attacks)} "
                     f"and a defence of {list(fed.defences)}")
        out.append((attack, defence))
    return out


def run_all(args, fed: Federation) -> None:
    attack_trainer = ROOT / "scripts/bench/attack_trainer.py"
    for attack, defence in cells(fed, args.cells):
        mode, robust = fed.attacks[attack], fed.defences[defence]
        env = {**os.environ, "HETEROTUNE_ATTACK_TRAINER": str(Path(args.trainer).resolve()),
               "HETEROTUNE_ATTACK_CLIENT": fed.attacker, "HETEROTUNE_ATTACK": mode}
        cmd = [sys.executable, str(ROOT / "scripts/bench_methods.py"), "--scenarios", fed.scenario,
               "--tasks", fed.task, "--methods", fed.method, "--seeds", "0", "--work", str(args.work),
               "--rounds", str(fed.rounds),
               "--binary", args.binary, "--trainer", str(attack_trainer), "--no-plots",
               "--docs", str(args.work / "heterogeneity-block.md"), "--keep-going",
               "--tag", tag(attack, defence), "--set", "aggregation.robust=" + json.dumps(robust)]
        for extra in fed.sets.get(defence, []):
            cmd += ["--set", extra]
        print(f"== {fed.name}: attack {attack}, defence {defence}", flush=True)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def load(path: Path) -> dict[str, dict]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("tag", "").startswith("byz-"):
                    out[r["tag"]] = r
    return out


def honest(record: dict, attacker: str) -> float:
    return statistics.mean(c["accuracy"] for c in record["result"]["clients"] if c["name"] != attacker)


def render(records: dict[str, dict], fed: Federation = FEDERATIONS["smallest"]) -> str:
    when = sorted({r.get("measured_on", "") for r in records.values()} - {""})
    clients = next((len(r["result"]["clients"]) for r in records.values()), 0)
    lines = [
        f"Generated by `scripts/bench_byzantine.py --federation {fed.name}` ({fed.title}). "
        f"Runs from {', '.join(when) or '–'} on {cpus(records.values())}. Do not edit by hand.",
        "",
        f"Mean final accuracy of the {max(clients - 1, 0) or 'honest'} honest clients on the global test "
        "set; in brackets the difference in points from the all-honest run under the same defence.",
        "",
        "| attack | " + " | ".join(fed.label(d) for d in fed.defences) + " |",
        "|---|" + "---|" * len(fed.defences),
    ]
    for attack in fed.attacks:
        cells = []
        for defence in fed.defences:
            r = records.get(tag(attack, defence))
            clean = records.get(tag("none", defence))
            if r is None:
                cells.append("not run")
                continue
            value = honest(r, fed.attacker)
            cell = f"{value:.3f}"
            if attack != "none" and clean is not None:
                cell += f" ({(value - honest(clean, fed.attacker)) * 100:+.1f})".replace("-", "−")
            cells.append(cell)
        lines.append(f"| {fed.label(attack)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_docs(docs: Path, block: str, fed: Federation = FEDERATIONS["smallest"]) -> None:
    begin, end = fed.block
    text = docs.read_text()
    body = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        sys.exit(f"{docs}: no {begin} … {end} block to fill")
    docs.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--federation", choices=list(FEDERATIONS), default="smallest")
    p.add_argument("--binary", default=str(ROOT / "target/release/heterotune"))
    p.add_argument("--trainer", default=str(ROOT / "target/release/heterotune-trainer"))
    p.add_argument("--work", type=Path, help="results and runs (default: .bench/byzantine[-<federation>])")
    p.add_argument("--docs", type=Path, default=ROOT / "docs/benchmarks.md")
    p.add_argument("--data", type=Path, help="the data file (default: docs/data/bench-byzantine[-<federation>].jsonl)")
    p.add_argument("--cells", help="only these runs, in this order: attack/defence,… (default: all)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    fed = FEDERATIONS[args.federation]
    args.work = args.work or fed.work
    args.data = args.data or fed.data
    if not args.report_only:
        run_all(args, fed)
    results = args.work / "results.jsonl"
    records = load(results)
    if not args.report_only or not args.data.exists():
        args.data.parent.mkdir(parents=True, exist_ok=True)
        if results.exists():
            shutil.copyfile(results, args.data)
    records = records or load(args.data)
    block = render(records, fed)
    update_docs(args.docs, block, fed)
    print(block)


if __name__ == "__main__":
    main()
