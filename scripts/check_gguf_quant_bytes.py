"""Dev-only: the Q8_0 / Q4_0 blocks of a SmolLM2 GGUF written by `ferrotune export gguf --type q8_0|q4_0` against
the `gguf` package's own quantizer (`gguf.quants.quantize`) on the HF weights (llama.cpp's q/k permutation
applied): prints the differing bytes per tensor (edit the paths and the type below).

Usage: "$(bash scripts/dev-python.sh)" scripts/check_gguf_quant_bytes.py
"""
import numpy as np, json
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import quantize
from safetensors.numpy import load_file
hf = load_file("/root/.cache/ferrotune/models/smollm2-135m-instruct/model.safetensors")
r = GGUFReader("/tmp/smollm2-q8_0.gguf")
def permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
res = {}
for t in r.tensors:
    if t.name in ("blk.0.attn_q.weight", "blk.3.ffn_down.weight", "token_embd.weight", "blk.7.attn_v.weight"):
        mod = {"attn_q": "self_attn.q_proj", "ffn_down": "mlp.down_proj", "attn_v": "self_attn.v_proj"}
        if t.name == "token_embd.weight": hn = "model.embed_tokens.weight"
        else:
            _, l, m, _ = t.name.split("."); hn = f"model.layers.{l}.{mod[m]}.weight"
        w = hf[hn].astype(np.float32)
        if "attn_q" in t.name: w = permute(w, 9)
        want = quantize(w, GGMLQuantizationType.Q8_0)
        got = np.asarray(t.data).reshape(want.shape)
        res[t.name] = {"bytes": int(want.size), "differ": int((want != got).sum())}
print(json.dumps(res))
