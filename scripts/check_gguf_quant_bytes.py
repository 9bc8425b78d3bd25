"""Dev-only: every quantized tensor of a GGUF written by `ferrotune export gguf --type q8_0|q4_0|q4_k_m` against
llama.cpp's own quantizer run on the same f32 weights: libggml's `ggml_quantize_chunk` (no importance matrix,
i.e. the `quantize_row_*_ref` functions `llama-quantize` uses), loaded with ctypes from the prebuilt llama.cpp
that the npm package `@node-llama-cpp/linux-x64` ships (`scripts/llama-cpp.sh` unpacks it; or pass the path of
`libggml-base.so`). The weights are the HF model's (f32 safetensors, llama.cpp's q/k row permutation applied for
`llama`). Prints, per tensor type, how many tensors and bytes differ.

Usage: "$(bash scripts/dev-python.sh)" scripts/check_gguf_quant_bytes.py MODEL_DIR FILE.gguf [libggml-base.so]
"""
import ctypes
import glob
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from safetensors.numpy import load_file

HF_OF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}


def permute(w, n_head):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def find_lib():
    hits = glob.glob(os.path.expanduser("~/.cache/ferrotune-dev/node-llama-cpp/**/libggml-base.so"), recursive=True)
    return hits[0] if hits else "/tmp/nlc/package/bins/linux-x64/libggml-base.so"


def main():
    model_dir, path = sys.argv[1], sys.argv[2]
    lib = ctypes.CDLL(sys.argv[3] if len(sys.argv) > 3 else find_lib())
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    hf = {}
    for f in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        hf.update(load_file(f))
    r = GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    res = {}
    for t in r.tensors:
        ty = t.tensor_type
        if ty.name not in ("Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q6_K"):
            continue
        if t.name == "token_embd.weight":
            w = hf["model.embed_tokens.weight"]
        elif t.name == "output.weight":
            w = hf["lm_head.weight"]
        else:
            _, layer, module, _ = t.name.split(".")
            w = hf[f"model.layers.{layer}.{HF_OF[module]}.weight"]
            if arch == "llama" and module in ("attn_q", "attn_k"):
                heads = cfg["num_attention_heads"] if module == "attn_q" else cfg["num_key_value_heads"]
                w = permute(w, heads)
        w = np.ascontiguousarray(w.astype(np.float32))
        got = np.asarray(t.data).view(np.uint8).reshape(-1)
        want = np.zeros(got.size + 4096, dtype=np.uint8)
        n = lib.ggml_quantize_chunk(int(ty), w.ctypes.data, want.ctypes.data, 0, w.shape[0], w.shape[1], None)
        want = want[:n]
        s = res.setdefault(ty.name, {"tensors": 0, "tensors_differing": 0, "bytes": 0, "bytes_differing": 0})
        differ = int((want != got).sum()) if want.size == got.size else got.size
        s["tensors"] += 1
        s["tensors_differing"] += int(differ > 0)
        s["bytes"] += int(got.size)
        s["bytes_differing"] += differ
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
