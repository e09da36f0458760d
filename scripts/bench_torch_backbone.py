#!/usr/bin/env python3
"""PyTorch + transformers side of trainer/examples/backbone_bench.rs.

Usage: bench_torch_backbone.py MODEL_DIR [--batch 16] [--seq 32] [--threads 2]
                               [--reps 5] [--top K ...] [--window K ...] [--dtype f32|bf16]

Times, on the CPU in float32 (or bfloat16), the same work the Rust example times:
  forward            embeddings + every layer + final norm, no autograd
  train top-K        frozen prefix without autograd, then the top K layers
                     with autograd from their input, final norm, a scalar
                     loss and backward (what a step with an adapter below
                     layer L-K costs)
  window top-K       only the top K layers + backward (prefix cached)
Prints one JSON object per line: {"model", "what", "min", "median", "runs"}
(seconds; warm-up runs excluded).
"""

import argparse
import json
import os
import statistics
import time

import torch


def time_runs(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--top", type=int, action="append", default=[])
    p.add_argument("--window", type=int, action="append", default=[])
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    args = p.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with open(os.path.join(args.model_dir, "config.json")) as f:
        config = json.load(f)
    name = os.path.basename(os.path.normpath(args.model_dir))
    family = config["model_type"]
    ids = torch.randint(0, config["vocab_size"], (args.batch, args.seq))

    if family == "bert":
        from transformers import BertModel

        model = BertModel.from_pretrained(args.model_dir, dtype=dtype, add_pooling_layer=False).eval()
        layers = list(model.encoder.layer)
        # The same key mask the Rust encoder gives SDPA: [B, 1, 1, T], True = attend.
        mask = torch.ones(args.batch, 1, 1, args.seq, dtype=torch.bool)

        def embed():
            return model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))

        def run_layer(layer, h):
            out = layer(h, attention_mask=mask)
            return out[0] if isinstance(out, tuple) else out

        def final(h):
            return h

    elif family == "llama":
        from transformers import LlamaModel

        model = LlamaModel.from_pretrained(args.model_dir, dtype=dtype).eval()
        layers = list(model.layers)
        position_ids = torch.arange(args.seq).unsqueeze(0)
        with torch.no_grad():
            rope = model.rotary_emb(torch.zeros(1, dtype=dtype), position_ids)

        def embed():
            return model.embed_tokens(ids)

        def run_layer(layer, h):
            # No padding: attention_mask=None makes SDPA causal, as in Rust.
            out = layer(h, attention_mask=None, position_ids=position_ids, position_embeddings=rope)
            return out[0] if isinstance(out, tuple) else out

        def final(h):
            return model.norm(h)

    else:
        raise SystemExit(f"unsupported model_type {family!r}")

    for param in model.parameters():
        param.requires_grad_(False)
    n = len(layers)

    def forward():
        with torch.no_grad():
            h = embed()
            for layer in layers:
                h = run_layer(layer, h)
            return final(h)

    def train(k, cached=None):
        def step():
            if cached is None:
                with torch.no_grad():
                    h = embed()
                    for layer in layers[: n - k]:
                        h = run_layer(layer, h)
            else:
                h = cached
            h = h.detach().requires_grad_(True)
            x = h
            for layer in layers[n - k :]:
                x = run_layer(layer, x)
            loss = final(x).square().mean(dtype=torch.float32)
            loss.backward()
            return h.grad

        return step

    def emit(what, runs):
        record = {"model": name, "what": what, "min": min(runs), "median": statistics.median(runs), "runs": runs}
        print(json.dumps(record), flush=True)

    emit("forward", time_runs(forward, args.reps))
    for k in args.top:
        emit(f"train top-{k}", time_runs(train(min(k, n)), args.reps))
    for k in args.window:
        k = min(k, n)
        with torch.no_grad():
            h = embed()
            for layer in layers[: n - k]:
                h = run_layer(layer, h)
        emit(f"window top-{k}", time_runs(train(k, cached=h), args.reps))


if __name__ == "__main__":
    main()
