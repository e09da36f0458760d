#!/usr/bin/env python3
"""Linear probes of a packaged model's layers: which depth carries the sentence?

For each layer, the mean-pooled hidden states (through the model's final norm, for a decoder) of
1500 training and 500 test texts of a task (deduplicated, shuffled with seed 0, ≤ 32 tokens) are
frozen features; a linear head is trained on them as the trainer trains its head (AdamW, lr 0.01,
240 steps of batch 16) for 3 seeds, and its test accuracy is printed. No adapter, no fine-tuning:
it measures what each depth offers a classifier (docs/method.md, "The capacity ladder and the
decoder").

    scripts/probe_layers.py                                   # SmolLM2 on TREC-6
    scripts/probe_layers.py --data .bench/heterogeneity/data/vader-movie-binary.jsonl
    scripts/probe_layers.py --model all-mpnet-base-v2 --layers 12

Needs the venv (torch, transformers) and the asset cache (scripts/setup.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

CACHE = Path(os.environ.get("HETEROTUNE_CACHE", Path.home() / ".cache/heterotune"))


def load_texts(path: Path) -> tuple[list[dict], list[dict], dict[str, int]]:
    seen, rows = set(), []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r["text"] not in seen:
                seen.add(r["text"])
                rows.append(r)
    random.Random(0).shuffle(rows)
    labels = {label: i for i, label in enumerate(sorted({r["label"] for r in rows}))}
    return rows[:1500], rows[1500:2000], labels


def features(model_dir: Path, layers: list[int], rows: list[dict]) -> dict[int, torch.Tensor]:
    config = json.loads((model_dir / "config.json").read_text())
    causal = config.get("model_type") == "llama"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(model_dir, dtype=torch.float32)
    base = model.model if causal else model
    top = config["num_hidden_layers"]
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with torch.no_grad():
        for i in range(0, len(rows), 50):
            batch = tok([r["text"] for r in rows[i:i + 50]], return_tensors="pt", padding=True,
                        truncation=True, max_length=32)
            states = base(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].unsqueeze(-1).float()
            for layer in layers:
                h = states[layer]
                if causal and layer < top:  # the last state is already normed
                    h = base.norm(h)
                out[layer].append((h * mask).sum(1) / mask.sum(1))
    return {layer: torch.cat(v) for layer, v in out.items()}


def probe(x_train, y_train, x_test, y_test, classes: int) -> float:
    accs = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        head = torch.nn.Linear(x_train.shape[1], classes)
        opt = torch.optim.AdamW(head.parameters(), lr=0.01)
        for _ in range(240):
            idx = torch.randint(0, len(x_train), (16,), generator=g)
            loss = torch.nn.functional.cross_entropy(head(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            accs.append((head(x_test).argmax(1) == y_test).float().mean().item())
    return sum(accs) / len(accs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="a folder under <cache>/models")
    p.add_argument("--data", default=str(CACHE / "data/trec/trec.jsonl"), help="JSONL with text and label")
    p.add_argument("--layers", default="6,10,14,18,22,26,30", help="comma-separated layer indices (0: embeddings)")
    args = p.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    train, test, labels = load_texts(Path(args.data))
    layers = [int(x) for x in args.layers.split(",")]
    model_dir = CACHE / "models" / args.model
    f_train, f_test = features(model_dir, layers, train), features(model_dir, layers, test)
    y_train = torch.tensor([labels[r["label"]] for r in train])
    y_test = torch.tensor([labels[r["label"]] for r in test])
    for layer in layers:
        acc = probe(f_train[layer], y_train, f_test[layer], y_test, len(labels))
        print(f"{args.model} layer {layer}: probe accuracy {acc:.3f}", flush=True)


if __name__ == "__main__":
    main()
