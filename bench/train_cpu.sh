#!/usr/bin/env bash
# `just bench-train-cpu`: LoRA training throughput on this CPU, ours next to PyTorch + peft
# (bench/reference/peft_lora_bench.py, a copy of the reference) with the same flags, at 1 and 2
# threads, for the tiny and smollm2-135m shapes (random weights, batch 4, seq 128, all-linear,
# rank 16). Appends both JSON lines per setting to bench/results/train-cpu-<host>-<date>.jsonl.
# With LORAFORGE_BLAS set (README: MKL or OpenBLAS), our lines' tags name the library.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-reference-venv.sh >&2
cargo build --release --quiet
out="bench/results/train-cpu-$(hostname -s)-$(date +%Y-%m-%d).jsonl"
flags=(--batch 4 --seq 128 --rank 16 --alpha 32 --targets all-linear --steps 5 --warmup-steps 2)
for shape in tiny smollm2-135m; do
  for threads in 1 2; do
    RAYON_NUM_THREADS=$threads MATMUL_NUM_THREADS=$threads ./target/release/loraforge bench train \
      --shape "$shape" "${flags[@]}" --tag "threads=$threads${LORAFORGE_BLAS:+ blas=$(basename "$LORAFORGE_BLAS")}" \
      --jsonl "$out" | cut -c1-300
    .venv-ref/bin/python bench/reference/peft_lora_bench.py --preset "$shape" "${flags[@]}" \
      --device cpu --dtype fp32 --threads "$threads" --tag "threads=$threads" --jsonl "$out" \
      | tail -n 1 | cut -c1-300
  done
done
echo "results appended to $out" >&2
