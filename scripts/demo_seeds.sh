#!/usr/bin/env bash
# The demo figures of the README: a demo recipe trained and evaluated for several seeds, then the median and
# range of its metrics (scripts/seed_spread.py), with the versions and CPU they came from.
#   bash scripts/demo_seeds.sh cgan 0 1 2     # about 5 minutes a seed on 2 cores
#   bash scripts/demo_seeds.sh ddpm 0 1 2
# Runs go to runs/demo_seeds/<family>/seed<S>/; a finished seed is not trained or evaluated again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
family=${1:?usage: bash scripts/demo_seeds.sh cgan|ddpm [SEED...]}
shift
case "$family" in
  cgan|ddpm) ;;
  *) echo "unknown family '$family': choose cgan or ddpm" >&2; exit 2 ;;
esac
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
metrics=()
for seed in "${seeds[@]}"; do
  run=runs/demo_seeds/$family/seed$seed
  if [ ! -e "$run/eval/classifier/metrics.json" ]; then
    "$PY" "train_$family.py" --config "configs/$family/demo_cpu.yaml" seed="$seed" output_dir="$run" \
      log.wandb=disabled --resume latest
    "$PY" eval.py "$run" --num-per-class 100 --no-pngs  # the quickstart's evaluation
  fi
  metrics+=("$run/eval/classifier/metrics.json")
done
"$PY" scripts/seed_spread.py "${metrics[@]}"
