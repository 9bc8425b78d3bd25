"""Dev-only side of the rollout benchmark: HF transformers `generate(num_return_sequences=N)` on the same model,
prompts and settings (f32, CPU, sampling at temperature 1.0, at most NEW new tokens, stopping at EOS). Prints one
JSON object {"tokens": useful tokens, "seconds": best wall time, "tokens_per_s": ...}: useful tokens are each
sequence's tokens up to and including its EOS (HF keeps decoding finished rows until the longest ends; those pad
tokens are not counted).

Usage: python scripts/bench_hf_rollout.py MODEL_DIR PROMPTS_JSON N NEW REPEATS EOS_IDS_JSON PAD_ID
(PROMPTS_JSON: a list of token-id lists; left-padded with PAD_ID)
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    model_dir, prompts, n, new, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    eos, pad = json.loads(sys.argv[6]), int(sys.argv[7])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    best, tokens = float("inf"), 0
    with torch.inference_mode():
        model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=4, do_sample=False, pad_token_id=pad)  # warm-up
        for r in range(repeats):
            torch.manual_seed(r)
            start = time.perf_counter()
            res = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, num_return_sequences=n, eos_token_id=eos, pad_token_id=pad)
            took = time.perf_counter() - start
            count = 0
            for row in res[:, longest:].tolist():
                for t in row:
                    count += 1
                    if t in eos:
                        break
            if took < best:
                best, tokens = took, count
    print(json.dumps({"tokens": tokens, "seconds": best, "tokens_per_s": tokens / best}))


if __name__ == "__main__":
    main()
