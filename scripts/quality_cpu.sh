#!/usr/bin/env bash
# Reproduces QUALITY.md on a CPU machine (about 1h30 on 2 cores): trains report A's cGAN and the
# stabilised cGAN for the same number of epochs, the CPU DDPM recipe, then evaluates all three the
# same way (offline classifier features, N per class) and the DDPM's samplers.
#   bash scripts/quality_cpu.sh [OUT_DIR] [CGAN_EPOCHS] [N_PER_CLASS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/quality}
EPOCHS=${2:-5}
N=${3:-100}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"

"$PY" train_ddpm.py --config configs/ddpm/fmnist_cpu.yaml output_dir="$OUT/ddpm_cpu" --overwrite
"$PY" train_cgan.py --config configs/cgan/report_a.yaml output_dir="$OUT/cgan_report_a" train.epochs="$EPOCHS" \
  eval.every_epochs=1 --overwrite
"$PY" train_cgan.py --config configs/cgan/fmnist_best.yaml output_dir="$OUT/cgan_best" train.epochs="$EPOCHS" --overwrite

"$PY" eval.py baselines --data fashion_mnist --num-per-class "$N" --out "$OUT/baselines.json"
for run in cgan_report_a cgan_best; do
  "$PY" eval.py "$OUT/$run" --num-per-class "$N" --no-pngs --out "$OUT/$run/eval/final"
done
# The DDPM's samplers: DDIM and DPM-Solver++ at several step counts and guidance scales.
for w in 1 1.5 2 3; do
  for s in "ddim 10" "ddim 20" "ddim 50" "dpmsolver 10" "dpmsolver 20"; do
    set -- $s
    "$PY" eval.py "$OUT/ddpm_cpu" --num-per-class "$N" --no-pngs --scheduler "$1" --steps "$2" --guidance "$w" \
      --out "$OUT/ddpm_cpu/eval/$1-$2-w$w"
  done
done
# The export's default: the fastest of those within 10% of the best FID.
"$PY" eval.py set-default "$OUT/ddpm_cpu" --tolerance 0.1
# The slow reference: ancestral DDPM over all T steps, on fewer samples.
"$PY" eval.py "$OUT/ddpm_cpu" --num-per-class 10 --no-pngs --scheduler ddpm --steps 1000 --guidance 2 \
  --out "$OUT/ddpm_cpu/eval/ddpm-1000-w2-n10"
"$PY" eval.py baselines --data fashion_mnist --num-per-class 10 --out "$OUT/baselines_n10.json"
"$PY" eval.py "$OUT/ddpm_cpu" --num-per-class "$N" --no-pngs --out "$OUT/ddpm_cpu/eval/final"
"$PY" eval.py compare "$OUT/cgan_report_a" "$OUT/cgan_best" "$OUT/ddpm_cpu" --metrics final --out "$OUT/compare" || true
