#!/usr/bin/env bash
# Runs fuzz binaries built elsewhere (stripped, xz-compressed in .carry/fuzz/TARGET.xz) on a
# machine without a Rust toolchain, such as the GPU machine's CPU cores (docs/testing.md).
#
#   scripts/fuzz-carried.sh SECONDS TARGET:WORKERS [TARGET:WORKERS ...]
#
# All targets run at once, each with WORKERS libFuzzer processes for SECONDS. New inputs go to
# $OUT/new/TARGET (fold them in with `just fuzz-merge TARGET` after copying them to fuzz/new/),
# crash inputs to $OUT/artifacts/TARGET, logs to $OUT/logs; one summary line a target is printed:
# the executions summed over its workers.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=$1
shift
out=${OUT:-/tmp/fuzz-out}
mkdir -p "$out/logs" /tmp/fuzz-bin
for spec in "$@"; do
    t=${spec%%:*}
    workers=${spec##*:}
    xz -dc ".carry/fuzz/$t.xz" >"/tmp/fuzz-bin/$t"
    chmod +x "/tmp/fuzz-bin/$t"
    mkdir -p "$out/new/$t" "$out/artifacts/$t" "$out/logs/$t"
    (cd "$out/logs/$t" && "/tmp/fuzz-bin/$t" "$out/new/$t" "$OLDPWD/fuzz/corpus/$t" \
        -jobs="$workers" -workers="$workers" -max_total_time="$seconds" -timeout=30 \
        -rss_limit_mb=8192 -print_final_stats=1 -artifact_prefix="$out/artifacts/$t/" \
        >/dev/null 2>&1) &
done
wait || true
for spec in "$@"; do
    t=${spec%%:*}
    execs=$({ grep -ho 'stat::number_of_executed_units: *[0-9]*' "$out/logs/$t"/fuzz-*.log 2>/dev/null || true; } |
        awk '{ n += $2 } END { print n + 0 }')
    crashes=$(ls "$out/artifacts/$t" | wc -l)
    echo "$(date -u +%FT%TZ) $t: ${execs:-0} executions over ${spec##*:} workers x ${seconds} s, $crashes crash inputs, $(ls "$out/new/$t" | wc -l) new inputs"
done
