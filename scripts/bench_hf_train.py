"""Dev-only side of the training benchmark: HF PEFT LoRA (or QLoRA via bitsandbytes, where it runs on the
CPU) training steps on SmolLM2, same shapes as ferrotune's bench. Prints one JSON object
{"tokens_per_s": x, "peak_rss_mb": y}, x from the median step time (as ferrotune's side reports it). Run once
per setting, in its own process, so peak RSS is per setting.

Usage: python scripts/bench_hf_train.py MODEL_DIR TARGETS(qv|all) METHOD(lora|qlora) BATCH SEQ STEPS [DEVICE [DTYPE [GC]]]
DEVICE: cpu (default) or cuda:N; DTYPE: f32 (default), bf16 or f16 for the base (PEFT keeps the adapters in f32).
GC: 1 for gradient checkpointing (`gradient_checkpointing_enable`, non-reentrant, inputs requiring grad as
PEFT needs), 0 (default) without. On a GPU the caller measures the process's GPU memory; peak_rss_mb is then
host memory.
"""
import json
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    model_dir, targets, method, batch, seq, steps = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
    device = sys.argv[7] if len(sys.argv) > 7 else "cpu"
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[sys.argv[8] if len(sys.argv) > 8 else "f32"]
    kw = {}
    if method == "qlora":
        from transformers import BitsAndBytesConfig
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    if device != "cpu":
        kw["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kw)
    if len(sys.argv) > 9 and sys.argv[9] == "1":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    tm = ["q_proj", "v_proj"] if targets == "qv" else "all-linear"
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=tm, task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sync()
        if i > 0:
            times.append(time.perf_counter() - start)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    median = sorted(times)[len(times) // 2]
    print(json.dumps({"tokens_per_s": batch * seq / median, "peak_rss_mb": rss}))


if __name__ == "__main__":
    main()
