#!/usr/bin/env bash
# libFuzzer runs of the fuzz targets (fuzz/fuzz_targets/, src/diagnostics/fuzz.rs) with
# cargo-fuzz on the stable toolchain (RUSTC_BOOTSTRAP=1 lets it use the sanitizer flags).
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS per target] [RUNS per target]
#
# New inputs go to fuzz/new/TARGET (ignored by git); the committed corpus fuzz/corpus/TARGET is
# read, never written (`just fuzz-merge` folds the new inputs in, minimised). A crash leaves its
# input in fuzz/artifacts/TARGET and fails the script. Each run's summary line (executions,
# corpus size, time) goes to bench/results/fuzz-<date>.txt.
#
# FUZZ_SANITIZER (default none): `address` adds AddressSanitizer, about 3x slower here (recipe
# target: 1,485 against 4,825 executions a second). The code is safe Rust but for a few `unsafe`
# blocks (file mappings, the allocator in memory_budget.rs); run ASan by hand after touching them.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-all}
seconds=${2:-60}
runs=${3:--1}
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null; then
    cargo install --locked cargo-fuzz@0.13.2
fi
if [ "$target" = all ]; then
    targets=(gguf model_folder recipe dataset chat_template)
else
    targets=("$target")
fi
mkdir -p bench/results
log="bench/results/fuzz-$(date -u +%Y-%m-%d).txt"
for t in "${targets[@]}"; do
    mkdir -p "fuzz/new/$t"
    started=$(date +%s)
    # -rss_limit_mb: a chat template over its memory budget is parked, not freed (memory_budget.rs).
    set +e
    cargo fuzz run --fuzz-dir fuzz --sanitizer "${FUZZ_SANITIZER:-none}" "$t" "fuzz/new/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -runs="$runs" -timeout=30 -rss_limit_mb=8192 \
        -print_final_stats=1 2>&1 | tee "/tmp/loraforge-fuzz-$t.log" | grep -E '^(#[0-9]+ +(DONE|INITED)|==|stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY|Done)'
    status=${PIPESTATUS[0]}
    set -e
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "/tmp/loraforge-fuzz-$t.log" | grep -o '[0-9]*$' || echo 0)
    corpus=$(( $(ls "fuzz/corpus/$t" | wc -l) + $(ls "fuzz/new/$t" | wc -l) ))
    echo "$(date -u +%FT%TZ) $t: exit $status, $execs executions, corpus $corpus inputs, $(( $(date +%s) - started )) s" | tee -a "$log"
    [ "$status" = 0 ] || { echo "fuzz target $t failed: see /tmp/loraforge-fuzz-$t.log and fuzz/artifacts/$t" >&2; exit 1; }
done
