#!/usr/bin/env bash
# `just bench-train-cpu`: LoRA training throughput on this CPU, ours next to PyTorch + peft
# (bench/reference/peft_lora_bench.py, a copy of the reference) with the same flags, at 1 and 2
# threads, for the tiny and smollm2-135m shapes (random weights, batch 4, seq 128, all-linear,
# rank 16). Appends the JSON lines per setting to bench/results/train-cpu-<host>-<date>.jsonl.
# With LORAFORGE_BLAS set (README: MKL or OpenBLAS), our lines' tags name the library.
#
# BASELINE=path/to/an/older/loraforge: is the CPU path slower than before? Each setting then runs
# the baseline and the current binary alternately, ROUNDS times (default 2), tagged `baseline` and
# `current`; REFERENCE=0 skips peft.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${REFERENCE:-1}" = 0 ] || bash scripts/setup-reference-venv.sh >&2
cargo build --release --quiet
current=${CARGO_TARGET_DIR:-target}/release/loraforge
out="bench/results/train-cpu-$(hostname -s)-$(date +%Y-%m-%d).jsonl"
flags=(--batch 4 --seq 128 --rank 16 --alpha 32 --targets all-linear --steps 5 --warmup-steps 2)
blas=${LORAFORGE_BLAS:+ blas=$(basename "$LORAFORGE_BLAS")}
# ours BINARY LABEL SHAPE THREADS
ours() {
  RAYON_NUM_THREADS=$4 MATMUL_NUM_THREADS=$4 "$1" bench train --shape "$3" "${flags[@]}" \
    --tag "threads=$4$blas$2" --jsonl "$out" | cut -c1-300
}
for shape in tiny smollm2-135m; do
  for threads in 1 2; do
    if [ -n "${BASELINE:-}" ]; then
      for _ in $(seq "${ROUNDS:-2}"); do
        ours "$BASELINE" " baseline" "$shape" "$threads"
        ours "$current" " current" "$shape" "$threads"
      done
    else
      ours "$current" "" "$shape" "$threads"
    fi
    [ "${REFERENCE:-1}" = 0 ] && continue
    .venv-ref/bin/python bench/reference/peft_lora_bench.py --preset "$shape" "${flags[@]}" \
      --device cpu --dtype fp32 --threads "$threads" --tag "threads=$threads" --jsonl "$out" \
      | tail -n 1 | cut -c1-300
  done
done
echo "results appended to $out" >&2
