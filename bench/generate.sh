#!/usr/bin/env bash
# `just bench-generate`: SmolLM2-135M (Q4_1 GGUF) prompt and generation tokens/s, ours next to
# transformers on the same CPU in the same run: batch 1 at 1 and 2 threads, a batch of 8 prompts
# (`--prompts`, transformers with 8 copies of the prompt), and speculative decoding with the model
# as its own draft (every draft kept: what the bookkeeping costs). Appends JSON lines to
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
prompts=$(mktemp)
for _ in 1 2 3 4 5 6 7 8; do printf '{"prompt": "%s"}\n' "$prompt" >>"$prompts"; done
RAYON_NUM_THREADS=2 ./target/release/loraforge generate --model "$model" --prompts "$prompts" --batch-size 8 \
  --max-tokens 64 --ignore-eos --warmup 2>&1 >/dev/null | grep '^Batch' \
  | python3 -c 'import json,re,sys; m=re.search(r"prompt: (\d+) tokens, ([0-9.]+) tokens-per-sec; generation: (\d+) tokens, ([0-9.]+)", sys.stdin.read()); print(json.dumps({"bench": "loraforge_generate_batch", "batch": 8, "threads": 2, "prompt_tokens": int(m[1]), "prompt_tps": float(m[2]), "generation_tokens": int(m[3]), "generation_tps": float(m[4])}))' \
  | tee -a "$out"
.venv-ref/bin/python bench/transformers_generate.py "$model" --prompt "$prompt" --max-tokens 64 \
  --threads 2 --batch 8 | tail -n 1 | tee -a "$out"
RAYON_NUM_THREADS=2 ./target/release/loraforge generate --model "$model" --prompt "$prompt" \
  --max-tokens 64 --ignore-eos --json --draft-model "$model" --num-draft-tokens 4 | tee -a "$out"
rm -f "$prompts"
echo "results appended to $out" >&2
