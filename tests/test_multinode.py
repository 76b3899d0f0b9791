"""Two machines for real: two `accelerate launch` processes (one per "machine", one worker each) on 127.0.0.1,
meeting at a static rendezvous and training over gloo, as `configs/accelerate/multi_node.yaml` launches them.

Each "machine" runs in a working directory of its own; `output_dir` is the one folder both see (the shared
filesystem several machines need).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipelines.checkpoints import list_checkpoints
from test_cgan import TINY
from trainer_utils import (
    ROOT, assert_same_state, assert_same_tensors, checkpoint_state, final_checkpoint, free_port,
    load_safetensors_dir, logged_steps,
)

HARNESS = ROOT / "tests" / "fault_harness.py"
# 2 epochs of 8 global batches of 2 x 16, every step logged, a checkpoint every 4 steps (all kept).
MACHINES = TINY + ["train.epochs=2", "train.batch_size=16", "log.every_steps=1", "checkpoint.every_steps=4",
                   "checkpoint.keep=10", "log.wandb=disabled"]
TOTAL = 16


def steps_so_far(out: Path) -> int:
    """How many steps a running training has logged (0 before its first; a line being written is not counted)."""
    try:
        return len(logged_steps(out))
    except (FileNotFoundError, ValueError):
        return 0


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher started with `start_new_session=True` and everything under it.

    torch's elastic agent starts each worker in a session of its own, so killing the launcher's
    process group alone would leave the workers running: each worker's group is killed too."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for pgid in {proc.pid, *(c.pid for c in children)}:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for child in children:  # a child that was not a group leader
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"


def start_machines(tmp_path: Path, script: list[str], args: list[str], machines: int = 2) -> list[subprocess.Popen]:
    """`accelerate launch` once per machine, all at once, on a free port; output to `machine{R}/launch.log`."""
    port = free_port()
    procs = []
    for rank in range(machines):
        cwd = tmp_path / f"machine{rank}"
        cwd.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", str(machines),
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--rdzv_backend", "static", "--same_network", "--num_processes", str(machines),
               "--mixed_precision", "no", "--dynamo_backend", "no", *script, *args]
        log = open(cwd / "launch.log", "w")
        # One thread per worker: 2 cores here, and the same thread count in every run (bitwise-equal results).
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))
        log.close()
    return procs


def logs(tmp_path: Path, machines: int = 2) -> list[str]:
    return [(tmp_path / f"machine{r}" / "launch.log").read_text() for r in range(machines)]


def report(printed: list[str]) -> str:
    """Each machine's `error:` lines and the end of its output."""
    return "\n====\n".join("\n".join(line for line in text.splitlines() if "error:" in line) + "\n...\n" + text[-3000:]
                           for text in printed)


def wait_machines(tmp_path: Path, procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Wait for every launcher (all are killed past `timeout`); returns each machine's output."""
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for p in procs:
                kill_tree(p)
            raise AssertionError(f"2-machine launch ran past {timeout} s\n" + report(logs(tmp_path)))
    return logs(tmp_path)


def train_on_two_machines(tmp_path: Path, out: Path, *flags: str) -> list[str]:
    procs = start_machines(tmp_path, [str(ROOT / "train_cgan.py")], [f"output_dir={out}", *MACHINES, *flags])
    printed = wait_machines(tmp_path, procs)
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"exit codes {codes}\n" + report(printed)
    return printed


@pytest.mark.slow  # about 70 s here: three 2-machine launches
def test_two_machines_killed_mid_run_resume_from_the_last_checkpoint_and_end_as_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    printed = train_on_two_machines(tmp_path / "a", reference)
    assert "2 processes (cpu) x batch 16" in printed[0]  # one run of 2 processes, not two runs of 1
    assert sum(text.count(f"done: {TOTAL} steps") for text in printed) == 1  # only the main process exports
    assert logged_steps(reference) == list(range(1, TOTAL + 1))
    assert (reference / "pipeline" / "model_index.json").is_file()
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in final_checkpoint(reference).iterdir()}

    # The same run, slowed down after each logged step (results unchanged), killed -9 on both machines
    # once a checkpoint is complete and a few more steps are logged.
    out = tmp_path / "killed"
    procs = start_machines(tmp_path / "b", [str(HARNESS), "slow:0.3", "train_cgan"], [f"output_dir={out}", *MACHINES])
    try:
        deadline = time.time() + 240
        while not (list_checkpoints(out) and steps_so_far(out) >= 6):
            assert time.time() < deadline and all(p.poll() is None for p in procs), (
                f"no checkpoint and 6 steps before the kill: exit codes {[p.poll() for p in procs]}\n"
                + report(logs(tmp_path / "b")))
            time.sleep(0.05)
    finally:
        for proc in procs:
            kill_tree(proc)
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2
    killed_at = logged_steps(out)[-1]
    assert killed_at < TOTAL and not (out / "pipeline").exists()
    start = json.loads((list_checkpoints(out)[-1] / "training_state.json").read_text())["step"]
    assert start % 4 == 0 and start <= killed_at

    printed = train_on_two_machines(tmp_path / "c", out, "--resume", "latest")
    # Each machine's first process prints (accelerate's print is per machine): both took the same checkpoint.
    resumed = f"resumed from {out / 'checkpoints' / f'step_{start:09d}'} at step {start}"
    assert all(resumed in text for text in printed), report(printed)
    assert sum(text.count(f"done: {TOTAL} steps") for text in printed) == 1  # exported once
    # Every step logged once: those logged after the checkpoint before the kill were replaced by the resumed run's.
    assert logged_steps(out) == list(range(1, TOTAL + 1))
    assert_same_state(checkpoint_state(final_checkpoint(out)), checkpoint_state(final_checkpoint(reference)))
    assert_same_tensors(load_safetensors_dir(out / "pipeline"), load_safetensors_dir(reference / "pipeline"))
    assert not list(out.glob(".tmp-*")) and not list((out / "checkpoints").glob(".tmp-*"))


LATE_SAVER = """\
# train_cgan with process 1 entering every checkpoint's save_state {seconds} s after the others.
import sys, time
import accelerate

real = accelerate.Accelerator.save_state

def save_state(self, *args, **kwargs):
    if self.process_index == 1:
        time.sleep({seconds})
    return real(self, *args, **kwargs)

accelerate.Accelerator.save_state = save_state
import pipelines.commands
sys.exit(pipelines.commands.train_cgan(sys.argv[1:]))
"""


@pytest.mark.slow  # a multi-process or end-to-end run; the fast suite covers its parts
def test_a_checkpoint_waits_for_the_rng_file_of_a_late_machine(tmp_path):
    """Every process writes its own RNG state into the checkpoint's temporary folder; the main process
    must not complete and rename that folder before the slowest one has (the file would be missing, or
    land in a re-created `.tmp-step_*` folder, and the resume would fail or differ)."""
    script = tmp_path / "late_saver.py"
    script.write_text(LATE_SAVER.format(seconds=2))
    out = tmp_path / "run"
    procs = start_machines(tmp_path, [str(script)], [f"output_dir={out}", *MACHINES, "train.max_steps=8"])
    printed = wait_machines(tmp_path, procs)
    assert [p.returncode for p in procs] == [0, 0], report(printed)
    assert [p.name for p in list_checkpoints(out)] == ["step_000000004", "step_000000008"]
    for checkpoint in list_checkpoints(out):
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}, checkpoint
    assert not list((out / "checkpoints").glob(".tmp-*"))
