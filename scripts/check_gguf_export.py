"""Dev-only: reads a GGUF written by `ferrotune export gguf` with the `gguf` package (llama.cpp's own Python
reader) and checks it against the HF model it came from: metadata, vocabulary, chat template, and every tensor
dequantized by `gguf.quants.dequantize` against the HF weight (llama.cpp's q/k permutation applied).

Usage: "$(bash scripts/dev-python.sh)" scripts/check_gguf_export.py MODEL_DIR FILE.gguf
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import load_file
import glob
import os


def permute(w, n_head):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    model_dir, path = sys.argv[1], sys.argv[2]
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    r = GGUFReader(path)
    field = lambda k: r.fields[k]
    val = lambda k: field(k).contents()
    arch = val("general.architecture")
    print("architecture", arch, "tensors", len(r.tensors), "fields", len(r.fields))
    assert val(f"{arch}.block_count") == cfg["num_hidden_layers"]
    assert val(f"{arch}.attention.head_count") == cfg["num_attention_heads"]
    assert val(f"{arch}.attention.head_count_kv") == cfg["num_key_value_heads"]
    tok = json.load(open(os.path.join(model_dir, "tokenizer.json")))
    tokens = val("tokenizer.ggml.tokens")
    for t, i in list(tok["model"]["vocab"].items())[:2000]:
        assert tokens[i] == t, (i, t, tokens[i])
    tc = json.load(open(os.path.join(model_dir, "tokenizer_config.json")))
    if "chat_template" in tc:
        assert val("tokenizer.chat_template") == tc["chat_template"]
    hf = {}
    for f in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        hf.update(load_file(f))
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    mods = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    worst = 0.0
    for t in r.tensors:
        if t.name in names:
            hn = names[t.name]
        else:
            _, layer, mod, suffix = t.name.split(".")
            hn = f"model.layers.{layer}.{mods[mod]}.{suffix}"
        want = hf[hn].astype(np.float32)
        if arch == "llama" and t.name.split(".")[2:3] in (["attn_q"], ["attn_k"]):
            heads = cfg["num_attention_heads"] if ".attn_q." in t.name else cfg["num_key_value_heads"]
            want = permute(want, heads)
        got = dequantize(t.data, t.tensor_type).reshape(want.shape)
        err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
        worst = max(worst, err)
    print(json.dumps({"file": path, "type_counts": {str(k): v for k, v in __import__("collections").Counter(t.tensor_type.name for t in r.tensors).items()},
                      "worst_relative_error": worst}))


if __name__ == "__main__":
    main()
