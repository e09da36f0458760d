"""What one run's report.json says, per client, and the resumable results file (JSON lines).

A result (one run) is:

    {"clients": [{"name", "home", "model", "accuracy", "variants"?, "served"?, "local_accuracy",
                  "bytes_up", "train_seconds", "peak_rss"}], "total_seconds", "round_seconds"}

- `accuracy`: the client's final global-model accuracy (report.json `finalEvaluation[i].accuracy`:
  the last aggregated state evaluated on the fixed global test set, the primary figure);
  `variants`: that record's `variants` map when the run serves more than one model (the bridge:
  `own`, `bridge`, `ensemble`); `served`: which of them the client served (`serve: auto` reads
  the client's validation split);
- `home`: the model the client's hardware runs in the scenario; `model`: the model it ran in this
  run (they differ only for smallest-common FedAvg, where every client runs the smallest model);
- `bytes_up`: mean over rounds of `rounds[].clients[].bytesUploaded`; `train_seconds`: mean over
  rounds of `trainSeconds` (client compute per round); `peak_rss`: max of `peakRssBytes`;
- `local_accuracy`: after the client's local training in the last round (kept, not tabulated).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from .spec import RunKey


def family_model(key: str) -> str:
    """report.json family keys are `<model dir>.<hash6>`."""
    return key.rsplit(".", 1)[0] if "." in key else key


def summarise(report: dict, homes: dict[str, str]) -> dict:
    """Per-client figures of one run; `homes` maps client name -> home model key."""
    per: dict[str, dict] = {}
    expected = {ev["client"] for ev in report.get("finalEvaluation", [])}
    for rnd in report.get("rounds", []):
        missing = expected - set(rnd.get("participants") or expected)
        if missing or rnd.get("excluded"):
            raise ValueError(f"round {rnd.get('round')} lost clients {sorted(missing)} "
                             f"(excluded: {rnd.get('excluded')}): every method must train every "
                             "client every round; rerun it on a less busy machine")
        for c in rnd.get("clients", []):
            p = per.setdefault(c["name"], {"bytes": [], "train": [], "rss": [], "local": None,
                                           "model": family_model(c["family"])})
            p["bytes"].append(c.get("bytesUploaded") or 0)
            if c.get("trainSeconds") is not None:
                p["train"].append(c["trainSeconds"])
            if c.get("peakRssBytes") is not None:
                p["rss"].append(c["peakRssBytes"])
            p["local"] = c.get("testAccuracy")
    clients = []
    for ev in report.get("finalEvaluation", []):
        name = ev["client"]
        p = per.get(name, {"bytes": [], "train": [], "rss": [], "local": None})
        row = {
            "name": name,
            "home": homes.get(name, family_model(ev["family"])),
            "model": family_model(ev["family"]),
            "accuracy": ev["accuracy"],
            "local_accuracy": p["local"],
            "bytes_up": statistics.mean(p["bytes"]) if p["bytes"] else None,
            "train_seconds": statistics.mean(p["train"]) if p["train"] else None,
            "peak_rss": max(p["rss"]) if p["rss"] else None,
        }
        if isinstance(ev.get("variants"), dict):
            row["variants"] = {k: float(v) for k, v in ev["variants"].items()}
        if isinstance(ev.get("served"), str):
            row["served"] = ev["served"]
        clients.append(row)
    if not clients:
        raise ValueError("report.json has no finalEvaluation records")
    durations = [r["durationSeconds"] for r in report.get("rounds", [])]
    dtypes = sorted({d for f in report.get("families", []) for d in f.get("dtypesRun", [])})
    return {
        "clients": clients,
        "dtypes": dtypes,
        "total_seconds": report.get("totalSeconds"),
        "round_seconds": statistics.median(durations[1:] if len(durations) > 1 else durations)
        if durations else None,
    }


def load(path: Path) -> dict[RunKey, dict]:
    """The results file as {key: record}; lines of another layout (the 6-client method table's
    `{method, seed, rounds, tag, result}`) are skipped, a later line for a key wins."""
    out: dict[RunKey, dict] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "scenario" not in r or "clients" not in r.get("result", {}):
            continue
        key = RunKey(r["scenario"], r["task"], r["method"], r["seed"], r["rounds"], r["steps"],
                     r.get("tag", ""))
        out[key] = r
    return out


# Records made before runs named their CPU: every one of them ran on the project's first bench
# machine.
EARLIER_CPU = "AMD EPYC (2 cores), avx512_bf16"


def cpu_model() -> str:
    """This machine's CPU, as /proc/cpuinfo names it, and whether it computes bf16 natively."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    units = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({os.cpu_count()} cores), {' + '.join(units) if units else 'no bf16 units'}"


def cpus(records) -> str:
    """The CPUs the records ran on, in order of first appearance."""
    seen: list[str] = []
    for r in records:
        cpu = r.get("cpu") or EARLIER_CPU
        if cpu not in seen:
            seen.append(cpu)
    return "; ".join(seen) or "–"


def append(path: Path, key: RunKey, result: dict, wall_seconds: float, measured_on: str = "",
           cpu: str = "") -> dict:
    cpu = cpu or cpu_model()
    if result.get("dtypes"):
        # What `dtype: auto` became: the same CPU ran bfloat16 before the trainer timed its GEMMs
        # (2026-12-07) and may run float32 after, so rows differing in it are marked apart.
        cpu += f"; ran {' + '.join(result['dtypes'])}"
    record = {**key.as_dict(), "wall_seconds": wall_seconds, "measured_on": measured_on,
              "cpu": cpu, "result": result}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record
