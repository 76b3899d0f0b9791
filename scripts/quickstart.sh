#!/usr/bin/env bash
# Set-up and the two everyday commands, for a fresh machine:
#   bash scripts/quickstart.sh demo   # install, get Fashion-MNIST, train and evaluate the cGAN and DDPM demos
#   bash scripts/quickstart.sh test   # install, run the fast test suite (--all: every test, as CI does)
# The venv lives in .venv (override with VENV=...). Extra arguments go to pytest (test) .
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ] || ! "$PY" -c "import pipelines, pytest" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    # The versions the published figures were measured with; torch stays the build the machine has.
    "$PY" -m pip install -q -c constraints.txt -e ".[dev]"
  fi
  if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    local sudo=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo="sudo"
    if command -v apt-get >/dev/null; then
      $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist
    else
      echo "note: apt-get is not available; real Fashion-MNIST will come from the Hub (or set data.path)" >&2
    fi
  fi
}

case "${1:-}" in
  demo)
    setup
    # The demos write only under runs/demo/ and replace what an earlier demo left there.
    "$PY" train_cgan.py --config configs/cgan/demo_cpu.yaml --overwrite
    "$PY" train_ddpm.py --config configs/ddpm/demo_cpu.yaml --overwrite
    # Offline metrics (the shipped Fashion-MNIST classifier): FID, KID, accuracy, diversity per class.
    "$PY" eval.py runs/demo/cgan --num-per-class 100 --no-pngs
    "$PY" eval.py runs/demo/ddpm --num-per-class 100 --no-pngs
    echo "Samples: runs/demo/{cgan,ddpm}/grids/final.png; metrics: runs/demo/*/eval/*/metrics.json;" \
         "pipelines: runs/demo/*/pipeline"
    ;;
  test)
    setup
    shift
    if [[ ${1:-} == --all ]]; then  # every test: the cluster, multi-process and end-to-end runs too
      shift
      HF_HUB_OFFLINE=1 "$PY" -m pytest -q --durations=15 "$@"
    else
      HF_HUB_OFFLINE=1 "$PY" -m pytest -m "not slow" -q "$@"
    fi
    ;;
  *)
    echo "usage: bash scripts/quickstart.sh demo|test [pytest args]" >&2
    exit 2
    ;;
esac
