#!/usr/bin/env python3
"""Bytes on the wire for two levers that need no retraining, measured on the client artifacts a
real run wrote (issue 14, item 4):

  * zstd over each artifact file (lossless: the model and its accuracy are unchanged), and per
    part of it (the own model's adapters and head, the bridge's, the pool probabilities);
  * int8 values with one float32 scale per tensor, as a quantiser with error feedback would send
    them: the size is exact, the accuracy effect is not measured here (int8 is not built).

Usage:
  scripts/bench_wire.py DIR [DIR ...] [--level 3] [--from-round 2]

DIR is a store folder (file://…), one run's folder in it, or any folder above them: every
`round-NNNN/clients/<client>/manifest.json` below it is read, with the data file it names.
Rounds before --from-round are left out (in round 1 a client whose own model is the bridge's
backbone sends two identical copies, which compress far better than any later round).
Figures are means per client and round, grouped by the client's model (the manifest's family).
zstd comes from the `zstandard` module if installed, else the `zstd` command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

BF16_BYTES = 2
SCALE_BYTES = 4  # one float32 scale per int8 tensor
PARTS = ("own", "bridge", "pool")


def read_safetensors(data: bytes) -> tuple[int, dict[str, tuple[str, list[int], bytes]]]:
    """(header bytes, name -> (dtype, shape, raw bytes)) of a safetensors file's bytes."""
    if len(data) < 8:
        raise ValueError("shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError(f"header of {n} bytes runs past the file ({len(data)} bytes)")
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        tensors[name] = (meta["dtype"], list(meta["shape"]), body[start:end])
    return 8 + n, tensors


def part_of(name: str) -> str:
    """Which part of a client artifact a tensor belongs to (see PARTS)."""
    head = name.split(".", 1)[0]
    return head if head in ("bridge", "pool") else "own"


def int8_bytes(dtype: str, shape: list[int], raw: bytes) -> int:
    """Bytes of the tensor as int8 values plus one f32 scale; pool probabilities and other
    non-float tensors stay as they are."""
    if dtype not in ("BF16", "F16", "F32"):
        return len(raw)
    numel = 1
    for d in shape:
        numel *= d
    return numel + SCALE_BYTES


def compressor(level: int):
    """A function bytes -> zstd-compressed length."""
    try:
        import zstandard  # type: ignore

        c = zstandard.ZstdCompressor(level=level)
        return lambda b: len(c.compress(b))
    except ImportError:
        pass
    exe = shutil.which("zstd")
    if exe is None:
        sys.exit("bench_wire.py needs zstd: `pip install zstandard` or `apt-get install zstd`")
    return lambda b: len(subprocess.run([exe, f"-{level}", "-c", "-q"], input=b, capture_output=True, check=True).stdout)


@dataclass
class Sizes:
    """Sums over the client artifacts of one model."""

    artifacts: int = 0
    file: int = 0
    file_zstd: int = 0
    parts: dict = field(default_factory=lambda: defaultdict(int))
    parts_zstd: dict = field(default_factory=lambda: defaultdict(int))
    parts_int8: dict = field(default_factory=lambda: defaultdict(int))


def measure(data: bytes, zstd_len, sizes: Sizes) -> None:
    """Adds one artifact file's sizes to `sizes`."""
    _, tensors = read_safetensors(data)
    grouped: dict[str, bytearray] = defaultdict(bytearray)
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        part = part_of(name)
        grouped[part] += raw
        sizes.parts_int8[part] += int8_bytes(dtype, shape, raw) if part != "pool" else len(raw)
    sizes.artifacts += 1
    sizes.file += len(data)
    sizes.file_zstd += zstd_len(data)
    for part, raw in grouped.items():
        sizes.parts[part] += len(raw)
        sizes.parts_zstd[part] += zstd_len(bytes(raw))


def client_artifacts(root: Path, from_round: int):
    """(model, data bytes) of every client artifact below `root` from round `from_round` on."""
    for manifest in sorted(root.rglob("clients/*/manifest.json")):
        round_dir = manifest.parent.parent.parent.name
        if not round_dir.startswith("round-") or int(round_dir[6:]) < from_round:
            continue
        m = json.loads(manifest.read_text())
        data = manifest.parent / f"data-{m['artifact']['sha256']}.safetensors"
        if not data.is_file():
            print(f"skipped {manifest}: its data file {data.name} is missing", file=sys.stderr)
            continue
        model = (m.get("family") or "?").rsplit(".", 1)[0]
        yield model, data.read_bytes()


def ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}×" if b else "–"


def table(by_model: dict[str, Sizes], level: int) -> str:
    lines = [
        f"| model | artifacts | file (bf16) | zstd -{level} | own adapters + head | bridge | pool probabilities | int8 + scales (all but the pool) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, s in sorted(by_model.items()):
        n = s.artifacts

        def cell(part: str) -> str:
            raw = s.parts.get(part, 0)
            if not raw:
                return "–"
            return f"{raw / n:,.0f} → {s.parts_zstd[part] / n:,.0f} ({ratio(raw, s.parts_zstd[part])})"

        floats = sum(s.parts[p] for p in ("own", "bridge"))
        floats_int8 = sum(s.parts_int8[p] for p in ("own", "bridge"))
        lines.append(
            f"| {model} | {n} | {s.file / n:,.0f} | {s.file_zstd / n:,.0f} ({ratio(s.file, s.file_zstd)}) | "
            f"{cell('own')} | {cell('bridge')} | {cell('pool')} | "
            f"{floats / n:,.0f} → {floats_int8 / n:,.0f} ({ratio(floats, floats_int8)}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--level", type=int, default=3, help="zstd level (default 3, zstd's own default)")
    ap.add_argument("--from-round", type=int, default=2)
    args = ap.parse_args()
    zstd_len = compressor(args.level)
    by_model: dict[str, Sizes] = defaultdict(Sizes)
    for root in args.dirs:
        if not root.is_dir():
            sys.exit(f"{root}: not a folder (give a store folder or a run's folder in it)")
        for model, data in client_artifacts(root, args.from_round):
            measure(data, zstd_len, by_model[model])
    if not by_model:
        sys.exit(f"no client artifacts from round {args.from_round} on below {', '.join(map(str, args.dirs))}")
    print(table(by_model, args.level))


if __name__ == "__main__":
    main()
