"""Scenarios, tasks and methods of the heterogeneity benchmark, and the spec of each run.

Every run's FederatedTune is built here from the quickstart's task, training and adapter
settings (examples/quickstart.yaml); only the clients, the dataset, the seeds, the rounds, the
local steps and the method differ. Same data, seeds, rounds, local steps and batch for every
method of a scenario and task.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# --- models: the capacity ladder, smallest first -------------------------------------------

@dataclass(frozen=True)
class Model:
    key: str            # the model folder (also the prefix of report.json's family keys)
    label: str          # short name in tables
    family: str         # spec.clients[].model.family
    params: int         # parameters of the packaged backbone (report.json families[].parameters)
    lora_rank: int      # HetLoRA / FlexLoRA rank by capacity
    extra: dict = field(default_factory=dict)  # further model fields (adaptedLayers, dtype)

    def model_spec(self) -> dict:
        return {"family": self.family, "uri": f"cache://models/{self.key}", **copy.deepcopy(self.extra)}


MODELS = {
    m.key: m
    for m in [
        Model("paraphrase-MiniLM-L3-v2", "MiniLM-L3", "bert", 17_241_984, 4),
        Model("all-MiniLM-L6-v2", "MiniLM-L6", "bert", 22_713_216, 8),
        Model("all-mpnet-base-v2", "MPNet", "mpnet", 109_486_978, 16),
        Model("SmolLM2-135M-Instruct", "SmolLM2", "llama", 134_515_008, 16,
              {"dtype": "auto", "adaptedLayers": {"mode": "topWindow", "window": 6}}),
    ]
}
# Table column order: the ladder, smallest first.
MODEL_ORDER = [k for k, _ in sorted(MODELS.items(), key=lambda kv: kv[1].params)]
# Client names by tier (site kind), as in the quickstart.
SITE = {
    "paraphrase-MiniLM-L3-v2": "edge",
    "all-MiniLM-L6-v2": "clinic",
    "all-mpnet-base-v2": "hospital",
    "SmolLM2-135M-Instruct": "bank",
}


def model_label(key: str) -> str:
    return MODELS[key].label if key in MODELS else key


# --- scenarios ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    per_model: int      # clients per model of the ladder
    alpha: float        # Dirichlet concentration of the label skew

    def clients(self) -> list[tuple[str, str]]:
        """(client name, home model key): the model the client's hardware runs."""
        out = []
        for key in MODEL_ORDER:
            site = SITE[key]
            if self.per_model == 1:
                out.append((site, key))
            else:
                out += [(f"{site}-{chr(ord('a') + i)}", key) for i in range(self.per_model)]
        return out


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("S1", "ladder of 8 clients (2 per model), Dirichlet α=0.5", 2, 0.5),
        Scenario("S2", "one client per model (4 clients), Dirichlet α=0.5", 1, 0.5),
        Scenario("S3", "ladder of 8 clients (2 per model), Dirichlet α=0.1", 2, 0.1),
    ]
}


# --- tasks -------------------------------------------------------------------------------------

VADER_RULE = ("VADER movie-review snippets (~/.cache/heterotune/data/vader/movie.tsv, mean human "
              "rating −4…+4): |score| < 0.5 dropped as ambiguous, label `neg` for score < 0 and `pos` "
              "for score > 0: 10 072 of the 10 605 snippets kept, 5 076 neg / 4 996 pos")
VADER_COUNTS = {"neg": 5076, "pos": 4996, "dropped": 533}


def derive_vader_movie(tsv: Path, out: Path, threshold: float = 0.5) -> dict:
    """Writes the binary movie-sentiment JSONL (see VADER_RULE) and returns counts.

    Rewrites `out` only when its content changes, so a run's dataset stays byte-identical."""
    lines, counts = [], {"neg": 0, "pos": 0, "dropped": 0}
    with tsv.open(encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header[:3] != ["id", "score", "text"]:
            raise ValueError(f"{tsv}: expected the header id<TAB>score<TAB>text, got {header}")
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            _id, score, text = line.split("\t", 2)
            s = float(score)
            if abs(s) < threshold or not text.strip():
                counts["dropped"] += 1
                continue
            label = "neg" if s < 0 else "pos"
            counts[label] += 1
            lines.append(json.dumps({"text": text.strip(), "label": label}, ensure_ascii=False))
    body = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.read_text(encoding="utf-8") != body:
        out.write_text(body, encoding="utf-8")
    return counts


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    labels: tuple | None    # None: the base spec's labels


TASKS = {
    t.name: t
    for t in [
        Task("trec", "TREC-6 question type (6 classes)", None),
        Task("movie", "movie-review sentiment, binary (VADER movie ratings)", ("neg", "pos")),
    ]
}


def dataset_for(task: str, base_dataset: dict, data_dir: Path, cache: Path) -> dict:
    """The task's `spec.task.dataset` (deriving the movie JSONL into `data_dir` if needed)."""
    if task == "trec":
        return copy.deepcopy(base_dataset)
    if task == "movie":
        out = data_dir / "vader-movie-binary.jsonl"
        derive_vader_movie(cache / "data/vader/movie.tsv", out)
        return {"uri": str(out.resolve()), "format": "jsonl", "textField": "text", "labelField": "label"}
    raise KeyError(task)


# --- methods -----------------------------------------------------------------------------------

SMALLEST_COMMON = "smallest-common FedAvg"
SMALLEST_HELD_OUT = "smallest-common FedAvg (pool held out)"
FAMILY_FEDAVG = "family-FedAvg"
HETLORA = "HetLoRA"
FLEXLORA = "FlexLoRA"
# The LoRA baselines at a LoRA learning rate: at the benchmark's shared 0.003 (tuned for DeMA
# adapters) the rank-16 MPNet client's LoRA diverged on S2 TREC-6 (validation accuracy 0.95 ->
# 0.49 in round 3, then predicting one class); 0.001, the top of the range LoRA recipes use, is
# one value for every task and seed, not tuned on either.
LORA_LR = 0.001
HETLORA_LR = f"HetLoRA (lr {LORA_LR})"
FLEXLORA_LR = f"FlexLoRA (lr {LORA_LR})"
BRIDGE = "Bridge (ensemble)"
BRIDGE_POOL = "Bridge + pool"
BRIDGE_VALIDATED = "Bridge + pool (validated)"
BRIDGE_ENSEMBLE = "Bridge + pool (FedDF ensemble)"
BRIDGE_LORA = "Bridge + pool (FedDF ensemble) with LoRA own models"
SMALLEST_FEDDF = "smallest-common FedDF (public pool)"
# Logit adjustment (`training.logitAdjustment: clientPrior`): the same arms with the label-skew
# correction of the training loss, the baselines too, so a gain is not the correction alone.
ADJUSTED = {"logitAdjustment": "clientPrior"}
SMALLEST_COMMON_LA = "smallest-common FedAvg + logit adjustment"
SMALLEST_FEDDF_LA = "smallest-common FedDF (public pool) + logit adjustment"
BRIDGE_ENSEMBLE_LA = "Bridge + pool (FedDF ensemble) + logit adjustment"
# The pool's ensemble with each client weighted by its agreement with the federation's vote
# (`distillation.poolWeighting: agreement`), the homogeneous FedDF baseline too.
BRIDGE_AGREE = "Bridge + pool (FedDF ensemble agreement-weighted)"
SMALLEST_FEDDF_AGREE = "smallest-common FedDF (public pool) agreement-weighted"
# The default's arm with the own model's label-skew correction before it is served
# (`bridge.calibration: poolEnsemble`, the product's default since 2026-12-07); the other bridge
# arms run with it off, as they were measured.
BRIDGE_CAL = "Bridge + pool (FedDF ensemble) calibrated"
# The same with one-way teaching on the client's data (`bridgeWeight: 0`): the own model learns
# from the bridge there, the bridge only from the labels and the pool's ensemble, so an own model
# fitted to a near-single-class partition cannot pull the shared bridge towards its classes.
BRIDGE_CAL_ONEWAY = "Bridge + pool (FedDF ensemble) calibrated one-way"
# The calibrated default serving, per client, the model whose top class on the pool agrees most
# often with the federation's ensemble (`serve: agreement`); what is sent, so the training, is the
# calibrated default's (`auto`'s): each run is its own paired ablation (the derived row "… auto").
BRIDGE_CAL_AGREE = "Bridge + pool (FedDF ensemble) calibrated served by agreement"
# The calibrated default with the pool's ensemble weighted by each client's agreement with the
# federation's vote (`poolWeighting: agreement`): the candidate default for untrusted sites (the
# Byzantine table's pool poisoning: −10.8 under the default's class-count weighting, −0.1 with it).
BRIDGE_CAL_AGREEW = "Bridge + pool (FedDF ensemble) calibrated agreement-weighted"
# FedDF's server step (`distillation.serverSteps`): after each round's average the aggregator
# distils the bridge on the pool against the round's ensemble, as many steps as a client's local
# round (`training.localSteps` of the benchmark, 20; one value, not tuned). The homogeneous FedDF
# baseline gets the same step, so a gain is the teacher's cross-family knowledge, not the step.
SERVER_STEPS = 20
BRIDGE_CAL_SERVER = "Bridge + pool (FedDF ensemble) calibrated + server distillation"
SMALLEST_FEDDF_SERVER = "smallest-common FedDF (public pool) + server distillation"
# The public pool of the pool arm: this share of the training split, held out unlabeled.
POOL_SHARE = 0.1
# Every bridge arm's common model.
BRIDGE_MODEL = {"family": "bert", "uri": "cache://models/paraphrase-MiniLM-L3-v2"}


def bridge_arm(distillation: dict, serve: str, pool: bool = True, smallest: bool = False,
               calibration: str = "none") -> dict:
    """A fedavg arm with the MiniLM-L3 bridge (`spec.bridge`), optionally every client on the
    smallest model and the public pool held out."""
    arm: dict = {"aggregation": {"algorithm": "fedavg"}}
    if smallest:
        arm["smallest"] = True
    arm["bridge"] = {"model": dict(BRIDGE_MODEL), "distillation": distillation, "serve": serve,
                     "calibration": calibration}
    if pool:
        arm["pool"] = POOL_SHARE
    return arm

# The deployable baselines: what a platform team would run without HeteroTune's method.
DEPLOYABLE = [SMALLEST_COMMON, SMALLEST_HELD_OUT, SMALLEST_FEDDF, FAMILY_FEDAVG, HETLORA, FLEXLORA,
              HETLORA_LR, FLEXLORA_LR, SMALLEST_COMMON_LA, SMALLEST_FEDDF_LA, SMALLEST_FEDDF_AGREE,
              SMALLEST_FEDDF_SERVER]
# label: (aggregation, adapter overrides, whether clients get per-capacity LoRA ranks,
#         whether every client runs the scenario's smallest model, training overrides,
#         extra spec fields)
METHODS: dict[str, dict] = {
    "local-only": {"aggregation": {"algorithm": "local-only"}},
    SMALLEST_COMMON: {"aggregation": {"algorithm": "fedavg"}, "smallest": True},
    # The same on the pool arm's labelled data (the pool held out, unused): run as the bridge
    # alone — every client on MiniLM-L3, the bridge MiniLM-L3 with every distillation term off,
    # serving the bridge, i.e. MiniLM-L3 FedAvg'd over all clients (the own models train beside
    # it and are not used). "More data" cannot then be mistaken for cross-family knowledge.
    SMALLEST_HELD_OUT: bridge_arm({"weight": 0.0, "bridgeWeight": 0.0, "poolWeight": 0.0,
                                   "poolTeacher": "bridge"}, "bridge", smallest=True),
    # The homogeneous FedDF the issue asks for (the same public pool as the pool arms): every
    # client on MiniLM-L3, FedAvg'd, and from round 2 on distilled on the pool from the ensemble
    # of every client's MiniLM-L3 predictions there (`poolTeacher: ensemble`, class-count weighted;
    # run as the bridge alone, serving the bridge, the own models unused).
    SMALLEST_FEDDF: bridge_arm({"weight": 0.0, "bridgeWeight": 0.0, "poolWeight": 1.0,
                                "poolTeacher": "ensemble"}, "bridge", smallest=True),
    FAMILY_FEDAVG: {"aggregation": {"algorithm": "family-fedavg"}},
    HETLORA: {"aggregation": {"algorithm": "hetlora"}, "lora": True},
    FLEXLORA: {"aggregation": {"algorithm": "flexlora"}, "lora": True},
    HETLORA_LR: {"aggregation": {"algorithm": "hetlora"}, "lora": True,
                 "training": {"learningRate": LORA_LR}},
    FLEXLORA_LR: {"aggregation": {"algorithm": "flexlora"}, "lora": True,
                  "training": {"learningRate": LORA_LR}},
    "DeMA+FedAvg": {"aggregation": {"algorithm": "fedavg"}},
    "DeMA+CMGA (PCGrad)": {"aggregation": {"algorithm": "cmga", "alignment": "pcgrad",
                                           "conflictThreshold": 0.0}},
    BRIDGE: bridge_arm({"weight": 1.0, "temperature": 2.0}, "ensemble", pool=False),
    # The bridge also teaching every own model on a public, unlabeled pool held out of the
    # training split (task.splits.pool). The other methods keep the pool's examples, labelled,
    # in their clients' training data: they get strictly more data than this arm.
    # Served: `auto` (the ensemble, the bridge where a client's own model is the bridge's
    # backbone); the first runs served "ensemble": analysis.serve_auto applies the rule to their
    # variants, the same evaluations.
    BRIDGE_POOL: bridge_arm({"weight": 1.0, "temperature": 2.0, "poolWeight": 1.0,
                             "poolTeacher": "bridge"}, "ensemble"),
    # The same, with the two choices read from each client's validation split: which model it
    # serves (`serve: validated`) and which model teaches the other on the pool (`poolTeacher`).
    BRIDGE_VALIDATED: bridge_arm({"weight": 1.0, "temperature": 2.0, "poolWeight": 1.0,
                                  "poolTeacher": "validated"}, "validated"),
    # The pool taught by the federation's ensemble (FedDF-style, `poolTeacher: ensemble`): every
    # client sends what it serves on the pool, the aggregator averages it per class (weighted by
    # each client's examples of the class), both models of every client distil from it.
    BRIDGE_ENSEMBLE: bridge_arm({"weight": 1.0, "temperature": 2.0, "poolWeight": 1.0,
                                 "poolTeacher": "ensemble"}, "auto"),
    # The same with LoRA own models (the LoRA baselines' ranks by capacity, at their learning
    # rate), the bridge's DeMA at the shared rate (`bridge.learningRate`): on S2 TREC-6 the MPNet
    # client's LoRA alone (HetLoRA at 0.001) beat the default's DeMA own model by ~4 points.
    BRIDGE_LORA: {**bridge_arm({"weight": 1.0, "temperature": 2.0, "poolWeight": 1.0,
                                "poolTeacher": "ensemble"}, "auto"),
                  "aggregation": {"algorithm": "hetlora"},
                  "lora": True, "training": {"learningRate": LORA_LR}, "bridge_lr": "shared"},
    SMALLEST_COMMON_LA: {"aggregation": {"algorithm": "fedavg"}, "smallest": True,
                         "training": dict(ADJUSTED)},
    SMALLEST_FEDDF_LA: {**bridge_arm({"weight": 0.0, "bridgeWeight": 0.0, "poolWeight": 1.0,
                                      "poolTeacher": "ensemble"}, "bridge", smallest=True),
                        "training": dict(ADJUSTED)},
    BRIDGE_ENSEMBLE_LA: {**bridge_arm({"weight": 1.0, "temperature": 2.0, "poolWeight": 1.0,
                                       "poolTeacher": "ensemble"}, "auto"),
                         "training": dict(ADJUSTED)},
    BRIDGE_AGREE: bridge_arm({"weight": 1.0, "temperature": 2.0, "poolWeight": 1.0,
                              "poolTeacher": "ensemble", "poolWeighting": "agreement"}, "auto"),
    # The default's arm with the own model calibrated to the pool's ensemble before it is served:
    # the training is the same (the correction is applied after it and never sent).
    BRIDGE_CAL: bridge_arm({"weight": 1.0, "temperature": 2.0, "poolWeight": 1.0,
                            "poolTeacher": "ensemble"}, "auto", calibration="poolEnsemble"),
    BRIDGE_CAL_ONEWAY: bridge_arm({"weight": 1.0, "bridgeWeight": 0.0, "temperature": 2.0,
                                   "poolWeight": 1.0, "poolTeacher": "ensemble"}, "auto",
                                  calibration="poolEnsemble"),
    BRIDGE_CAL_AGREE: bridge_arm({"weight": 1.0, "temperature": 2.0, "poolWeight": 1.0,
                                  "poolTeacher": "ensemble"}, "agreement",
                                 calibration="poolEnsemble"),
    BRIDGE_CAL_AGREEW: bridge_arm({"weight": 1.0, "temperature": 2.0, "poolWeight": 1.0,
                                   "poolTeacher": "ensemble", "poolWeighting": "agreement"}, "auto",
                                  calibration="poolEnsemble"),
    BRIDGE_CAL_SERVER: bridge_arm({"weight": 1.0, "temperature": 2.0, "poolWeight": 1.0,
                                   "poolTeacher": "ensemble", "serverSteps": SERVER_STEPS}, "auto",
                                  calibration="poolEnsemble"),
    SMALLEST_FEDDF_SERVER: bridge_arm({"weight": 0.0, "bridgeWeight": 0.0, "poolWeight": 1.0,
                                       "poolTeacher": "ensemble", "serverSteps": SERVER_STEPS},
                                      "bridge", smallest=True),
    SMALLEST_FEDDF_AGREE: bridge_arm({"weight": 0.0, "bridgeWeight": 0.0, "poolWeight": 1.0,
                                      "poolTeacher": "ensemble", "poolWeighting": "agreement"},
                                     "bridge", smallest=True),
}
# Rows derived from the bridge runs' finalEvaluation[].variants (no run of their own):
# bridge method → {variant: row label}.
BRIDGE_VARIANTS = {
    BRIDGE: {"own": "Bridge: own model", "bridge": "Bridge: bridge model"},
    BRIDGE_POOL: {"own": "Bridge + pool: own model", "bridge": "Bridge + pool: bridge model",
                  "ensemble": "Bridge + pool: ensemble everywhere"},
    BRIDGE_VALIDATED: {"own": "validated: own model", "bridge": "validated: bridge model",
                       "ensemble": "validated: ensemble everywhere"},
    BRIDGE_ENSEMBLE: {"own": "FedDF ensemble: own model", "bridge": "FedDF ensemble: bridge model"},
    BRIDGE_LORA: {"own": "LoRA own models: own model", "bridge": "LoRA own models: bridge model"},
    BRIDGE_ENSEMBLE_LA: {"own": "logit-adjusted: own model", "bridge": "logit-adjusted: bridge model"},
    BRIDGE_AGREE: {"own": "agreement-weighted: own model", "bridge": "agreement-weighted: bridge model"},
    BRIDGE_CAL: {"own": "calibrated: own model"},
    BRIDGE_CAL_AGREEW: {"own": "calibrated agreement-weighted: own model",
                        "bridge": "calibrated agreement-weighted: bridge model"},
    BRIDGE_CAL_SERVER: {"own": "server-distilled: own model",
                        "bridge": "server-distilled: bridge model"},
    BRIDGE_CAL_ONEWAY: {"own": "calibrated one-way: own model", "bridge": "calibrated one-way: bridge model"},
    # "auto": the ensemble, or the bridge on the bridge's backbone (analysis.expand_variants).
    BRIDGE_CAL_AGREE: {"auto": "served by agreement: auto in the same runs",
                       "bridge": "served by agreement: bridge model"},
}
# Listed in the docs, not run yet.
NOT_RUN: dict[str, str] = {
    BRIDGE_CAL_SERVER: "on seeds 0–2; run on movie seed 0 and on the unseen TREC-6 seeds 3 and 4 (Intel "
                       "Xeon) and rejected there (method.md, \"The server's step on the bridge\")",
    SMALLEST_FEDDF_SERVER: "on seeds 0–2; run beside the server-distilled arm on movie seed 0 and TREC-6 "
                           "seed 3 (method.md, \"The server's step on the bridge\")",
    BRIDGE_CAL_AGREEW: "on seeds 0–2; one run on movie seed 0 on another CPU (benchmarks.md, \"Two rules "
                       "tried\")",
    BRIDGE_CAL_AGREE: "on seeds 0–2; run on the unseen seeds 3 and 4 of S2 TREC-6 and rejected there "
                      "(method.md, \"Serving by agreement with the pool ensemble\")",
}
# The method the quickstart ships today (examples/quickstart.yaml); the bridge replaces it as the
# default once it is measured.
SHIPPED_DEFAULT = "DeMA+CMGA (PCGrad)"


def slug(text: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in text)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")


def smallest_model(scenario: Scenario) -> str:
    return min({m for _, m in scenario.clients()}, key=lambda k: MODELS[k].params)


@dataclass(frozen=True)
class RunKey:
    scenario: str
    task: str
    method: str
    seed: int
    rounds: int
    steps: int
    tag: str = ""

    def as_dict(self) -> dict:
        return {"scenario": self.scenario, "task": self.task, "method": self.method, "seed": self.seed,
                "rounds": self.rounds, "steps": self.steps, "tag": self.tag}

    def name(self) -> str:
        """At most 63 characters. Cut at the end, as long as the seed survives the cut (the
        names of every run made so far); a longer method slug is shortened instead, with a hash
        of the whole slug, so that seeds never share a name."""
        suffix = f"-{slug(self.tag)}" if self.tag else ""
        method = slug(self.method)
        base = full = f"b-{self.scenario.lower()}-{self.task}-{method}"
        kept = f"-s{self.seed}"
        tail = f"{kept}-r{self.rounds}-k{self.steps}{suffix}"
        if len(base) + len(kept) > 63:
            digest = hashlib.sha256(method.encode()).hexdigest()[:6]
            base = f"{base[:63 - len(kept) - 7].rstrip('-')}-{digest}"
        name = (base + tail)[:63].rstrip("-")
        if suffix and not name.endswith(suffix):
            # The tag was cut: two settings' runs would share a name (and a store folder).
            digest = hashlib.sha256((full + tail).encode()).hexdigest()[:8]
            name = f"{base[:63 - len(kept) - len(digest) - 1].rstrip('-')}{kept}-{digest}"
        return name


def build_spec(base: dict, key: RunKey, dataset: dict, store: Path,
               overrides: list[tuple[str, object]] = (), max_test_examples: int | None = None) -> dict:
    """The FederatedTune of one run: the quickstart's task/training/adapter settings, the
    scenario's clients, the task's dataset, and the method."""
    scenario, task, method = SCENARIOS[key.scenario], TASKS[key.task], METHODS[key.method]
    b = base["spec"]
    smallest = smallest_model(scenario)
    clients = []
    for name, home in scenario.clients():
        model = MODELS[smallest if method.get("smallest") else home]
        c = {"name": name, "model": model.model_spec()}
        if method.get("lora"):
            c["loraRank"] = model.lora_rank
        clients.append(c)
    t = copy.deepcopy(b["task"])
    t["dataset"] = dataset
    if task.labels is not None:
        t["labels"] = list(task.labels)
    t["partition"]["alpha"] = scenario.alpha
    t["partition"]["seed"] = key.seed
    if max_test_examples is not None:
        t["maxTestExamples"] = max_test_examples
    # Only the pool arm holds a public pool out (the base spec's own pool, if any, is dropped:
    # every other method keeps those examples, labelled, in its clients' training data).
    t.setdefault("splits", {}).pop("pool", None)
    if method.get("pool"):
        t["splits"]["pool"] = method["pool"]
    training = copy.deepcopy(b["training"])
    training["seed"] = key.seed
    training["localSteps"] = key.steps
    training.update(method.get("training", {}))
    adapter = copy.deepcopy(b["adapter"])
    if method.get("lora") and "bridge" in method:
        # the bridge's DeMA reads the adapter's DeMA settings: keep them
        adapter["type"] = "lora"
    elif method.get("lora"):
        adapter = {"type": "lora", "rank": adapter.get("rank", 8)}
    spec = {
        "rounds": key.rounds,
        # every client every round: the methods are compared on the same updates
        "minClients": len(clients),
        # a busy machine must not cut a client: results.summarise refuses a run that lost one
        "roundDeadlineSeconds": max(b.get("roundDeadlineSeconds", 900), 3600),
        "maxRetriesPerClient": b.get("maxRetriesPerClient", 1),
        "clients": clients,
        "task": t,
        "training": training,
        "adapter": adapter,
        "aggregation": copy.deepcopy(method["aggregation"]),
        # The primary figure is the final global model (afterLastRound); evaluating every
        # round's received model too would cost a test-set pass per client and round.
        "evaluation": {"eachRound": False, "afterLastRound": True},
        "storage": {"uri": f"file://{store}"},
    }
    if "bridge" in method:
        spec["bridge"] = copy.deepcopy(method["bridge"])
        if method.get("bridge_lr") == "shared":
            spec["bridge"]["learningRate"] = b["training"]["learningRate"]
    for path, value in overrides:
        set_path(spec, path.split("."), value)
    return {
        "apiVersion": base.get("apiVersion", "heterotune.dev/v1alpha1"),
        "kind": base.get("kind", "FederatedTune"),
        "metadata": {"name": key.name(), "namespace": base.get("metadata", {}).get("namespace", "default")},
        "spec": spec,
    }


def set_path(node, keys: list[str], value) -> None:
    """Sets `value` at `keys` under `node`; a key `name[*]` walks every item of the list `name`,
    `name[i]` its item i (0-based)."""
    key, rest = keys[0], keys[1:]
    indexed = re.fullmatch(r"(.+)\[(\*|\d+)\]", key)
    if indexed:
        items = node.get(indexed.group(1), [])
        if indexed.group(2) != "*":
            i = int(indexed.group(2))
            if i >= len(items):
                raise ValueError(f"{key}: the list has {len(items)} items")
            items = [items[i]]
        for item in items:
            set_path(item, rest, value)
    elif not rest:
        node[key] = value
    else:
        set_path(node.setdefault(key, {}), rest, value)
