#!/usr/bin/env bash
# bench/ncu_decode.sh BIN MODEL TAG, on a machine with an NVIDIA GPU and Nsight Compute: where a
# decode step of MODEL goes (issue 21), through BIN (`loraforge`, built with --features cuda).
# 1. Each decode-session kernel of the session's second step (194 launches for a 32-block
#    model: embed, then q/k/v, RoPE, attention, o, gate/up and down a block, then the head):
#    its time and DRAM bytes, summed by kernel -> $OUT/ncu-summary-TAG.txt.
# 2. Unless FULL=0: ncu's full sections for block 0's four products and for the head
#    -> $OUT/ncu-full-TAG-{block0,head}.txt (occupancy, stall reasons, instruction counts).
# ncu runs the SM at its base clock (1.5 GHz on an H200 against 1.98): times are ~25% above a
# real step's. The counts assume a Llama-shaped model of 32 blocks (--launch-skip).
set -u
OUT=${OUT:-bench/results}
bin=$1 model=$2 tag=$3
prompt="The history of the lighthouse begins in antiquity, when fires were lit on hills"
names='regex:^(linear|gated|attend|rope_append|embed)$'
ncu --kernel-name "$names" --launch-skip 194 --launch-count 194 --csv \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum \
  "$bin" generate --device cuda --model "$model" --prompt "$prompt" --max-tokens 4 --ignore-eos \
  > /tmp/ncu-sum.csv 2>/tmp/ncu-sum.err
python3 - "$tag" "$model" <<'PY' | tee "$OUT/ncu-summary-$3.txt"
import csv, sys, collections
rows = [r for r in csv.reader(open("/tmp/ncu-sum.csv")) if len(r) > 10]
head = rows[0]; rows = rows[1:]
ki, mi, vi = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
idi = head.index("ID")
per = collections.defaultdict(dict)
for r in rows:
    per[(r[idi], r[ki])][r[mi]] = float(r[vi].replace(",", ""))
agg = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
for (i, k), m in per.items():
    t = m.get("gpu__time_duration.sum", 0.0); b = m.get("dram__bytes_read.sum", 0.0)
    a = agg[k]; a[0] += 1; a[1] += t; a[2] += b; a[3] = max(a[3], t)
unit = 1e-3  # ns -> us
tot = sum(a[1] for a in agg.values())
print(sys.argv[2], "kernels", sum(a[0] for a in agg.values()), "total_us %.1f" % (tot * unit))
for k, (n, t, b, mx) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print("  %-12s n=%4d sum=%10.1fus mean=%8.2fus max=%8.2fus read=%6.3fGB %6.2fTB/s" % (k, n, t*unit, t*unit/n, mx*unit, b/1e9, b/t/1e3 if t else 0))
PY
tail -3 /tmp/ncu-sum.err
[ "${FULL:-1}" = 0 ] && exit 0
# full sections: token 2's first four products (qkv, o, gated, down of block 0) and its head
ncu --kernel-name 'regex:^(linear|gated)$' --launch-skip 129 --launch-count 4 --set full \
  "$bin" generate --device cuda --model "$model" --prompt "$prompt" --max-tokens 4 --ignore-eos \
  > "$OUT/ncu-full-$tag-block0.txt" 2>&1
ncu --kernel-name 'regex:^linear$' --launch-skip 193 --launch-count 1 --set full \
  "$bin" generate --device cuda --model "$model" --prompt "$prompt" --max-tokens 4 --ignore-eos \
  > "$OUT/ncu-full-$tag-head.txt" 2>&1
grep -E "Duration|Memory Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Issue Slots Busy|Block Limit" "$OUT/ncu-full-$tag-block0.txt" | head -60
