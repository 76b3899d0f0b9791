#!/usr/bin/env bash
# Rewrite constraints.txt from the installed environment (after an upgrade; then measure the figures again:
# bash scripts/demo_seeds.sh cgan, and the rest of docs/results.md that you quote).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
{
  echo "# The versions the README's and docs/results.md's figures were measured with (Python $("$PY" -c 'import platform; print(platform.python_version())'), torch $("$PY" -c 'import torch; print(torch.__version__.split("+")[0])'))."
  echo "# scripts/quickstart.sh installs with '-c constraints.txt'; setup.cfg keeps the ranges. torch, torchvision and the"
  echo "# CUDA wheels are left out on purpose: pip keeps the build your machine has (CPU or CUDA)."
  echo "# Regenerate after an upgrade, and re-measure the figures: bash scripts/lock.sh"
  "$PY" -m pip freeze --exclude-editable | grep -Eiv '^(torch|torchvision|triton|nvidia-.*|cuda-.*|class.conditional.generation)=='
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pinned packages"
