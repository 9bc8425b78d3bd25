#!/usr/bin/env bash
# GPU smoke check, for a session that has a CUDA machine (never run by `make test`; CI has no GPU).
# Builds with libtorch_cuda linked, then runs generation and a short QLoRA SFT on cuda:0 in bf16 and prints
# what it measured. Usage (repo root, on the GPU host): bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
make build-cuda
ft=target/release/ferrotune
model=$("$ft" models pull smollm2-135m-instruct)
echo "== generate on cuda:0 (bf16)"
"$ft" generate --model "$model" --device cuda:0 --dtype bf16 --chat --prompt "What is the capital of France?" --json
echo "== QLoRA SFT on cuda:0 (bf16 compute, f32 adapters and optimizer), 20 steps"
out=$(mktemp -d)
"$ft" train sft --recipe recipes/lora-sft.yaml --output-dir "$out/q" --max-steps 20 \
  --set adapter.method=qlora --set device=cuda:0 --set dtype=bf16 --json | tail -3
echo "== the adapter on cuda:0"
"$ft" generate --model "$model" --adapter "$out/q" --device cuda:0 --dtype bf16 --chat --prompt "What is the capital of Egypt?" --json
