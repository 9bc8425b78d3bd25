#!/usr/bin/env bash
# GPU check, for a session that has a CUDA machine (never run by `make test`; CI has no GPU). Each section
# prints its result and the script goes on after a failure; the summary at the end says which failed.
#
# On a GPU host with this repo's toolchain: `bash scripts/gpu_check.sh` (builds with `make build-cuda`, uses
# SmolLM2 from the registry).
# On a bare GPU host that has a CUDA PyTorch 2.11 but no cargo and no network (the lent device machine):
#   FERROTUNE_BIN=.gpu/ferrotune FERROTUNE_BENCH_BIN=.gpu/training FERROTUNE_TEMPLATE=.gpu/tpl bash scripts/gpu_check.sh
# runs binaries built here (for CPU) against that PyTorch's libtorch with libtorch_cuda preloaded (the same
# libtorch version, so the same ABI), on a random-weight model shaped like SmolLM2 (config and tokenizer from
# FERROTUNE_TEMPLATE; scripts/make_random_model.py, which also gives HF's loss as the reference).
#
# Checks: forward loss on cuda:0 (f32, bf16) against HF transformers on the same GPU and against ferrotune on
# the CPU; generation on cuda:0; LoRA SFT losses on cuda:0 f32 against the CPU; the same with the layers split
# between the CPU and cuda:0 by a device_map; 2-rank NCCL data parallelism (2 GPUs); LoRA and QLoRA SFT in bf16
# on cuda:0; kill-and-resume on cuda:0 against an uninterrupted run; the training benchmark against HF PEFT
# on the same GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
py=${PYTHON:-python3}
fails=()
section() { echo; echo "== $*"; }
fail() { echo "FAILED: $*"; fails+=("$*"); }

nvidia-smi -L || true
if [ -n "${FERROTUNE_BIN:-}" ]; then
  tl=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
  export LD_LIBRARY_PATH="$tl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "libtorch from $tl ($("$py" -c 'import torch; print(torch.__version__)'))"
  # Only ferrotune's processes get libtorch_cuda preloaded (the bench keeps it off nvidia-smi).
  ft=$(mktemp -d)/ferrotune
  printf '#!/bin/sh\nLD_PRELOAD=%s exec %s "$@"\n' "$tl/libtorch_cuda.so" "$(realpath "$FERROTUNE_BIN")" >"$ft"
  chmod +x "$ft"
else
  make build-cuda || exit 1
  ft=target/release/ferrotune
fi
work=$(mktemp -d)
head -c 1500 README.md >"$work/text.txt"

if [ -n "${FERROTUNE_TEMPLATE:-}" ]; then
  section "random SmolLM2-shaped model (HF reference losses on cuda:0)"
  model=$work/model
  ref=$("$py" scripts/make_random_model.py "$FERROTUNE_TEMPLATE" "$model" "$work/text.txt" cuda:0 2>"$work/model.log" | tail -1)
  echo "$ref"
  [ -n "$ref" ] || { fail "random model"; tail -n 5 "$work/model.log"; }
else
  model=$("$ft" models pull smollm2-135m-instruct)
  ref=$("$py" - "$model" "$work/text.txt" <<'EOF' 2>/dev/null | tail -1
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
ids = AutoTokenizer.from_pretrained(sys.argv[1])(open(sys.argv[2]).read(), return_tensors="pt").input_ids.to("cuda:0")
nll = lambda dt: AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=dt).to("cuda:0").eval()(ids, labels=ids).loss.float().item()
with torch.no_grad():
    print(json.dumps({"hf_nll_f32": nll(torch.float32), "hf_nll_bf16": nll(torch.bfloat16)}))
EOF
)
  echo "$ref"
fi
num() { "$py" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
close() { "$py" -c "import sys; a,b,t=map(float,sys.argv[1:4]); sys.exit(0 if abs(a-b)<=t else 1)" "$1" "$2" "$3"; }

section "forward loss: ferrotune cpu f32 / cuda:0 f32 / cuda:0 bf16 against HF"
cpu=$("$ft" eval perplexity --model "$model" --text-file "$work/text.txt" --device cpu --json) && echo "cpu f32:   $cpu"
g32=$("$ft" eval perplexity --model "$model" --text-file "$work/text.txt" --device cuda:0 --dtype f32 --json) && echo "cuda f32:  $g32"
g16=$("$ft" eval perplexity --model "$model" --text-file "$work/text.txt" --device cuda:0 --dtype bf16 --json) && echo "cuda bf16: $g16"
if [ -n "$ref" ] && [ -n "${g32:-}" ] && [ -n "${g16:-}" ] && [ -n "${cpu:-}" ]; then
  close "$(num "$g32" mean_nll)" "$(num "$ref" hf_nll_f32)" 1e-3 && echo "cuda f32 = HF f32 (±1e-3)" || fail "cuda f32 NLL differs from HF"
  close "$(num "$g32" mean_nll)" "$(num "$cpu" mean_nll)" 1e-3 && echo "cuda f32 = cpu f32 (±1e-3)" || fail "cuda f32 NLL differs from cpu"
  close "$(num "$g16" mean_nll)" "$(num "$ref" hf_nll_bf16)" 2e-2 && echo "cuda bf16 = HF bf16 (±2e-2)" || fail "cuda bf16 NLL differs from HF bf16"
else
  fail "forward loss"
fi

section "generate on cuda:0 (bf16)"
"$ft" generate --model "$model" --device cuda:0 --dtype bf16 --chat --prompt "What is the capital of France?" --max-new-tokens 16 --json || fail "generate"

section "Prometheus /metrics of a policy server on cuda:0: GPU memory from NVML"
mlog="$work/metrics-serve.log"
FERROTUNE__POLICY__DEVICE=cuda:0 FERROTUNE__METRICS__LISTEN=127.0.0.1:0 "$ft" serve --services policy --listen 127.0.0.1:0 \
  --artifact-root "$work" >"$mlog" 2>&1 &
mpid=$!
for _ in $(seq 50); do grep -q "metrics http" "$mlog" && break; sleep 0.2; done
murl=$(grep -o "metrics http://[^ ]*" "$mlog" | head -1 | cut -d' ' -f2)
if [ -n "$murl" ] && "$py" -c "import urllib.request,sys; t=urllib.request.urlopen(sys.argv[1]).read().decode(); g=[l for l in t.splitlines() if l.startswith('ferrotune_gpu_memory_used_bytes')]; print('\n'.join(g)); sys.exit(0 if g else 1)" "$murl"; then
  echo "GPU memory reported"
else
  fail "no ferrotune_gpu_memory_used_bytes in /metrics"
fi
kill "$mpid" 2>/dev/null; wait "$mpid" 2>/dev/null

sft() { # name, extra args...
  local name=$1; shift
  "$ft" train sft --recipe recipes/lora-sft.yaml --output-dir "$work/$name" --set "model=$model" "$@" --json >"$work/$name.log" 2>&1
}
losses() { "$py" -c "import json,sys; print(' '.join('%.5f' % r['loss'] for r in map(json.loads, open(sys.argv[1])) if r.get('loss') is not None))" "$1/metrics.jsonl"; }

section "LoRA SFT losses, 4 steps, no dropout: cpu f32 vs cuda:0 f32"
if sft cpu4 --max-steps 4 --set adapter.lora_dropout=0 --set device=cpu && sft gpu4 --max-steps 4 --set adapter.lora_dropout=0 --set device=cuda:0; then
  a=$(losses "$work/cpu4"); b=$(losses "$work/gpu4"); echo "cpu:  $a"; echo "cuda: $b"
  "$py" -c "import sys; a=list(map(float,sys.argv[1].split())); b=list(map(float,sys.argv[2].split())); d=max(abs(x-y) for x,y in zip(a,b)); print('max |Δloss| = %.2e' % d); sys.exit(0 if len(a)==len(b)==4 and d<2e-3 else 1)" "$a" "$b" || fail "cuda f32 SFT losses differ from cpu"
else
  fail "SFT cpu/cuda f32"; tail -n 3 "$work/cpu4.log" "$work/gpu4.log"
fi

section "device_map: layers split over two devices (embedding + layer 0 on the CPU, the rest on cuda:0), 4 steps, against cpu f32"
# A real cross-device split: every activation, table, cache and gradient move runs (on a CPU host they are no-ops).
if sft split4 --max-steps 4 --set adapter.lora_dropout=0 --set device=cpu --set 'device_map={model.embed_tokens: cpu, model.layers.0: cpu, model.layers: 0, model.norm: 0, lm_head: 0}' --set training.gradient_checkpointing=true; then
  a=$(losses "$work/cpu4"); b=$(losses "$work/split4"); echo "cpu:   $a"; echo "split: $b"
  "$py" -c "import sys; a=list(map(float,sys.argv[1].split())); b=list(map(float,sys.argv[2].split())); d=max(abs(x-y) for x,y in zip(a,b)); print('max |Δloss| = %.2e' % d); sys.exit(0 if len(a)==len(b)==4 and d<2e-3 else 1)" "$a" "$b" || fail "device_map split SFT losses differ from cpu"
else
  fail "device_map split SFT"; tail -n 3 "$work/split4.log"
fi

section "data parallel over NCCL: 2 ranks (cuda:0, cuda:1) vs 1 rank with twice the accumulation, 4 steps"
if [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" -ge 2 ]; then
  if sft nccl1 --max-steps 4 --set adapter.lora_dropout=0 --set device=cuda:0 --set training.micro_batch_size=2 --set training.gradient_accumulation_steps=2 \
     && sft nccl2 --max-steps 4 --set adapter.lora_dropout=0 --set device=cuda:0 --set training.micro_batch_size=2 --set training.gradient_accumulation_steps=1 --nproc-per-node 2; then
    a=$(losses "$work/nccl1"); b=$(losses "$work/nccl2"); echo "1 rank:  $a"; echo "2 ranks: $b"
    "$py" -c "import sys; a=list(map(float,sys.argv[1].split())); b=list(map(float,sys.argv[2].split())); d=max(abs(x-y) for x,y in zip(a,b)); print('max |Δloss| = %.2e' % d); sys.exit(0 if len(a)==len(b)==4 and d<1e-4 else 1)" "$a" "$b" || fail "NCCL 2-rank losses differ"
  else
    fail "NCCL data parallel"; tail -n 3 "$work/nccl1.log" "$work/nccl2.log"
  fi
else
  echo "skipped: one GPU (NCCL refuses two ranks on one device; a 1-rank NCCL group is checked by the core unit test nccl::)"
fi

for m in lora qlora; do
  section "$m SFT on cuda:0, bf16 base, f32 adapters and optimizer, 20 steps"
  if sft "${m}16" --max-steps 20 --set adapter.method=$m --set device=cuda:0 --set dtype=bf16; then
    echo "losses: $(losses "$work/${m}16")"
    tail -1 "$work/${m}16/metrics.jsonl"
    "$ft" generate --model "$model" --adapter "$work/${m}16" --device cuda:0 --dtype bf16 --chat --prompt "What is the capital of Egypt?" --max-new-tokens 8 --json >/dev/null && echo "adapter loads and generates on cuda:0" || fail "$m adapter generate"
  else
    fail "$m SFT bf16"; tail -n 5 "$work/${m}16.log"
  fi
done

section "kill -9 at step 5 and resume on cuda:0 (LoRA, dropout 0.05, bf16), against 10 steps straight"
common=(--max-steps 10 --set device=cuda:0 --set dtype=bf16 --set training.save_steps=5)
if sft straight "${common[@]}"; then
  "$ft" train sft --recipe recipes/lora-sft.yaml --output-dir "$work/killed" --set "model=$model" "${common[@]}" --json >"$work/killed.log" 2>&1 &
  pid=$!
  while kill -0 $pid 2>/dev/null && [ ! -d "$work/killed/checkpoints/step-00000005" ]; do sleep 0.01; done
  kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
  if [ -d "$work/killed/checkpoints/step-00000010" ]; then
    echo "inconclusive: the run finished before it was killed"
  elif sft killed "${common[@]}" --resume; then
    "$py" - "$work/straight" "$work/killed" <<'EOF' || fail "resumed adapter differs"
import sys
from safetensors.torch import load_file
a, b = (load_file(d + "/adapter_model.safetensors") for d in sys.argv[1:3])
d = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
print("resumed vs straight: %d tensors, max |Δ| = %.3e%s" % (len(a), d, " (bit-identical)" if d == 0 else ""))
sys.exit(0 if d < 1e-4 else 1)
EOF
  else
    fail "resume"; tail -n 5 "$work/killed.log"
  fi
else
  fail "straight run"; tail -n 5 "$work/straight.log"
fi

section "training benchmark on cuda:0 (bf16), ferrotune vs HF PEFT on the same GPU"
if [ -n "${GPU_CHECK_SKIP_BENCH:-}" ]; then
  echo "skipped (GPU_CHECK_SKIP_BENCH)"
elif [ -n "${FERROTUNE_BENCH_BIN:-}" ]; then
  FERROTUNE_BENCH_DEVICE=cuda:0 FERROTUNE_BENCH_DTYPE=bf16 FERROTUNE_BENCH_STEPS=${FERROTUNE_BENCH_STEPS:-20} FERROTUNE_BENCH_MODEL=$model \
    FERROTUNE_DEV_PYTHON=$(command -v "$py") FERROTUNE_BENCH_HF_SCRIPT=scripts/bench_hf_train.py LD_PRELOAD="$tl/libtorch_cuda.so" \
    "$FERROTUNE_BENCH_BIN" --bench || fail "benchmark"
else
  FERROTUNE_BENCH_DEVICE=cuda:0 FERROTUNE_BENCH_DTYPE=bf16 FERROTUNE_BENCH_STEPS=${FERROTUNE_BENCH_STEPS:-20} FERROTUNE_BENCH_MODEL=$model \
    FERROTUNE_DEV_PYTHON=$(command -v "$py") FERROTUNE_CUDA=1 make bench-train || fail "benchmark"
fi

echo
if [ ${#fails[@]} -eq 0 ]; then echo "GPU CHECK: all sections passed"; else printf 'GPU CHECK: FAILED: %s\n' "${fails[@]}"; exit 1; fi
