#!/usr/bin/env bash
# The standing GPU check (see ../shared/GPU.md): about 8 minutes on one H200.
#   bash scripts/gpu_check.sh OUT_DIR [DATA_DIR]
# Prints the GPU figures of bench/, trains the Fashion-MNIST DDPM quality and best-cGAN recipes
# time-boxed, evaluates both with the offline classifier, and leaves at most 8 files in OUT_DIR: two
# benchmark JSONs, two metrics JSONs, two grids (the log is the caller's tee). Each training gets a
# budget of seconds (DDPM_SECONDS, CGAN_SECONDS) turned into a step count from the benchmark's own
# seconds per step, so the cosine schedule still runs to its end inside the box.
# SMALL=1 shrinks everything for a CPU rehearsal.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_check.sh OUT_DIR [DATA_DIR]}
DATA=${2:-}
PY=${PY:-python3}
WORK=$(mktemp -d)
mkdir -p "$OUT"
say() { echo "== [$(date +%T)] $*"; }
data=()
[ -n "$DATA" ] && data=(data.path="$DATA")
if [ "${SMALL:-0}" = 1 ]; then
  steps=(--steps 3 --warmup 1); sample_batch=4; n=5
  ddpm_seconds=${DDPM_SECONDS:-20}; cgan_seconds=${CGAN_SECONDS:-10}
  # The CPU has no fast bf16 and the recipe's batch of 128 takes ~18 s a step there.
  ddpm_size=("model.block_out_channels=[16,32,32]" "model.attention=[false,false,false]" model.norm_num_groups=8
             train.batch_size=16 train.mixed_precision=no)
else
  steps=(--steps 30 --warmup 5); sample_batch=250; n=200
  ddpm_seconds=${DDPM_SECONDS:-240}; cgan_seconds=${CGAN_SECONDS:-75}
  ddpm_size=(train.mixed_precision=bf16)
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

# DDPM_STEPS and CGAN_STEPS (both) skip the benchmarks and train that many steps.
if [ -n "${DDPM_STEPS:-}" ] && [ -n "${CGAN_STEPS:-}" ]; then
  ddpm_steps=$DDPM_STEPS; cgan_steps=$CGAN_STEPS
else
  say "training step vs ceiling"
  # The two recipes trained below, as trained (the DDPM in bf16), so their step times size the trainings.
  "$PY" bench/train_step.py --cgan configs/cgan/fmnist_best.yaml --ddpm configs/ddpm/fmnist_quality.yaml "${steps[@]}" \
    --ddpm-set "${ddpm_size[@]}" "${data[@]}" --set "${data[@]}" --json "$OUT/bench_train_step.json"
  # 80% of the budget at the benchmark's pace: the loop also draws grids and writes logs and checkpoints.
  steps_for() {  # trainer seconds -> optimizer steps
    "$PY" -c "import json,sys; r={x['trainer']: x for x in json.load(open(sys.argv[1]))['rows']}[sys.argv[2]]
print(max(10, int(0.8 * float(sys.argv[3]) / r['ours_s_per_step'])))" "$OUT/bench_train_step.json" "$1" "$2"
  }
  ddpm_steps=$(steps_for ddpm "$ddpm_seconds"); cgan_steps=$(steps_for cgan "$cgan_seconds")
  say "sampling"
  "$PY" bench/sampling.py --ddpm-config configs/ddpm/report_a.yaml --batch "$sample_batch" --skip-ddpm-full \
    --json "$OUT/bench_sampling.json"
fi

say "DDPM, quality recipe, $ddpm_steps steps (${ddpm_seconds} s budget)"
"$PY" train_ddpm.py --config configs/ddpm/fmnist_quality.yaml output_dir="$WORK/ddpm" train.max_steps="$ddpm_steps" \
  log.wandb=disabled eval.every_epochs=null checkpoint.every_steps=100000 \
  "${ddpm_size[@]}" "${data[@]}"
# The best setting measured on the CPU DDPM (docs/results.md): DPM-Solver++ 20, w = 2.5 on t/T <= 0.45.
"$PY" eval.py "$WORK/ddpm" --num-per-class "$n" --no-pngs --out "$WORK/ddpm/eval/final" \
  --scheduler dpmsolver --steps 20 --guidance 2.5 --guidance-interval 0 0.45 \
  ${DATA:+--data fashion_mnist --data-path "$DATA"}
cp "$WORK/ddpm/eval/final/metrics.json" "$OUT/ddpm_metrics.json"
cp "$WORK/ddpm/eval/final/grid.png" "$OUT/ddpm_grid.png"

say "cGAN, best recipe, $cgan_steps steps (${cgan_seconds} s budget)"
"$PY" train_cgan.py --config configs/cgan/fmnist_best.yaml output_dir="$WORK/cgan" train.max_steps="$cgan_steps" \
  log.wandb=disabled eval.every_epochs=null checkpoint.every_steps=100000 "${data[@]}"
"$PY" eval.py "$WORK/cgan" --num-per-class "$n" --no-pngs --out "$WORK/cgan/eval/final" \
  ${DATA:+--data fashion_mnist --data-path "$DATA"}
cp "$WORK/cgan/eval/final/metrics.json" "$OUT/cgan_metrics.json"
cp "$WORK/cgan/eval/final/grid.png" "$OUT/cgan_grid.png"
rm -rf "$WORK"
say "done: $(ls "$OUT")"
