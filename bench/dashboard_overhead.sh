#!/usr/bin/env bash
# `just bench-dashboard`: training throughput with the dashboard on against `--no-tui`, on the
# same run (the demo recipe on SmolLM2-135M, 12 steps), alternating the two modes ROUNDS times so
# drift on a shared machine hits both. The dashboard needs a terminal: tmux gives it one.
# Throughput is the median of the per-step tokens/s in each run's metrics.jsonl. On a shared VM
# runs differ by ±10%, more than the effect, so the script also reads the CPU time of the
# dashboard's own thread (named "dashboard") against the whole process's from /proc: the share
# of the machine the dashboard takes from training.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-3}"
model=$(scripts/fetch-assets.sh smollm2 | tail -n 1)
cargo build --release --quiet
bin="$PWD/target/release/loraforge"
out="bench/results/dashboard-overhead-$(hostname -s)-$(date +%Y-%m-%d).jsonl"
work=$(mktemp -d)
trap 'rm -rf "$work"; tmux kill-session -t lf-bench 2>/dev/null || true' EXIT
# The demo recipe without its [export] and held-out [eval]: only training is measured.
sed -e "s|^extends = \"../|extends = \"$PWD/|" -e '/^prompts = /d' -e '/^\[export\]/,$d' \
  recipes/smollm2-demo.toml > "$work/recipe.toml"

median_tps() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
tps = [r["tokens_per_sec"] for r in rows if r["event"] == "train"][1:]  # the first step warms up
print(statistics.median(tps))
PY
}

run() {  # run MODE DIR
  local args=(train "$work/recipe.toml" --set "model.path=\"$model\"" --set train.iters=12
              --set train.steps_per_report=1 --set train.steps_per_eval=1000
              --set train.save_every=1000 --set "output.dir=\"$2\"")
  if [ "$1" = tui ]; then
    tmux new-session -d -s lf-bench -x 120 -y 40 "env -u CI $bin ${args[*]@Q}"
    local pid=""
    while [ -z "$pid" ]; do sleep 0.2; pid=$(pgrep -f "^$bin train .*$2" | head -1 || true); done
    # Last sample before the process ends: ticks of the dashboard thread and of the process.
    local ui=0 all=0
    while [ -d "/proc/$pid" ]; do
      for task in /proc/"$pid"/task/*; do
        if [ "$(cat "$task/comm" 2>/dev/null)" = dashboard ]; then
          ui=$(awk '{print $14 + $15}' "$task/stat" 2>/dev/null || echo "$ui")
        fi
      done
      all=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo "$all")
      sleep 0.5
    done
    while tmux has-session -t lf-bench 2>/dev/null; do sleep 0.2; done
    cpu_share+="$(python3 -c "print($ui / max($all, 1))") "
  else
    "$bin" "${args[@]}" --no-tui >/dev/null
  fi
}

declare -A samples=([tui]="" [plain]="")
cpu_share=""
for round in $(seq "$ROUNDS"); do
  for mode in plain tui; do
    dir="$work/$mode-$round"
    run "$mode" "$dir"
    samples[$mode]+="$(median_tps "$dir/metrics.jsonl") "
  done
done
python3 - "${samples[plain]}" "${samples[tui]}" "$cpu_share" <<PY | tee -a "$out"
import json, statistics, sys
plain = [float(x) for x in sys.argv[1].split()]
tui = [float(x) for x in sys.argv[2].split()]
share = [float(x) for x in sys.argv[3].split()]
ratio = statistics.median(tui) / statistics.median(plain)
print(json.dumps({"bench": "dashboard_overhead", "model": "SmolLM2-135M Q4_1", "host": "$(hostname -s)",
                  "plain_tokens_per_sec": plain, "tui_tokens_per_sec": tui,
                  "tui_over_plain": round(ratio, 4), "overhead_percent": round((1 - ratio) * 100, 2),
                  "dashboard_thread_cpu_share": share,
                  "dashboard_thread_cpu_percent_max": round(max(share) * 100, 3)}))
PY
