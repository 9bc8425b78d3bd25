"""Dev-only: GGUF export of the Qwen3 and Gemma 3 families checked in transformers.

transformers' GGUF loader reads fewer hyperparameters than a GGUF holds: for `qwen3` it takes head_dim as 128
and ignores biases; for `gemma3` it takes `query_pre_attn_scalar` as 256 and ignores rope scaling (llama.cpp
scales Gemma 3 by 1/√head_dim). So the tiny models here are shaped the way the released checkpoints are
(Qwen3: head_dim 128, no biases; Gemma 3: head_dim 256 = query_pre_attn_scalar, every sixth layer global, no
rope scaling), made with transformers, given the TinyLlama-shaped fixture's SentencePiece tokenizer, exported
by `ferrotune export gguf` (f32, f16, q8_0) and loaded back in transformers: max |Δ logit| and NLL against the
HF model on a text.

Usage: "$(bash scripts/dev-python.sh)" scripts/check_gguf_families.py FERROTUNE_BINARY
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, Gemma3TextConfig, Gemma3ForCausalLM, Qwen3Config, Qwen3ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "tests", "fixtures", "tiny-llama-spm")
TEXT = "Ahoy matey, the treasure be buried on the island. The quick brown fox jumps over the lazy dog twice."


def make(kind, d):
    torch.manual_seed(1)
    common = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=2, head_dim=128, tie_word_embeddings=True, **common))
    else:
        cfg = Gemma3TextConfig(num_hidden_layers=6, head_dim=256, query_pre_attn_scalar=256, sliding_window=4,
                               tie_word_embeddings=True, **common)
        model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.2)
    model.eval().save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, f), d)
    return model


def main():
    binary = sys.argv[1]
    out = {}
    with tempfile.TemporaryDirectory() as root:
        for kind in ("qwen3", "gemma3"):
            d = os.path.join(root, kind)
            ref = make(kind, d)
            ids = torch.tensor([Tokenizer.from_file(os.path.join(d, "tokenizer.json")).encode(TEXT).ids])
            with torch.no_grad():
                want = ref(ids).logits
            res = {"nll_hf": float(F.cross_entropy(want[0, :-1], ids[0, 1:]))}
            for ty in ("f32", "f16", "q8_0"):
                f = os.path.join(d, f"{ty}.gguf")
                subprocess.run([binary, "export", "gguf", "--model", d, "--out", f, "--type", ty], check=True,
                               capture_output=True)
                m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f"{ty}.gguf", dtype=torch.float32).eval()
                with torch.no_grad():
                    got = m(ids).logits
                res[ty] = {"max_abs_logit_diff": float((got - want).abs().max()),
                           "max_abs_logit": float(want.abs().max()),
                           "nll": float(F.cross_entropy(got[0, :-1], ids[0, 1:]))}
            out[kind] = res
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
