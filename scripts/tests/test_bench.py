"""The heterogeneity benchmark (scripts/bench_methods.py, scripts/bench/): spec building, the
movie-sentiment derivation, report parsing, and the tables' maths on synthetic results. No model
runs here (scripts/test.sh runs `bench_methods.py --quick` once as the smoke test)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from bench import analysis, results
from bench.results import EARLIER_CPU
from bench.spec import (BRIDGE, BRIDGE_CAL, BRIDGE_ENSEMBLE, DEPLOYABLE, SMALLEST_FEDDF, SMALLEST_HELD_OUT, VADER_COUNTS, FAMILY_FEDAVG, FLEXLORA, HETLORA, LORA_LR, METHODS, MODELS, SCENARIOS,
                        SMALLEST_COMMON, TASKS, RunKey, build_spec, dataset_for, derive_vader_movie,
                        smallest_model)

ROOT = Path(__file__).resolve().parents[2]
L3, L6, MP, SM = "paraphrase-MiniLM-L3-v2", "all-MiniLM-L6-v2", "all-mpnet-base-v2", "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def base():
    return yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())


TREC = {"uri": "cache://data/trec/trec.jsonl", "format": "jsonl", "textField": "text", "labelField": "label"}


def spec(base, scenario="S1", method="DeMA+FedAvg", seed=3, task="trec", **kw):
    return build_spec(base, RunKey(scenario, task, method, seed, 12, 20), TREC, Path("/tmp/store"), **kw)["spec"]


# --- spec building ---------------------------------------------------------------------------------

def test_scenarios_are_the_ladder(base):
    s1 = spec(base, "S1")
    models = [c["model"]["uri"].rsplit("/", 1)[1] for c in s1["clients"]]
    assert models == [L3, L3, L6, L6, MP, MP, SM, SM]
    assert [c["model"]["family"] for c in s1["clients"]] == ["bert"] * 4 + ["mpnet"] * 2 + ["llama"] * 2
    assert s1["clients"][6]["model"]["adaptedLayers"] == {"mode": "topWindow", "window": 6}
    assert len({c["name"] for c in s1["clients"]}) == 8
    assert s1["minClients"] == 8 and s1["task"]["partition"]["alpha"] == 0.5
    s2 = spec(base, "S2")
    assert [c["name"] for c in s2["clients"]] == ["edge", "clinic", "hospital", "bank"]
    assert s2["minClients"] == 4
    s3 = spec(base, "S3")
    assert s3["task"]["partition"]["alpha"] == 0.1 and len(s3["clients"]) == 8


def test_quickstart_settings_seeds_rounds_and_steps(base):
    s = spec(base, seed=7)
    q = base["spec"]
    assert s["task"]["partition"]["seed"] == 7 and s["training"]["seed"] == 7
    # the split (hence the test set) stays fixed; only the pool arm holds a pool out
    assert s["task"]["splits"] == {k: v for k, v in q["task"]["splits"].items() if k != "pool"}
    assert s["training"]["localSteps"] == 20 and s["rounds"] == 12
    for k in ("batchSize", "learningRate", "headLearningRate", "maxSeqLength"):
        assert s["training"][k] == q["training"][k]
    assert s["adapter"] == q["adapter"]
    assert s["task"]["labels"] == q["task"]["labels"]
    assert spec(base, max_test_examples=50)["task"]["maxTestExamples"] == 50
    assert q["training"]["seed"] == 0 and q["task"]["partition"]["seed"] == 0  # base left untouched


def test_every_method_same_data_and_training(base):
    specs = {m: spec(base, method=m) for m in METHODS}
    for m, s in specs.items():
        task = s["task"]
        if METHODS[m].get("pool"):
            # the pool arm holds a share of the training split out, unlabelled
            assert task["splits"].pop("pool") == METHODS[m]["pool"], m
        assert task == specs["local-only"]["task"], m
        # the same training but for a method's own learning rate (the LoRA baselines at a LoRA one)
        training = dict(s["training"])
        if "learningRate" in METHODS[m].get("training", {}):
            assert training.pop("learningRate") == LORA_LR, m
            training["learningRate"] = specs["local-only"]["training"]["learningRate"]
        # the logit-adjustment arms: the same training with the label-skew correction
        if "logitAdjustment" in METHODS[m].get("training", {}):
            assert training.pop("logitAdjustment") == "clientPrior", m
        assert training == specs["local-only"]["training"], m
        assert set(METHODS[m].get("training", {})) <= {"learningRate", "logitAdjustment"}, m
        assert s["rounds"] == 12 and s["minClients"] == 8


def test_method_settings(base):
    assert spec(base, method="local-only")["aggregation"] == {"algorithm": "local-only"}
    assert spec(base, method=FAMILY_FEDAVG)["aggregation"] == {"algorithm": "family-fedavg"}
    assert spec(base, method="DeMA+CMGA (PCGrad)")["aggregation"] == {
        "algorithm": "cmga", "alignment": "pcgrad", "conflictThreshold": 0.0}
    sc = spec(base, method=SMALLEST_COMMON)
    assert sc["aggregation"] == {"algorithm": "fedavg"} and sc["adapter"]["type"] == "dema"
    assert {json.dumps(c["model"], sort_keys=True) for c in sc["clients"]} == {
        json.dumps({"family": "bert", "uri": f"cache://models/{L3}"}, sort_keys=True)}
    assert smallest_model(SCENARIOS["S1"]) == L3
    for m, algo in [(HETLORA, "hetlora"), (FLEXLORA, "flexlora")]:
        s = spec(base, method=m)
        assert s["aggregation"] == {"algorithm": algo} and s["adapter"]["type"] == "lora"
        assert [c["loraRank"] for c in s["clients"]] == [4, 4, 8, 8, 16, 16, 16, 16]
    assert all("loraRank" not in c for c in spec(base, method="DeMA+FedAvg")["clients"])
    b = spec(base, method=BRIDGE)
    assert b["aggregation"] == {"algorithm": "fedavg"}
    assert b["bridge"] == {"model": {"family": "bert", "uri": f"cache://models/{L3}"},
                           "distillation": {"weight": 1.0, "temperature": 2.0}, "serve": "ensemble",
                           "calibration": "none"}
    assert "bridge" not in spec(base, method="DeMA+FedAvg")
    assert set(DEPLOYABLE) <= set(METHODS)
    # the held-out baseline: MiniLM-L3 everywhere, the bridge alone (no distillation), a pool
    h = spec(base, method=SMALLEST_HELD_OUT)
    assert {c["model"]["uri"] for c in h["clients"]} == {f"cache://models/{L3}"}
    assert h["bridge"]["serve"] == "bridge" and h["task"]["splits"]["pool"] == 0.1
    assert h["bridge"]["distillation"] == {"weight": 0.0, "bridgeWeight": 0.0, "poolWeight": 0.0,
                                           "poolTeacher": "bridge"}
    # the homogeneous FedDF: the same, the pool taught by the MiniLM-L3 ensemble
    f = spec(base, method=SMALLEST_FEDDF)
    assert {c["model"]["uri"] for c in f["clients"]} == {f"cache://models/{L3}"}
    assert f["bridge"]["serve"] == "bridge" and f["task"]["splits"]["pool"] == 0.1
    assert f["bridge"]["distillation"]["poolTeacher"] == "ensemble"
    assert f["bridge"]["distillation"]["poolWeight"] > 0
    assert SMALLEST_FEDDF in DEPLOYABLE
    assert "pool" not in spec(base, method=SMALLEST_COMMON)["task"].get("splits", {})


def test_run_names_unique_and_valid():
    names = set()
    for sc in SCENARIOS:
        for t in TASKS:
            for m in METHODS:
                for seed in (0, 1, 2):
                    n = RunKey(sc, t, m, seed, 12, 20, "every-layer").name()
                    assert len(n) <= 63 and n == n.lower() and not n.endswith("-"), n
                    names.add(n)
    assert len(names) == len(SCENARIOS) * len(TASKS) * len(METHODS) * 3
    # The names of runs made so far stay what they were (their folders and specs keep them);
    # a slug too long to keep the seed is shortened with a hash instead.
    lora = "Bridge + pool (FedDF ensemble) with LoRA own models"
    assert RunKey("S2", "movie", lora, 1, 12, 20).name() == \
        "b-s2-movie-bridge-pool-feddf-ensemble-with-lora-own-models-s1-r"
    la = "smallest-common FedDF (public pool) + logit adjustment"
    for seed in (0, 1, 2):
        n = RunKey("S2", "movie", la, seed, 12, 20).name()
        assert n.endswith(f"-s{seed}") and len(n) <= 63, n
    # Tags cut at 63 characters would give two settings one name: the Byzantine cells of the
    # default federation once shared `…-byz-p` (run one after another, each --fresh: their
    # results stand, their logs and folders were overwritten).
    cal = "Bridge + pool (FedDF ensemble) calibrated"
    tags = [f"byz-{a}-{d}" for a in ("pool", "x1000", "none") for d in ("norm-bound", "agreement", "counts")]
    names = [RunKey("S2", "trec", cal, 0, 6, 20, t).name() for t in tags]
    assert len(set(names)) == len(names), names
    assert all(len(n) <= 63 and "-s0-" in n for n in names), names
    # a tag that fits is kept as it was
    assert RunKey("S2", "trec", "DeMA+FedAvg", 0, 12, 20, "noclip").name() == "b-s2-trec-dema-fedavg-s0-r12-k20-noclip"


def test_overrides(base):
    s = spec(base, overrides=[("training.maxGradNorm", 0),
                              ("clients[*].model.adaptedLayers.everyLayerInGroup", True)])
    assert s["training"]["maxGradNorm"] == 0
    assert all(c["model"]["adaptedLayers"]["everyLayerInGroup"] for c in s["clients"])


def test_vader_movie_derivation(tmp_path):
    tsv = tmp_path / "movie.tsv"
    tsv.write_text("id\tscore\ttext\n1\t2.3\tGreat film.\n2\t-0.4\tMeh.\n3\t0.49\tOk I guess\n"
                   "4\t-3.1\tAwful\tto sit through.\n5\t0.5\tFine.\n6\t-0.5\tDull.\n")
    out = tmp_path / "d" / "movie.jsonl"
    counts = derive_vader_movie(tsv, out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == [{"text": "Great film.", "label": "pos"}, {"text": "Awful\tto sit through.", "label": "neg"},
                    {"text": "Fine.", "label": "pos"}, {"text": "Dull.", "label": "neg"}]
    assert counts == {"neg": 2, "pos": 2, "dropped": 2}
    mtime = out.stat().st_mtime_ns
    derive_vader_movie(tsv, out)
    assert out.stat().st_mtime_ns == mtime  # unchanged content is not rewritten
    bad = tmp_path / "bad.tsv"
    bad.write_text("score\ttext\n1\tx\n")
    with pytest.raises(ValueError):
        derive_vader_movie(bad, tmp_path / "x.jsonl")


def test_vader_movie_counts_on_the_cache(cache, tmp_path):
    """The counts the docs quote, on the packaged (sha256-pinned) VADER movie ratings."""
    assert derive_vader_movie(Path(cache) / "data/vader/movie.tsv", tmp_path / "m.jsonl") == VADER_COUNTS


def test_movie_task_dataset(tmp_path, base):
    (tmp_path / "cache/data/vader").mkdir(parents=True)
    (tmp_path / "cache/data/vader/movie.tsv").write_text("id\tscore\ttext\n1\t1.0\tgood\n2\t-1.0\tbad\n")
    ds = dataset_for("movie", TREC, tmp_path / "work/data", tmp_path / "cache")
    assert ds["format"] == "jsonl" and os.path.isabs(ds["uri"]) and Path(ds["uri"]).is_file()
    s = build_spec(base, RunKey("S2", "movie", "DeMA+FedAvg", 0, 1, 2), ds, tmp_path / "store")["spec"]
    assert s["task"]["labels"] == ["neg", "pos"] and s["task"]["dataset"] == ds
    assert dataset_for("trec", TREC, tmp_path, tmp_path) == TREC


def _validator():
    for b in ("debug", "release"):
        p = ROOT / "target" / b / "heterotune"
        if p.is_file():
            return p
    return None


@pytest.mark.skipif(_validator() is None, reason="no heterotune binary under target/ (cargo build)")
def test_specs_pass_heterotune_validate(tmp_path, base):
    """Every spec the benchmark builds passes the CRD schema and CEL rules (the bridge only once
    the binary knows `spec.bridge`)."""
    binary = _validator()
    knows_bridge = "bridge" in subprocess.run([str(binary), "crd"], capture_output=True, text=True).stdout
    ds = {"uri": "/tmp/movie.jsonl", "format": "jsonl", "textField": "text", "labelField": "label"}
    for sc in SCENARIOS:
        for t, dataset in [("trec", TREC), ("movie", ds)]:
            for m in METHODS:
                if m == BRIDGE and not knows_bridge:
                    continue
                f = tmp_path / f"{sc}-{t}-{m.replace(' ', '_').replace('/', '_')}.yaml"
                f.write_text(yaml.safe_dump(build_spec(base, RunKey(sc, t, m, 0, 12, 20), dataset, tmp_path)))
                r = subprocess.run([str(binary), "validate", "-f", str(f)], capture_output=True, text=True)
                assert r.returncode == 0, f"{sc} {t} {m}: {r.stdout}{r.stderr}"


# --- report parsing and the results file -----------------------------------------------------------

def _report(variants=False):
    rounds = [{"durationSeconds": d, "clients": [
        {"name": "edge", "family": f"{L3}.ef204a", "bytesUploaded": 100 * r, "trainSeconds": 1.0 * r,
         "peakRssBytes": 1e8 * r, "testAccuracy": 0.5},
        {"name": "bank", "family": f"{SM}.b280af", "bytesUploaded": 300, "trainSeconds": 4.0,
         "peakRssBytes": 5e8, "testAccuracy": 0.4}]} for r, d in [(1, 10.0), (2, 8.0), (3, 6.0)]]
    final = [{"client": "edge", "family": f"{L3}.ef204a", "accuracy": 0.8},
             {"client": "bank", "family": f"{SM}.b280af", "accuracy": 0.6}]
    if variants:
        final[0]["variants"] = {"own": 0.78, "bridge": 0.75, "ensemble": 0.8}
        final[1]["variants"] = {"own": 0.55, "bridge": 0.7, "ensemble": 0.6}
        final[1]["served"] = "bridge"
    families = [{"key": f"{L3}.ef204a", "dtypesRun": ["float32"]},
                {"key": f"{SM}.b280af", "dtypesRun": ["bfloat16", "float32"]}]
    return {"rounds": rounds, "finalEvaluation": final, "totalSeconds": 30.0, "families": families}


def test_summarise_report():
    r = results.summarise(_report(), {"edge": L3, "bank": SM})
    edge, bank = r["clients"]
    assert edge == {"name": "edge", "home": L3, "model": L3, "accuracy": 0.8, "local_accuracy": 0.5,
                    "bytes_up": 200, "train_seconds": 2.0, "peak_rss": 3e8}
    assert bank["model"] == SM and "variants" not in bank
    assert r["round_seconds"] == 7.0 and r["total_seconds"] == 30.0
    assert r["dtypes"] == ["bfloat16", "float32"]
    # smallest-common: the client's home differs from the model it ran
    r = results.summarise(_report(), {"edge": L3, "bank": MP})
    assert r["clients"][1]["home"] == MP and r["clients"][1]["model"] == SM
    r = results.summarise(_report(variants=True), {})
    assert r["clients"][1]["variants"] == {"own": 0.55, "bridge": 0.7, "ensemble": 0.6}
    assert r["clients"][1]["served"] == "bridge" and "served" not in r["clients"][0]


def test_a_run_that_lost_a_client_is_refused():
    rep = _report()
    rep["rounds"][1]["participants"] = ["edge"]
    with pytest.raises(ValueError, match="lost clients \\['bank'\\]"):
        results.summarise(rep, {})
    rep = _report()
    rep["rounds"][2]["excluded"] = ["bank"]
    with pytest.raises(ValueError, match="excluded"):
        results.summarise(rep, {})
    with pytest.raises(ValueError):
        results.summarise({"rounds": [], "finalEvaluation": []}, {})


def test_results_file_roundtrip(tmp_path):
    f = tmp_path / "results.jsonl"
    f.write_text(json.dumps({"method": "DeMA+FedAvg", "seed": 0, "rounds": 12, "tag": "",
                             "result": {"global": 0.7}}) + "\n")  # the 6-client table's layout
    k = RunKey("S2", "trec", "DeMA+FedAvg", 0, 1, 2, "quick")
    results.append(f, k, {"clients": [], "x": 1}, 3.0, "2026-12-06")
    results.append(f, k, {"clients": [], "x": 2}, 4.0)
    loaded = results.load(f)
    assert list(loaded) == [k] and loaded[k]["result"]["x"] == 2 and loaded[k]["wall_seconds"] == 4.0
    assert results.load(tmp_path / "none.jsonl") == {}
    # What `dtype: auto` ran joins the CPU, so that rows differing in it are marked apart.
    rec = results.append(f, k, {"clients": [], "dtypes": ["float32"]}, 1.0, cpu="Some CPU")
    assert rec["cpu"] == "Some CPU; ran float32"
    assert results.append(f, k, {"clients": []}, 1.0, cpu="Some CPU")["cpu"] == "Some CPU"


# --- tables on synthetic results -------------------------------------------------------------------

HOMES = [("edge", L3), ("clinic", L6), ("hospital", MP), ("bank", SM)]


def res(accs, variants=None, wall=10.0):
    clients = []
    for (name, home), a in zip(HOMES, accs):
        c = {"name": name, "home": home, "model": home, "accuracy": a, "bytes_up": 1000.0,
             "train_seconds": 2.0, "peak_rss": 2**20 * 100}
        if variants:
            c["variants"] = {k: v[len(clients)] for k, v in variants.items()}
        clients.append(c)
    return {"clients": clients, "wall_seconds": wall}


def runs_fixture():
    """S2-like: 3 seeds; the default (bridge) beats everything except on `bank`, where local-only wins."""
    return {
        "local-only": {s: res([0.5, 0.5, 0.5, 0.80]) for s in range(3)},
        SMALLEST_COMMON: {0: res([0.70, 0.70, 0.70, 0.70]), 1: res([0.72] * 4), 2: res([0.68] * 4)},
        FAMILY_FEDAVG: {0: res([0.60, 0.62, 0.64, 0.66]), 1: res([0.6] * 4), 2: res([0.6] * 4)},
        HETLORA: {s: res([0.55] * 4) for s in range(3)},
        BRIDGE: {s: res([0.80, 0.82, 0.84, 0.78 + 0.01 * s],
                        variants={"own": [0.7, 0.8, 0.9, 0.6], "bridge": [0.75] * 4,
                                  "ensemble": [0.80, 0.82, 0.84, 0.78 + 0.01 * s]})
                 for s in range(3)},
    }


def test_overall_by_model_mean_std():
    r = res([0.6, 0.7, 0.8, 0.9])
    assert analysis.overall(r) == pytest.approx(0.75)
    assert analysis.by_model(r, MP) == pytest.approx(0.8) and analysis.by_model(r, "x") is None
    assert analysis.mean_std([1.0, 3.0]) == (2.0, 1.0)
    assert analysis.fmt_acc([0.8, 0.9]) == ".850±.050" and analysis.fmt_acc([0.8]) == ".800"
    assert analysis.fmt_points([-1.0, -3.0]) == "−2.0±1.0"


def test_paired_and_best_deployable():
    runs = runs_fixture()
    assert analysis.best_deployable(runs) == SMALLEST_COMMON
    assert analysis.best_deployable(runs, exclude=SMALLEST_COMMON) == FAMILY_FEDAVG
    p = analysis.paired(runs, BRIDGE, SMALLEST_COMMON)
    assert [s for s, _ in p] == [0, 1, 2]
    assert p[0][1] == pytest.approx(100 * (0.81 - 0.70))
    assert p[1][1] == pytest.approx(100 * (0.8125 - 0.72))
    del runs[SMALLEST_COMMON][2]
    assert [s for s, _ in analysis.paired(runs, BRIDGE, SMALLEST_COMMON)] == [0, 1]


def test_bridge_variants_become_rows():
    groups = analysis.group({
        RunKey("S2", "trec", BRIDGE, s, 12, 20): {"wall_seconds": 5.0, "result": r}
        for s, r in runs_fixture()[BRIDGE].items()})
    runs = groups[("S2", "trec")]
    assert set(runs) == {BRIDGE, "Bridge: own model", "Bridge: bridge model"}
    assert analysis.overall(runs["Bridge: own model"][0]) == pytest.approx(0.75)
    assert analysis.overall(runs["Bridge: bridge model"][1]) == pytest.approx(0.75)
    assert runs[BRIDGE][0]["wall_seconds"] == 5.0
    # a run without variants adds nothing
    runs = {BRIDGE: {0: res([0.8] * 4)}}
    analysis.expand_variants(runs)
    assert set(runs) == {BRIDGE}


def test_per_client_table_flags_worse_off_clients():
    runs = runs_fixture()
    analysis.expand_variants(runs)
    rows = {r.name: r for r in analysis.per_client(runs, BRIDGE)}
    assert rows["edge"].best_alt == SMALLEST_COMMON and rows["edge"].alt == pytest.approx(0.70)
    assert rows["edge"].delta == pytest.approx(10.0) and not rows["edge"].flagged
    # bank: 0.78/0.79/0.80 under the bridge, 0.80 alone
    assert rows["bank"].best_alt == "local-only"
    assert rows["bank"].default == pytest.approx(0.79) and rows["bank"].delta == pytest.approx(-1.0)
    assert not rows["bank"].flagged  # exactly 1 point is allowed
    runs["local-only"][0] = res([0.5, 0.5, 0.5, 0.83])
    rows = {r.name: r for r in analysis.per_client(runs, BRIDGE)}
    assert rows["bank"].delta == pytest.approx(-2.0) and rows["bank"].flagged
    # the bridge's own served variants are not alternatives to it
    assert all(not r.best_alt.startswith("Bridge:") for r in rows.values())
    assert analysis.per_client(runs, "DeMA+FedAvg") == []


def test_targets_met_missed_and_margins():
    runs = runs_fixture()
    t = analysis.targets(runs, BRIDGE, "trec")
    assert len(t) == 3
    over_best, over_fam, clients = t
    diffs = [100 * (analysis.overall(runs[BRIDGE][s]) - analysis.overall(runs[SMALLEST_COMMON][s])) for s in range(3)]
    assert over_best.value == pytest.approx(sum(diffs) / 3) and over_best.seeds == 3
    assert over_best.status == "met" and over_best.margin == pytest.approx(over_best.value - 4.6)
    assert over_fam.status == "met" and over_fam.value > 15
    assert clients.value == pytest.approx(-1.0) and clients.status == "met"
    runs["local-only"][1] = res([0.5, 0.5, 0.5, 0.95])
    clients = analysis.targets(runs, BRIDGE, "trec")[2]
    assert clients.status == "missed" and clients.margin < 0 and "bank" in clients.note
    # a weak default misses by a negative margin; the second task adds the ordering check
    t = analysis.targets(runs, HETLORA, "movie")
    assert t[0].status == "missed" and t[0].margin < -4.6 and t[1].status == "missed"
    assert len(t) == 4 and t[3].status == "missed"
    # nothing measured
    t = analysis.targets({HETLORA: runs[HETLORA]}, BRIDGE, "trec")
    assert [x.status for x in t] == ["not measured"] * 3


def test_default_resolution():
    runs = {"DeMA+FedAvg": {0: res([0.5] * 4)}}
    assert analysis.resolve_default(runs, "auto") == "DeMA+CMGA (PCGrad)"
    runs[BRIDGE] = {0: res([0.5] * 4)}
    assert analysis.resolve_default(runs, "auto") == BRIDGE
    assert analysis.resolve_default(runs, HETLORA) == HETLORA
    # the newest shipped arm wins once it has as many seeds as the one it replaces
    runs[BRIDGE_ENSEMBLE] = {s: res([0.5] * 4) for s in range(3)}
    runs[BRIDGE_CAL] = {0: res([0.5] * 4)}
    assert analysis.resolve_default(runs, "auto") == BRIDGE_ENSEMBLE
    runs[BRIDGE_CAL] = {s: res([0.5] * 4) for s in range(3)}
    assert analysis.resolve_default(runs, "auto") == BRIDGE_CAL


def test_the_old_bridge_arms_run_uncalibrated_and_the_new_one_calibrated():
    assert METHODS[BRIDGE_ENSEMBLE]["bridge"]["calibration"] == "none"
    assert METHODS[BRIDGE_CAL]["bridge"]["calibration"] == "poolEnsemble"
    assert {k: v for k, v in METHODS[BRIDGE_CAL]["bridge"].items() if k != "calibration"} == \
        {k: v for k, v in METHODS[BRIDGE_ENSEMBLE]["bridge"].items() if k != "calibration"}


def test_compute_rows_per_model_as_run():
    runs = runs_fixture()
    runs[SMALLEST_COMMON] = {0: {"clients": [dict(c, model=L3) for c in res([0.7] * 4)["clients"]]}}
    analysis.expand_variants(runs)
    rows = analysis.compute_rows(runs)
    sc = [r for r in rows if r[0] == SMALLEST_COMMON]
    assert sc == [(SMALLEST_COMMON, L3, 4, 2.0, 100.0, 1.0)]
    assert not [r for r in rows if r[0].startswith("Bridge:")]
    assert len([r for r in rows if r[0] == BRIDGE]) == 4


def test_render_and_docs_block():
    runs = runs_fixture()
    analysis.expand_variants(runs)
    text = analysis.render({("S2", "trec"): runs}, BRIDGE, "SETTING", {("S2", "trec"): [("img/a.png", "cap")]})
    assert text.startswith("SETTING")
    assert "![cap](img/a.png)" in text
    assert "| **Bridge (ensemble)** |" in text and "| Bridge: own model |" in text
    assert "not run: " in text and "smallest-common FedDF" in text
    assert "| edge | MiniLM-L3 | 0.800 | – | 0.700 | smallest-common FedAvg | +10.0 |  |" in text
    assert "Targets (issue 13)" in text and "| met |" in text
    assert "No results yet" in analysis.render({}, BRIDGE, "S", {})

    doc = "# Benchmarks\n\n## Training step vs PyTorch\n\ntext\n"
    once = analysis.update_block(doc, "BLOCK 1")
    assert once.startswith("# Benchmarks\n\n" + analysis.SECTION + "\n\n" + analysis.BEGIN + "\nBLOCK 1\n"
                           + analysis.END + "\n\n## Training step vs PyTorch")
    twice = analysis.update_block(once, "BLOCK 2\n")
    assert twice == once.replace("BLOCK 1", "BLOCK 2") and twice.count(analysis.BEGIN) == 1
    assert analysis.update_block("", "B").startswith("# Benchmarks\n\n" + analysis.SECTION)


def test_rows_run_on_another_cpu_are_marked():
    records = {RunKey("S2", "trec", m, s, 12, 20): {"wall_seconds": 5.0, "result": r,
                                                    **({"cpu": "Other CPU"} if m == HETLORA else {})}
               for m, by_seed in runs_fixture().items() for s, r in by_seed.items()}
    runs = analysis.group(records)[("S2", "trec")]
    assert runs[HETLORA][0]["cpu"] == "Other CPU" and runs[BRIDGE][0]["cpu"] == EARLIER_CPU
    text = analysis.scenario_block("S2", "trec", runs, BRIDGE, [])
    assert "| HetLoRA † |" in text and "| family-FedAvg |" in text
    assert f"another CPU than this table's ({EARLIER_CPU}): HetLoRA on Other CPU." in text
    del runs[HETLORA]
    assert "†" not in analysis.scenario_block("S2", "trec", runs, BRIDGE, [])


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import plots

    runs = runs_fixture()
    analysis.expand_variants(runs)
    figs = plots.draw({("S2", "trec"): runs}, BRIDGE, tmp_path)
    paths = [p for p, _ in figs[("S2", "trec")]]
    assert [p.name for p in paths] == ["bench-s2-trec-accuracy.png", "bench-s2-trec-paired.png",
                                       "bench-s2-trec-clients.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models_table_matches_the_ladder():
    assert [MODELS[k].label for k in (L3, L6, MP, SM)] == ["MiniLM-L3", "MiniLM-L6", "MPNet", "SmolLM2"]
    assert MODELS[L3].params < MODELS[L6].params < MODELS[MP].params < MODELS[SM].params


def test_cli_lists_and_quick_slice():
    import bench_methods

    assert bench_methods.split_list("bridge-ensemble, DeMA+FedAvg,smallest-common-fedavg", METHODS, "methods") == [
        BRIDGE, "DeMA+FedAvg", SMALLEST_COMMON]
    assert bench_methods.split_list("s1,S3", SCENARIOS, "scenarios") == ["S1", "S3"]
    with pytest.raises(SystemExit):
        bench_methods.split_list("fedprox", METHODS, "methods")
    q = bench_methods.QUICK
    assert (q["scenarios"], q["tasks"], q["seeds"], q["rounds"], q["steps"], q["max_test_examples"]) == (
        "S2", "trec", "0", 1, 2, 50)
    assert bench_methods.split_list(q["methods"], METHODS, "methods") == [SMALLEST_COMMON, "DeMA+FedAvg"]


def test_served_counts_say_what_each_client_served_over_its_seeds():
    runs = [{"clients": [{"name": "a", "served": s}, {"name": "b"}]} for s in ("own", "ensemble", "own")]
    assert analysis.served_counts(runs, "a") == "own 2, ensemble 1"
    assert analysis.served_counts(runs, "b") == ""


# --- the Byzantine benchmark's hostile client and table ------------------------------------------

def _artifact(tmp_path):
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "out"
    out.mkdir()
    tensors = {"shared.slot0.gate.bias": torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16),
               "pool.probs": torch.tensor([[0.25, 0.75]], dtype=torch.bfloat16)}
    save_file(tensors, str(out / "adapter.safetensors"))
    (out / "manifest.json").write_text(json.dumps({"artifact": {"path": "adapter.safetensors",
                                                                "sha256": "00", "bytes": 1}}))
    return out


def _fake_trainer(tmp_path):
    real = tmp_path / "real-trainer"
    real.write_text("#!/bin/sh\nexit 0\n")
    real.chmod(0o755)
    return real


@pytest.mark.parametrize("mode, want", [("scale:1000", [1000.0, -2000.0, 500.0]), ("flip", [-1.0, 2.0, -0.5]),
                                        ("none", [1.0, -2.0, 0.5])])
def test_the_hostile_client_rewrites_only_its_own_update(tmp_path, mode, want):
    import hashlib
    import sys

    from safetensors.torch import load_file

    out = _artifact(tmp_path)
    env = {**os.environ, "HETEROTUNE_ATTACK_TRAINER": str(_fake_trainer(tmp_path)),
           "HETEROTUNE_ATTACK_CLIENT": "edge-a", "HETEROTUNE_ATTACK": mode}
    wrapper = ROOT / "scripts/bench/attack_trainer.py"
    # Another client's training is left alone.
    subprocess.run([sys.executable, str(wrapper), "train", "--client", "edge-b", "--round", "1", "--out", str(out)],
                   env=env, check=True)
    assert load_file(str(out / "adapter.safetensors"))["shared.slot0.gate.bias"].float().tolist() == [1.0, -2.0, 0.5]
    subprocess.run([sys.executable, str(wrapper), "train", "--client", "edge-a", "--round", "1", "--out", str(out)],
                   env=env, check=True)
    t = load_file(str(out / "adapter.safetensors"))
    assert t["shared.slot0.gate.bias"].float().tolist() == want
    assert t["pool.probs"].float().tolist() == [[0.25, 0.75]], "pool values are not attacked"
    manifest = json.loads((out / "manifest.json").read_text())
    raw = (out / "adapter.safetensors").read_bytes()
    if mode != "none":
        assert manifest["artifact"] == {"path": "adapter.safetensors", "bytes": len(raw),
                                        "sha256": hashlib.sha256(raw).hexdigest()}


def test_the_pool_poisoning_client_claims_class_0_for_everything_and_leaves_its_update(tmp_path):
    import sys

    import torch
    from safetensors.torch import load_file, save_file

    out = _artifact(tmp_path)
    data = out / "adapter.safetensors"
    t = load_file(str(data))
    t["pool.counts"] = torch.tensor([3.0, 5.0], dtype=torch.bfloat16)
    save_file(t, str(data))
    env = {**os.environ, "HETEROTUNE_ATTACK_TRAINER": str(_fake_trainer(tmp_path)),
           "HETEROTUNE_ATTACK_CLIENT": "edge", "HETEROTUNE_ATTACK": "pool"}
    wrapper = ROOT / "scripts/bench/attack_trainer.py"
    subprocess.run([sys.executable, str(wrapper), "train", "--client", "edge", "--round", "2", "--out", str(out)],
                   env=env, check=True)
    t = load_file(str(data))
    assert t["pool.probs"].float().tolist() == [[1.0, 0.0]]
    assert t["pool.counts"].float().tolist() == [8.0, 0.0]
    assert t["pool.probs"].dtype == torch.bfloat16
    assert t["shared.slot0.gate.bias"].float().tolist() == [1.0, -2.0, 0.5], "the update is not attacked"


def test_the_hostile_client_fails_with_the_real_trainer(tmp_path):
    import sys

    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\nexit 3\n")
    failing.chmod(0o755)
    env = {**os.environ, "HETEROTUNE_ATTACK_TRAINER": str(failing), "HETEROTUNE_ATTACK_CLIENT": "edge-a",
           "HETEROTUNE_ATTACK": "flip"}
    wrapper = ROOT / "scripts/bench/attack_trainer.py"
    r = subprocess.run([sys.executable, str(wrapper), "train", "--client", "edge-a", "--round", "1",
                        "--out", str(tmp_path)], env=env)
    assert r.returncode == 3


def test_the_byzantine_table_pairs_each_attack_with_its_clean_run():
    import bench_byzantine as bz

    def rec(attack, defence, honest_acc, attacker_acc=0.1):
        clients = [{"name": f"c{i}", "accuracy": honest_acc} for i in range(7)]
        return {"tag": bz.tag(attack, defence), "measured_on": "2026-12-07",
                "result": {"clients": clients + [{"name": bz.ATTACKER, "accuracy": attacker_acc}]}}

    records = {r["tag"]: r for r in [rec("none", "none", 0.84), rec("x1000", "none", 0.20),
                                     rec("none", "multi-krum", 0.83), rec("x1000", "multi-krum", 0.82)]}
    table = bz.render(records)
    row = next(line for line in table.splitlines() if line.startswith("| ×1000 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0.200 (−64.0)", "the attacker's own accuracy is not counted"
    assert cells[5] == "0.820 (−1.0)"
    assert cells[2] == "not run"


def test_the_default_federations_table_leaves_out_its_own_attacker_and_names_its_defences():
    import bench_byzantine as bz

    fed = bz.FEDERATIONS["default"]

    def rec(attack, defence, honest_acc):
        clients = [{"name": n, "accuracy": honest_acc} for n in ("clinic", "hospital", "bank")]
        return {"tag": bz.tag(attack, defence), "measured_on": "2026-12-07",
                "result": {"clients": clients + [{"name": fed.attacker, "accuracy": 0.0}]}}

    records = {r["tag"]: r for r in [rec("none", "agreement", 0.86), rec("pool", "agreement", 0.85)]}
    table = bz.render(records, fed)
    assert "3 honest clients" in table and "--federation default" in table
    assert ("| attack | none | norm bound, reported class counts (before 2e61c68) | norm bound + "
            "agreement-weighted pool | norm bound + class counts from the partition (the default) |") in table
    row = next(line for line in table.splitlines() if line.startswith("| pool poisoning |"))
    assert row.endswith("| not run | not run | 0.850 (−1.0) | not run |")
    assert fed.block[0] == "<!-- bench:byzantine-default:begin -->"
    assert bz.FEDERATIONS["smallest"].block[0] == "<!-- bench:byzantine:begin -->"


def test_overrides_reach_one_client_or_all():
    from bench.spec import set_path

    doc = {"clients": [{"model": {"uri": "a"}}, {"model": {"uri": "b"}}]}
    set_path(doc, ["clients[1]", "model", "uri"], "c")
    assert [c["model"]["uri"] for c in doc["clients"]] == ["a", "c"]
    set_path(doc, ["clients[*]", "model", "dtype"], "auto")
    assert all(c["model"]["dtype"] == "auto" for c in doc["clients"])
    with pytest.raises(ValueError, match="2 items"):
        set_path(doc, ["clients[2]", "model", "uri"], "d")


def test_method_labels_can_be_named_on_the_command_line():
    # --methods splits on commas: a label with one could never be run by name
    for m in METHODS:
        assert "," not in m, m
