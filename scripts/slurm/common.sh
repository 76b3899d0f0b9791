# Sourced by the sbatch files of this folder: settings from the environment, and the launch that turns
# Slurm's time-limit warning into a checkpoint and a requeue. Not a job script itself.
#
# Settings (environment variables; the sbatch files' #SBATCH lines are the only thing to edit):
#   CONFIG           the run's YAML                        (configs/ddpm/fmnist_quality.yaml)
#   SCRIPT           the trainer                           (train_cgan.py for a config under a cgan/ folder,
#                                                           else train_ddpm.py)
#   OVERRIDES        dotted overrides, space-separated     (none; values cannot hold spaces: use "$@")
#   GPUS_PER_NODE    processes per node                    (8)
#   MIXED_PRECISION  no, fp16 or bf16                      (bf16)
#   MASTER_PORT      rendezvous port on the first node     (20000 + job id mod 20000)
#   PYTHON           the interpreter with the project      (.venv/bin/python if there, else python)
#   REQUEUE          1: requeue the job when Slurm's time-limit warning (USR1) stopped the run (1)
#   REPO_DIR         the repository                        (the directory sbatch was run from)
# Arguments after the sbatch file name go to the trainer (dotted overrides).
# Every start passes --resume latest: the first starts at step 0, a requeued one continues. A job never deletes
# a run (the trainer refuses --overwrite with --resume): to start again, choose a new output_dir.

set -euo pipefail
cd "${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
if [[ ! -f train_ddpm.py ]]; then
  echo "error: $PWD is not the repository: run sbatch from its root, or set REPO_DIR" >&2
  exit 2
fi

CONFIG=${CONFIG:-configs/ddpm/fmnist_quality.yaml}
if [[ -z ${SCRIPT:-} ]]; then
  case $CONFIG in
    */cgan/*|cgan/*) SCRIPT=train_cgan.py ;;
    *) SCRIPT=train_ddpm.py ;;
  esac
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MIXED_PRECISION=${MIXED_PRECISION:-bf16}
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
REQUEUE=${REQUEUE:-1}
NNODES=${SLURM_NNODES:-1}
read -r -a override_args <<< "${OVERRIDES:-}"
TRAIN_ARGS=("$SCRIPT" --config "$CONFIG" "${override_args[@]}" "$@" --resume latest)
export PYTHON GPUS_PER_NODE MIXED_PRECISION MASTER_PORT NNODES

# The first node of the allocation: where the rendezvous (and process 0) is.
main_node() {
  scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p
}

warned=0
child=
on_warning() {
  warned=1
  echo "$(date '+%F %T') time-limit warning: SIGTERM to the run (it checkpoints and stops)"
  [[ -n $child ]] && kill -TERM "$child" 2>/dev/null || true
}

# run_job COMMAND...: COMMAND in the background (bash runs a trap only between commands, never while a
# foreground one runs); on USR1 (#SBATCH --signal=B:USR1@...) it gets SIGTERM, and once it has stopped the
# job is requeued, so the next start continues from the checkpoint SIGTERM wrote. A scancel, or a preemption
# (Slurm sends SIGTERM to every process of the job itself), is not requeued by this script.
run_job() {
  echo "$(date '+%F %T') job ${SLURM_JOB_ID:-none} start ${SLURM_RESTART_COUNT:-0} on $NNODES node(s) x" \
       "$GPUS_PER_NODE process(es), port $MASTER_PORT: $*"
  trap on_warning USR1
  "$@" &
  child=$!
  local rc
  while true; do
    rc=0
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break  # still there: the wait was cut short by the trap
  done
  trap - USR1
  echo "$(date '+%F %T') the run exited with $rc"
  if [[ $warned == 1 && $rc != 0 && $REQUEUE == 1 ]]; then
    echo "requeueing job $SLURM_JOB_ID: its next start continues with --resume latest"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}
