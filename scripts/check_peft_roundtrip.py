"""Dev-only: loads an adapter written by `ferrotune train sft` with HF PEFT and compares PEFT's logits with
ferrotune's (`ferrotune eval perplexity --adapter` on the same text), i.e. PEFT reads our adapters.

Usage: "$(bash scripts/dev-python.sh)" scripts/check_peft_roundtrip.py MODEL_DIR ADAPTER_DIR TEXT_FILE
Prints PEFT's mean NLL with and without the adapter; compare with ferrotune's.
"""
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    model_dir, adapter, text_file = sys.argv[1:4]
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok(open(text_file).read(), return_tensors="pt").input_ids
    with torch.no_grad():
        print("base mean_nll", base(ids, labels=ids).loss.item())
        model = PeftModel.from_pretrained(base, adapter).eval()
        print("peft+adapter mean_nll", model(ids, labels=ids).loss.item())


if __name__ == "__main__":
    main()
