#!/usr/bin/env python3
"""PyTorch + transformers side of trainer/examples/step_bench.rs.

Usage: bench_torch_step.py JOB.json [--threads 2]

JOB.json (written by the Rust example) names the model folder, the DeMA
settings (r, K, S, adapted layers and their slots, scale), the frozen prefix
depth, the optimiser settings, the safetensors file with the trainer's
initial adapter and head values, and a pool of tokenised TREC questions with
the batches (indices into the pool) the trainer draws, in its order.

The step is the trainer's (trainer/src/train.rs, `ClientModel::train`), in
eager PyTorch with the Hugging Face model's own layers (frozen, eval mode;
BERT, MPNet and LLaMA; the backbone in the job's `dtype`, float32 or
bfloat16, with the adapters and head in float32 as the trainer keeps them):

  * frozen prefix: embeddings and layers 0..prefix_layers-1 (through the first
    adapted layer) computed once, under no_grad, in chunks of eval_batch_size
    examples in pool order, and kept per example without padding;
  * per step: right-pad the batch's cached prefixes to the batch's longest
    and stack them; DeMA after the first adapted layer; the remaining layers,
    each followed by its DeMA when adapted; the final norm (LLaMA); mean
    pooling over the mask; the linear head; cross-entropy; backward; global
    gradient-norm clipping; AdamW (adapters lr, head lr, weight decay as the
    trainer's); the loss read back as a float.

DeMA (trainer/src/adapters/dema.rs), per adapted layer l in slot s:
  z = D_l rms(h); g = softmax(W_g z + b_g); m = sum_k g_k (E_k z + e_k);
  h' = h + (U_l m) * scale, with the same einsum and operation order.

Protocol: after loading, building the cache and running the warm-up steps
(the first `warmup_steps` batches, from the trainer's initial values) it
prints one JSON line {"ready": true, ...}; then for each line "run" on stdin
it runs every batch once (a fresh AdamW, as each `ClientModel::train` call
builds one) and prints {"seconds", "step_seconds", "losses", "mean_loss"};
"quit" ends it.
"""

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def load_backbone(job, dtype=torch.float32):
    """(embed, run_layer(i, h, mask), final_norm, num_layers, attn impl)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model_dir = job["model_dir"]
    if job["family"] == "bert":
        from transformers import BertModel

        model = BertModel.from_pretrained(model_dir, dtype=dtype, add_pooling_layer=False).eval()
        layers = list(model.encoder.layer)

        def embed(ids):
            return model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))

        def keys(mask):
            # The key mask the Rust encoder gives SDPA: [B, 1, 1, T], True = attend.
            b, t = mask.shape
            return mask.ne(0).view(b, 1, 1, t)

        def run_layer(i, h, key_mask, rope):
            out = layers[i](h, attention_mask=key_mask)
            return out[0] if isinstance(out, tuple) else out

        def final(h):
            return h

        def rope_for(t):
            return None

    elif job["family"] == "llama":
        from transformers import LlamaModel

        model = LlamaModel.from_pretrained(model_dir, dtype=dtype).eval()
        layers = list(model.layers)
        ropes = {}

        def embed(ids):
            return model.embed_tokens(ids)

        def keys(mask):
            # Right padding: the causal mask alone keeps real tokens from
            # seeing padding (what the Rust decoder does): attention_mask=None
            # makes SDPA causal.
            return None

        def rope_for(t):
            # Rust precomputes cos/sin tables and narrows them; cache per length.
            if t not in ropes:
                with torch.no_grad():
                    pos = torch.arange(t).unsqueeze(0)
                    ropes[t] = (pos, model.rotary_emb(torch.zeros(1, dtype=dtype), pos))
            return ropes[t]

        def run_layer(i, h, key_mask, rope):
            pos, emb = rope
            out = layers[i](h, attention_mask=key_mask, position_ids=pos, position_embeddings=emb)
            return out[0] if isinstance(out, tuple) else out

        def final(h):
            return model.norm(h)

    elif job["family"] == "mpnet":
        from transformers import MPNetModel

        model = MPNetModel.from_pretrained(model_dir, dtype=dtype, add_pooling_layer=False).eval()
        layers = list(model.encoder.layer)
        biases = {}

        def embed(ids):
            # MPNet numbers positions from the padding index, as the Rust encoder does.
            return model.embeddings(input_ids=ids)

        def keys(mask):
            # transformers' MPNet adds the padding as the most negative value of the dtype.
            b, t = mask.shape
            return (1.0 - mask.to(dtype)).view(b, 1, 1, t) * torch.finfo(dtype).min

        def rope_for(t):
            # The relative position bias, computed once per length and shared by all layers
            # (MPNetEncoder.compute_position_bias; the Rust side computes it once at load).
            if t not in biases:
                with torch.no_grad():
                    biases[t] = model.encoder.compute_position_bias(torch.zeros(1, t, 1, dtype=dtype))
            return biases[t]

        def run_layer(i, h, key_mask, bias):
            out = layers[i](h, attention_mask=key_mask, position_bias=bias)
            return out[0] if isinstance(out, tuple) else out

        def final(h):
            return h

    else:
        raise SystemExit(f"unsupported family {job['family']!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    assert len(layers) == job["num_layers"], (len(layers), job["num_layers"])
    impl = getattr(model.config, "_attn_implementation", "?")
    return embed, keys, rope_for, run_layer, final, len(layers), impl


class Dema(torch.nn.Module):
    """DeMA exactly as trainer/src/adapters/dema.rs `Dema::apply` (f32 values and arithmetic)."""

    def __init__(self, job, init):
        super().__init__()
        self.scale = float(job["scale"])
        self.eps = float(job["rms_eps"])
        self.slot_of = {int(l): int(s) for l, s in job["adapted_layers"]}
        p = torch.nn.Parameter
        self.experts_weight = torch.nn.ParameterList()
        self.experts_bias = torch.nn.ParameterList()
        self.gate_weight = torch.nn.ParameterList()
        self.gate_bias = torch.nn.ParameterList()
        for s in range(job["slots"]):
            self.experts_weight.append(p(init[f"shared.slot{s}.experts.weight"].clone()))
            self.experts_bias.append(p(init[f"shared.slot{s}.experts.bias"].clone()))
            self.gate_weight.append(p(init[f"shared.slot{s}.gate.weight"].clone()))
            self.gate_bias.append(p(init[f"shared.slot{s}.gate.bias"].clone()))
        self.down = torch.nn.ParameterDict()
        self.up = torch.nn.ParameterDict()
        for l in self.slot_of:
            self.down[str(l)] = p(init[f"family.layer{l}.down.weight"].clone())
            self.up[str(l)] = p(init[f"family.layer{l}.up.weight"].clone())
        r, k, d = job["rank"], job["experts"], job["hidden_size"]
        assert self.experts_weight[0].shape == (k, r, r)
        assert self.down[str(next(iter(self.slot_of)))].shape == (r, d)

    def is_adapted(self, layer):
        return layer in self.slot_of

    def apply(self, layer, h):
        # An f32 adapter on a bf16 backbone: computed in f32, returned in the backbone's dtype.
        s = self.slot_of[layer]
        down, up = self.down[str(layer)], self.up[str(layer)]
        x = h.float()
        normed = x * (x.square().mean(-1, keepdim=True) + self.eps).rsqrt()
        z = normed.matmul(down.t())  # [..., r]
        gate = (z.matmul(self.gate_weight[s].t()) + self.gate_bias[s]).softmax(-1)  # [..., K]
        experts = torch.einsum("...i,koi->...ko", z, self.experts_weight[s]) + self.experts_bias[s]
        mixed = (gate.unsqueeze(-1) * experts).sum(-2)  # [..., r]
        return (x + mixed.matmul(up.t()) * self.scale).to(h.dtype)


class Head(torch.nn.Module):
    """Mean pooling over the mask + linear (trainer/src/adapters/head.rs)."""

    def __init__(self, init):
        super().__init__()
        self.weight = torch.nn.Parameter(init["head.weight"].clone())
        self.bias = torch.nn.Parameter(init["head.bias"].clone())

    def forward(self, h, mask):
        x = h.float()
        m = mask.float().unsqueeze(-1)
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.linear(pooled, self.weight, self.bias)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("job")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.job) as f:
        job = json.load(f)

    from safetensors.torch import load_file

    init = load_file(job["init"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job.get("dtype", "float32")]
    embed, keys, rope_for, run_layer, final, n_layers, impl = load_backbone(job, dtype)
    dema = Dema(job, init)
    head = Head(init)
    adapter_params = list(dema.parameters())
    head_params = list(head.parameters())
    trainable = sum(p.numel() for p in adapter_params + head_params)
    names = {f"shared.slot{s}.{part}.{v}" for s in range(job["slots"]) for part in ("experts", "gate") for v in ("weight", "bias")}
    names |= {f"family.layer{l}.{w}.weight" for l, _ in job["adapted_layers"] for w in ("down", "up")}
    names |= {"head.weight", "head.bias"}
    assert names == set(init), f"init tensors differ: {sorted(set(init) ^ names)}"
    prefix = job["prefix_layers"]
    assert prefix >= 1 and dema.is_adapted(prefix - 1), "the prefix ends at the first adapted layer"

    pool = job["pool"]
    pad = job["pad_id"]
    tokens = [e["ids"] for e in pool]
    labels_all = [e["label"] for e in pool]

    # The tokenizer check: does transformers' tokenizer give the same ids?
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(job["model_dir"])
        enc = tok([e["text"] for e in pool], truncation=True, max_length=job["max_seq_length"])["input_ids"]
        bad = sum(1 for a, b in zip(enc, tokens) if list(a) != list(b))
        tokenizer_check = f"{len(pool) - bad}/{len(pool)} id sequences equal to transformers'"
    except Exception as e:  # the check is informative only
        tokenizer_check = f"not checked ({type(e).__name__}: {e})"

    def batch(rows):
        """Right-pads rows into [b, t] ids and mask, and labels (train.rs `batch`)."""
        t = max(1, max(len(tokens[i]) for i in rows))
        ids, mask = [], []
        for i in rows:
            row = tokens[i]
            ids.extend(row)
            mask.extend([1] * len(row))
            ids.extend([pad] * (t - len(row)))
            mask.extend([0] * (t - len(row)))
        b = len(rows)
        return (
            torch.tensor(ids, dtype=torch.int64).view(b, t),
            torch.tensor(mask, dtype=torch.int64).view(b, t),
            torch.tensor([labels_all[i] for i in rows], dtype=torch.int64),
        )

    # Frozen prefix, once, in chunks of eval_batch_size in pool order.
    start = time.perf_counter()
    cache = {}
    chunk = job["eval_batch_size"]
    with torch.no_grad():
        for c in range(0, len(pool), chunk):
            rows = list(range(c, min(c + chunk, len(pool))))
            ids, mask, _ = batch(rows)
            km, rope = keys(mask), rope_for(ids.shape[1])
            h = embed(ids)
            for l in range(prefix):
                h = run_layer(l, h, km, rope)
            for j, i in enumerate(rows):
                cache[i] = h[j, : len(tokens[i])].clone()
    prefix_seconds = time.perf_counter() - start

    def window_input(rows, t):
        parts = []
        for i in rows:
            s = cache[i]
            p = t - s.shape[0]
            parts.append(F.pad(s, (0, 0, 0, p)) if p > 0 else s)
        return torch.stack(parts, 0)

    def window(h, mask):
        km, rope = keys(mask), rope_for(h.shape[1])
        h = dema.apply(prefix - 1, h)
        for l in range(prefix, n_layers):
            h = run_layer(l, h, km, rope)
            if dema.is_adapted(l):
                h = dema.apply(l, h)
        return head(final(h), mask)

    def optimizer():
        return torch.optim.AdamW(
            [
                {"params": adapter_params, "lr": job["learning_rate"]},
                {"params": head_params, "lr": job["head_learning_rate"]},
            ],
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=job["weight_decay"],
        )

    params = adapter_params + head_params
    max_norm = job["max_grad_norm"]

    def step(opt, rows):
        ids, mask, labels = batch(rows)
        _tokens_seen = int(mask.sum().item())  # the trainer counts tokens each step
        h = window_input(rows, ids.shape[1])
        opt.zero_grad()
        logits = window(h, mask)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        return loss.item()

    def run(batches):
        opt = optimizer()
        losses, times = [], []
        start = time.perf_counter()
        for rows in batches:
            t0 = time.perf_counter()
            losses.append(step(opt, rows))
            times.append(time.perf_counter() - t0)
        return time.perf_counter() - start, times, losses

    batches = job["batches"]
    _, _, warm_losses = run(batches[: job["warmup_steps"]])
    grad_layers = list(range(prefix, n_layers))
    print(
        json.dumps(
            {
                "ready": True,
                "torch": torch.__version__,
                "dtype": str(dtype).removeprefix("torch."),
                "attn_implementation": impl,
                "threads": torch.get_num_threads(),
                "trainable_parameters": trainable,
                "adapted_layers": sorted(dema.slot_of),
                "grad_layers": [grad_layers[0], grad_layers[-1]] if grad_layers else [],
                "prefix_seconds": prefix_seconds,
                "tokenizer_check": tokenizer_check,
                "warmup_losses": warm_losses,
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd != "run":
            continue
        seconds, times, losses = run(batches)
        print(
            json.dumps(
                {"seconds": seconds, "step_seconds": times, "losses": losses, "mean_loss": sum(losses) / len(losses)}
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
