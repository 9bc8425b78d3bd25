"""Dev-only side of the generation benchmark: HF transformers `generate` on the same model and settings
(DTYPE f32 or bf16, CPU, greedy, exactly NEW new tokens, same prompt). Prints one JSON object {"batch": tokens_per_s}.

Usage: python scripts/bench_hf_generate.py MODEL_DIR DTYPE PROMPT_IDS_JSON NEW REPEATS BATCH [BATCH ...]
(best of REPEATS runs per batch size, as the Rust side does)
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    model_dir, dtype, prompt, new, repeats = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    batches = [int(b) for b in sys.argv[6:]]
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    out = {}
    with torch.inference_mode():
        model.generate(torch.tensor([prompt]), max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        for b in batches:
            ids = torch.tensor([prompt] * b)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, pad_token_id=model.config.eos_token_id)
                best = min(best, time.perf_counter() - start)
                assert res.shape[1] - len(prompt) == new
            out[str(b)] = b * new / best
    print(json.dumps(out))


if __name__ == "__main__":
    main()
