#!/usr/bin/env python3
"""Reference activations from Hugging Face transformers, for the Rust parity test.

Usage: parity_reference.py MODEL_DIR OUT.safetensors [--max-len N]

Runs the model in MODEL_DIR (config.json + model.safetensors + tokenizer.json)
with transformers (BertModel, MPNetModel or LlamaForCausalLM, float32, eval
mode, 2 CPU threads) on a fixed batch of real questions (TREC), tokenised by HF's own
tokenizer with right padding, and writes OUT.safetensors with:

  input_ids, attention_mask        [B, T] int64, as HF's tokenizer made them
  hidden.0                         embeddings output           [B, T, H] f32
  hidden.{i}  (i = 1..L)           output of layer i-1         [B, T, H] f32
  final_norm                       LLaMA only: model.norm(hidden.L)
  pooled                           mean over real positions of the final
                                   output (hidden.L; LLaMA: final_norm) [B, H]
  logits                           LLaMA only: [B, T, V] f32
  greedy_ids                       LLaMA only: prompt + 4 greedy tokens [1, P+4]
  short.input_ids, short.attention_mask   the same texts truncated to 12 tokens

Hidden states and logits are zeroed at padded positions. The metadata holds
the texts (JSON list), the greedy prompt, max_len and the family, so the Rust
test tokenises exactly the same strings.

Second form: parity_reference.py make-tiny {bert,llama,mpnet} TOKENIZER_DIR OUT_DIR
writes a small random checkpoint with transformers, with the options the real
models do not exercise (BERT: gelu_new, 3 heads of 16, LayerNorm eps 1e-7,
saved from BertForSequenceClassification so names carry a `bert.` prefix;
LLaMA: head_dim 24 != hidden/heads, 4 query / 2 KV heads, llama3 RoPE
scaling, untied lm_head, attention and MLP biases; MPNet: gelu_new, 3 heads
of 16, eps 1e-7, 66 positions, saved from MPNetForMaskedLM so names carry an
`mpnet.` prefix), and copies the tokenizer files from TOKENIZER_DIR (a real
model of the same family).
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

# Real questions from the TREC question-classification set (Li & Roth),
# chosen for varied lengths and characters.
TEXTS = [
    "What is the capital of Yugoslavia ?",
    "How far is it from Denver to Aspen ?",
    "Who was the first woman killed in the Vietnam War ?",
    "What does the abbreviation AIDS stand for ?",
    "When did Hawaii become a state ?",
    "What is the name of the chocolate company in San Francisco ?",
    "How many Grand Slam titles did Steffi Graf win in 1988 , and who did she beat in the Wimbledon final that year ?",
    "Why ?",
]
GREEDY_PROMPT = "The capital of France is"
GREEDY_NEW_TOKENS = 4
SHORT_MAX_LEN = 12


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(model_dir)
    else:
        tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
    tok.padding_side = "right"
    tok.truncation_side = "right"
    if tok.pad_token is None:
        # Masked anyway; any valid id will do.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def make_tiny(kind, tokenizer_dir, out_dir):
    import shutil

    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    with open(os.path.join(tokenizer_dir, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    # The encoders' (BERT, MPNet) options the real models do not use.
    encoder = dict(
        vocab_size=vocab_size,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=100,
        hidden_act="gelu_new",
        layer_norm_eps=1e-7,
        initializer_range=0.2,
    )
    if kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(max_position_embeddings=64, num_labels=3, **encoder)
        model = BertForSequenceClassification(config)
    elif kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            tie_word_embeddings=False,
            attention_bias=True,
            mlp_bias=True,
            initializer_range=0.2,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = LlamaForCausalLM(config)
    elif kind == "mpnet":
        from transformers import MPNetConfig, MPNetForMaskedLM

        config = MPNetConfig(
            max_position_embeddings=66, relative_attention_num_buckets=32, pad_token_id=1, **encoder
        )
        model = MPNetForMaskedLM(config)
    else:
        sys.exit(f"make-tiny: unknown kind {kind!r} (bert, llama, mpnet)")
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Non-trivial norms and biases, so every parameter matters.
            if "norm" in name.lower() or name.endswith("bias"):
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.normal_(0.0, 0.1)
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        src = os.path.join(tokenizer_dir, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(out_dir, name))
    print(f"wrote tiny {kind} to {out_dir}")


def model_layers(model):
    inner = getattr(model, "model", model)
    return inner.layers if hasattr(inner, "layers") else inner.encoder.layer


def layer_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "make-tiny":
        if len(sys.argv) != 5:
            sys.exit("usage: parity_reference.py make-tiny {bert,llama,mpnet} TOKENIZER_DIR OUT_DIR")
        make_tiny(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--max-len", type=int, default=64)
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    with open(os.path.join(args.model_dir, "config.json")) as f:
        config = json.load(f)
    model_type = config.get("model_type")
    if model_type not in ("bert", "llama", "mpnet"):
        sys.exit(f"{args.model_dir}/config.json: unsupported model_type {model_type!r}")

    tok = load_tokenizer(args.model_dir)
    enc = tok(
        TEXTS,
        padding=True,
        truncation=True,
        max_length=args.max_len,
        return_tensors="pt",
    )
    input_ids = enc["input_ids"].to(torch.int64)
    mask = enc["attention_mask"].to(torch.int64)
    short = tok(TEXTS, padding=True, truncation=True, max_length=SHORT_MAX_LEN, return_tensors="pt")

    captured = {}

    def hook(name):
        def fn(_module, _inputs, output):
            captured[name] = layer_output(output).detach().to(torch.float32)

        return fn

    if model_type in ("bert", "mpnet"):
        from transformers import BertModel, MPNetModel

        bert = model_type == "bert"
        encoder_class = BertModel if bert else MPNetModel
        model = encoder_class.from_pretrained(args.model_dir, dtype=torch.float32, add_pooling_layer=False)
        model.eval()
        model.embeddings.register_forward_hook(hook("hidden.0"))
        for i, layer in enumerate(model.encoder.layer):
            layer.register_forward_hook(hook(f"hidden.{i + 1}"))
        # BERT: token type 0 everywhere; MPNet has no token types.
        types = {"token_type_ids": torch.zeros_like(input_ids)} if bert else {}
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=mask, **types)
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        model.eval()
        inner = model.model
        inner.embed_tokens.register_forward_hook(hook("hidden.0"))
        for i, layer in enumerate(inner.layers):
            layer.register_forward_hook(hook(f"hidden.{i + 1}"))
        inner.norm.register_forward_hook(hook("final_norm"))
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        captured["logits"] = out.logits.detach().to(torch.float32)

    keep = mask.unsqueeze(-1).to(torch.float32)
    tensors = {name: (t * keep).contiguous() for name, t in captured.items()}
    # Mean pooling over the real tokens, as sentence-transformers does.
    last = tensors["final_norm" if model_type == "llama" else f"hidden.{len(model_layers(model))}"]
    tensors["pooled"] = (last.sum(dim=1) / keep.sum(dim=1)).contiguous()
    tensors["input_ids"] = input_ids.contiguous()
    tensors["attention_mask"] = mask.contiguous()
    tensors["short.input_ids"] = short["input_ids"].to(torch.int64).contiguous()
    tensors["short.attention_mask"] = short["attention_mask"].to(torch.int64).contiguous()

    if model_type == "llama":
        prompt = tok(GREEDY_PROMPT, return_tensors="pt")["input_ids"].to(torch.int64)
        ids = prompt
        with torch.no_grad():
            for _ in range(GREEDY_NEW_TOKENS):
                logits = model(input_ids=ids, use_cache=False).logits
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        tensors["greedy_ids"] = ids.contiguous()
        print(f"greedy: {GREEDY_PROMPT!r} -> {tok.decode(ids[0, prompt.shape[1]:])!r}")

    metadata = {
        "texts": json.dumps(TEXTS),
        "greedy_prompt": GREEDY_PROMPT,
        "max_len": str(args.max_len),
        "short_max_len": str(SHORT_MAX_LEN),
        "family": model_type,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {args.out}: {len(tensors)} tensors, batch {tuple(input_ids.shape)}")


if __name__ == "__main__":
    main()
