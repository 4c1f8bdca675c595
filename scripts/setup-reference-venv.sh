#!/usr/bin/env bash
# Creates .venv-ref with the reference implementations (transformers, torch, mlx, ...) used to
# make fixtures and to benchmark against. Not needed to build, run or test loraforge.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv-ref/bin/python ] && .venv-ref/bin/python -c "import torch, transformers, gguf, accelerate" 2>/dev/null; then
  exit 0
fi
python3 -m venv .venv-ref
.venv-ref/bin/pip install --quiet -r scripts/requirements-reference.txt
