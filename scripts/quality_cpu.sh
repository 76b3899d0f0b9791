#!/usr/bin/env bash
# Reproduces docs/results.md on a CPU machine (about 4 hours on 2 cores): trains the CPU DDPM recipe, report
# A's cGAN and the stabilised cGAN (the two cGANs for the same number of epochs), then evaluates them
# the same way (offline classifier features, N images per class) and the DDPM's samplers.
# Re-running continues: finished trainings are skipped, interrupted ones resume from their checkpoint.
#   bash scripts/quality_cpu.sh [OUT_DIR] [CGAN_EPOCHS] [N_PER_CLASS] [SAMPLER_N_PER_CLASS] [DDPM_T_N_PER_CLASS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/quality}
EPOCHS=${2:-5}
N=${3:-100}
SAMPLER_N=${4:-50}
SLOW_N=${5:-5}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"

train() {  # train SCRIPT RUN_NAME ARGS...: skipped when the run already exported its pipeline
  local script=$1 run=$2
  shift 2
  [ -e "$OUT/$run/pipeline/model_index.json" ] || "$PY" "$script" output_dir="$OUT/$run" --resume latest "$@"
}
train train_ddpm.py ddpm_cpu --config configs/ddpm/fmnist_cpu.yaml
train train_cgan.py cgan_report_a --config configs/cgan/report_a.yaml train.epochs="$EPOCHS" eval.every_epochs=1
train train_cgan.py cgan_best --config configs/cgan/fmnist_best.yaml train.epochs="$EPOCHS"

"$PY" eval.py baselines --data fashion_mnist --num-per-class "$N" --out "$OUT/baselines_n$N.json"
for run in cgan_report_a cgan_best; do
  "$PY" eval.py "$OUT/$run" --num-per-class "$N" --no-pngs --out "$OUT/$run/eval/final"
done
# The DDPM's samplers: DDIM and DPM-Solver++ at several step counts and guidance scales.
"$PY" eval.py baselines --data fashion_mnist --num-per-class "$SAMPLER_N" --out "$OUT/baselines_n$SAMPLER_N.json"
for w in 1 1.5 2 3; do
  for s in "ddim 10" "ddim 20" "ddim 50" "dpmsolver 10" "dpmsolver 20"; do
    set -- $s
    "$PY" eval.py "$OUT/ddpm_cpu" --num-per-class "$SAMPLER_N" --no-pngs --scheduler "$1" --steps "$2" \
      --guidance "$w" --guidance-interval 0 1 --out "$OUT/ddpm_cpu/eval/$1-$2-w$w"
  done
done
# Guidance strength and interval at the cGANs' N (the guidance-interval table of docs/results.md).
# An interval of 0 1 guides every step (and overrides an export's default interval on a re-run).
for s in "10 1 0 1" "10 1.5 0 1" "10 2 0 1" "10 3 0 1" "10 2 0 0.45" "10 2 0 0.6" "10 2.5 0 0.45" "10 3 0 0.6" \
         "10 3 0.25 0.6" "10 4 0 0.6" "20 2.5 0 0.45"; do
  set -- $s
  "$PY" eval.py "$OUT/ddpm_cpu" --num-per-class "$N" --no-pngs --scheduler dpmsolver --steps "$1" --guidance "$2" \
    --guidance-interval "$3" "$4" --out "$OUT/ddpm_cpu/eval/n$N-dpmsolver-$1-w$2-gi$3-$4"
done
# The export's default: the fastest of those within 10% of the best FID (Fashion-MNIST has 10 classes).
"$PY" eval.py set-default "$OUT/ddpm_cpu" --tolerance 0.1 --num-samples $((N * 10))
# The slow reference: ancestral DDPM over all T = 1000 steps, on fewer samples (and its floor at that N).
"$PY" eval.py "$OUT/ddpm_cpu" --num-per-class "$SLOW_N" --no-pngs --scheduler ddpm --steps 1000 --guidance 2 \
  --guidance-interval 0 1 \
  --out "$OUT/ddpm_cpu/slow/ddpm-1000-w2"
"$PY" eval.py baselines --data fashion_mnist --num-per-class "$SLOW_N" --out "$OUT/baselines_n$SLOW_N.json"
# Training longer: two more epochs, each resuming the previous run's last checkpoint with train.epochs one
# higher, so the cosine schedule restarts at its value for that point (about 1e-4) and decays to 0 again.
continue_ddpm() {  # continue_ddpm FROM TO EPOCHS
  local from="$OUT/$1" to="$OUT/$2"
  [ -e "$to/pipeline/model_index.json" ] && return
  if [ ! -d "$to/checkpoints" ]; then
    mkdir -p "$to/checkpoints.tmp"
    cp -r "$(ls -d "$from"/checkpoints/step_* | tail -n 1)" "$from/config.yaml" "$to/checkpoints.tmp/"
    mv "$to/checkpoints.tmp/config.yaml" "$to/" && mv "$to/checkpoints.tmp" "$to/checkpoints"
  fi
  "$PY" train_ddpm.py --config configs/ddpm/fmnist_cpu.yaml output_dir="$to" train.epochs="$3" eval.every_epochs=null \
    --resume latest
}
continue_ddpm ddpm_cpu ddpm_cpu5 5
continue_ddpm ddpm_cpu5 ddpm_cpu6 6
for run in ddpm_cpu5 ddpm_cpu6; do
  "$PY" eval.py "$OUT/$run" --num-per-class "$N" --no-pngs --scheduler dpmsolver --steps 20 --guidance 2.5 \
    --guidance-interval 0 0.45 --out "$OUT/$run/eval/n$N-dpmsolver-20-w2.5-gi0-0.45"
done
# The DDPM with its chosen default sampler, at the cGANs' N, then the comparison table and grids.
"$PY" eval.py "$OUT/ddpm_cpu" --num-per-class "$N" --no-pngs --out "$OUT/ddpm_cpu/eval/final"
"$PY" eval.py compare "$OUT/cgan_report_a" "$OUT/cgan_best" "$OUT/ddpm_cpu" --metrics final --out "$OUT/compare"
