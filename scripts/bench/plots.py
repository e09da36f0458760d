"""The PNG figures of the docs block (matplotlib, pinned in scripts/requirements.txt, Agg backend).

Per scenario and task:
- `bench-<scenario>-<task>-accuracy.png`: final global-model accuracy per method, mean ± std over
  seeds, for all clients and per home model (the primary figure);
- `bench-<scenario>-<task>-paired.png`: every method's paired difference per seed against the best
  deployable baseline, with the +4.6 target;
- `bench-<scenario>-<task>-clients.png`: each client's accuracy under the default method next to
  the best it gets from any alternative.
"""

from __future__ import annotations

from pathlib import Path

from . import analysis
from .spec import MODEL_ORDER, model_label


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, out: Path) -> Path:
    """The figures' common finish: a light y grid, tight layout, written to `out`, closed."""
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def accuracy_figure(runs: dict, default: str, title: str, out: Path) -> Path:
    plt = _pyplot()
    methods = analysis.ordered(runs)
    homes = [m for m in MODEL_ORDER if any(c["home"] == m for r in runs[methods[0]].values()
                                           for c in r["clients"])]
    series = [("all clients", None)] + [(model_label(m), m) for m in homes]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(methods) + 2), 4.2), dpi=110)
    for i, (label, model) in enumerate(series):
        means, stds = [], []
        for m in methods:
            vals = [analysis.overall(r) if model is None else analysis.by_model(r, model)
                    for r in runs[m].values()]
            ms = analysis.mean_std(vals)
            means.append(ms[0] if ms else 0.0)
            stds.append(ms[1] if ms else 0.0)
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(methods))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=label,
               color="black" if model is None else None, alpha=0.85 if model is None else 0.7)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([("★ " if m == default else "") + m for m in methods], rotation=25, ha="right",
                       fontsize=8)
    ax.set_ylabel("final global-model accuracy")
    ax.set_ylim(0, 1.15)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=len(series), loc="upper center", frameon=False)
    return _save(plt, fig, ax, out)


def clients_figure(runs: dict, default: str, title: str, out: Path) -> Path | None:
    rows = analysis.per_client(runs, default)
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(rows) + 2), 3.8), dpi=110)
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r.default for r in rows], 0.4, label=default)
    ax.bar([x + 0.2 for x in xs], [r.alt or 0.0 for r in rows], 0.4, label="best alternative")
    for x, r in zip(xs, rows):
        if r.best_alt:
            ax.text(x + 0.2, (r.alt or 0) + 0.01, r.best_alt, rotation=90, fontsize=6, ha="center",
                    va="bottom")
        if r.flagged:
            ax.text(x - 0.2, r.default + 0.01, "!", color="red", ha="center", fontsize=10)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r.name}\n{model_label(r.home)}" for r in rows], fontsize=7)
    ax.set_ylabel("final accuracy")
    ax.set_ylim(0, 1.25)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _save(plt, fig, ax, out)


def paired_figure(runs: dict, default: str, title: str, out: Path) -> Path | None:
    """Per-seed paired differences (points) of every method against the best deployable baseline,
    with the issue's +4.6 target line."""
    best = analysis.best_deployable(runs)
    methods = [m for m in analysis.ordered(runs) if m != best and analysis.paired(runs, m, best)] if best else []
    if not methods:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(methods) + 2), 3.8), dpi=110)
    for j, m in enumerate(methods):
        p = analysis.paired(runs, m, best)
        ds = [d for _, d in p]
        ax.scatter([j] * len(ds), ds, s=18, color="C3" if m == default else "C0", zorder=3)
        mean = sum(ds) / len(ds)
        ax.plot([j - 0.3, j + 0.3], [mean, mean], color="black", lw=1.5, zorder=2)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(analysis.TARGET_OVER_DEPLOYABLE, color="C2", lw=0.8, ls="--",
               label=f"target +{analysis.TARGET_OVER_DEPLOYABLE}")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([("★ " if m == default else "") + m for m in methods], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(f"points vs {best}\n(per seed; bar = mean)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return _save(plt, fig, ax, out)


def draw(groups: analysis.Groups, requested: str, img_dir: Path) -> dict[tuple[str, str], list[tuple[Path, str]]]:
    """All figures; {(scenario, task): [(png, caption)]}. `requested`: the default method, or
    `auto` (resolved in each group)."""
    out: dict[tuple[str, str], list[tuple[Path, str]]] = {}
    for (sc, tk), runs in groups.items():
        if not runs:
            continue
        default = analysis.resolve_default(runs, requested)
        base = img_dir / f"bench-{sc.lower()}-{tk}"
        figs = [(accuracy_figure(runs, default, f"{sc}, {tk}: final global-model accuracy (mean ± std over seeds)",
                                 base.with_name(base.name + "-accuracy.png")),
                 f"{sc} {tk}: accuracy per method")]
        pd = paired_figure(runs, default, f"{sc}, {tk}: paired differences vs the best deployable baseline",
                           base.with_name(base.name + "-paired.png"))
        if pd:
            figs.append((pd, f"{sc} {tk}: paired differences per seed"))
        c = clients_figure(runs, default, f"{sc}, {tk}: each client under {default} vs its best alternative",
                           base.with_name(base.name + "-clients.png"))
        if c:
            figs.append((c, f"{sc} {tk}: per client"))
        out[(sc, tk)] = figs
    return out
