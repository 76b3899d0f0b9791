#!/usr/bin/env bash
# The standing GPU check (see ../shared/GPU.md).
#   bash scripts/gpu_check.sh OUT_DIR [DATA_DIR]
# Opens with the correctness matrix (scripts/gpu_matrix.py: both trainers x fp32/bf16/fp16 x data on the device/
# in host memory x eager/compile/compile reduce-overhead, 10 steps and a resume to 20 each, plus 2 processes on
# the one GPU; about 5 minutes on one H100, each cell's pass/fail and first error in figures.json as `matrix`).
# Then the GPU figures of bench/ (each trainer's step against its ceiling; the speed options, the CUDA-graph
# compile modes among them, on the report-B cGAN and the bf16 quality DDPM; sampling, eager and compiled),
# trains the Fashion-MNIST DDPM quality and best-cGAN recipes time-boxed, evaluates both with the offline
# classifier, and packs both exports in fp16 (about 8 minutes on one H200). The whole does not fit one
# 10-minute call: MATRIX=only runs the matrix alone, MATRIX=0 everything after it (default MATRIX=1: both).
# It leaves up to 5 files in OUT_DIR (the log is the caller's tee):
# figures.json (every benchmark and metric, rewritten after each part), two grids, two export tars (each under the 16 MiB a file may
# have; for pretrained/). Each training gets a budget of seconds (DDPM_SECONDS, CGAN_SECONDS) turned into a
# step count from the benchmark's own seconds per step, so the cosine schedule still runs to its end inside
# the box. SPEED=0 skips the speed-option and compiled-sampling figures. SMALL=1 shrinks everything for a CPU
# rehearsal (the matrix's CUDA-only cells then say they were skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_check.sh OUT_DIR [DATA_DIR]}
DATA=${2:-}
PY=${PY:-python3}
WORK=$(mktemp -d)
mkdir -p "$OUT"
say() { echo "== [$(date +%T)] $*"; }
PARTS="$WORK/figures"; mkdir -p "$PARTS"
fold() {  # every figure so far into OUT/figures.json, so a call cut short still brings back what it measured
  "$PY" - "$PARTS" "$OUT/figures.json" <<'PY'
import json, os, pathlib, sys
parts, out = pathlib.Path(sys.argv[1]), sys.argv[2]
merged = {p.stem: json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))}
pathlib.Path(out + ".partial").write_text(json.dumps(merged, indent=2))
os.replace(out + ".partial", out)
PY
}
data=()
[ -n "$DATA" ] && data=(data.path="$DATA")
if [ "${SMALL:-0}" = 1 ]; then
  steps=(--steps 3 --warmup 1); sample_batch=4; n=5
  ddpm_seconds=${DDPM_SECONDS:-20}; cgan_seconds=${CGAN_SECONDS:-10}
  # compilation takes minutes on 2 CPU cores; the CUDA-graph modes skip there
  cgan_variants=(channels_last); ddpm_variants=(channels_last)
  # The CPU has no fast bf16 and the recipe's batch of 128 takes ~18 s a step there.
  ddpm_size=("model.block_out_channels=[16,32,32]" "model.attention=[false,false,false]" model.norm_num_groups=8
             train.batch_size=16 train.mixed_precision=no)
else
  steps=(--steps 30 --warmup 5); sample_batch=250; n=200
  ddpm_seconds=${DDPM_SECONDS:-150}; cgan_seconds=${CGAN_SECONDS:-45}
  # Each compiled variant pays its compilation (a minute or more for the U-Net) inside the 9-minute call.
  cgan_variants=(channels_last compile "compile reduce-overhead"); ddpm_variants=(channels_last "compile reduce-overhead")
  ddpm_size=(train.mixed_precision=bf16)
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

MATRIX=${MATRIX:-1}
if [ "$MATRIX" != 0 ]; then
  say "correctness matrix"
  if [ "${SMALL:-0}" = 1 ]; then matrix_args=(--small --deadline 1800); else matrix_args=(--deadline 240 --cell-timeout 120); fi
  "$PY" scripts/gpu_matrix.py "$PARTS/matrix.json" "${matrix_args[@]}"
  fold
  if [ "$MATRIX" = only ]; then rm -rf "$WORK"; say "done: $(ls "$OUT")"; exit 0; fi
fi

# DDPM_STEPS and CGAN_STEPS (both) skip the benchmarks and train that many steps.
if [ -n "${DDPM_STEPS:-}" ] && [ -n "${CGAN_STEPS:-}" ]; then
  ddpm_steps=$DDPM_STEPS; cgan_steps=$CGAN_STEPS
else
  say "training step vs ceiling"
  # The two recipes trained below, as trained (the DDPM in bf16), so their step times size the trainings.
  "$PY" bench/train_step.py --cgan configs/cgan/fmnist_best.yaml --ddpm configs/ddpm/fmnist_quality.yaml "${steps[@]}" \
    --ddpm-set "${ddpm_size[@]}" "${data[@]}" --set "${data[@]}" --json "$PARTS/bench_train_step.json"
  # 80% of the budget at the benchmark's pace: the loop also draws grids and writes logs and checkpoints.
  steps_for() {  # trainer seconds -> optimizer steps
    "$PY" -c "import json,sys; r={x['trainer']: x for x in json.load(open(sys.argv[1]))['rows']}[sys.argv[2]]
print(max(10, int(0.8 * float(sys.argv[3]) / r['ours_s_per_step'])))" "$PARTS/bench_train_step.json" "$1" "$2"
  }
  fold
  ddpm_steps=$(steps_for ddpm "$ddpm_seconds"); cgan_steps=$(steps_for cgan "$cgan_seconds")
  say "sampling"
  compiled=(); [ "${SPEED:-1}" = 1 ] && compiled=(--compile)
  "$PY" bench/sampling.py --ddpm-config configs/ddpm/report_a.yaml --batch "$sample_batch" --skip-ddpm-full \
    "${compiled[@]}" --json "$PARTS/bench_sampling.json"
  fold
  if [ "${SPEED:-1}" = 1 ]; then
    say "speed options: report-B cGAN (fp32), quality DDPM (as trained below)"
    "$PY" bench/speed_options.py --trainers cgan --cgan configs/cgan/report_b_hinge_emb10.yaml "${steps[@]}" \
      --variants "${cgan_variants[@]}" --set "${data[@]}" --json "$PARTS/bench_speed_cgan.json"
    "$PY" bench/speed_options.py --trainers ddpm --ddpm configs/ddpm/fmnist_quality.yaml "${steps[@]}" \
      --variants "${ddpm_variants[@]}" --set "${ddpm_size[@]}" "${data[@]}" --json "$PARTS/bench_speed_ddpm.json"
    fold
  fi
fi

say "DDPM, quality recipe, $ddpm_steps steps (${ddpm_seconds} s budget)"
"$PY" train_ddpm.py --config configs/ddpm/fmnist_quality.yaml output_dir="$WORK/ddpm" train.max_steps="$ddpm_steps" \
  log.wandb=disabled eval.every_epochs=null checkpoint.every_steps=100000 \
  "${ddpm_size[@]}" "${data[@]}"
# The best setting measured on the CPU DDPM (docs/results.md): DPM-Solver++ 20, w = 2.5 on t/T <= 0.45.
"$PY" eval.py "$WORK/ddpm" --num-per-class "$n" --no-pngs --out "$WORK/ddpm/eval/final" \
  --scheduler dpmsolver --steps 20 --guidance 2.5 --guidance-interval 0 0.45 \
  ${DATA:+--data fashion_mnist --data-path "$DATA"}
cp "$WORK/ddpm/eval/final/metrics.json" "$PARTS/ddpm_metrics.json"; fold
cp "$WORK/ddpm/eval/final/grid.png" "$OUT/ddpm_grid.png"
# generate on the GPU, to a grid and to a folder of PNGs (samples drawn on CUDA, written from the host)
"$PY" -m pipelines.generate "$WORK/ddpm/pipeline" --class 0 --class 7 --num 4 --steps 5 --out "$WORK/generated.png"
"$PY" -m pipelines.generate "$WORK/ddpm/pipeline" --class 0 --num 4 --steps 5 --out "$WORK/generated"

say "cGAN, best recipe, $cgan_steps steps (${cgan_seconds} s budget)"
"$PY" train_cgan.py --config configs/cgan/fmnist_best.yaml output_dir="$WORK/cgan" train.max_steps="$cgan_steps" \
  log.wandb=disabled eval.every_epochs=null checkpoint.every_steps=100000 "${data[@]}"
"$PY" eval.py "$WORK/cgan" --num-per-class "$n" --no-pngs --out "$WORK/cgan/eval/final" \
  ${DATA:+--data fashion_mnist --data-path "$DATA"}
cp "$WORK/cgan/eval/final/metrics.json" "$PARTS/cgan_metrics.json"; fold
cp "$WORK/cgan/eval/final/grid.png" "$OUT/cgan_grid.png"
say "exports in fp16"
for name in ddpm cgan; do
  "$PY" scripts/pack_export.py "$WORK/$name/pipeline" "$OUT/${name}_fp16.tar"
done
rm -rf "$WORK"
say "done: $(ls "$OUT")"
