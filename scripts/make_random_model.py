"""GPU-check helper: a SmolLM2-shaped Llama with random weights (for a GPU host that cannot fetch the real
weights), and HF transformers' next-token loss on a text file as the reference for ferrotune's.

Usage: python scripts/make_random_model.py TEMPLATE_DIR OUT_DIR TEXT_FILE DEVICE
TEMPLATE_DIR holds config.json and the tokenizer files; the weights are drawn with seed 0 and std 0.1 (the
default 0.02 gives near-uniform logits, which would hide a wrong forward pass). Prints one JSON object with
HF's mean NLL of TEXT_FILE in f32 and bf16 (loaded as bf16) on DEVICE.
"""
import json
import shutil
import sys

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def main():
    template, out, text_file, device = sys.argv[1:5]
    config = LlamaConfig.from_pretrained(template)
    config.initializer_range = 0.1
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(out, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        shutil.copy(f"{template}/{f}", f"{out}/{f}")
    shutil.copy(f"{template}/config.json", f"{out}/config.json")
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(open(text_file).read(), return_tensors="pt").input_ids.to(device)
    res = {"tokens": ids.shape[1]}
    model = model.to(device).eval()
    with torch.no_grad():
        res["hf_nll_f32"] = model(ids, labels=ids).loss.item()
        # Loaded in bf16 (not cast after loading, which would also round RoPE's inverse frequencies to bf16).
        m16 = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(device).eval()
        res["hf_nll_bf16"] = m16(ids, labels=ids).loss.float().item()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
