"""Dev-only: loads GGUFs written by `ferrotune export gguf` in transformers (`from_pretrained(gguf_file=...)`) and
compares them with the HF model they came from: token ids and chat template of the GGUF's tokenizer, logits and
mean NLL on a text.

Usage: "$(bash scripts/dev-python.sh)" scripts/check_gguf_transformers.py MODEL_DIR TEXT_FILE A.gguf [B.gguf ...]
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    model_dir, text_file, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    text = open(text_file).read()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text, return_tensors="pt").input_ids
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(ids).logits
    out = {"nll_hf": float(F.cross_entropy(want[0, :-1], ids[0, 1:]))}
    for f in files:
        d, name = os.path.split(os.path.abspath(f))
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
        t = AutoTokenizer.from_pretrained(d, gguf_file=name)
        with torch.no_grad():
            got = m(ids).logits
        out[name] = {
            "max_abs_logit_diff": float((got - want).abs().max()),
            "max_abs_logit": float(want.abs().max()),
            "nll": float(F.cross_entropy(got[0, :-1], ids[0, 1:])),
            "same_token_ids": t(text, return_tensors="pt").input_ids.tolist() == ids.tolist(),
            "same_chat_template": t.chat_template == tok.chat_template,
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
