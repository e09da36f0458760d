#!/usr/bin/env python3
"""Normalise the packaged all-MiniLM-L6-v2 checkpoint into the project's layout.

* model.safetensors: f32, names exactly as BertModel's state_dict (any `bert.` or
  `0.auto_model.` prefix stripped); the non-persistent `embeddings.position_ids` buffer is dropped
  (BertModel's state_dict has no such entry and every tensor in the file is then f32).
* tokenizer.json: padding and truncation switched off (the packaged file pads every input to
  128 tokens); the caller pads and builds the attention mask.
* config.json, tokenizer_config.json, vocab.txt, special_tokens_map.json copied.

Usage: convert_minilm.py SRC_MODEL_DIR OUT_DIR
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error")):
    os.environ.setdefault(_k, _v)

from convert_onnx_bert import expected_names, normalise_name

DROP = {"embeddings.position_ids"}


def fix_tokenizer_json(obj: dict) -> dict:
    obj = dict(obj)
    obj["padding"] = None
    obj["truncation"] = None
    return obj


def convert(src_dir: str, out_dir: str, log=print) -> dict:
    from safetensors.numpy import load_file, save_file

    raw = load_file(os.path.join(src_dir, "model.safetensors"))
    tensors = {}
    for k, v in raw.items():
        hf = normalise_name(k)
        if hf is None:
            raise ValueError(f"unexpected tensor {k}")
        if hf in DROP:
            continue
        if v.dtype != np.float32:
            raise ValueError(f"{k} is {v.dtype}, expected float32")
        if hf in tensors:
            raise ValueError(f"duplicate tensor {hf}")
        tensors[hf] = np.ascontiguousarray(v)
    with open(os.path.join(src_dir, "config.json")) as f:
        cfg = json.load(f)
    want = expected_names(cfg["num_hidden_layers"], pooler="pooler.dense.weight" in tensors)
    if sorted(tensors) != sorted(want):
        raise ValueError(f"tensor inventory mismatch: missing={sorted(set(want) - set(tensors))} extra={sorted(set(tensors) - set(want))}")
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg.setdefault("architectures", ["BertModel"])
    cfg["torch_dtype"] = "float32"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    with open(os.path.join(src_dir, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(fix_tokenizer_json(tj), f, ensure_ascii=False, separators=(",", ":"))
    for name in ("tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if os.path.exists(os.path.join(src_dir, name)):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    log(f"  {len(tensors)} tensors, pooler={'yes' if 'pooler.dense.weight' in tensors else 'absent'}; tokenizer padding/truncation off")
    return {"n_tensors": len(tensors)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src_dir")
    ap.add_argument("out_dir")
    a = ap.parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    convert(a.src_dir, a.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
