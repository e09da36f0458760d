#!/usr/bin/env python3
"""Convert a BERT encoder exported to ONNX (paraphrase-MiniLM-L3-v2, as exported by PyTorch from
sentence-transformers) back into a Hugging Face BertModel checkpoint directory.

How the names are recovered. PyTorch's exporter keeps parameter names for the tensors it uses as
they are (embeddings, LayerNorm weights, biases), but each Linear weight is pre-transposed to
[in, out] and stored under an anonymous name such as `onnx::MatMul_470`. Each such initializer is
the B input of one MatMul whose output is consumed by an Add that adds the Linear's bias, and the
bias initializer has the HF name (`...query.bias`). So the weight's HF name is the bias name with
`.bias` -> `.weight`, and its value is the initializer transposed back to [out, in].

Names are normalised to BertModel's state_dict (no `bert.` or `model.0.auto_model.` prefix).
The config is read off the graph as far as possible (sizes from the tensors, LayerNorm epsilon
from the LayerNormalization nodes, the number of heads from the attention-score scale constant,
gelu from the Erf node) and checked against the values expected for MiniLM-L3.

Usage: convert_onnx_bert.py MODEL.onnx TOKENIZER_DIR OUT_DIR [--no-parity]
  TOKENIZER_DIR must hold tokenizer.json (and optionally tokenizer_config.json, vocab.txt) of the
  same vocabulary: for MiniLM-L3 that is the converted all-MiniLM-L6-v2 directory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error")):
    os.environ.setdefault(_k, _v)

_HF_ROOTS = ("embeddings.", "encoder.", "pooler.")


def normalise_name(name: str) -> Optional[str]:
    """Strip any module prefix (`bert.`, `model.0.auto_model.`, `0.auto_model.` ...) so the name
    starts at embeddings./encoder./pooler.; None if the name is not a BERT parameter name."""
    best = None
    for root in _HF_ROOTS:
        if name.startswith(root):
            return name
        i = name.find("." + root)
        if i >= 0 and (best is None or i < best):
            best = i
    if best is None:
        return None
    return name[best + 1:]


def _consumers(graph) -> Dict[str, list]:
    cons: Dict[str, list] = {}
    for node in graph.node:
        for inp in node.input:
            cons.setdefault(inp, []).append(node)
    return cons


def onnx_to_hf_tensors(model) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Return ({hf_name: array}, {onnx_initializer_name: hf_name}) for every parameter of the
    encoder that the graph uses. Raises if an anonymous MatMul weight cannot be named."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    # Constant nodes can also carry weights in some exports; treat them like initializers.
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] not in inits:
            for a in node.attribute:
                if a.name == "value" and len(a.t.dims) >= 2 and a.t.data_type == 1:
                    t = a.t
                    t.name = node.output[0]
                    inits[node.output[0]] = t
    cons = _consumers(graph)
    out: Dict[str, np.ndarray] = {}
    names: Dict[str, str] = {}

    def put(hf: str, arr: np.ndarray, src: str):
        if hf in out:
            if not np.array_equal(out[hf], arr):
                raise ValueError(f"two different tensors map to {hf}")
            return
        out[hf] = np.ascontiguousarray(arr, dtype=np.float32)
        names[src] = hf

    # 1. named parameters (float tensors whose name normalises to a BERT parameter)
    for name, init in inits.items():
        hf = normalise_name(name)
        if hf is None or init.data_type != 1:  # 1 = FLOAT
            continue
        put(hf, numpy_helper.to_array(init), name)

    # 2. anonymous Linear weights: MatMul(x, W) -> Add(bias, .) with a named bias
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        w_name = node.input[1]
        if w_name not in inits or normalise_name(w_name) is not None:
            continue
        if node.op_type == "Gemm":
            raise NotImplementedError("Gemm-based exports are not supported")
        bias_name = None
        for c in cons.get(node.output[0], []):
            if c.op_type != "Add":
                continue
            other = [i for i in c.input if i != node.output[0]]
            if len(other) == 1 and other[0] in inits and (normalise_name(other[0]) or "").endswith(".bias"):
                bias_name = other[0]
                break
        if bias_name is None:
            raise ValueError(f"cannot name MatMul weight {w_name}: its output feeds no Add with a named bias")
        hf = normalise_name(bias_name)[: -len(".bias")] + ".weight"
        w = numpy_helper.to_array(inits[w_name])
        if w.ndim != 2:
            raise ValueError(f"MatMul weight {w_name} is not 2-D")
        put(hf, w.T, w_name)
    return out, names


def graph_hyperparameters(model) -> dict:
    """Numbers read off the graph: LayerNorm epsilon, attention scale -> head dim, activation."""
    from onnx import helper, numpy_helper

    graph = model.graph
    eps = set()
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        if node.op_type == "LayerNormalization":
            e = 1e-5  # ONNX default
            for a in node.attribute:
                if a.name == "epsilon":
                    e = helper.get_attribute_value(a)
            eps.add(float(np.float32(e)))
    consts = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
    for i in graph.initializer:
        if i.name not in consts and len(i.dims) == 0:
            consts[i.name] = numpy_helper.to_array(i)
    # attention scores: MatMul(Q, K^T) -> Div(., sqrt(head_dim))  (or Mul by 1/sqrt(head_dim))
    scales = set()
    for node in graph.node:
        if node.op_type in ("Div", "Mul") and "/attention/self/" in node.name + "".join(node.output):
            for i in node.input:
                v = consts.get(i)
                if v is not None and v.size == 1:
                    s = float(v.reshape(()))
                    scales.add(s * s if node.op_type == "Div" else 1.0 / (s * s))
    return {
        "layer_norm_eps": sorted(eps),
        "head_dim": sorted(round(s) for s in scales),
        "gelu_erf": "Erf" in ops,
    }


def make_config(tensors: Dict[str, np.ndarray], hp: dict, expect: Optional[dict] = None) -> dict:
    vocab, hidden = tensors["embeddings.word_embeddings.weight"].shape
    max_pos = tensors["embeddings.position_embeddings.weight"].shape[0]
    type_vocab = tensors["embeddings.token_type_embeddings.weight"].shape[0]
    layers = sorted({int(m.group(1)) for k in tensors for m in [re.match(r"encoder\.layer\.(\d+)\.", k)] if m})
    if layers != list(range(len(layers))):
        raise ValueError(f"non-contiguous encoder layers {layers}")
    inter = tensors["encoder.layer.0.intermediate.dense.weight"].shape[0]
    if len(hp["head_dim"]) != 1:
        raise ValueError(f"cannot read the head size from the graph: {hp['head_dim']}")
    head_dim = hp["head_dim"][0]
    if len(hp["layer_norm_eps"]) != 1:
        raise ValueError(f"LayerNorm epsilons differ: {hp['layer_norm_eps']}")
    if not hp["gelu_erf"]:
        raise ValueError("no Erf node: the activation is not exact gelu")
    cfg = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "num_hidden_layers": len(layers),
        "num_attention_heads": int(hidden // head_dim),
        "intermediate_size": int(inter),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": int(max_pos),
        "type_vocab_size": int(type_vocab),
        "initializer_range": 0.02,
        "layer_norm_eps": float(str(np.float32(hp["layer_norm_eps"][0]))),
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "use_cache": True,
        "torch_dtype": "float32",
        "_converted_from": "paraphrase-MiniLM-L3-v2 (ONNX)",
    }
    if expect:
        for k, v in expect.items():
            if cfg[k] != v:
                raise ValueError(f"config {k}={cfg[k]} read from the ONNX graph, expected {v}")
    return cfg


def expected_names(n_layers: int, pooler: bool = False) -> List[str]:
    names = [
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
    ]
    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        for lin in ("attention.self.query", "attention.self.key", "attention.self.value",
                    "attention.output.dense", "intermediate.dense", "output.dense"):
            names += [p + lin + ".weight", p + lin + ".bias"]
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            names += [p + ln + ".weight", p + ln + ".bias"]
    if pooler:
        names += ["pooler.dense.weight", "pooler.dense.bias"]
    return names


L3_EXPECT = {
    "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 3, "num_attention_heads": 12,
    "intermediate_size": 1536, "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
}

PARITY_SENTENCES = [
    "The capital of France is Paris.",
    "How did serfdom develop in and then leave Russia ?",
    "What is the full form of .com ?",
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005.",
    "I love this movie, the acting was wonderful!",
    "a",
]


def onnx_outputs(onnx_path: str, input_ids: np.ndarray, attention_mask: np.ndarray) -> Dict[str, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = input_ids.astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = attention_mask.astype(np.int64)
        elif i.name == "token_type_ids":
            feeds[i.name] = np.zeros_like(input_ids, dtype=np.int64)
        else:
            raise ValueError(f"unexpected ONNX input {i.name}")
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def parity(model_dir: str, onnx_path: str, sentences=PARITY_SENTENCES) -> float:
    """Max |HF BertModel last_hidden_state - ONNX last hidden state| over the real tokens of a
    padded batch of real sentences (tokenised with the converted tokenizer.json)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    enc = tok.encode_batch(sentences)
    n = max(len(e.ids) for e in enc)
    ids = np.zeros((len(enc), n), np.int64)
    mask = np.zeros((len(enc), n), np.int64)
    for r, e in enumerate(enc):
        ids[r, : len(e.ids)] = e.ids
        mask[r, : len(e.ids)] = 1
    outs = onnx_outputs(onnx_path, ids, mask)
    ref = [v for v in outs.values() if v.ndim == 3 and v.shape[:2] == ids.shape]
    if len(ref) != 1:
        raise ValueError(f"cannot identify the ONNX last-hidden-state output among {[(k, v.shape) for k, v in outs.items()]}")
    ref = ref[0]
    model = BertModel.from_pretrained(model_dir, add_pooling_layer=False, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    m = mask.astype(bool)
    return float(np.max(np.abs(hs[m] - ref[m])))


def copy_tokenizer(tokenizer_dir: str, out_dir: str):
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        src = os.path.join(tokenizer_dir, f)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out_dir, f))
    if not os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}")


def convert(onnx_path: str, tokenizer_dir: str, out_dir: str, check_parity: bool = True, log=print) -> dict:
    import onnx
    from safetensors.numpy import save_file

    model = onnx.load(onnx_path)
    tensors, names = onnx_to_hf_tensors(model)
    hp = graph_hyperparameters(model)
    cfg = make_config(tensors, hp, expect=L3_EXPECT)
    pooler = "pooler.dense.weight" in tensors
    want = expected_names(cfg["num_hidden_layers"], pooler)
    if sorted(tensors) != sorted(want):
        raise ValueError(
            f"tensor inventory mismatch: missing={sorted(set(want) - set(tensors))} extra={sorted(set(tensors) - set(want))}"
        )
    anon = sum(1 for k in names if normalise_name(k) is None)
    log(f"  {len(tensors)} tensors ({anon} Linear weights named through the graph), pooler={'yes' if pooler else 'absent'}")
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    copy_tokenizer(tokenizer_dir, out_dir)
    vocab_txt = os.path.join(out_dir, "vocab.txt")
    if os.path.exists(vocab_txt):
        with open(vocab_txt, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n != cfg["vocab_size"]:
            raise ValueError(f"tokenizer vocab has {n} entries, model has {cfg['vocab_size']}")
    info = {"pooler": pooler, "n_tensors": len(tensors)}
    if check_parity:
        d = parity(out_dir, onnx_path)
        log(f"  parity vs onnxruntime: max|diff| of last hidden state = {d:.2e}")
        if not d <= 1e-4:
            raise AssertionError(f"converted model differs from the ONNX model by {d}")
        info["parity_max_abs_diff"] = d
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx")
    ap.add_argument("tokenizer_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--no-parity", action="store_true")
    a = ap.parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    convert(a.onnx, a.tokenizer_dir, a.out_dir, check_parity=not a.no_parity)
    return 0


if __name__ == "__main__":
    sys.exit(main())
