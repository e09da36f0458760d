"""Tables, paired differences, the per-client table and the issue's targets, from results.

Everything here works on plain dicts (see `results.py` for one run's result), so it is tested on
synthetic results without running a model. Accuracies are fractions; differences are in points
(100 × fraction). "± std" is the population standard deviation over seeds.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .results import EARLIER_CPU
from .spec import (BRIDGE, BRIDGE_CAL, BRIDGE_ENSEMBLE, BRIDGE_MODEL, BRIDGE_POOL, BRIDGE_VALIDATED, BRIDGE_VARIANTS, DEPLOYABLE, FAMILY_FEDAVG, METHODS, MODEL_ORDER, NOT_RUN,
                   SCENARIOS, SHIPPED_DEFAULT, TASKS, RunKey, model_label)

# Issue 13's targets (points of mean global-test accuracy, paired over seeds).
TARGET_OVER_DEPLOYABLE = 4.6
TARGET_OVER_FAMILY = 3.0
TARGET_CLIENT_SLACK = 1.0
EPS = 1e-9  # points: a difference that is exactly on a target meets it (float noise aside)
METHOD_ORDER = list(METHODS) + [label for v in BRIDGE_VARIANTS.values() for label in v.values()]

# groups[(scenario, task)][method][seed] = result (with "wall_seconds")
Groups = dict[tuple[str, str], dict[str, dict[int, dict]]]


def group(records: dict[RunKey, dict]) -> Groups:
    """Records of one setting (rounds, steps, tag) by scenario and task, method, seed; the
    bridge's served variants become rows of their own."""
    out: Groups = {}
    for key, rec in records.items():
        res = dict(rec["result"], wall_seconds=rec.get("wall_seconds"), cpu=rec.get("cpu") or EARLIER_CPU)
        out.setdefault((key.scenario, key.task), {}).setdefault(key.method, {})[key.seed] = res
    for runs in out.values():
        serve_auto(runs)
        expand_variants(runs)
    return out


def serve_auto(runs: dict[str, dict[int, dict]]) -> None:
    """Bridge + pool runs serve `auto`: the ensemble, and the bridge for a client whose home model
    is the bridge's backbone (`ServedModel::choose`). Runs that served the ensemble everywhere get
    that rule applied to their variants: the same evaluations."""
    for res in runs.get(BRIDGE_POOL, {}).values():
        for c in res["clients"]:
            v = c.get("variants") or {}
            if "bridge" in v and "ensemble" in v:
                c["served"] = auto_variant(c)
                c["accuracy"] = v[c["served"]]


def expand_variants(runs: dict[str, dict[int, dict]]) -> None:
    """Adds "Bridge: own model" / "Bridge: bridge model" from the bridge runs' per-client
    `variants` (same run, another served model: same bytes and compute)."""
    for method, variants in BRIDGE_VARIANTS.items():
        for seed, res in runs.get(method, {}).items():
            for variant, label in variants.items():
                picks = [auto_variant(c) if variant == "auto" else variant for c in res["clients"]]
                if all(p in c.get("variants", {}) for p, c in zip(picks, res["clients"])):
                    clients = [dict(c, accuracy=c["variants"][p], served=p)
                               for p, c in zip(picks, res["clients"])]
                    runs.setdefault(label, {})[seed] = dict(res, clients=clients, derived_from=method)


def auto_variant(client: dict) -> str:
    """What `serve: auto` serves (`ServedModel::choose`): the bridge for a client whose home model
    is the bridge's backbone, the ensemble elsewhere."""
    bridge_model = BRIDGE_MODEL["uri"].rsplit("/", 1)[-1]
    return "bridge" if client.get("home") == bridge_model else "ensemble"


def ordered(methods) -> list[str]:
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(m for m in methods if m not in METHOD_ORDER)


def overall(result: dict) -> float:
    """Mean final global-model accuracy over the run's clients."""
    return statistics.mean(c["accuracy"] for c in result["clients"])


def by_model(result: dict, model: str) -> float | None:
    """Mean over the clients whose hardware runs `model` (their home model)."""
    accs = [c["accuracy"] for c in result["clients"] if c["home"] == model]
    return statistics.mean(accs) if accs else None


def mean_std(values: list[float]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.mean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def fmt_acc(values: list[float]) -> str:
    ms = mean_std(values)
    if ms is None:
        return "–"
    if len([v for v in values if v is not None]) == 1:
        return f"{ms[0]:.3f}".lstrip("0")
    return f"{ms[0]:.3f}".lstrip("0") + "±" + f"{ms[1]:.3f}".lstrip("0")


def signed(x: float, digits: int = 1) -> str:
    if round(x, digits) == 0:
        x = 0.0
    return f"{x:+.{digits}f}".replace("-", "−")


def fmt_points(diffs: list[float]) -> str:
    ms = mean_std(diffs)
    if ms is None:
        return "–"
    return signed(ms[0]) + (f"±{ms[1]:.1f}" if len(diffs) > 1 else "")


def mean_overall(runs: dict[str, dict[int, dict]], method: str) -> float | None:
    rs = runs.get(method, {})
    return statistics.mean(overall(r) for r in rs.values()) if rs else None


def paired(runs: dict[str, dict[int, dict]], a: str, b: str) -> list[tuple[int, float]]:
    """(seed, points a − b) for the seeds both methods ran."""
    ra, rb = runs.get(a, {}), runs.get(b, {})
    return [(s, 100 * (overall(ra[s]) - overall(rb[s]))) for s in sorted(ra) if s in rb]


def best_deployable(runs: dict[str, dict[int, dict]], exclude: str | None = None) -> str | None:
    """The deployable baseline with the highest mean accuracy over its seeds, among those run on
    the most seeds (up to 3): a baseline on one lucky seed does not displace one measured on
    three."""
    ran = [m for m in DEPLOYABLE if m != exclude and runs.get(m)]
    if not ran:
        return None
    enough = min(3, max(len(runs[m]) for m in ran))
    return max((mean_overall(runs, m), m) for m in ran if len(runs[m]) >= enough)[1]


# The bridge arms the quickstart has shipped, newest first.
SHIPPED_BRIDGE_ARMS = (BRIDGE_CAL, BRIDGE_ENSEMBLE, BRIDGE_POOL, BRIDGE_VALIDATED, BRIDGE)


def resolve_default(runs: dict[str, dict[int, dict]], requested: str) -> str:
    """The default method judged in one (scenario, task) group. `auto`: the newest bridge arm the
    quickstart has shipped that was run here on as many seeds as any of them (so a new default
    measured on one seed does not replace one measured on three), else the method the quickstart
    shipped before the bridge."""
    if requested != "auto":
        return requested
    counts = {m: len(runs.get(m, {})) for m in SHIPPED_BRIDGE_ARMS}
    most = max(counts.values())
    if most == 0:
        return SHIPPED_DEFAULT
    return next(m for m in SHIPPED_BRIDGE_ARMS if counts[m] == most)


@dataclass
class ClientRow:
    name: str
    home: str
    default: float          # mean over the default's seeds
    best_alt: str | None    # the alternative that does best for this client (paired seeds)
    alt: float | None       # its mean over the seeds both ran
    delta: float | None     # points: default − alternative on those seeds
    served: str = ""        # what the client served under the default, over its seeds

    @property
    def flagged(self) -> bool:
        return self.delta is not None and self.delta < -TARGET_CLIENT_SLACK - EPS


def per_client(runs: dict[str, dict[int, dict]], default: str) -> list[ClientRow]:
    """Each client's final accuracy under `default` next to the best it gets from any other
    method (its own model's bridge variants excluded: they are the same federation)."""
    d = runs.get(default, {})
    if not d:
        return []
    alts = [m for m in runs if m != default
            and not any(r.get("derived_from") == default for r in runs[m].values())]
    rows = []
    names = [(c["name"], c["home"]) for c in d[next(iter(d))]["clients"]]
    for name, home in names:
        def acc(res):
            return next((c["accuracy"] for c in res["clients"] if c["name"] == name), None)

        mine = [acc(r) for r in d.values()]
        best = None
        for m in alts:
            seeds = [s for s in d if s in runs[m] and acc(runs[m][s]) is not None and acc(d[s]) is not None]
            if not seeds:
                continue
            alt_mean = statistics.mean(acc(runs[m][s]) for s in seeds)
            delta = 100 * statistics.mean(acc(d[s]) - acc(runs[m][s]) for s in seeds)
            if best is None or delta < best[2]:
                best = (m, alt_mean, delta)
        rows.append(ClientRow(name, home, statistics.mean(v for v in mine if v is not None),
                              *(best if best else (None, None, None)), served_counts(d.values(), name)))
    return rows


def served_counts(results, name: str) -> str:
    """"ensemble 2, own 1": which model a client served over the runs (`serve: auto` chooses on
    its validation split); empty when the runs do not say."""
    seen = [c["served"] for r in results for c in r["clients"] if c["name"] == name and c.get("served")]
    return ", ".join(f"{v} {seen.count(v)}" for v in sorted(set(seen), key=lambda v: (-seen.count(v), v)))


@dataclass
class Target:
    what: str
    value: float | None     # measured, points
    goal: float             # points
    seeds: int
    note: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "not measured"
        return "met" if self.value >= self.goal - EPS else "missed"

    @property
    def margin(self) -> float | None:
        return None if self.value is None else self.value - self.goal


def targets(runs: dict[str, dict[int, dict]], default: str, task: str) -> list[Target]:
    out = []
    best = best_deployable(runs, exclude=default)
    d_best = [x for _, x in paired(runs, default, best)] if best else []
    out.append(Target(f"{default} ≥ best deployable ({best or 'none measured'}) + {TARGET_OVER_DEPLOYABLE}",
                      statistics.mean(d_best) if d_best else None, TARGET_OVER_DEPLOYABLE, len(d_best)))
    d_fam = [x for _, x in paired(runs, default, FAMILY_FEDAVG)] if default != FAMILY_FEDAVG else []
    out.append(Target(f"{default} ≥ {FAMILY_FEDAVG} + {TARGET_OVER_FAMILY}",
                      statistics.mean(d_fam) if d_fam else None, TARGET_OVER_FAMILY, len(d_fam)))
    rows = [r for r in per_client(runs, default) if r.delta is not None]
    worst = min(rows, key=lambda r: r.delta) if rows else None
    out.append(Target(f"no client more than {TARGET_CLIENT_SLACK:g} point below its best alternative",
                      worst.delta if worst else None, -TARGET_CLIENT_SLACK, len(runs.get(default, {})),
                      f"worst: {worst.name} vs {worst.best_alt}" if worst else ""))
    if task != "trec":
        both = [v for v in (statistics.mean(d_best) if d_best else None,
                            statistics.mean(d_fam) if d_fam else None) if v is not None]
        out.append(Target("same ordering as TREC-6: default above the best deployable and family-FedAvg",
                          min(both) if len(both) == 2 else None, 0.0, min(len(d_best), len(d_fam))))
    return out


def compute_rows(runs: dict[str, dict[int, dict]]) -> list[tuple[str, str, int, float | None, float | None,
                                                                   float | None]]:
    """(method, model as run, clients, train s/round, peak RSS MiB, KB up per round) per method
    and model, over the method's seeds (derived rows are left out: same run)."""
    rows = []
    for m in ordered(runs):
        rs = list(runs[m].values())
        if not rs or rs[0].get("derived_from"):
            continue
        for model in MODEL_ORDER + sorted({c["model"] for r in rs for c in r["clients"]} - set(MODEL_ORDER)):
            cs = [c for r in rs for c in r["clients"] if c["model"] == model]
            if not cs:
                continue

            def mean_of(k):
                v = [c[k] for c in cs if c.get(k) is not None]
                return statistics.mean(v) if v else None

            rss = [c["peak_rss"] for c in cs if c.get("peak_rss") is not None]
            up = mean_of("bytes_up")
            rows.append((m, model, len(cs) // len(rs), mean_of("train_seconds"),
                         max(rss) / 2**20 if rss else None, up / 1000 if up is not None else None))
    return rows


def _num(v, fmt):
    return "–" if v is None else format(v, fmt)


def scenario_block(scenario: str, task: str, runs: dict[str, dict[int, dict]], default: str,
                   images: list[tuple[str, str]]) -> str:
    sc, tk = SCENARIOS[scenario], TASKS[task]
    methods = ordered(runs)
    seeds = sorted({s for m in methods for s in runs[m]})
    models = [m for m in MODEL_ORDER if any(c["home"] == m for r in runs[methods[0]].values()
                                             for c in r["clients"])] if methods else []
    best = best_deployable(runs)
    out = [f"### {scenario}, {tk.title}: {sc.title}", ""]
    out.append(f"Seeds {', '.join(map(str, seeds))}. Best deployable baseline here (by mean): "
               f"**{best or 'none measured'}**. Default method: **{default}**.")
    out.append("")
    for path, caption in images:
        out += [f"![{caption}]({path})", ""]
    head = ["method"] + [model_label(m) for m in models] + ["all clients", "− best deployable",
                                                            f"− {FAMILY_FEDAVG}", "KB up/client/round",
                                                            "wall s/run"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # The table's CPU is its first run's; a row with a run on another CPU is marked (and footnoted).
    table_cpu = next((r["cpu"] for m in methods for r in runs[m].values() if r.get("cpu")), None)
    elsewhere: dict[str, list[str]] = {}
    for m in methods:
        rs = runs[m]
        cells = [fmt_acc([by_model(r, mod) for r in rs.values()]) for mod in models]
        cells.append(fmt_acc([overall(r) for r in rs.values()]))
        cells.append(fmt_points([x for _, x in paired(runs, m, best)]) if best and m != best else "–")
        cells.append(fmt_points([x for _, x in paired(runs, m, FAMILY_FEDAVG)]) if m != FAMILY_FEDAVG else "–")
        ups = [c["bytes_up"] for r in rs.values() for c in r["clients"] if c.get("bytes_up") is not None]
        cells.append(f"{statistics.mean(ups) / 1000:.1f}" if ups else "–")
        walls = [r["wall_seconds"] for r in rs.values() if r.get("wall_seconds") is not None]
        cells.append(f"{statistics.mean(walls):.0f}" if walls and not rs[next(iter(rs))].get("derived_from")
                     else "(same run)" if walls else "–")
        name = f"**{m}**" if m == default else m
        other = sorted({r["cpu"] for r in rs.values() if r.get("cpu") and r["cpu"] != table_cpu})
        if other:
            name += " †"
            elsewhere[m] = other
        out.append("| " + " | ".join([name] + cells) + " |")
    for m in [m for m in METHODS if not runs.get(m)]:
        why = NOT_RUN.get(m, "not run on this scenario and task yet")
        out.append("| " + " | ".join([m, f"not run: {why}"] + [""] * (len(head) - 2)) + " |")
    out.append("")
    if elsewhere:
        out += [f"† Rows run, in part or whole, on another CPU than this table's ({table_cpu}): "
                + "; ".join(f"{m} on {', '.join(c)}" for m, c in elsewhere.items())
                + ". The same training can end several points apart on two CPUs (movie sentiment: "
                  "8.5 points once): compare such a row with the others with care.", ""]
    # paired differences per seed
    lines, seen = [], set()
    for m in methods:
        for ref in [best, FAMILY_FEDAVG]:
            if not ref or m == ref or (ref, m) in seen:
                continue
            seen.add((m, ref))
            p = paired(runs, m, ref)
            if not p:
                continue
            d = [x for _, x in p]
            lines.append(f"| {m} − {ref} | " + ", ".join(f"s{s} {signed(x)}" for s, x in p)
                         + f" | {signed(statistics.mean(d))} | {statistics.pstdev(d):.1f} | "
                         f"{signed(min(d))} … {signed(max(d))} |")
    if lines:
        out += ["Paired differences per seed (points of mean client accuracy):", "",
                "| pair | per seed | mean | std | range |", "|---|---|---|---|---|", *lines, ""]
    # per-client table
    rows = per_client(runs, default)
    if rows:
        out += [f"Per client: final accuracy under {default} (mean over seeds) next to the best it gets from "
                "any alternative (mean over the seeds both ran; Δ in points on those seeds; ⚠ = more than "
                f"{TARGET_CLIENT_SLACK:g} point worse off):", "",
                "| client | model | default | served (seeds) | best alternative | which | Δ | |",
                "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r.name} | {model_label(r.home)} | {r.default:.3f} | {r.served or '–'} | "
                       f"{_num(r.alt, '.3f')} | {r.best_alt or '–'} | "
                       f"{signed(r.delta) if r.delta is not None else '–'} | {'⚠' if r.flagged else ''} |")
        out.append("")
    else:
        out += [f"Per client: no runs of the default method ({default}) here.", ""]
    # compute and bytes
    crow = compute_rows(runs)
    if crow:
        run_models = [m for m in MODEL_ORDER if any(r[1] == m for r in crow)]
        run_models += sorted({r[1] for r in crow} - set(run_models))
        out += ["Client compute and traffic per model as run (the client's training seconds per round · "
                "peak RSS of its trainer process · bytes uploaded per round; under smallest-common FedAvg "
                "every client runs MiniLM-L3):", "",
                "| method | " + " | ".join(model_label(m) for m in run_models) + " |",
                "|---|" + "---|" * len(run_models)]
        cells: dict[str, dict[str, str]] = {}
        for m, model, _n, tsec, rss, kb in crow:
            cells.setdefault(m, {})[model] = (f"{_num(tsec, '.1f')} s · {_num(rss, '.0f')} MiB · "
                                              f"{_num(kb, '.1f')} KB")
        for m, row in cells.items():
            out.append(f"| {m} | " + " | ".join(row.get(mod, "–") for mod in run_models) + " |")
        out.append("")
    # targets
    out += ["Targets (issue 13):", "", "| target | measured | margin | seeds | status |", "|---|---|---|---|---|"]
    for t in targets(runs, default, task):
        meas = "–" if t.value is None else signed(t.value)
        marg = "–" if t.margin is None else signed(t.margin)
        note = f" ({t.note})" if t.note else ""
        out.append(f"| {t.what}{note} | {meas} | {marg} | {t.seeds} | {t.status} |")
    out.append("")
    return "\n".join(out)


def render(groups: Groups, requested: str, setting: str, images: dict[tuple[str, str], list]) -> str:
    """The generated docs block (without its markers); `requested`: the default method, or `auto`
    ([`resolve_default`] in each group)."""
    out = [setting, ""]
    if not groups:
        out.append("No results yet: run `scripts/bench_methods.py`.")
        return "\n".join(out) + "\n"
    order = {s: i for i, s in enumerate(SCENARIOS)} | {t: i for i, t in enumerate(TASKS)}
    for sc, tk in sorted(groups, key=lambda k: (order.get(k[0], 99), order.get(k[1], 99))):
        runs = groups[(sc, tk)]
        out.append(scenario_block(sc, tk, runs, resolve_default(runs, requested), images.get((sc, tk), [])))
    return "\n".join(out).rstrip() + "\n"


BEGIN = "<!-- bench:heterogeneity:begin -->"
END = "<!-- bench:heterogeneity:end -->"
SECTION = "## Heterogeneous federation: the ladder and the deployable baselines"


def update_block(text: str, block: str) -> str:
    """Replaces what lies between the markers; without markers, adds the section (title and
    markers) right after the document's first `# ` title."""
    body = f"{BEGIN}\n{block.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        return head + body + tail
    lines = text.splitlines(keepends=True)
    i = next((n for n, line in enumerate(lines) if line.startswith("# ")), None)
    section = f"{SECTION}\n\n{body}\n"
    if i is None:
        return f"# Benchmarks\n\n{section}" + ("\n" + text if text else "")
    return "".join(lines[: i + 1]) + "\n" + section + "".join(lines[i + 1:])
