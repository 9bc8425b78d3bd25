#!/usr/bin/env bash
# make bench-dist: LoRA SFT (recipes/lora-sft.yaml) on 1 rank vs 2 ranks (--nproc-per-node 2) with the same
# global batch (micro 2 × accumulation 2 vs micro 2 × 2 ranks), side by side in one run. Prints wall seconds,
# trained tokens per second over the whole command (start-up included), the peak resident memory of the largest
# process, and the share of a step rank 0 spent in collectives (dist/comm_s ÷ dist/step_s, waiting for the other
# rank included). On a 2-core CPU host this shows the overhead of splitting 2 cores between 2 ranks, not a
# speed-up. The 2-rank run goes twice: gradient buckets summed while the backward pass runs (the default) and
# after it (FERROTUNE_DIST_OVERLAP=0). FERROTUNE_BENCH_MODEL (default smollm2-135m-instruct), FERROTUNE_BENCH_STEPS (default 16).
set -euo pipefail
cd "$(dirname "$0")/.."
ft=target/release/ferrotune
model=${FERROTUNE_BENCH_MODEL:-smollm2-135m-instruct}
steps=${FERROTUNE_BENCH_STEPS:-16}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
measure() { # name, args… → "$work/name.json" {wall_s, max_rss_kb}
  local name=$1; shift
  python3 - "$work/$name.json" "$@" <<'PY'
import json, resource, subprocess, sys, time
t = time.time()
r = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
if r.returncode != 0:
    sys.exit("bench-dist: run failed: " + r.stderr[-2000:])
json.dump({"wall_s": time.time() - t, "max_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, open(sys.argv[1], "w"))
PY
}
common=(train sft --recipe recipes/lora-sft.yaml --set "model=$model" --max-steps "$steps" --set training.save_steps=0
        --set training.micro_batch_size=2 --json)
measure one "$ft" "${common[@]}" --output-dir "$work/one" --set training.gradient_accumulation_steps=2
measure two "$ft" "${common[@]}" --output-dir "$work/two" --set training.gradient_accumulation_steps=1 --nproc-per-node 2
FERROTUNE_DIST_OVERLAP=0 measure after "$ft" "${common[@]}" --output-dir "$work/after" --set training.gradient_accumulation_steps=1 --nproc-per-node 2
python3 - "$work" "$steps" "$model" <<'PY'
import json, sys
work, steps, model = sys.argv[1], sys.argv[2], sys.argv[3]
print(f"LoRA SFT of {model}, {steps} steps, global batch 4 (micro 2); CPU threads: {__import__('os').cpu_count()}")
print(f"{'ranks':>5} {'all-reduce':>22} {'wall s':>8} {'trained tok/s':>14} {'peak RSS MB':>12} {'comm share':>11} {'step s':>7}")
for name, ranks, how in (("one", 1, "-"), ("two", 2, "overlapping backward"), ("after", 2, "after backward")):
    m = json.load(open(f"{work}/{name}.json"))
    rows = [json.loads(l) for l in open(f"{work}/{name}/metrics.jsonl")]
    tokens = sum(r["trained_tokens"] for r in rows)
    comm = [r["metrics"]["dist/comm_s"] / r["metrics"]["dist/step_s"] for r in rows if "dist/comm_s" in r.get("metrics", {})]
    share = f"{100 * sum(comm) / len(comm):.0f}%" if comm else "-"
    # Mean step time past the first (rank 0's clock; 1 rank: from the step timestamps when present).
    step = [r["metrics"]["dist/step_s"] for r in rows[1:] if "dist/step_s" in r.get("metrics", {})]
    step_s = f"{sum(step) / len(step):.2f}" if step else "-"
    print(f"{ranks:>5} {how:>22} {m['wall_s']:>8.1f} {tokens / m['wall_s']:>14.1f} {m['max_rss_kb'] / 1024:>12.0f} {share:>11} {step_s:>7}")
PY
