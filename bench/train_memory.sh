#!/usr/bin/env bash
# `just bench-train-memory`: peak memory of LoRA training on a float base against QLoRA on the same
# base quantized to 4 bits on load — same model (SmolLM2-135M, float32), same data, same batches.
# Each run is its own process so the peak RSS (VmHWM) belongs to that run alone.
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=$(scripts/fetch-assets.sh smollm2 | tail -n 1)
float_dir="$(dirname "$gguf")/SmolLM2-135M-Instruct-f32"
if [ ! -d "$float_dir" ]; then
  bash scripts/setup-reference-venv.sh >&2
  .venv-ref/bin/python scripts/fixtures/dequantize_smollm2.py "$gguf" "$float_dir" >&2
fi
cargo build --release --quiet
out="bench/results/train-memory-$(hostname -s)-$(date +%Y-%m-%d).jsonl"
common=(--set "model.path=\"$float_dir\"" --set train.iters=4 --set train.steps_per_report=4
        --set train.steps_per_eval=1000 --set "output.dir=\"$(mktemp -d)\"")
for variant in float qlora4; do
  extra=()
  [ "$variant" = qlora4 ] && extra=(--set "model.quantize={ bits = 4, group_size = 64 }")
  line=$(./target/release/loraforge train recipes/smollm2-demo.toml "${common[@]}" "${extra[@]}" | grep '^Iter 4: Train')
  peak=$(sed -E 's/.*Peak mem ([0-9.]+) GB.*/\1/' <<<"$line")
  tps=$(sed -E 's/.*Tokens\/sec ([0-9.]+).*/\1/' <<<"$line")
  echo "{\"bench\": \"train_memory\", \"variant\": \"$variant\", \"model\": \"SmolLM2-135M f32\", \"peak_rss_gb\": $peak, \"tokens_per_sec\": $tps}" | tee -a "$out"
done
