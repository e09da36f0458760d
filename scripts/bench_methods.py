#!/usr/bin/env python3
"""The heterogeneity benchmark: the capacity ladder, the deployable baselines, HeteroTune's methods.

Runs `heterotune run` for every scenario x task x method x seed and regenerates the block of
docs/benchmarks.md between `<!-- bench:heterogeneity:begin -->` and `<!-- bench:heterogeneity:end -->`
(tables) and docs/img/bench-*.png (figures). Issue 13, part 4.

Scenarios (clients built here; task, training and adapter settings from examples/quickstart.yaml):
  S1  ladder of 8 clients: 2 x paraphrase-MiniLM-L3-v2, 2 x all-MiniLM-L6-v2, 2 x all-mpnet-base-v2,
      2 x SmolLM2-135M-Instruct (top-6 window); Dirichlet alpha 0.5
  S2  one client per model (4 clients), alpha 0.5
  S3  S1 with alpha 0.1
Tasks: trec (TREC-6, the quickstart's) and movie (binary sentiment derived from the cached VADER
movie ratings into <work>/data: |score| < 0.5 dropped as ambiguous, neg/pos by sign).
Methods (--methods, comma-separated labels): local-only; smallest-common FedAvg (every client on
the scenario's smallest model, fedavg); family-FedAvg; HetLoRA and FlexLoRA (LoRA, ranks 4/8/16/16
by capacity; at the shared learning rate and at a LoRA one, 0.001); DeMA+FedAvg; DeMA+CMGA
(PCGrad); the bridge arms (fedavg + a bridge model; scripts/bench/spec.py lists them all).

A seed sets the partition seed and the training seed; the split, hence the global test set, is
fixed. The primary figure is each client's final global-model accuracy (report.json
finalEvaluation[].accuracy), averaged over clients.

    scripts/bench_methods.py                      # everything: 3 scenarios x 2 tasks x 8 methods x 3 seeds
    scripts/bench_methods.py --scenarios S2 --tasks trec --methods 'DeMA+FedAvg,family-FedAvg'
    scripts/bench_methods.py --scenarios s1 --methods bridge-ensemble,dema-cmga-pcgrad   # slugs work too
    scripts/bench_methods.py --report-only        # tables and figures from the results file
    scripts/bench_methods.py --quick              # smoke test of the whole pipeline (~1 minute)
    scripts/bench_methods.py --set training.maxGradNorm=0 --tag noclip   # a setting, side by side

Results are appended as JSON lines to <work>/results.jsonl, keyed by scenario, task, method,
seed, rounds, local steps and tag: an interrupted benchmark resumes where it stopped. Needs the
release binaries (cargo build --release --bins) and the asset cache (scripts/setup.sh).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import analysis, results  # noqa: E402
from bench.spec import (METHODS, SCENARIOS, SMALLEST_COMMON, TASKS, VADER_RULE, RunKey,  # noqa: E402
                        build_spec, dataset_for, slug)

QUICK = {"scenarios": "S2", "tasks": "trec", "methods": f"{SMALLEST_COMMON},DeMA+FedAvg", "seeds": "0",
         "rounds": 1, "steps": 2, "max_test_examples": 50, "default_method": "DeMA+FedAvg"}


def parse_override(text: str) -> tuple[str, object]:
    """`training.maxGradNorm=0` -> ("training.maxGradNorm", 0) (the value as YAML); a
    segment `clients[*]` sets the field on every client."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: use PATH=VALUE under spec, e.g. training.maxGradNorm=0")
    path, value = text.split("=", 1)
    return path.strip(), yaml.safe_load(value)


def split_list(text: str, known, what: str) -> list:
    """Comma-separated items; with `known`, each is a known name or its slug (`dema-cmga-pcgrad`
    for `DeMA+CMGA (PCGrad)`, `s1` for `S1`)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if known is None:
        return items
    by_slug = {slug(k): k for k in known}
    out = []
    for x in items:
        name = x if x in known else by_slug.get(slug(x))
        if name is None:
            sys.exit(f"--{what}: unknown {x!r}; use: {', '.join(known)} (or their slugs: {', '.join(by_slug)})")
        out.append(name)
    return out


def run_one(binary: Path, trainer: Path, spec: dict, key: RunKey, work: Path, threads: int | None) -> tuple[dict, float]:
    name = spec["metadata"]["name"]
    spec_file = work / "specs" / f"{name}.yaml"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    report_dir = work / "reports" / name
    cmd = [str(binary), "--log-format", "json", "run", "-f", str(spec_file), "--fresh",
           "--trainer", str(trainer), "--work-dir", str(work / "work"), "--report-dir", str(report_dir)]
    if threads:
        cmd += ["--threads", str(threads)]
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with log.open("w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=work)
    wall = time.time() - started
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-5:])
        raise RuntimeError(f"{name} failed (exit {code}), see {log}:\n{tail}")
    report = json.loads((report_dir / "report.json").read_text())
    homes = dict(SCENARIOS[key.scenario].clients())
    try:
        return results.summarise(report, homes), wall
    except ValueError as e:
        raise RuntimeError(f"{name}: {e}") from e


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def setting_text(base: dict, args, seeds: list[int], records: dict) -> str:
    b = base["spec"]
    tr, ad = b["training"], b["adapter"]
    when = sorted({r.get("measured_on", "") for r in records.values()} - {""})
    overrides = (f"; setting `{args.tag}`" + (": " + ", ".join(f"`{p}={v}`" for p, v in args.overrides)
                                              if args.overrides else "")) if args.tag else ""
    mte = args.max_test_examples or b["task"].get("maxTestExamples")
    return "\n".join([
        f"Generated by `scripts/bench_methods.py` from `{_rel(args.results)}` (commit {git_commit()}, "
        f"runs from {', '.join(when) or '–'}; CPU: {results.cpus(records.values())}). "
        "Do not edit by hand.",
        "",
        f"Every run: {args.rounds} rounds × {args.steps} local steps, batch {tr['batchSize']}, "
        f"≤ {tr['maxSeqLength']} tokens, lr {tr['learningRate']} (head {tr['headLearningRate']}), "
        f"DeMA r {ad.get('rank')}, K {ad.get('experts')}, S {ad.get('slots')}; every client in every round; "
        f"seeds {', '.join(map(str, seeds))} (a seed sets the partition and training seeds; the split, "
        f"hence the global test set (≤ {mte} examples), is fixed){overrides}. "
        "Accuracy: each client's **final global model** on the global test set "
        "(report.json `finalEvaluation[].accuracy`), mean over clients (\"all clients\") or over the clients "
        "of one model (their home model: under smallest-common FedAvg every client runs MiniLM-L3 on the "
        "same hardware); mean ± population std over seeds. Differences are paired by seed, in points. "
        "The best deployable baseline is the best by mean of smallest-common FedAvg (the pool's examples "
        "labelled in its clients' data, or held out as in the pool arms), smallest-common FedDF (the same "
        "public pool, the ensemble of the clients' MiniLM-L3 models teaching on it), family-FedAvg, "
        "HetLoRA and FlexLoRA (LoRA ranks 4 / 8 / 16 / 16 for MiniLM-L3 / MiniLM-L6 / MPNet / SmolLM2), "
        "each at the shared learning rate and at a LoRA one (0.001: at 0.003 the rank-16 MPNet client's "
        "LoRA diverged, its validation accuracy falling from 0.95 to 0.49 in round 3), and the "
        "smallest-common arms with logit adjustment or an agreement-weighted pool ensemble, among the "
        "baselines run on the most seeds (up to 3). "
        + ("The default method (judged by the per-client table and the targets) is the quickstart's, "
           "Bridge + pool (FedDF ensemble) calibrated, in each group where it has been run on as many seeds "
           "as the bridge arm it replaced (else that arm)." if args.default_method == "auto"
           else f"The default method (judged by the per-client table and the targets): {args.default_method}."),
        "",
        f"Second task: {VADER_RULE}; written to the benchmark's work folder as JSONL.",
        "",
        "Regenerate: `scripts/bench_methods.py` (3 scenarios × 2 tasks × 8 methods × 3 seeds, resumable; "
        "`--scenarios`, `--tasks`, `--methods`, `--seeds` for a slice, `--report-only` for these tables from "
        "the results file). The 6-client method table further down is the earlier quickstart-federation "
        "benchmark.",
    ])


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def regenerate(base: dict, args, records: dict, seeds: list[int], docs: Path, img_dir: Path) -> None:
    groups = analysis.group(records)
    images: dict = {}
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("matplotlib is missing (pinned in scripts/requirements.txt: run scripts/setup.sh), "
                     "or pass --no-plots")
        from bench import plots

        for k, figs in plots.draw(groups, args.default_method, img_dir).items():
            images[k] = [(os.path.relpath(p, docs.parent), cap) for p, cap in figs]
    block = analysis.render(groups, args.default_method, setting_text(base, args, seeds, records), images)
    text = docs.read_text() if docs.exists() else ""
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(analysis.update_block(text, block))
    print(block)
    print(f"wrote {docs}" + (f" and {sum(len(v) for v in images.values())} figures under {img_dir}" if images else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated labels of: " + ", ".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=20, help="local steps per round")
    p.add_argument("--max-test-examples", type=int, default=None, help="override task.maxTestExamples")
    p.add_argument("--default-method", default="auto",
                   help="the method the per-client table and the targets judge; auto: the bridge where "
                        "measured, else the quickstart's DeMA+CMGA (PCGrad)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: S2, trec, smallest-common FedAvg and DeMA+FedAvg (judged as the default), "
                        "seed 0, 1 round x 2 steps, 50 test examples; work, docs and figures under .bench/quick")
    p.add_argument("--report-only", action="store_true", help="regenerate the docs block from the results file")
    p.add_argument("--spec", default=str(ROOT / "examples/quickstart.yaml"))
    p.add_argument("--work", default=None, help="default .bench/heterogeneity (.bench/quick with --quick)")
    p.add_argument("--docs", default=None, help="default docs/benchmarks.md (<work>/benchmarks.md with --quick)")
    p.add_argument("--img-dir", default=None, help="default docs/img (<work>/img with --quick)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="libtorch threads per trainer")
    p.add_argument("--binary", default=str(ROOT / "target/release/heterotune"))
    p.add_argument("--trainer", default=str(ROOT / "target/release/heterotune-trainer"))
    p.add_argument("--cache", default=os.environ.get("HETEROTUNE_CACHE", str(Path.home() / ".cache/heterotune")))
    p.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                   metavar="PATH=VALUE", help="override a spec field for every run (repeatable)")
    p.add_argument("--tag", default="", help="names the runs of this setting (needed with --set)")
    p.add_argument("--keep-going", action="store_true", help="record a failed run and go on with the others")
    args = p.parse_args()
    if (args.overrides or args.max_test_examples) and not args.tag and not args.quick:
        sys.exit("--set and --max-test-examples need --tag (the runs of another setting must not share "
                 "names or results)")
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
        args.tag = args.tag or "quick"
    work = Path(args.work or ROOT / (".bench/quick" if args.quick else ".bench/heterogeneity")).resolve()
    docs = Path(args.docs or (work / "benchmarks.md" if args.quick else ROOT / "docs/benchmarks.md"))
    img_dir = Path(args.img_dir or (work / "img" if args.quick else ROOT / "docs/img"))
    args.results = work / "results.jsonl"

    scenarios = split_list(args.scenarios, SCENARIOS, "scenarios")
    tasks = split_list(args.tasks, TASKS, "tasks")
    methods = split_list(args.methods, METHODS, "methods")
    seeds = [int(s) for s in split_list(args.seeds, None, "seeds")]
    base = yaml.safe_load(Path(args.spec).read_text())
    work.mkdir(parents=True, exist_ok=True)
    records = results.load(args.results)

    def wanted(k: RunKey) -> bool:
        return (k.rounds, k.steps, k.tag) == (args.rounds, args.steps, args.tag) and k.scenario in scenarios \
            and k.task in tasks and k.seed in seeds

    if not args.report_only:
        binary, trainer = Path(args.binary).resolve(), Path(args.trainer).resolve()
        for b in (binary, trainer):
            if not b.is_file():
                sys.exit(f"{b} is missing: run `cargo build --release --bins` first")
        failed = []
        for task in tasks:
            dataset = dataset_for(task, base["spec"]["task"]["dataset"], work / "data", Path(args.cache))
            for scenario in scenarios:
                for seed in seeds:
                    for m in methods:
                        key = RunKey(scenario, task, m, seed, args.rounds, args.steps, args.tag)
                        if key in records:
                            continue
                        spec = build_spec(base, key, dataset, work / "store", args.overrides, args.max_test_examples)
                        print(f"== {scenario} {task} {m}, seed {seed}, {args.rounds} x {args.steps} ...", flush=True)
                        try:
                            res, wall = run_one(binary, trainer, spec, key, work, args.threads)
                        except RuntimeError as e:
                            if not args.keep_going:
                                sys.exit(str(e))
                            print(e, flush=True)
                            failed.append(key)
                            continue
                        rec = results.append(args.results, key, res, wall, datetime.date.today().isoformat())
                        records[key] = rec
                        accs = ", ".join(f"{c['name']} {c['accuracy']:.3f}" for c in res["clients"])
                        print(f"   {analysis.overall(res):.3f} ({accs}); {wall:.0f} s", flush=True)
        if failed:
            print(f"{len(failed)} runs failed: " + "; ".join(f"{k.scenario} {k.task} {k.method} s{k.seed}"
                                                            for k in failed))
    regenerate(base, args, {k: r for k, r in records.items() if wanted(k)}, seeds, docs, img_dir)


if __name__ == "__main__":
    main()
