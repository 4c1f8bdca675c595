#!/usr/bin/env bash
# `just bench-generate`: SmolLM2-135M (Q4_1 GGUF) prompt and generation tokens/s, ours next to
# transformers on the same CPU in the same run. Appends JSON lines to
# bench/results/generate-<host>-<date>.jsonl and prints a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(scripts/fetch-assets.sh smollm2 | tail -n 1)
bash scripts/setup-reference-venv.sh >&2
out="bench/results/generate-$(hostname -s)-$(date +%Y-%m-%d).jsonl"
prompt="Write a short story about a lighthouse keeper who finds a message in a bottle. It was a stormy night and"
cargo build --release --quiet
for threads in 1 2; do
  RAYON_NUM_THREADS=$threads ./target/release/loraforge generate --model "$model" --prompt "$prompt" \
    --max-tokens 64 --ignore-eos --json | tee -a "$out"
  .venv-ref/bin/python bench/transformers_generate.py "$model" --prompt "$prompt" --max-tokens 64 \
    --threads "$threads" | tail -n 1 | tee -a "$out"
done
echo "results appended to $out" >&2
