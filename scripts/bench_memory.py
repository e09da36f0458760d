#!/usr/bin/env python3
"""Peak memory of one local round: DeMA and LoRA in the trainer, full fine-tuning in PyTorch.

For every packaged model x {float32, bfloat16} x {DeMA, LoRA r=8 on q,v} x setting, runs a
one-client `heterotune run` (1 round, 5 local steps, local-only, no bridge, no final evaluation)
and measures the trainer's peak resident set size two ways:

  * from outside: the `train` process's `ru_maxrss` from wait4(2) (a wrapper passed as
    `--trainer` runs the real trainer and records it): the whole process, evaluation passes
    included. This is the figure the table and the sizing test use.
  * the trainer's own figure: `VmHWM` of /proc/self/status read at the end of the training loop
    (before the validation and test passes), written to report.json as
    rounds[].clients[].peakRssBytes.

The baseline is the trainer process with libtorch loaded and no model (`heterotune-trainer
--help`), so a row breaks into baseline, frozen weights (from the parameter count and dtype)
and the rest (training: activations, adapter state, prefix cache, tokenizer, data).

Full fine-tuning has no mode in the trainer: it is measured in PyTorch (transformers, same
backbone, batch, sequence length, dtype and texts; AdamW over every parameter, 5 steps), next to
PyTorch's own baseline (python, torch, transformers and the model's modules imported, the model
built on the meta device) and, with --torch-lora, PyTorch's LoRA (r=8 on q,v of every layer,
frozen backbone). DeMA / full FT is stated both as raw peaks and above each process's baseline.
Each row also records what the trainer prepared (its example counts and the bytes of the
frozen-prefix cache files it wrote) and the spec it ran, which the sizing test re-estimates.
`smol-full` (SmolLM2 at full depth, adapters at layers 9, 19, 29) is measured only when named.

    scripts/bench_memory.py                      # every model, prints the markdown table
    scripts/bench_memory.py --models L3 smol     # a subset
    scripts/bench_memory.py --write-docs         # also replace the block in docs/benchmarks.md
    scripts/bench_memory.py --models smol --append   # re-measure one model, keep the other rows
    scripts/bench_memory.py --report-only --write-docs   # the table of docs/data/memory.json

Writes docs/data/memory.json (rows read by operator/src/sizing/calibration.rs's test).
Needs the asset cache, the venv (transformers) and release binaries (--bin).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

import bench_central as central  # noqa: E402 (scripts/ is on sys.path when this runs)

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("HETEROTUNE_CACHE", Path.home() / ".cache/heterotune"))
MIB = 1024 * 1024
# The packaged models as scripts/bench_central.py names them (SmolLM2 with its top-6 window),
# and SmolLM2 at full depth.
MODELS = {**central.MODELS,
          "smol-full": {"family": "llama", "uri": "cache://models/SmolLM2-135M-Instruct"}}
# The quickstart's settings (TREC questions, batch 16, 32 tokens) and a larger one on longer
# texts (SMS messages, batch 32, 64 tokens: most batches hold a message that fills the
# window). `examples`: lines of the dataset subset (about a quickstart client's share of TREC).
SETTINGS = {
    "trec-b16-s32": {"data": "trec", "batch": 16, "seq": 32, "examples": 2500},
    "sms-b32-s64": {"data": "sms", "batch": 32, "seq": 64, "examples": 2500},
}
STEPS = 5
WRAPPER = """#!{python}
import json, os, subprocess, sys
p = subprocess.Popen([{trainer!r}] + sys.argv[1:])
_, status, usage = os.wait4(p.pid, 0)
with open({log!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:2], "maxrss": usage.ru_maxrss * 1024}}) + "\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def cpu_name() -> dict:
    text = Path("/proc/cpuinfo").read_text()
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
    bf16 = sorted(f for f in flags if "bf16" in f)
    return {"model": model, "cores": os.cpu_count(), "bf16Flags": bf16}


def subset(data: str, n: int, out: Path) -> tuple[Path, list[str], list[str]]:
    """The first `n` examples of a packaged dataset as JSONL (text, label): path, labels, texts."""
    rows = []
    if data == "trec":
        with (CACHE / "data/trec/trec.jsonl").open() as f:
            for line in f:
                r = json.loads(line)
                rows.append({"text": r["text"], "label": r["label"]})
    else:
        with (CACHE / "data/sms-spam/sms-spam.csv").open(newline="") as f:
            for r in csv.DictReader(f):
                rows.append({"text": r["text"], "label": "spam" if r["spam"] == "1" else "ham"})
    rows = rows[:n]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out, sorted({r["label"] for r in rows}), [r["text"] for r in rows]


def spec(model: str, dtype: str, adapter: str, setting: dict, data: Path, labels, store: Path, name: str) -> dict:
    m = dict(MODELS[model], dtype=dtype)
    adapter_spec = {"type": "dema", "rank": 8, "experts": 4, "slots": 3}
    if adapter == "lora":
        adapter_spec = {"type": "lora", "rank": 8, "slots": 3}
    return {
        "apiVersion": "heterotune.dev/v1alpha1",
        "kind": "FederatedTune",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "rounds": 1,
            "minClients": 1,
            # A busy machine must not cut a slow model's round.
            "roundDeadlineSeconds": 7200,
            "clients": [{"name": "c", "model": m}],
            "task": {
                "dataset": {"uri": f"file://{data}", "format": "jsonl", "textField": "text", "labelField": "label"},
                "labels": labels,
                "splits": {"validation": 0.1, "test": 0.1, "seed": 0},
                "partition": {"strategy": "iid", "seed": 0, "minExamplesPerClient": 1},
                "maxTestExamples": 250,
            },
            "training": {"localSteps": STEPS, "batchSize": setting["batch"], "maxSeqLength": setting["seq"],
                         "learningRate": 0.003, "seed": 0},
            "adapter": adapter_spec,
            "aggregation": {"algorithm": "local-only"},
            "evaluation": {"eachRound": False, "afterLastRound": False},
            "storage": {"uri": f"file://{store}"},
        },
    }


def trainer_run(args, model, dtype, adapter, key, setting, work: Path) -> dict:
    """One measured `heterotune run`: the train process's peaks."""
    name = f"mem-{model}-{dtype}-{adapter}-{key}".lower().replace("_", "-")
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    data, labels, _ = subset(setting["data"], setting["examples"], d / "data.jsonl")
    log = d / "rss.jsonl"
    log.unlink(missing_ok=True)
    wrapper = d / "trainer"
    wrapper.write_text(WRAPPER.format(python=sys.executable, trainer=str(args.bin / "heterotune-trainer"), log=str(log)))
    wrapper.chmod(0o755)
    doc = spec(model, dtype, adapter, setting, data, labels, d / "store", name)
    (d / "spec.yaml").write_text(yaml.safe_dump(doc))
    cmd = [str(args.bin / "heterotune"), "run", "-f", str(d / "spec.yaml"), "--trainer", str(wrapper), "--fresh",
           "--parallel", "1", "--threads", str(args.threads), "--work-dir", str(d / "work"),
           "--report-dir", str(d / "report")]
    started = time.time()
    with (d / "run.log").open("w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"{name}: heterotune run failed (exit {code}): see {d / 'run.log'}")
    runs = [json.loads(l) for l in log.read_text().splitlines()]
    train = max((r["maxrss"] for r in runs if r["argv"] == ["train"]), default=None)
    if train is None:
        sys.exit(f"{name}: no train process was recorded in {log}")
    report = json.loads((d / "report/report.json").read_text())
    client = report["rounds"][0]["clients"][0]
    return {"peakRss": train, "trainerVmHwm": client.get("peakRssBytes"), "seconds": round(time.time() - started, 1),
            **data_profile(d), "spec": doc}


def data_profile(d: Path) -> dict:
    """What the train process prepared (its log's example counts) and its frozen-prefix caches
    (the bytes of the cache files it wrote: the same tensors it held)."""
    log = next(d.glob("work/*/*/clients/c/round-0001.log")).read_text()
    found = re.search(r"(\d+) train / (\d+) validation / (\d+) test examples", log)
    if found is None:
        sys.exit(f"{d}: the trainer's log names no example counts")
    cache = sum(f.stat().st_size for f in d.glob("work/*/*/prefix-cache/*.safetensors"))
    return {"examples": [int(x) for x in found.groups()], "prefixCacheBytes": cache}


TORCH_JOB = r"""
import json, os, resource, sys
import torch, transformers
transformers.logging.set_verbosity_error()
job = json.loads(sys.argv[1])
torch.set_num_threads(job["threads"])
torch.manual_seed(0)
dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job["dtype"]]
from transformers import AutoConfig, AutoModel, AutoTokenizer
kw = {"add_pooling_layer": False} if job["family"] in ("bert", "mpnet") else {}
if job["what"] == "baseline":
    # Every module the model needs imported and built on the meta device: no weights.
    with torch.device("meta"):
        AutoModel.from_config(AutoConfig.from_pretrained(job["dir"]), **kw)
    AutoTokenizer.from_pretrained(job["dir"])
    print(json.dumps({"ok": True})); sys.exit(0)
model = AutoModel.from_pretrained(job["dir"], dtype=dtype, **kw)
tok = AutoTokenizer.from_pretrained(job["dir"])
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
d = model.config.hidden_size
head = torch.nn.Linear(d, job["classes"]).to(dtype)
if job["what"] == "lora":
    for p in model.parameters():
        p.requires_grad_(False)
    r = 8
    class LoRA(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.a = torch.nn.Parameter(torch.randn(r, base.in_features, dtype=dtype) * 0.01)
            self.b = torch.nn.Parameter(torch.zeros(base.out_features, r, dtype=dtype))
        def forward(self, x):
            return self.base(x) + (x @ self.a.t()) @ self.b.t() * (16 / r)
    for mod in list(model.modules()):
        for qn, vn in (("query", "value"), ("q_proj", "v_proj"), ("q", "v")):
            if isinstance(getattr(mod, qn, None), torch.nn.Linear) and isinstance(getattr(mod, vn, None), torch.nn.Linear):
                setattr(mod, qn, LoRA(getattr(mod, qn)))
                setattr(mod, vn, LoRA(getattr(mod, vn)))
params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
texts = job["texts"]
model.train()
for step in range(job["steps"]):
    batch = texts[step * job["batch"]:(step + 1) * job["batch"]]
    enc = tok(batch, padding="longest", truncation=True, max_length=job["seq"], return_tensors="pt")
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
    logits = head((out * m).sum(1) / m.sum(1))
    labels = torch.randint(0, job["classes"], (len(batch),))
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print(json.dumps({"ok": True, "trainable": sum(p.numel() for p in params)}))
"""


def torch_run(args, what, model, dtype, setting, texts) -> dict:
    """One PyTorch process (`what`: baseline, full, lora): its ru_maxrss from wait4."""
    m = MODELS.get(model, {})
    job = {"what": what, "dtype": dtype, "family": m.get("family"), "threads": args.threads,
           "dir": str(CACHE / "models" / m.get("uri", "/").rsplit("/", 1)[-1]), "classes": 6,
           "batch": setting["batch"] if setting else 1, "seq": setting["seq"] if setting else 1, "steps": STEPS,
           "texts": texts[: STEPS * setting["batch"]] if setting else []}
    p = subprocess.Popen([sys.executable, "-c", TORCH_JOB, json.dumps(job)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    out, err = p.stdout.read(), p.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"PyTorch {what} {model} {dtype} failed:\n{err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {"peakRss": usage.ru_maxrss * 1024, "trainable": result.get("trainable")}


def torch_refs(args, model, dtype, setting, texts, done: dict) -> dict:
    """PyTorch's full FT and LoRA peaks of `model`'s backbone (SmolLM2's once for both depths)."""
    uri = MODELS[model]["uri"]
    if uri not in done:
        done[uri] = torch_run(args, "baseline", model, dtype, setting, texts)["peakRss"]
    key = (uri, dtype, setting["batch"], setting["seq"])
    if key not in done:
        done[key] = {"pytorchFull": torch_run(args, "full", model, dtype, setting, texts)["peakRss"]}
        if args.torch_lora:
            done[key]["pytorchLora"] = torch_run(args, "lora", model, dtype, setting, texts)["peakRss"]
    return {"pytorchBaseline": done[uri], **done[key]}


def baseline_trainer(args) -> int:
    p = subprocess.Popen([str(args.bin / "heterotune-trainer"), "--help"], stdout=subprocess.DEVNULL)
    _, _, usage = os.wait4(p.pid, 0)
    return usage.ru_maxrss * 1024


def parameters(model: str) -> int:
    """Backbone parameters the trainer loads: the checkpoint's tensors but the pooler."""
    from safetensors import safe_open  # noqa: PLC0415

    path = CACHE / "models" / MODELS[model]["uri"].rsplit("/", 1)[-1] / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                   if "pooler" not in k and not k.endswith("position_ids"))


def mib(b) -> str:
    return "–" if b is None else f"{b / MIB:.0f}"


def table(doc: dict) -> str:
    cpu, base_t = doc["cpu"], doc["baseline"]["trainer"]
    torch_lora = any("pytorchLora" in r for r in doc["rows"])
    settings = "; ".join(f"`{k}`: {v['data'].upper()} (first {v['examples']} records), batch {v['batch']}, "
                         f"≤ {v['seq']} tokens" for k, v in doc["settings"].items()
                         if any(r["setting"] == k for r in doc["rows"]))
    lines = [
        f"CPU: {cpu['model']}, {cpu['cores']} cores, bf16 flags: {', '.join(cpu['bf16Flags']) or 'none'}. "
        f"One client, one round of {doc['steps']} local steps, {doc['threads']} thread; {settings}; eval batch 64; "
        "DeMA r 8, K 4, S 3; LoRA r 8 on q, v of the same adapted layers. SmolLM2: top-6 window.",
        "",
        "Peak RSS of the trainer's `train` process in MiB, **measured from outside** (wait4 `ru_maxrss`: the "
        "whole process, validation and test passes included); in brackets the trainer's own `VmHWM` at the end "
        f"of its training loop (report.json `peakRssBytes`). **Baseline**: the trainer with libtorch loaded and "
        f"no model, {mib(base_t)} MiB. **Weights**: parameters × dtype bytes (float32 borrows the "
        "memory-mapped checkpoint; bfloat16 converts it and releases the mapped pages). **Training**: DeMA's "
        "peak − baseline − weights (activations, the frozen-prefix cache, adapter and optimizer state, "
        "tokenizer, data). **Full FT**: the trainer has no full fine-tuning mode, so it is PyTorch (transformers, "
        "AdamW over every parameter, the same texts, batch, length and dtype), next to PyTorch's own baseline "
        "(python, torch, transformers and the model's modules imported, the model built on the meta device, the "
        "tokenizer loaded). **DeMA / full FT**: raw peaks, and in brackets above each process's baseline."
        + (" PyTorch LoRA: r 8 on q, v of every layer, frozen backbone." if torch_lora else ""),
        "",
        "| model | setting | dtype | weights | DeMA | = baseline + weights + training | LoRA | "
        "full FT (PyTorch) | PyTorch baseline |" + (" LoRA (PyTorch) |" if torch_lora else "") + " DeMA / full FT |",
        "|---|---|---|---:|---:|---|---:|---:|---:|" + ("---:|" if torch_lora else "") + "---:|",
    ]
    for r in (r for r in doc["rows"] if "dema" in r and "lora" in r):
        dema, lora, ft, base_p = r["dema"], r["lora"], r.get("pytorchFull"), r.get("pytorchBaseline")
        ratio = "–"
        if ft and base_p:
            ratio = f"{dema['peakRss'] / ft:.0%} ({(dema['peakRss'] - base_t) / (ft - base_p):.0%})"
        rest = dema["peakRss"] - base_t - r["weightBytes"]
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['dtype']} | {mib(r['weightBytes'])} | "
            f"{mib(dema['peakRss'])} ({mib(dema['trainerVmHwm'])}) | "
            f"{mib(base_t)} + {mib(r['weightBytes'])} + {mib(rest)} | "
            f"{mib(lora['peakRss'])} ({mib(lora['trainerVmHwm'])}) | {mib(ft)} | {mib(base_p)} |"
            + (f" {mib(r.get('pytorchLora'))} |" if torch_lora else "") + f" {ratio} |"
        )
    lines += ["", summary(doc)]
    return "\n".join(lines) + "\n"


def summary(doc: dict) -> str:
    """The DeMA / full FT goal (≤ 50 %), raw and above the baselines, in one paragraph."""
    base_t = doc["baseline"]["trainer"]
    raw, net = [], []
    for r in doc["rows"]:
        if "dema" in r and r.get("pytorchFull") and r.get("pytorchBaseline"):
            name = f"{r['model']} {r['setting']} {r['dtype']}"
            raw.append((r["dema"]["peakRss"] / r["pytorchFull"], name))
            net.append(((r["dema"]["peakRss"] - base_t) / (r["pytorchFull"] - r["pytorchBaseline"]), name))
    if not raw:
        return "No PyTorch reference measured."
    over = [n for v, n in net if v > 0.5]
    return (f"DeMA's peak is {min(raw)[0]:.0%}–{max(raw)[0]:.0%} of full fine-tuning's on raw peaks (goal ≤ 50 %: "
            f"{'met on every row' if max(raw)[0] <= 0.5 else 'missed'}); above each process's baseline "
            f"{min(net)[0]:.0%}–{max(net)[0]:.0%}"
            + (f", over 50 % for {', '.join(over)} (there the trainer's f32 activations, frozen-prefix cache and "
               "tokenizer outweigh AdamW's state of the whole backbone; on the smallest backbones bfloat16 even "
               "costs the trainer more than full fine-tuning costs PyTorch above its heavier baseline)." if over else ".")
            )


def write_docs(text: str) -> None:
    path = ROOT / "docs/benchmarks.md"
    doc = path.read_text()
    begin, end = "<!-- bench:memory:begin -->", "<!-- bench:memory:end -->"
    block = (f"{begin}\nGenerated by `scripts/bench_memory.py` from `docs/data/memory.json`. Do not edit by hand; "
             f"regenerate: `scripts/bench_memory.py --write-docs` (SmolLM2's rounds and the PyTorch processes take most of "
             f"the time: here, on a shared and busy 2-core machine, about an hour in all, run as a few slices "
             f"with `--append` and `--no-trainer`).\n\n"
             f"{text}{end}")
    if begin in doc:
        head, rest = doc.split(begin, 1)
        doc = head + block + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n## Peak memory\n\n" + block + "\n"
    path.write_text(doc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=[m for m in MODELS if m != "smol-full"], choices=list(MODELS))
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    p.add_argument("--bin", type=Path, default=ROOT / "target/release")
    p.add_argument("--work", type=Path, default=ROOT / ".bench/memory")
    p.add_argument("--threads", type=int, default=1, help="threads per trainer/PyTorch (peak RSS barely depends on it)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch references")
    p.add_argument("--torch-lora", action="store_true", help="also PyTorch's LoRA (r=8 on q,v of every layer)")
    p.add_argument("--out", type=Path, default=ROOT / "docs/data/memory.json")
    p.add_argument("--write-docs", action="store_true", help="replace the block in docs/benchmarks.md")
    p.add_argument("--append", action="store_true", help="keep --out's rows of other models/settings/dtypes")
    p.add_argument("--no-trainer", action="store_true",
                   help="only add the PyTorch references to --out's rows (implies --append)")
    p.add_argument("--report-only", action="store_true", help="print (and --write-docs) the table of --out; measure nothing")
    args = p.parse_args()
    args.work = args.work.resolve()
    if args.report_only:
        text = table(json.loads(args.out.read_text()))
        print(text)
        if args.write_docs:
            write_docs(text)
        return
    doc = {"cpu": cpu_name(), "threads": args.threads, "steps": STEPS, "settings": SETTINGS,
           "baseline": {"trainer": baseline_trainer(args)},
           "rows": []}
    if (args.append or args.no_trainer) and args.out.exists():
        doc["rows"] = json.loads(args.out.read_text())["rows"]
    torch_done: dict = {}
    for key in args.settings:
        setting = SETTINGS[key]
        args.work.mkdir(parents=True, exist_ok=True)
        _, _, texts = subset(setting["data"], setting["examples"], args.work / f"texts-{key}.jsonl")
        random.Random(0).shuffle(texts)
        for model in args.models:
            n = parameters(model)
            for dtype in args.dtypes:
                row = {"model": model, "setting": key, "dtype": dtype, "parameters": n,
                       "weightBytes": n * (4 if dtype == "float32" else 2),
                       "batchSize": setting["batch"], "maxSeqLength": setting["seq"]}
                old = [r for r in doc["rows"] if (r["model"], r["setting"], r["dtype"]) == (model, key, dtype)]
                if args.no_trainer and old:
                    row = old[0]
                for adapter in () if args.no_trainer else ("dema", "lora"):
                    row[adapter] = trainer_run(args, model, dtype, adapter, key, setting, args.work)
                    print(f"{model} {key} {dtype} {adapter}: {mib(row[adapter]['peakRss'])} MiB "
                          f"({row[adapter]['seconds']} s)", file=sys.stderr, flush=True)
                if not args.no_torch:
                    row.update(torch_refs(args, model, dtype, setting, texts, torch_done))
                doc["rows"] = [r for r in doc["rows"] if (r["model"], r["setting"], r["dtype"]) != (model, key, dtype)]
                doc["rows"].append(row)
                print(f"  {json.dumps(row)}", file=sys.stderr, flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(doc, indent=1) + "\n")
    text = table(doc)
    print(text)
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
