# loraforge tasks. `just` alone lists them. Install just with `pip install rust-just`.

default:
    @just --list

# Fetch the real-world assets (SmolLM2 GGUF, llama.cpp tokenizer vectors, tokenizer.json files).
fetch what="all":
    scripts/fetch-assets.sh {{what}}

# Build the release binary (add `--features cuda` for NVIDIA GPUs).
build *flags:
    cargo build --release {{flags}}

# The embedded default end to end: fetch SmolLM2-135M, inspect it, fine-tune it on the demo
# dataset, fuse and export it (mlx-community folder), then compare base, fine-tuned and fused
# generations on held-out prompts (train runs the recipe's [export] and [eval] when it ends).
demo: build
    #!/usr/bin/env bash
    set -euo pipefail
    model=$(scripts/fetch-assets.sh smollm2 | tail -n 1)
    ./target/release/loraforge inspect "$model"
    ./target/release/loraforge train recipes/smollm2-demo.toml --set model.path="\"$model\""

# Fold adapters into their base and export, e.g.
# `just fuse --model BASE --adapters runs/x/adapters --out out --format gguf`.
fuse *args: build
    ./target/release/loraforge fuse {{args}}

# Fine-tune with a recipe, e.g. `just train recipes/smollm2-demo.toml --resume`.
train recipe *flags: build
    ./target/release/loraforge train {{recipe}} {{flags}}

# Base vs fine-tuned generations on the recipe's held-out prompts.
eval recipe *flags: build
    ./target/release/loraforge eval {{recipe}} {{flags}}

# Every test, in the release profile (one build serves the binary, unit and integration tests),
# with the portable Vulkan backend, whose tests run on Mesa's lavapipe where it is installed.
test:
    cargo test --release --features vulkan

# The module-level import graph, checked against the layer order of src/lib.rs.
layers:
    cargo test --release --test suite layers -- --nocapture

# libFuzzer on the readers of untrusted input, e.g. `just fuzz gguf 600` (all five by default).
fuzz target="all" seconds="60" runs="-1":
    scripts/fuzz.sh {{target}} {{seconds}} {{runs}}

# Fold the inputs fuzzing found (fuzz/new/) into the committed corpus, minimised.
fuzz-merge target:
    RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz --sanitizer "${FUZZ_SANITIZER:-none}" {{target}} fuzz/corpus/{{target}} fuzz/new/{{target}} -- -merge=1

# Formatting and lints exactly as CI checks them.
lint:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings

# Generation speed on this CPU, ours next to transformers (results in bench/results/).
bench-generate:
    bench/generate.sh

# Regenerate the committed reference fixtures with transformers / mlx (needs .venv-ref).
fixtures:
    scripts/setup-reference-venv.sh
    .venv-ref/bin/python scripts/fixtures/make_tiny_models.py
    .venv-ref/bin/python scripts/fixtures/make_mlx_quantized.py
    .venv-ref/bin/python scripts/fixtures/make_convert_reference.py
    .venv-ref/bin/python scripts/fixtures/make_smollm2_reference.py "$(scripts/fetch-assets.sh smollm2 | tail -n 1)"
    .venv-ref/bin/python scripts/fixtures/make_family_models.py
    .venv-ref/bin/python scripts/fixtures/make_family_gguf.py
    .venv-ref/bin/python scripts/fixtures/make_family_mlx.py
    .venv-ref/bin/python scripts/fixtures/make_peft_parity.py
    .venv-ref/bin/python scripts/fixtures/make_peft_parity.py gemma2
    .venv-ref/bin/python scripts/fixtures/make_peft_parity.py phi3-parts
    .venv-ref/bin/python scripts/fixtures/make_adapter_interop.py
    .venv-ref/bin/python scripts/fixtures/make_kquant_blocks.py
    .venv-ref/bin/python scripts/fixtures/make_kquant_model.py
    .venv-ref/bin/python scripts/fixtures/make_mlx_lora_parity.py
    .venv-ref/bin/python scripts/fixtures/make_table_datasets.py
    .venv-ref/bin/python scripts/fixtures/make_foreign_adapters.py
    .venv-ref/bin/python scripts/fixtures/make_rotating_cache.py
    .venv-ref/bin/python scripts/fixtures/make_chat_turns.py "$(scripts/fetch-assets.sh smollm2 | tail -n 1)"
    .venv-ref/bin/python scripts/fixtures/make_logprobs.py
    cargo build --release && .venv-ref/bin/python scripts/fixtures/make_export_interop.py

# LoRA training tokens/s on this CPU, ours vs PyTorch + peft, 1 and 2 threads (bench/results/).
bench-train-cpu:
    bench/train_cpu.sh

# On a GPU machine: ours and PyTorch + peft on the same card, issue 4's shapes (bench/results/).
bench-gpu:
    bench/gpu.sh

# Training throughput with the dashboard on vs --no-tui on the same run (needs tmux).
bench-dashboard:
    bench/dashboard_overhead.sh

# Peak memory of float LoRA vs QLoRA (4-bit on load) on SmolLM2-135M (results in bench/results/).
bench-train-memory:
    bench/train_memory.sh
