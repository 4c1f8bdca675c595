#!/usr/bin/env bash
# `just bench-gpu`, on a machine with an NVIDIA GPU: `loraforge bench train` and the references
# (bench/reference/peft_lora_bench.py: PyTorch + peft, bf16, SDPA; with `--liger`, peft +
# Liger-Kernel; with `--quant nf4`, peft + bitsandbytes) on the same card in one sitting,
# all-linear rank 16, for the shapes of issues 4 and 17. JSON lines go to
# ${OUT:-bench/results}/train-gpu-<card>-<date>.jsonl; our peak device memory is the highest
# `nvidia-smi memory.used` sampled every 100 ms (CUDA context and Burn's pool included).
#
# LORAFORGE: the CUDA binary (default target/release/loraforge, built with --features cuda).
# WHEELS: a folder of wheels to pip-install first (the GPU image has no peft).
# SHAPES: which runs (default: "warmup smollm2 1b 8b 8b-nockpt 8b-qlora 8b-32k 8b-64k", the rows
# of issue 17's table; "warmup" compiles our kernels on a tiny shape first; also "1b-ckpt",
# and "8b-128k", "8b-256k", "8b-256k-liger" for the longest context each side trains; "gemma2-9b",
# "phi3-mini", "phi3-mini-qlora", "mixtral-8x7b", "mixtral-8x7b-qlora", "qwen3-30b-a3b"
# (issue 20); "1b-data"
# and "8b-data" for real data, issue 17's goal 5; "gen-8b" (bf16) and "gen-8b-q4" (4-bit) for issue 21's
# generation rows (see generation() below); "vk-check", "vk-tiny", "vk-smollm2", "vk-1b"
# for issue 19's portable path through Vulkan, with LORAFORGE_VULKAN the binary built with
# --features vulkan and the Vulkan loader installed, each portable row once per dtype of
# VK_DTYPES (default "f32 f16"); "vk-demo" the QLoRA demo recipe on Vulkan with DEMO_MODEL the
# SmolLM2 GGUF, its run folder's small files copied to $outdir/vk-demo).
# Each row runs ours, then peft, then peft + Liger (QLoRA: bitsandbytes NF4), as the table has
# them, then unsloth with UNSLOTH=1; a reference that does not fit the card says so in its line.
# DTYPE: our base's compute dtype (default bf16, as the reference's); REFERENCE=0 skips the
# references, LIGER=0 the Liger runs, PEFT=0 plain peft's (not Liger's, not bitsandbytes');
# TAG: a label added to our lines' tag (to tell builds apart). OURS_TIMEOUT: seconds our run may
# take (default 400; a 256k step takes about 470); REFERENCE_TIMEOUT the same for each reference
# run (default 300).
# CHAT_MIX, LLAMA3_TOKENIZER: the real-data rows' dataset and tokenizer (default: where
# `scripts/fetch-assets.sh chat-mix` and `tokenizers` put them).
# OUT: where the JSON lines go (default bench/results). The device tool sets it to the folder it
# brings back, so there the lines land in $OUT directly: copying bench/results over it afterwards
# replaces them with the old file (session 8 lost a call's lines that way).
set -u
cd "$(dirname "$0")/.."
bin=${LORAFORGE:-./target/release/loraforge}
py=${PY:-python3}
outdir=${OUT:-bench/results}
mkdir -p "$outdir"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-')
out="$outdir/train-gpu-$card-$(date +%Y-%m-%d).jsonl"
[ -n "${WHEELS:-}" ] && $py -m pip install --quiet --no-deps "$WHEELS"/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
common=(--targets all-linear --rank 16 --alpha 32)

# ours SHAPE BATCH SEQ STEPS WARMUP [extra...]
ours() {
  local shape=$1 batch=$2 seq=$3 steps=$4 warm=$5; shift 5
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >/tmp/gpu-mem.log &
  local sampler=$!
  timeout "${OURS_TIMEOUT:-400}" "${ours_bin:-$bin}" bench train --device "${ours_device:-cuda}" --shape "$shape" --batch "$batch" --seq "$seq" \
    --steps "$steps" --warmup-steps "$warm" --dtype "${DTYPE:-bf16}" "${common[@]}" "$@" \
    --tag "$card${TAG:+ $TAG}" >/tmp/ours.json
  local rc=$?
  kill $sampler
  local peak_mib
  peak_mib=$(sort -n /tmp/gpu-mem.log | tail -1)
  if [ $rc -eq 0 ]; then
    $py -c "import json,sys; d=json.load(open('/tmp/ours.json')); d['results']['peak_device_mem_gib']=$peak_mib/1024; d['results']['peak_device_mem_kind']='max nvidia-smi memory.used'; print(json.dumps(d))" | tee -a "$out" | cut -c1-400
  else
    echo "{\"bench\": \"loraforge_bench_train\", \"status\": \"exit $rc\", \"shape\": \"$shape\", \"peak_device_mem_gib\": $(( peak_mib / 1024 ))}" | tee -a "$out"
  fi
}

# reference SHAPE BATCH SEQ STEPS WARMUP [extra...]
reference() {
  local shape=$1 batch=$2 seq=$3 steps=$4 warm=$5; shift 5
  [ "${REFERENCE:-1}" = 0 ] && return
  [[ "${PEFT:-1}" = 0 && " $* " != *" --liger "* && " $* " != *" nf4 "* ]] && return
  timeout "${REFERENCE_TIMEOUT:-300}" $py bench/reference/peft_lora_bench.py --device cuda --dtype bf16 --attn sdpa \
    --preset "$shape" --batch "$batch" --seq "$seq" --steps "$steps" --warmup-steps "$warm" \
    "${common[@]}" "$@" --tag "$card" --jsonl "$out" | tail -n 3 | cut -c1-400
}

# moe RUNNER ARGS...: a row of a mixture-of-experts shape, its adapters on attention only.
moe() {
  local common=(--targets q_proj,k_proj,v_proj,o_proj --rank 16 --alpha 32)
  "$@"
}

# liger SHAPE BATCH SEQ STEPS WARMUP [extra...]: the reference with Liger-Kernel.
liger() {
  [ "${LIGER:-1}" = 0 ] && return
  reference "$@" --liger
}

# unsloth SHAPE BATCH SEQ STEPS WARMUP [extra...]: unsloth (bench/reference/unsloth_bench.py) when
# UNSLOTH=1 (its wheels are not on the GPU image: see bench/NOTES.md for the set that is carried).
unsloth() {
  [ "${UNSLOTH:-0}" = 1 ] || return 0
  local shape=$1 batch=$2 seq=$3 steps=$4 warm=$5; shift 5
  timeout "${REFERENCE_TIMEOUT:-300}" $py bench/reference/unsloth_bench.py --preset "$shape" \
    --batch "$batch" --seq "$seq" --steps "$steps" --warmup-steps "$warm" "${common[@]}" "$@" \
    --tag "$card" --jsonl "$out" 2>&1 | grep -v "^   step" | tail -n 4 | cut -c1-600
}

# data SHAPE BATCH STEPS WARMUP [extra...]: the chat mix at max_seq_len 2048, ours packed (which
# writes the encoded examples), ours padded (length-bucketed), then peft and peft + Liger padded
# (each batch to its longest example) on the same examples. Batches are rows: packed rows of up
# to 2048 tokens for ours, examples for the padded runs, as trainers count them.
data() {
  local shape=$1 batch=$2 steps=$3 warm=$4; shift 4
  local rows=${CHAT_MIX:-$HOME/.cache/loraforge/chat-mix/chat-mix.jsonl}
  local tok=${LLAMA3_TOKENIZER:-$HOME/.cache/loraforge/tokenizers/llama3}
  local examples=/tmp/bench-examples.jsonl
  ours "$shape" "$batch" 2048 "$steps" "$warm" --data "$rows" --tokenizer "$tok" --pack --examples-out "$examples" "$@"
  ours "$shape" "$batch" 2048 "$steps" "$warm" --data "$rows" --tokenizer "$tok" "$@"
  [ "${REFERENCE:-1}" = 0 ] && return
  for liger in "" --liger; do
    [ -n "$liger" ] && [ "${LIGER:-1}" = 0 ] && continue
    timeout "${REFERENCE_TIMEOUT:-300}" $py bench/reference/peft_data_bench.py --examples "$examples" \
      --preset "$shape" --batch "$batch" --steps "$steps" --warmup-steps "$warm" "${common[@]}" \
      $liger "$@" --tag "$card" --jsonl "$out" | tail -n 1 | cut -c1-600
  done
}

# portable SHAPE BATCH SEQ STEPS WARMUP [extra...]: ours on the portable backend through Vulkan
# (issue 19), LORAFORGE_VULKAN's binary (built with --features vulkan), once per VK_DTYPES.
portable() {
  for dtype in ${VK_DTYPES:-f32 f16}; do
    ours_bin=${LORAFORGE_VULKAN:-$bin} ours_device=vulkan DTYPE=$dtype ours "$@"
  done
}

# vk_demo: `just demo`'s recipe (QLoRA on SmolLM2's Q4_1 GGUF: train, export, eval) on Vulkan.
vk_demo() {
  local run=runs/smollm2-demo
  rm -rf "$run"
  timeout "${OURS_TIMEOUT:-400}" "${LORAFORGE_VULKAN:-$bin}" train recipes/smollm2-demo.toml --no-tui \
    --set device='"vulkan"' --set model.path="\"$DEMO_MODEL\"" 2>&1 | tail -n 40
  mkdir -p "$outdir/vk-demo"
  find "$run" -maxdepth 2 -type f -size -2M -exec cp --parents {} "$outdir/vk-demo" \;
}

# generation BATCH...: issue 21's generation rows on GEN_MODEL (default: a random
# Llama-3-8B-shaped bf16 folder made once by bench/reference/make_random_llama.py with the Llama 3
# tokenizer from LLAMA3_TOKENIZER), ours (`generate --json`, --prompts at batch > 1) then
# transformers' generate loop (bench/transformers_generate.py) at each batch, GEN_TOKENS new
# tokens (default 128) after a 55-token prompt, end-of-sequence ignored. Lines go to
# generate-gpu-<card>-<date>.jsonl; our peak device memory is nvidia-smi's, as in training rows.
# GEN_BATCHES: the batch sizes (default "1 8 32"). Our line's `decode` says how batch 1 decoded:
# "session" (the whole-step decode session, `src/backends/cuda/decode.rs`) or, with
# LORAFORGE_DECODE=ops in the environment, "ops" (op by op, for comparison).
# GEN_PROMPT_REPEAT=N: the prompt N times over (each line says its prompt_tokens), for the
# prompt's throughput at a length where the launches count less. LORAFORGE_DECODE_TILE (the
# decode session's products' tile, src/backends/cuda/decode.rs) is recorded as `tile`.
generation() {
  local model=${GEN_MODEL:-/tmp/llama3-8b-random}
  local tok=${LLAMA3_TOKENIZER:-$HOME/.cache/loraforge/tokenizers/llama3}
  local gen_out="$outdir/generate-gpu-$card-$(date +%Y-%m-%d).jsonl"
  local tokens=${GEN_TOKENS:-128}
  local prompt="The history of the lighthouse begins in antiquity, when fires were lit on hills to guide ships home. Over the centuries the towers grew taller, the lamps brighter, and the keepers who tended them became figures of legend in every port along the coast, where"
  local part=$prompt
  for _ in $(seq 2 "${GEN_PROMPT_REPEAT:-1}"); do prompt="$prompt $part"; done
  [ -d "$model" ] || $py bench/reference/make_random_llama.py "$model" "$tok" || return
  # GEN_QUANT=q4: ours on `loraforge convert -q` of the folder (MLX affine 4-bit, group 64, every
  # matrix), transformers with bitsandbytes NF4 (the decoder's linears; head and embedding bf16).
  local quant=${GEN_QUANT:-none} ref_quant=none ours_model=$model
  if [ "$quant" = q4 ]; then
    ref_quant=nf4 ours_model=$model-q4
    if [ ! -d "$ours_model" ]; then
      local t0=$(date +%s.%N)
      "$bin" convert --model "$model" --out "$ours_model" -q 2>&1 | tail -1
      $py -c "import json,sys,time; print(json.dumps({'bench': 'loraforge_convert', 'card': sys.argv[1], 'flags': '-q', 'seconds': time.time() - float(sys.argv[2])}))" "$card" "$t0" | tee -a "$gen_out"
    fi
  fi
  for batch in "$@"; do
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >/tmp/gpu-mem.log &
    local sampler=$!
    local start=$(date +%s.%N)
    if [ "$batch" = 1 ]; then
      timeout "${OURS_TIMEOUT:-400}" "$bin" generate --device cuda --model "$ours_model" --prompt "$prompt" \
        --max-tokens "$tokens" --ignore-eos --warmup --json >/tmp/gen.json 2>/tmp/gen.err
    else
      $py -c "import json,sys; [print(json.dumps({'prompt': sys.argv[1]})) for _ in range($batch)]" "$prompt" >/tmp/prompts.jsonl
      timeout "${OURS_TIMEOUT:-400}" "$bin" generate --device cuda --model "$ours_model" --prompts /tmp/prompts.jsonl \
        --batch-size "$batch" --max-tokens "$tokens" --ignore-eos --warmup >/tmp/gen.json 2>/tmp/gen.err
    fi
    local rc=$?
    kill $sampler
    local peak_mib
    peak_mib=$(sort -n /tmp/gpu-mem.log | tail -1)
    $py - "$rc" "$batch" "$peak_mib" "$start" "$card" "$quant" <<'PY' | tee -a "$gen_out" | cut -c1-400
import json, re, sys, time
rc, batch, peak, start, card, quant = sys.argv[1:]
wall = time.time() - float(start)
err = open("/tmp/gen.err").read()
import os
row = {"bench": "loraforge_generate_gpu", "card": card, "quant": quant, "batch": int(batch), "status": f"exit {rc}",
       "decode": os.environ.get("LORAFORGE_DECODE", "session"),
       "tile": os.environ.get("LORAFORGE_DECODE_TILE", "default"),
       "wall_s": float(wall), "peak_device_mem_gib": int(peak) / 1024}
load = re.search(r"blocks in ([0-9.]+) s", err)
row["load_s"] = float(load.group(1)) if load else None
if rc == "0" and batch == "1":
    d = json.loads(open("/tmp/gen.json").read().strip().splitlines()[-1])
    row.update({k: d[k] for k in ("prompt_tokens", "prompt_tps", "generation_tokens", "generation_tps")})
elif rc == "0":
    m = re.search(r"prompt: (\d+) tokens, ([0-9.]+) tokens-per-sec; generation: (\d+) tokens, ([0-9.]+)", err)
    row.update({"prompt_tokens": int(m.group(1)), "prompt_tps": float(m.group(2)),
                "generation_tokens": int(m.group(3)), "generation_tps": float(m.group(4))})
else:
    row["stderr_tail"] = err[-600:]
print(json.dumps(row))
PY
    [ "${REFERENCE:-1}" = 0 ] && continue
    timeout "${REFERENCE_TIMEOUT:-300}" $py bench/transformers_generate.py "$model" --device cuda \
      --dtype bfloat16 --quant "$ref_quant" --batch "$batch" --prompt "$prompt" --max-tokens "$tokens" 2>/tmp/ref.err \
      | tail -n 1 | $py -c "import json,sys; d=json.loads(sys.stdin.read()); d.pop('ids'); d['card']='$card'; print(json.dumps(d))" \
      | tee -a "$gen_out" | cut -c1-400
  done
}

# Our side times as many steps as the reference's (8 at 1B, 6 at 8B): with 3, our median moved
# ±2% between sittings (session 8) and the ratio with it. One warm-up step compiles our kernels.
for s in ${SHAPES:-warmup smollm2 1b 8b 8b-nockpt 8b-qlora 8b-32k 8b-64k}; do
  case $s in
    warmup) ours tiny 4 128 2 1 ;;
    smollm2) ours smollm2-135m 16 1024 5 2; reference smollm2-135m 16 1024 10 3; liger smollm2-135m 16 1024 10 3; unsloth smollm2-135m 16 1024 10 3 ;;
    1b) ours llama3.2-1b 8 2048 8 1; reference llama3.2-1b 8 2048 8 3; liger llama3.2-1b 8 2048 8 3; unsloth llama3.2-1b 8 2048 8 3 ;;
    1b-ckpt) ours llama3.2-1b 8 2048 8 1 --grad-checkpoint; reference llama3.2-1b 8 2048 8 3 --grad-checkpoint ;;
    8b) ours llama3-8b 4 2048 6 1 --grad-checkpoint; reference llama3-8b 4 2048 6 2 --grad-checkpoint; liger llama3-8b 4 2048 6 2 --grad-checkpoint; unsloth llama3-8b 4 2048 6 2 --grad-checkpoint ;;
    8b-nockpt) ours llama3-8b 4 2048 6 1; liger llama3-8b 4 2048 6 2; unsloth llama3-8b 4 2048 6 2 ;;
    # Issue 20: Gemma 2 9B (head dim 256: our flash kernels' two-warp split since session 28, the
    # sliced attention before; the reference runs eager, as transformers recommends: SDPA drops
    # the soft-cap).
    gemma2-9b) ours gemma2-9b 4 2048 6 1 --grad-checkpoint; reference gemma2-9b 4 2048 6 2 --grad-checkpoint --attn eager; liger gemma2-9b 4 2048 6 2 --grad-checkpoint --attn eager ;;
    # Issue 20: Phi-3.5-mini (fused qkv_proj and gate_up_proj), bf16 and QLoRA.
    phi3-mini) ours phi3-mini 8 2048 8 1 --grad-checkpoint; reference phi3-mini 8 2048 8 3 --grad-checkpoint; liger phi3-mini 8 2048 8 3 --grad-checkpoint ;;
    phi3-mini-qlora) ours phi3-mini 8 2048 8 1 --grad-checkpoint --quant 4; reference phi3-mini 8 2048 8 3 --grad-checkpoint --quant nf4 ;;
    # Issue 20: mixtures of experts, LoRA on attention (q, k, v, o) on both sides: transformers 5
    # holds the experts as 3-D parameters, which peft's all-linear does not wrap as linears.
    mixtral-8x7b) moe ours mixtral-8x7b 4 2048 6 1 --grad-checkpoint; moe reference mixtral-8x7b 4 2048 6 2 --grad-checkpoint ;;
    # QLoRA beside peft in bf16 (bitsandbytes' nf4 would quantize only the attention of a MoE).
    mixtral-8x7b-qlora) moe ours mixtral-8x7b 4 2048 6 1 --grad-checkpoint --quant 4; moe reference mixtral-8x7b 4 2048 6 2 --grad-checkpoint ;;
    qwen3-30b-a3b) moe ours qwen3-30b-a3b 4 2048 6 1 --grad-checkpoint; moe reference qwen3-30b-a3b 4 2048 6 2 --grad-checkpoint ;;
    8b-qlora) ours llama3-8b 4 2048 6 1 --grad-checkpoint --quant 4; reference llama3-8b 4 2048 6 2 --grad-checkpoint --quant nf4; unsloth llama3-8b 4 2048 6 2 --grad-checkpoint --quant nf4 ;;
    8b-32k) ours llama3-8b 1 32768 3 1 --grad-checkpoint; reference llama3-8b 1 32768 3 1 --grad-checkpoint; liger llama3-8b 1 32768 3 1 --grad-checkpoint; unsloth llama3-8b 1 32768 3 1 --grad-checkpoint ;;
    8b-64k) ours llama3-8b 1 65536 2 1 --grad-checkpoint; liger llama3-8b 1 65536 2 1 --grad-checkpoint ;;
    # Goal 4's doubling: one timed step after one warm-up, both sides, until each fails.
    8b-128k) ours llama3-8b 1 131072 1 1 --grad-checkpoint; liger llama3-8b 1 131072 1 1 --grad-checkpoint ;;
    # 256k: no warm-up step (one step is ~7 minutes; a call has 10), the kept block inputs in host
    # memory; Liger apart (8b-256k-liger), as the two do not fit one call.
    8b-256k) ours llama3-8b 1 262144 1 0 --grad-checkpoint --offload-checkpoints ;;
    8b-256k-liger) liger llama3-8b 1 262144 1 0 --grad-checkpoint ;;
    1b-data) data llama3.2-1b 8 30 5 ;;
    8b-data) data llama3-8b 4 12 3 --grad-checkpoint ;;
    gen-8b) generation ${GEN_BATCHES:-1 8 32} ;;
    gen-8b-q4) GEN_QUANT=q4 generation ${GEN_BATCHES:-1 8 32} ;;
    # Issue 19: the device checks and the portable path's rows beside ours on CUDA and peft.
    vk-check) "${LORAFORGE_VULKAN:-$bin}" bench check --device vulkan | tee -a "$outdir/device-check-vulkan-$card-$(date +%Y-%m-%d).jsonl" | cut -c1-200 ;;
    vk-tiny) portable tiny 4 128 3 1 ;;
    vk-smollm2) portable smollm2-135m 16 1024 3 1; ours smollm2-135m 16 1024 5 2; reference smollm2-135m 16 1024 10 3 ;;
    vk-1b) portable llama3.2-1b 8 2048 3 1; ours llama3.2-1b 8 2048 8 1; reference llama3.2-1b 8 2048 8 3 ;;
    vk-demo) vk_demo ;;
  esac
done
echo "results appended to $out"
