#!/usr/bin/env python3
"""Convert a LLaMA-architecture GGUF (SmolLM2-135M-Instruct, Q4_1 + Q8_0) into a Hugging Face
checkpoint directory: config.json, model.safetensors (f32), tokenizer.json, tokenizer_config.json.

Our own code does the parts that decide correctness:
  * Q4_0 / Q4_1 / Q8_0 / F16 / F32 dequantisation in numpy (the `gguf` package is used only to
    parse the file, and, in the checks, as an independent reference dequantiser);
  * GGUF -> HF tensor names, shapes (GGUF lists dims innermost-first, so a GGUF [in, out] tensor is
    a row-major numpy [out, in] = torch Linear weight);
  * undoing llama.cpp's q/k row permutation (GGUF q/k weights are laid out for interleaved-pair
    RoPE; HF LLaMA uses rotate-half RoPE);
  * config.json from GGUF metadata;
  * an HF `tokenizer.json` (byte-level BPE) built from the GGUF vocab/merges/token types with the
    pre-tokenizer that llama.cpp's `tokenizer.ggml.pre` names (SmolLM2: "smollm" = every digit on
    its own, then the GPT-2 byte-level split).

Usage: convert_gguf_llama.py MODEL.gguf OUT_DIR [--no-smoke]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

import numpy as np

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error")):
    os.environ.setdefault(_k, _v)

QK = 32  # elements per block for Q4_0 / Q4_1 / Q8_0

# GGML type ids (ggml.h); only the ones this converter understands.
GGML_F32 = 0
GGML_F16 = 1
GGML_Q4_0 = 2
GGML_Q4_1 = 3
GGML_Q8_0 = 8
GGML_BF16 = 30

BLOCK_BYTES = {GGML_Q4_0: 2 + QK // 2, GGML_Q4_1: 4 + QK // 2, GGML_Q8_0: 2 + QK}


# --------------------------------------------------------------------------- dequantisation
def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if raw.size % block_bytes:
        raise ValueError(f"buffer of {raw.size} bytes is not a whole number of {block_bytes}-byte blocks")
    return raw.reshape(-1, block_bytes)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0 block = f16 scale d, then 32 x int8 q; value = d * q."""
    b = _blocks(raw, BLOCK_BYTES[GGML_Q8_0])
    d = b[:, :2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    q = b[:, 2:].copy().view(np.int8).astype(np.float32)  # [n, 32]
    return (d * q).reshape(-1)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    """Q4_1 block = f16 scale d, f16 min m, then 16 bytes: element j (0..15) is the low nibble of
    byte j and element j+16 is its high nibble; value = d * q + m."""
    b = _blocks(raw, BLOCK_BYTES[GGML_Q4_1])
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = b[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # [n, 32]
    return (d * q + m).reshape(-1)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    """Q4_0 block = f16 scale d, then 16 bytes of nibbles (same order as Q4_1); value = d * (q - 8)."""
    b = _blocks(raw, BLOCK_BYTES[GGML_Q4_0])
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    qs = b[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
    return (d * q.astype(np.float32)).reshape(-1)


def dequantize(raw: np.ndarray, ggml_type: int, n_elements: int) -> np.ndarray:
    """Flat float32 array of `n_elements` values from a GGUF tensor's raw data."""
    if ggml_type == GGML_F32:
        out = np.ascontiguousarray(raw).view(np.float32).reshape(-1)
    elif ggml_type == GGML_F16:
        out = np.ascontiguousarray(raw).view(np.float16).reshape(-1).astype(np.float32)
    elif ggml_type == GGML_BF16:
        u = np.ascontiguousarray(raw).view(np.uint16).reshape(-1).astype(np.uint32) << 16
        out = u.view(np.float32)
    elif ggml_type == GGML_Q8_0:
        out = dequantize_q8_0(raw)
    elif ggml_type == GGML_Q4_1:
        out = dequantize_q4_1(raw)
    elif ggml_type == GGML_Q4_0:
        out = dequantize_q4_0(raw)
    else:
        raise NotImplementedError(f"GGML type {ggml_type} is not supported by this converter")
    if out.size != n_elements:
        raise ValueError(f"dequantised {out.size} values, expected {n_elements}")
    return out.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- RoPE permutation
def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF (rotate-half) -> GGUF (interleaved pairs) row order, exactly as llama.cpp's
    convert_hf_to_gguf.py does it: reshape [n_heads, 2, head_dim/2, in], swap axes 1 and 2."""
    out_dim = w.shape[0]
    return (
        w.reshape(n_heads, 2, out_dim // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF -> HF: reshape [n_heads, head_dim/2, 2, in], swap axes 1 and 2 (inverse of permute_rope)."""
    out_dim = w.shape[0]
    return (
        w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


# --------------------------------------------------------------------------- names
_BLOCK_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def map_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF LLaMA name; raises KeyError for names we do not know."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        raise KeyError(gguf_name)
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_MAP:
        return f"model.layers.{int(parts[1])}.{_BLOCK_MAP[parts[2]]}.{suffix}"
    if len(parts) == 1 and parts[0] in _TOP_MAP:
        return f"{_TOP_MAP[parts[0]]}.{suffix}"
    raise KeyError(gguf_name)


# --------------------------------------------------------------------------- GGUF access
def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_metadata(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    md = {
        "arch": arch,
        "name": _field(reader, "general.name"),
        "license": _field(reader, "general.license"),
        "n_layers": int(_field(reader, "llama.block_count")),
        "hidden": int(_field(reader, "llama.embedding_length")),
        "ffn": int(_field(reader, "llama.feed_forward_length")),
        "n_heads": int(_field(reader, "llama.attention.head_count")),
        "n_kv_heads": int(_field(reader, "llama.attention.head_count_kv", _field(reader, "llama.attention.head_count"))),
        "ctx": int(_field(reader, "llama.context_length")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rms_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_dim": _field(reader, "llama.rope.dimension_count"),
        "vocab_size": _field(reader, "llama.vocab_size"),
        "rope_scaling": _field(reader, "llama.rope.scaling.type"),
    }
    tokens = _field(reader, "tokenizer.ggml.tokens")
    md["tokens"] = list(tokens)
    md["token_type"] = [int(t) for t in _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))]
    md["merges"] = list(_field(reader, "tokenizer.ggml.merges", []))
    md["tokenizer_model"] = _field(reader, "tokenizer.ggml.model")
    md["tokenizer_pre"] = _field(reader, "tokenizer.ggml.pre")
    for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        v = _field(reader, f"tokenizer.ggml.{k}")
        md[k] = None if v is None else int(v)
    md["add_bos_token"] = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    md["add_eos_token"] = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    md["chat_template"] = _field(reader, "tokenizer.chat_template")
    if md["vocab_size"] is None:
        md["vocab_size"] = len(tokens)
    md["vocab_size"] = int(md["vocab_size"])
    if md["rope_scaling"] not in (None, "none"):
        raise NotImplementedError(f"rope scaling {md['rope_scaling']!r} not supported")
    head_dim = md["hidden"] // md["n_heads"]
    if md["rope_dim"] is not None and int(md["rope_dim"]) != head_dim:
        raise NotImplementedError("partial rotary embeddings are not supported")
    return md


def _f32_repr(x: float) -> float:
    """The shortest decimal that round-trips the float32 value (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def tensor_array(t) -> np.ndarray:
    """Dequantised numpy array of a GGUFReader tensor, in row-major HF order (dims reversed)."""
    shape = tuple(int(d) for d in reversed(list(t.shape)))
    flat = dequantize(np.asarray(t.data), int(t.tensor_type), int(t.n_elements))
    return flat.reshape(shape)


def convert_tensors(reader, md: dict) -> Dict[str, np.ndarray]:
    out: Dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise NotImplementedError("rope_freqs (llama3 rope scaling) not supported")
        hf = map_name(t.name)
        w = tensor_array(t)
        if hf.endswith("self_attn.q_proj.weight"):
            w = unpermute_rope(w, md["n_heads"])
        elif hf.endswith("self_attn.k_proj.weight"):
            w = unpermute_rope(w, md["n_kv_heads"])
        out[hf] = np.ascontiguousarray(w, dtype=np.float32)
    if "lm_head.weight" in out and np.array_equal(out["lm_head.weight"], out["model.embed_tokens.weight"]):
        del out["lm_head.weight"]
    return out


def expected_shapes(md: dict) -> Dict[str, Tuple[int, ...]]:
    h, f, v = md["hidden"], md["ffn"], md["vocab_size"]
    hd = h // md["n_heads"]
    kv = hd * md["n_kv_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(md["n_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    return shapes


def make_config(md: dict, tied: bool) -> dict:
    head_dim = md["hidden"] // md["n_heads"]
    rope_theta = _f32_repr(md["rope_theta"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": md["hidden"],
        "intermediate_size": md["ffn"],
        "num_hidden_layers": md["n_layers"],
        "num_attention_heads": md["n_heads"],
        "num_key_value_heads": md["n_kv_heads"],
        "head_dim": head_dim,
        "vocab_size": md["vocab_size"],
        "max_position_embeddings": md["ctx"],
        "rms_norm_eps": _f32_repr(md["rms_eps"]),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": tied,
        "bos_token_id": md["bos_token_id"],
        "eos_token_id": md["eos_token_id"],
        "pad_token_id": md["padding_token_id"],
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
        "_converted_from": md.get("name"),
    }


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer(md: dict):
    """An HF `tokenizers.Tokenizer` equivalent to llama.cpp's tokenizer for this GGUF."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if md["tokenizer_model"] != "gpt2":
        raise NotImplementedError(f"tokenizer model {md['tokenizer_model']!r} not supported (byte-level BPE only)")
    pre = md["tokenizer_pre"]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # llama.cpp: regexes ["\p{N}", GPT-2 split] -> each digit is its own pre-token.
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt-2", "default", None):
        pre_tok = byte_level
    else:
        raise NotImplementedError(f"GGUF pre-tokenizer {pre!r} not supported")

    tokens: List[str] = md["tokens"]
    vocab = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise ValueError(f"duplicate token {t!r} at ids {vocab[t]} and {i}")
        vocab[t] = i
    merges = []
    for m in md["merges"]:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"unexpected merge {m!r}")
        merges.append((parts[0], parts[1]))
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    # token_type 3 = CONTROL (special), 4 = USER_DEFINED (added, not special)
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, md["token_type"]) if ty == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, md["token_type"]) if ty == 4]
    if specials:
        tok.add_special_tokens(specials)
    if user:
        tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError("tokenizer vocabulary size changed while adding special tokens")
    return tok


def make_tokenizer_config(md: dict) -> dict:
    tokens = md["tokens"]

    def t(i):
        return None if i is None else tokens[i]

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": md["add_bos_token"],
        "add_eos_token": md["add_eos_token"],
        "bos_token": t(md["bos_token_id"]),
        "eos_token": t(md["eos_token_id"]),
        "unk_token": t(md["unknown_token_id"]),
        "pad_token": t(md["padding_token_id"]),
        "model_max_length": md["ctx"],
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [tok for tok, ty in zip(tokens, md["token_type"]) if ty == 3],
    }
    if md.get("chat_template"):
        cfg["chat_template"] = md["chat_template"]
    return cfg


# --------------------------------------------------------------------------- checks
def check_dequant_against_gguf(reader, names=("token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight")) -> List[str]:
    """Compare our dequantisation with gguf.quants.dequantize (an independent implementation)."""
    from gguf import quants

    report = []
    by_name = {t.name: t for t in reader.tensors}
    for n in names:
        t = by_name.get(n)
        if t is None:
            continue
        ours = tensor_array(t)
        ref = quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(ours.shape)
        diff = float(np.max(np.abs(ours - ref)))
        if diff > 1e-6:
            raise AssertionError(f"dequantisation of {n} differs from gguf.quants by {diff}")
        report.append(f"{n} ({t.tensor_type.name}) max|diff|={diff:.1e}")
    return report


NLL_TEXT = (
    "Paris is the capital and largest city of France. With an estimated population of over two million "
    "residents, it is the centre of the Ile-de-France region. The city is a major railway, highway and "
    "air-transport hub served by two international airports. It is known for its museums and architectural "
    "landmarks: the Louvre received millions of visitors, making it the most-visited art museum in the world."
)
# Mean next-token NLL of NLL_TEXT measured on the converted checkpoint: 2.58 nats. With the q/k RoPE
# permutation left in place the model still says " Paris" but the NLL rises to 4.07, so the NLL
# bound is what catches a wrong un-permutation.
NLL_MAX = 3.2


def load_for_smoke(model_dir: str):
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return tok, model


def greedy_continuation(tok, model, prompt: str = "The capital of France is", max_new_tokens: int = 4) -> str:
    import torch

    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:].tolist())


def mean_nll(tok, model, text: str = NLL_TEXT) -> float:
    import torch

    ids = torch.tensor([tok.encode(text).ids])
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def smoke_checks(model_dir: str) -> dict:
    """Greedy 'The capital of France is' must start with ' Paris'; NLL of a paragraph < NLL_MAX."""
    tok, model = load_for_smoke(model_dir)
    return {"continuation": greedy_continuation(tok, model), "nll": mean_nll(tok, model)}


# --------------------------------------------------------------------------- main conversion
def convert(gguf_path: str, out_dir: str, smoke: bool = True, log=print) -> dict:
    """Write the HF checkpoint into out_dir (which must exist and be empty or scratch)."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    reader = GGUFReader(gguf_path, "r")
    md = read_metadata(reader)
    tensors = convert_tensors(reader, md)
    tied = "lm_head.weight" not in tensors
    shapes = expected_shapes(md)
    if not tied:
        shapes["lm_head.weight"] = (md["vocab_size"], md["hidden"])
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != shapes:
        missing = sorted(set(shapes) - set(got))
        extra = sorted(set(got) - set(shapes))
        wrong = sorted(k for k in set(got) & set(shapes) if got[k] != shapes[k])
        raise ValueError(f"tensor inventory mismatch: missing={missing[:5]} extra={extra[:5]} wrong_shape={wrong[:5]}")
    for k, v in tensors.items():
        if not np.isfinite(v).all():
            raise ValueError(f"non-finite values in {k}")

    log(f"  dequantised {len(tensors)} tensors, {sum(v.size for v in tensors.values()):,} parameters")
    for line in check_dequant_against_gguf(reader):
        log(f"  dequant check vs gguf.quants: {line}")

    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    del tensors
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(make_config(md, tied), f, indent=2)
        f.write("\n")
    tok = build_tokenizer(md)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(make_tokenizer_config(md), f, indent=2)
        f.write("\n")
    info = {"rope_theta": md["rope_theta"], "rms_norm_eps": md["rms_eps"], "tied": tied}
    if smoke:
        res = smoke_checks(out_dir)
        log(f"  smoke: 'The capital of France is' -> {res['continuation']!r}; paragraph NLL {res['nll']:.3f} nats/token")
        if not res["continuation"].startswith(" Paris"):
            raise AssertionError(f"smoke check failed: continuation {res['continuation']!r} does not start with ' Paris'")
        if not res["nll"] < NLL_MAX:
            raise AssertionError(f"smoke check failed: paragraph NLL {res['nll']:.3f} >= {NLL_MAX}")
        info["smoke"] = res
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("out_dir")
    ap.add_argument("--no-smoke", action="store_true")
    a = ap.parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    convert(a.gguf, a.out_dir, smoke=not a.no_smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
