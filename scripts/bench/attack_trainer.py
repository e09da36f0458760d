#!/usr/bin/env python3
"""A hostile client for the Byzantine benchmark (scripts/bench_byzantine.py): used as
`heterotune run --trainer`, it runs the real trainer with the same arguments, then, when the
command trains the attacking client, rewrites that client's update before the runner uploads
it, as a compromised site would: well-formed, of the right shapes, with a correct sha256.

Environment:
  HETEROTUNE_ATTACK_TRAINER  the real trainer binary (required)
  HETEROTUNE_ATTACK_CLIENT   the attacking client's name (unset: no attack)
  HETEROTUNE_ATTACK          scale:<k> (every delta ×k), flip (×−1), random (Gaussian values of
                             the same RMS as each tensor, seeded by round), pool (see below), none

scale, flip and random attack every tensor but the pool ensemble's values (`pool.*`:
probabilities, clamped by the aggregator): the shared part, the client's own parts and head, and
its bridge. `pool` poisons only those: the client says class 0 with certainty for every pool text
(`pool.probs` one-hot) and claims all its examples are of class 0 (`pool.counts`), which gives it
its whole aggregation weight on that class of the ensemble every client distils from.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path


def arg(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def attacked(t, mode: str, seed: int):
    import torch

    x = t.to(torch.float32)
    if mode == "flip":
        y = -x
    elif mode == "random":
        g = torch.Generator().manual_seed(seed)
        rms = x.pow(2).mean().sqrt()
        y = torch.randn(x.shape, generator=g) * rms
    elif mode.startswith("scale:"):
        y = x * float(mode.split(":", 1)[1])
    else:
        raise SystemExit(f"attack_trainer: HETEROTUNE_ATTACK={mode!r}: use scale:<k>, flip, random or none")
    return y.to(t.dtype)


def poison(tensors: dict) -> None:
    """`pool`: class 0 for every pool text, every example claimed for class 0 (a client without
    pool values, before the federation has an ensemble, sends its update unchanged)."""
    import torch

    probs, counts = tensors.get("pool.probs"), tensors.get("pool.counts")
    if probs is None or counts is None:
        return
    one_hot = torch.zeros(probs.shape, dtype=torch.float32)
    one_hot[:, 0] = 1.0
    claimed = torch.zeros(counts.shape, dtype=torch.float32)
    claimed[0] = counts.to(torch.float32).sum()
    tensors["pool.probs"] = one_hot.to(probs.dtype).contiguous()
    tensors["pool.counts"] = claimed.to(counts.dtype).contiguous()


def rewrite(out: Path, mode: str, round_: int) -> None:
    from safetensors.torch import load_file, save_file

    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = out / manifest["artifact"]["path"]
    tensors = load_file(str(data))
    if mode == "pool":
        poison(tensors)
    else:
        for i, name in enumerate(sorted(tensors)):
            if not name.startswith("pool."):
                tensors[name] = attacked(tensors[name], mode, round_ * 1000 + i).contiguous()
    save_file(tensors, str(data))
    raw = data.read_bytes()
    manifest["artifact"]["sha256"] = hashlib.sha256(raw).hexdigest()
    manifest["artifact"]["bytes"] = len(raw)
    manifest_path.write_text(json.dumps(manifest, indent=2))


def main() -> int:
    real = os.environ.get("HETEROTUNE_ATTACK_TRAINER")
    if not real:
        print("attack_trainer: set HETEROTUNE_ATTACK_TRAINER to the real trainer", file=sys.stderr)
        return 2
    args = sys.argv[1:]
    rc = subprocess.call([real, *args])
    mode = os.environ.get("HETEROTUNE_ATTACK", "none")
    target = os.environ.get("HETEROTUNE_ATTACK_CLIENT")
    if rc != 0 or not args or args[0] != "train" or mode == "none" or arg(args, "--client") != target:
        return rc
    out, round_ = arg(args, "--out"), arg(args, "--round")
    if out is None or round_ is None:
        print("attack_trainer: train without --out/--round", file=sys.stderr)
        return 2
    rewrite(Path(out), mode, int(round_))
    return 0


if __name__ == "__main__":
    sys.exit(main())
