"""The Slurm job scripts of scripts/slurm/, run for real with bash: fake `srun` and `scontrol` first on PATH
start each "node" as a process on this machine, so the scripts' own launch commands train a tiny cGAN on
2 nodes x 1 process (gloo on 127.0.0.1), or 1 node x 2 processes, and export it; a second start (as a
requeued job's) continues the run with --resume latest instead of refusing it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.checkpoints import list_checkpoints
from test_multinode import kill_tree, steps_so_far
from trainer_utils import ROOT, free_port, logged_steps

SLURM = ROOT / "scripts" / "slurm"
JOB_ID = "4242"

FAKE_SRUN = """#!/usr/bin/env bash
# Fake srun: its command once per node of the fake allocation, all at once, each with its SLURM_NODEID and
# SLURM_PROCID; the signals srun forwards (TERM, INT) go to every node's command; exits with the highest code.
while [[ $# -gt 0 && $1 == -* ]]; do echo "$1" >> "$FAKE_SLURM_LOG"; shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
rc=0
for pid in "${pids[@]}"; do
  while true; do
    code=0
    wait "$pid" || code=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  (( code > rc )) && rc=$code
done
exit "$rc"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# Fake scontrol: `show hostnames LIST` prints localhost once per node; every call is logged.
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [[ $1 == show && $2 == hostnames ]]; then
  for ((node = 0; node < SLURM_NNODES; node++)); do echo localhost; done
fi
"""

# A tiny cGAN run on the synthetic data set: 4 steps (2 processes x batch 16), every step logged.
TINY_CONFIG = """\
data: {name: synthetic, synthetic_size: 256}
model: {base_channels: 8, latent_dim: 16, label_emb_dim: 8}
train: {batch_size: 16, epochs: 2, max_steps: 4}
log: {every_steps: 1, wandb: disabled}
checkpoint: {every_steps: 1000}
"""

# train_cgan.py slowed down after each logged step (tests/fault_harness.py's `slow:`; results unchanged),
# so a signal lands mid-run.
SLOW_CGAN = """\
import sys
sys.path.insert(0, {tests!r})
import fault_harness
fault_harness.install("slow:0.3")
import pipelines.commands
sys.exit(pipelines.commands.train_cgan(sys.argv[1:]))
"""


@pytest.fixture
def cluster(tmp_path):
    """Fake Slurm commands and a 2-node job's environment; `cluster.start(FILE, *args)` runs a job script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    config = tmp_path / "configs" / "cgan" / "tiny.yaml"  # under cgan/: the scripts pick train_cgan.py
    config.parent.mkdir(parents=True)
    config.write_text(TINY_CONFIG)

    class Cluster:
        log = tmp_path / "slurm_calls.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "OVERRIDES"))}
        env.update({
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log),
            "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NNODES": "2",
            "SLURM_SUBMIT_DIR": str(ROOT), "GPUS_PER_NODE": "1", "MIXED_PRECISION": "no",
            "CONFIG": str(config), "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1",  # one thread per process on these 2 cores
        })
        starts = 0

        def start(self, name: str, *args: str, **env: str) -> subprocess.Popen:
            """`bash scripts/slurm/NAME ARGS...` from another directory (sbatch runs a copy of the file), on a
            free port; output in `job.N.log`."""
            self.starts += 1
            out = open(tmp_path / f"job.{self.starts}.log", "w")
            proc = subprocess.Popen(
                ["bash", str(SLURM / name), *args], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                env={**self.env, "MASTER_PORT": str(free_port()), "SLURM_RESTART_COUNT": str(self.starts - 1),
                     **env},
                start_new_session=True)
            out.close()
            proc.log = tmp_path / f"job.{self.starts}.log"
            return proc

        def wait(self, proc: subprocess.Popen, timeout: float = 300) -> str:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_tree(proc)
                raise AssertionError(f"job script ran past {timeout} s:\n{proc.log.read_text()[-5000:]}")
            return proc.log.read_text()

        def run(self, name: str, *args: str, **env: str) -> str:
            proc = self.start(name, *args, **env)
            printed = self.wait(proc)
            assert proc.returncode == 0, f"exit code {proc.returncode}\n{printed[-6000:]}"
            return printed

        def calls(self) -> list[str]:
            return self.log.read_text().splitlines() if self.log.exists() else []

    return Cluster()


def resumes_without_training_again(cluster, name: str, out: Path, steps: int, processes: int, precision: str) -> None:
    """A first start trains (in `precision`) and exports; a second one (a requeued job) resumes from the final
    checkpoint, trains nothing again, and exports again."""
    printed = cluster.run(name, f"output_dir={out}")
    training = json.loads((out / "pipeline" / "training.json").read_text())
    assert (training["processes"], training["mixed_precision"]) == (processes, precision)
    assert f"--resume latest: no complete checkpoint in {out / 'checkpoints'}; starting from step 0" in printed
    assert f"{processes} processes (cpu) x batch 16" in printed  # one run over every node, not one per node
    assert f"done: {steps} steps; pipeline in {out / 'pipeline'}" in printed
    assert logged_steps(out) == list(range(1, steps + 1))
    assert (out / "pipeline" / "model_index.json").is_file()
    exported = (out / "pipeline" / "model_index.json").stat().st_mtime_ns

    printed = cluster.run(name, f"output_dir={out}")
    assert "already holds a run" not in printed
    assert f"resumed from {out / 'checkpoints' / f'step_{steps:09d}'} at step {steps}" in printed
    assert logged_steps(out) == list(range(1, steps + 1))  # no step trained again
    assert f"done: {steps} steps" in printed and (out / "pipeline" / "model_index.json").stat().st_mtime_ns > exported
    assert not any("requeue" in call for call in cluster.calls())


@pytest.mark.slow  # a multi-process or end-to-end run; the fast suite covers its parts
def test_one_node_script_trains_with_accelerate_and_a_second_start_continues(cluster, tmp_path):
    cluster.env.update({"SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node01", "GPUS_PER_NODE": "2"})
    del cluster.env["MIXED_PRECISION"]  # the default: bf16 (autocast runs on the CPU too)
    resumes_without_training_again(cluster, "train_1node.sbatch", tmp_path / "run", steps=4, processes=2,
                                   precision="bf16")
    assert not any(call.startswith("--") for call in cluster.calls())  # no srun: the launcher runs in the job


@pytest.mark.slow  # about 45 s here; the one-node script's test stays in the fast suite
def test_torchrun_script_trains_on_two_nodes_and_a_second_start_continues(cluster, tmp_path):
    cluster.env["MIXED_PRECISION"] = "bf16"  # torchrun has no --mixed_precision: the script exports it to accelerate
    resumes_without_training_again(cluster, "train_multinode_torchrun.sbatch", tmp_path / "run", steps=4,
                                   processes=2, precision="bf16")
    assert "scontrol show hostnames node[01-02]" in cluster.calls()


@pytest.mark.slow  # about 45 s here; the one-node script's test stays in the fast suite
def test_multinode_script_is_requeued_at_the_time_limit_warning_and_the_requeued_start_continues(cluster, tmp_path):
    """The accelerate script on 2 nodes: USR1 (#SBATCH --signal=B:USR1@...) mid-run makes it checkpoint, stop and
    requeue the job; the requeued start continues from that checkpoint to the end. (A start after the end
    is the other scripts' second start above: common.sh is the same.)"""
    out = tmp_path / "run"
    slow = tmp_path / "configs" / "cgan" / "slow_cgan.py"
    slow.write_text(SLOW_CGAN.format(tests=str(ROOT / "tests")))
    long = {"SCRIPT": str(slow), "OVERRIDES": "train.max_steps=16 log.every_steps=1"}  # 16 steps, 0.3 s each
    proc = cluster.start("train_multinode.sbatch", f"output_dir={out}", **long)
    deadline = time.time() + 240
    while steps_so_far(out) < 3:
        if proc.poll() is not None or time.time() > deadline:
            kill_tree(proc)
            pytest.fail(f"3 steps not logged (exit code {proc.returncode}):\n{proc.log.read_text()[-5000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # to the batch shell only, as B: sends it
    printed = cluster.wait(proc)
    assert proc.returncode != 0, printed[-5000:]
    [checkpoint] = list_checkpoints(out)  # the checkpoint SIGTERM wrote (none was due before step 1000)
    step = int(checkpoint.name.split("_")[1])
    assert 3 <= step < 16 and f"SIGTERM: saved a checkpoint at step {step}" in printed, printed[-5000:]
    assert f"scontrol requeue {JOB_ID}" in cluster.calls()
    assert "--ntasks-per-node=1" in cluster.calls()  # srun: one launcher per node
    assert not (out / "pipeline").exists()

    printed = cluster.run("train_multinode.sbatch", f"output_dir={out}", **long)
    assert f"resumed from {checkpoint} at step {step}" in printed
    assert logged_steps(out)[-(16 - step):] == list(range(step + 1, 17))
    training = json.loads((out / "pipeline" / "training.json").read_text())
    assert (training["processes"], training["mixed_precision"]) == (2, "no")  # MIXED_PRECISION over the file's bf16
    assert cluster.calls().count(f"scontrol requeue {JOB_ID}") == 1  # a finished run is not requeued


@pytest.mark.slow  # three job-array tasks: two trainings and a report, about 2 minutes here
def test_a_study_as_a_job_array_trains_one_run_per_task_and_the_last_task_writes_the_report(cluster, tmp_path,
                                                                                            classifier_dir):
    """scripts/slurm/study_array.sbatch: each array task trains its run of a sweep file (with --resume latest, as
    every start does); the report appears when the last run is finished, whichever task that is."""
    import yaml

    from test_sweep import write_sweep

    study = write_sweep(tmp_path / "study.yaml", classifier_dir)
    count = subprocess.run([sys.executable, "-m", "pipelines.sweep", str(study), "--count"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert count.strip() == "2"
    runs = yaml.safe_load(study.read_text())["parameters"]["loss.name"]["values"]
    one = {"STUDY": str(study), "SWEEP_ARGS": "--inception no", "SLURM_NNODES": "1"}
    printed = cluster.run("study_array.sbatch", SLURM_ARRAY_TASK_ID="1", **one)
    assert f"training {runs[1]}_emb8" in printed and "1 of 2 runs finished" in printed
    assert (tmp_path / "runs" / f"{runs[1]}_emb8" / "pipeline" / "model_index.json").is_file()
    assert not (tmp_path / "runs" / "report" / "report.md").exists()
    printed = cluster.run("study_array.sbatch", SLURM_ARRAY_TASK_ID="0", **one)
    assert f"training {runs[0]}_emb8" in printed
    report = (tmp_path / "runs" / "report" / "report.md").read_text()
    assert all(f"{name}_emb8" in report for name in runs)
    printed = cluster.run("study_array.sbatch", SLURM_ARRAY_TASK_ID="0", **one)  # a task started again
    assert f"{runs[0]}_emb8 is finished" in printed and f"training {runs[0]}" not in printed
    proc = cluster.start("study_array.sbatch", SLURM_ARRAY_TASK_ID="2", **one)
    assert cluster.wait(proc) and proc.returncode == 2
    assert "--task 2: the study has 2 runs (valid: 0..1)" in proc.log.read_text()
