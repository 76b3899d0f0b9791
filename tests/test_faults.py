"""Faults: kill -9 and SIGTERM mid-run, half-written and corrupt checkpoints, bad input to the trainers."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipelines.config import CGANConfig, DDPMConfig, load_config
from pipelines.checkpoints import list_checkpoints, resolve_resume
from test_cgan import TINY
from test_ddpm import TINY as DDPM_TINY
from trainer_utils import (
    ROOT, assert_same_state, assert_same_tensors, checkpoint_state, final_checkpoint, free_port, launch,
    file_stamp, load_safetensors_dir, logged_steps, run_script,
)

# Long enough to be interrupted: the cGAN 4 epochs of 8 steps, the DDPM 2 of 8, a checkpoint every 4 steps.
# Every step is logged, so stats.jsonl shows which steps each process ran.
LONG = TINY + ["train.epochs=4", "checkpoint.every_steps=4", "checkpoint.keep=10", "train.ema_decay=0.9",
               "log.every_steps=1"]
DDPM_LONG = DDPM_TINY + ["checkpoint.every_steps=4", "checkpoint.keep=10", "log.every_steps=1"]
FAMILIES = {"cgan": ("train_cgan", CGANConfig, LONG, 32), "ddpm": ("train_ddpm", DDPMConfig, DDPM_LONG, 16)}
HARNESS = ROOT / "tests" / "fault_harness.py"


def harness(family, out, fault, *extra, wait=True):
    """The trainer under `fault` (tests/fault_harness.py) in a new process."""
    script, _, overrides, _ = FAMILIES[family]
    cmd = [sys.executable, str(HARNESS), fault, script, f"output_dir={out}", "log.wandb=disabled", *overrides, *extra]
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        proc.stdout_text, proc.stderr_text = proc.communicate(timeout=600)
    return proc


# The DDPM's final pictures make each of its runs slow here: its kill cases run in the slow suite (the fast
# one resumes the DDPM mid-run in test_ddpm.py and reads its checkpoint files below).
SLOW_KILLS = {("ddpm", "a later checkpoint"), ("ddpm", "the export"), ("ddpm", "random")}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """An uninterrupted run of a family, and the list of every file write it made, in order: made once each."""
    made = {}

    def reference_of(family):
        if family not in made:
            root = tmp_path_factory.mktemp(f"reference-{family}")
            proc = harness(family, root / "full", f"log-writes:{root / 'writes.jsonl'}")
            assert proc.returncode == 0, proc.stderr_text[-5000:]
            writes = [json.loads(line) for line in (root / "writes.jsonl").read_text().splitlines()]
            made[family] = family, root / "full", writes
        return made[family]

    return reference_of


@pytest.fixture(params=list(FAMILIES))
def reference(request, references):
    # Function-scoped over a module-wide cache: pytest would rebuild a parametrized module fixture each time
    # the test order switched between its parameters.
    return references(request.param)


def resume_and_compare(family, out, reference_out, *extra):
    """Resume `out` and check it continued from its newest complete checkpoint, ran exactly the steps after
    it, and ended in the same state as the uninterrupted run: both networks, optimizers, EMA, LR schedule,
    RNG states and step, and the same exported pipeline."""
    script, cls, overrides, total = FAMILIES[family]
    done = list_checkpoints(out)
    start = json.loads((done[-1] / "training_state.json").read_text())["step"] if done else 0
    kept = file_stamp(done[-1] / "training_state.json") if done else None
    assert run_script(script, cls, out, overrides, *extra, "--resume", "latest") == 0
    # The newest checkpoint is untouched (a run from an earlier one, or from the start, rewrites it) and every
    # step is logged once: the records of steps after the checkpoint, logged before the fault, are replaced.
    assert not done or file_stamp(done[-1] / "training_state.json") == kept, f"not resumed from step {start}"
    assert logged_steps(out) == list(range(1, total + 1)), f"resumed from step {start}"
    assert_same_state(checkpoint_state(final_checkpoint(out)), checkpoint_state(final_checkpoint(reference_out)))
    assert_same_tensors(load_safetensors_dir(out / "pipeline"), load_safetensors_dir(reference_out / "pipeline"))
    return start


def assert_nothing_half_made_looks_done(out, reference_out):
    """Every checkpoint that looks complete is (same files as the reference's, all readable), and an export
    exists only whole."""
    names = sorted(p.name for p in final_checkpoint(reference_out).iterdir())
    for checkpoint in list_checkpoints(out):
        assert sorted(checkpoint_state(checkpoint)) == names, checkpoint
    if (out / "pipeline").exists():
        assert_same_tensors(load_safetensors_dir(out / "pipeline"), load_safetensors_dir(reference_out / "pipeline"))


def write_moments(writes, seed, count):
    """Kill moments (1-based write numbers): the first write of the second checkpoint, the export's weights,
    and `count` more drawn with `seed`."""
    rng = random.Random(seed)
    numbered = list(enumerate(writes, 1))
    return {"a later checkpoint": next(i for i, w in numbered if ".tmp-step_" in w and "_000000004" not in w),
            "the export": next(i for i, w in numbered if "/.tmp-pipeline/" in w),
            "random": rng.sample(range(1, len(writes) + 1), count)}


def check_kill_at_write_then_resume(reference, tmp_path, moment):
    family, reference_out, writes = reference
    out = tmp_path / f"killed-{moment}"
    proc = harness(family, out, f"kill-at-write:{moment}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr_text[-3000:]
    killed_in = writes[moment - 1]
    assert_nothing_half_made_looks_done(out, reference_out)
    start = resume_and_compare(family, out, reference_out)
    # The kill landed inside the write it names: that checkpoint (or the export) was not taken as complete.
    if ".tmp-step_" in killed_in:
        assert start < int(killed_in.split(".tmp-step_")[1][:9])
    return killed_in


KILL_CASES = [pytest.param(family, pick, marks=[pytest.mark.slow] if (family, pick) in SLOW_KILLS else [],
                           id=f"{family}-{pick}")
              for family in FAMILIES for pick in ("a later checkpoint", "the export", "random")]


@pytest.mark.parametrize("reference,pick", KILL_CASES, indirect=["reference"])
def test_kill_9_during_a_write_then_resume_continues_exactly(reference, tmp_path, pick):
    family, _, writes = reference
    moment = write_moments(writes, seed=0, count=1)[pick]
    killed_in = check_kill_at_write_then_resume(reference, tmp_path, moment[0] if pick == "random" else moment)
    if pick != "random":
        assert {"a later checkpoint": "/.tmp-step_", "the export": "/.tmp-pipeline/"}[pick] in killed_in


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))
def test_kill_9_at_many_seeded_write_moments(reference, tmp_path, seed):
    _, _, writes = reference
    for moment in write_moments(writes, seed=100 + seed, count=4)["random"]:
        check_kill_at_write_then_resume(reference, tmp_path, moment)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_kill_9_at_seeded_random_times(reference, tmp_path, seed):
    family, reference_out, _ = reference
    out = tmp_path / "killed"
    proc = harness(family, out, "slow:0.05", wait=False)
    time.sleep(random.Random(seed).uniform(3.0, 9.0))  # start-up takes about 3 s here; the run about 5 s more
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert_nothing_half_made_looks_done(out, reference_out)
    resume_and_compare(family, out, reference_out)


TWO = TINY + ["train.epochs=2", "train.batch_size=16", "log.every_steps=1", "checkpoint.every_steps=1000"]


def launch_two(tmp_path, out, *script):
    return launch(tmp_path, ["--multi_gpu", "--num_processes", "2"],
                  [*script, f"output_dir={out}", "log.wandb=disabled", *TWO])


@pytest.mark.slow  # a multi-process or end-to-end run; the fast suite covers its parts
def test_sigterm_to_one_of_two_processes_writes_the_only_checkpoint_and_both_resume_from_it(tmp_path):
    """Preemption reaching one rank: the ranks agree at the next step, save together, and exit 143."""
    reference = tmp_path / "reference"
    result = launch_two(tmp_path, reference, str(ROOT / "train_cgan.py"))
    assert result.returncode == 0, result.report
    out = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), "--multi_gpu",
           "--num_processes", "2", str(HARNESS), "slow:0.2", "train_cgan", f"output_dir={out}", "log.wandb=disabled",
           *TWO]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, proc, 2)
    os.kill(int((tmp_path / "pid.1").read_text()), signal.SIGTERM)  # rank 1 only, not the main process
    printed, err = proc.communicate(timeout=300)
    [checkpoint] = list_checkpoints(out)
    step = json.loads((checkpoint / "training_state.json").read_text())["step"]
    assert 2 <= step < 16 and f"SIGTERM: saved a checkpoint at step {step}" in printed, printed + err
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    assert logged_steps(out)[-1] == step
    result = launch_two(tmp_path, out, str(ROOT / "train_cgan.py"), "--resume", "latest")
    assert result.returncode == 0, result.report
    assert logged_steps(out)[-(16 - step):] == list(range(step + 1, 17))
    assert_same_state(checkpoint_state(final_checkpoint(out)), checkpoint_state(final_checkpoint(reference)))
    assert_same_tensors(load_safetensors_dir(out / "pipeline"), load_safetensors_dir(reference / "pipeline"))


@pytest.mark.slow  # a multi-process or end-to-end run; the fast suite covers its parts
def test_a_nan_on_one_rank_skips_the_step_on_every_rank_without_a_hang(tmp_path):
    """Rank 1 alone sees a NaN loss at step 3: both ranks skip that update (decided on the device), nobody
    waits alone in the gradient all-reduce, and the weights stay identical on both ranks."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = launch(tmp_path, ["--multi_gpu", "--num_processes", "2"],
                    [str(HARNESS), "nan-on-rank:1:3", "train_cgan", f"output_dir={out}", "log.wandb=disabled", *TWO],
                    timeout=300)
    assert result.returncode == 0, result.report
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in records] == [0] * 3 + [1] * (len(records) - 3)  # step 4 was skipped
    rank0, rank1 = (load_file(str(tmp_path / f"weights.{r}.safetensors")) for r in (0, 1))
    weights = [k for k in rank0 if "running" not in k and "num_batches" not in k]  # BatchNorm stats are per rank
    assert all(torch.equal(rank0[k], rank1[k]) and torch.isfinite(rank0[k]).all() for k in weights)


@pytest.mark.slow  # a multi-process or end-to-end run; the fast suite covers its parts
def test_two_processes_print_their_scaling_use_the_process_group_timeout_and_scale_lr(tmp_path):
    out = tmp_path / "run"
    result = launch(tmp_path, ["--multi_gpu", "--num_processes", "2"],
                    [str(HARNESS), "record-pg-timeout", "train_cgan", f"output_dir={out}", "log.wandb=disabled", *TWO,
                     "train.max_steps=2", "train.process_group_timeout_minutes=90", "optim.scale_lr=true",
                     "optim.lr_g=1e-4", "optim.lr_d=3e-4"], timeout=300)
    assert result.returncode == 0, result.report
    assert ("2 processes (cpu) x batch 16 x accumulation 1 = global batch 32; learning rates lr_g=0.0002, "
            "lr_d=0.0006 (scaled x2 by optim.scale_lr)") in result.stdout
    assert result.stdout.count("2 processes (cpu)") == 1  # the main process prints it
    assert [(tmp_path / f"pg_timeout.{r}").read_text() for r in (0, 1)] == ["5400.0", "5400.0"]
    record = json.loads((out / "stats.jsonl").read_text().splitlines()[-1])
    assert record["lr_g"] == pytest.approx(2e-4) and record["lr_d"] == pytest.approx(6e-4)


def sigterm_when_started(proc, marker, timeout=120):
    """SIGTERM once `marker` exists; returns (seconds from the signal to the exit, stdout)."""
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, f"{marker.name} never started: {proc.poll()}"
        time.sleep(0.05)
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    printed, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    return time.time() - start, printed


def test_sigterm_during_the_final_pictures_exits_at_the_next_phase_and_resume_only_finishes(uninterrupted,
                                                                                             tmp_path):
    out = tmp_path / "preempted"
    proc = harness("cgan", out, "slow-final:3", wait=False)
    seconds, printed = sigterm_when_started(proc, tmp_path / "slow-final")
    assert seconds < 3 + 15  # the grid being drawn ends; the pictures, the export and its logging do not start
    assert "SIGTERM after training: the checkpoint at step 32 is complete" in printed
    assert not (out / "pipeline").exists() and not list(out.glob(".tmp-*"))
    trained = logged_steps(out)
    assert run_script("train_cgan", CGANConfig, out, LONG, "--resume", "latest") == 0
    assert logged_steps(out) == trained  # no step trained again: only the pictures and the export
    assert (out / "grids" / "final.png").is_file()
    assert_same_tensors(load_safetensors_dir(out / "pipeline"), load_safetensors_dir(uninterrupted / "pipeline"))


def test_sigterm_during_an_evaluation_drops_it_checkpoints_and_resumes(classifier_dir, tmp_path):
    out = tmp_path / "preempted"
    # 10 sampling batches of 4 images, each 2 s slower: the evaluation would take 20 s more
    evaluated = [f"eval.classifier={classifier_dir}", "eval.num_per_class=4", "eval.batch_size=4",
                 "eval.every_epochs=1", "checkpoint.every_steps=1000"]
    proc = harness("cgan", out, "slow-eval:2", *evaluated, wait=False)
    seconds, printed = sigterm_when_started(proc, tmp_path / "slow-eval")
    assert seconds < 12  # stopped between two of its batches
    assert "SIGTERM: the evaluation at epoch 1 was stopped" in printed
    assert "SIGTERM: saved a checkpoint at step 8" in printed
    assert [p.name for p in list_checkpoints(out)] == ["step_000000008"]
    assert not (out / "best").exists()  # the stopped evaluation chose nothing
    assert run_script("train_cgan", CGANConfig, out, LONG + evaluated, "--resume", "latest") == 0
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss_d" in r] == list(range(1, 33))
    assert [r["epoch"] for r in records if "eval/fid" in r] == [2, 3, 4]  # epoch 1's evaluation was dropped
    assert (out / "pipeline" / "model_index.json").is_file()


def test_an_output_dir_one_process_cannot_see_stops_every_process_with_a_clear_error(tmp_path):
    out = tmp_path / "run"
    result = launch(tmp_path, ["--multi_gpu", "--num_processes", "2"],
                    [str(HARNESS), "unshared-on-rank:1", "train_cgan", f"output_dir={out}", "log.wandb=disabled",
                     *TWO], timeout=300)
    assert result.returncode != 0
    # Both processes stop with it, the one that sees the folder too: none is left waiting in a collective.
    assert result.stderr.count(f"error: output_dir {out} is not shared: process 1 on ") == 2
    assert "put output_dir on a filesystem all of them mount" in result.stderr
    assert "pipelines/rundir.py" not in result.stderr  # one line per process; the launcher's own report follows
    assert not (out / "config.yaml").exists() and not list(out.glob(".shared-check-*"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "full"
    assert run_script("train_cgan", CGANConfig, out, LONG) == 0
    return out


def wait_for_steps(out, proc, steps, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "stats.jsonl").exists() and len(logged_steps(out)) >= steps:
            return
        time.sleep(0.02)
    pytest.fail(f"the run did not log {steps} steps (exit code {proc.poll()})")


@pytest.mark.parametrize("reference", ["cgan", pytest.param("ddpm", marks=pytest.mark.slow)], indirect=True)
def test_sigterm_writes_the_only_checkpoint_and_the_run_continues_from_it(reference, tmp_path):
    """With no step or time checkpoint due, the checkpoint SIGTERM writes is the only one there is."""
    family, reference_out, _ = reference
    _, _, _, total = FAMILIES[family]
    out = tmp_path / "preempted"
    proc = harness(family, out, "slow:0.2", "checkpoint.every_steps=1000", wait=False)
    wait_for_steps(out, proc, 2)
    proc.send_signal(signal.SIGTERM)
    printed, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    [checkpoint] = list_checkpoints(out)
    step = json.loads((checkpoint / "training_state.json").read_text())["step"]
    assert 2 <= step < total and step == logged_steps(out)[-1]  # saved right after the step SIGTERM interrupted
    assert f"SIGTERM: saved a checkpoint at step {step}" in printed
    # The checkpoint of the reference run at that step would only exist where a step checkpoint was due.
    assert resume_and_compare(family, out, reference_out, "checkpoint.every_steps=1000") == step


def test_half_written_checkpoints_are_never_taken(uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    newest = list_checkpoints(out)[-1]
    # A kill during save leaves a temporary folder; a folder without its state file is incomplete too.
    shutil.copytree(newest, out / "checkpoints" / ".tmp-step_000000999")
    incomplete = out / "checkpoints" / "step_000000998"
    shutil.copytree(newest, incomplete)
    (incomplete / "training_state.json").unlink()
    assert resolve_resume(out, "latest") == newest


@pytest.mark.parametrize("overrides,message", [
    (["data.name=imagenet"], "valid choices: fashion_mnist, cifar10, synthetic"),
    (["train.batch_size=0"], "train.batch_size=0: must be positive"),
    (["optim.lr_g=.nan"], "optim.lr_g=nan: must be a finite number"),
    # Found only once the data is loaded or the models are built, after the run directory exists:
    (["model.channels=3"], "model.channels=3 but the data has 1-channel images"),
    (["data.pad_to=30"], "must be a multiple of 4"),
    (["data.path=/nonexistent/folder"], "does not exist"),
    (["trian.epochs=3"], "unknown config key 'trian'"),
])
def test_bad_input_fails_early_with_a_clear_message_and_no_run_left(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY + overrides) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    # Nothing written (no config.yaml, no W&B folder), so the corrected command is not refused as a rerun.
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("script,cls,tiny,bad,message", [
    ("train_cgan", CGANConfig, "test_cgan", ["model.channels=3"], "model.channels=3 but the data"),
    ("train_ddpm", DDPMConfig, "test_ddpm", ["log.showcase_class=10"], "log.showcase_class=10: the data has 10 "
                                                                        "classes (valid: 0..9)"),
])
def test_a_corrected_retry_runs_without_overwrite(tmp_path, capsys, script, cls, tiny, bad, message):
    base = __import__(tiny).TINY + ["train.max_steps=1", "log.wandb=offline"]
    out = tmp_path / "run"
    assert run_script(script, cls, out, base + bad) == 2
    assert message in capsys.readouterr().err
    assert run_script(script, cls, out, base) == 0
    assert (out / "pipeline" / "model_index.json").exists() and (out / "config.yaml").exists()


def test_resume_latest_without_a_complete_checkpoint_starts_over_and_logs_each_step_once(tmp_path, caplog, capsys):
    """The attempt before was killed while saving its only checkpoint: its steps run again, logged once."""
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY + ["train.max_steps=2"]) == 0
    uninterrupted = load_safetensors_dir(out / "pipeline")
    [checkpoint] = list_checkpoints(out)
    checkpoint.rename(checkpoint.with_name(f".tmp-{checkpoint.name}"))  # the save, cut short
    with caplog.at_level("WARNING", logger="pipelines"):
        assert run_script("train_cgan", CGANConfig, out, TINY + ["train.max_steps=2"], "--resume", "latest") == 0
    assert f"--resume latest: no complete checkpoint in {out / 'checkpoints'}; starting from step 0" in caplog.text
    assert "a write that was cut short" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (out / "stats.jsonl").read_text().splitlines()] == [2]
    assert_same_tensors(load_safetensors_dir(out / "pipeline"), uninterrupted)


class _Exploit:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


CHECKPOINT_FILES = {
    "cgan": ["extra.safetensors", "model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin",
             "random_states_0.pkl", "training_state.json"],
    "ddpm": ["scheduler.bin"],  # the LR schedule; the rest as the cGAN's, with one network and one optimizer
}
FILE_CASES = [pytest.param(family, name, id=f"{family}-{name}") for family, names in CHECKPOINT_FILES.items()
              for name in names]


def resume_from_damaged(reference, tmp_path, name, damage) -> str:
    family, reference_out, _ = reference
    script, cls, overrides, _ = FAMILIES[family]
    out = tmp_path / "run"
    shutil.copytree(reference_out, out)
    newest = list_checkpoints(out)[-1]
    damage(newest / name)
    import io
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_script(script, cls, out, overrides, "--resume", "latest") == 2
    assert str(newest / name) in err.getvalue(), err.getvalue()
    return err.getvalue()


@pytest.mark.parametrize("reference,name", FILE_CASES, indirect=["reference"])
def test_a_damaged_checkpoint_file_is_an_error_that_names_it(reference, tmp_path, name):
    def truncate(path):
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])

    assert "cannot be loaded" in resume_from_damaged(reference, tmp_path, name, truncate)


PICKLES = [c for c in FILE_CASES if c.values[1].endswith((".bin", ".pkl"))]


@pytest.mark.parametrize("reference,name", PICKLES, indirect=["reference"])
def test_no_checkpoint_file_can_run_code_when_loaded(reference, tmp_path, name):
    import torch

    marker = tmp_path / "pwned"
    resume_from_damaged(reference, tmp_path, name, lambda path: torch.save({"state": _Exploit(marker)}, path))
    assert not marker.exists()  # weights_only loading refused the object instead of running it


@pytest.mark.parametrize("reference", ["cgan"], indirect=True)
@pytest.mark.parametrize("tamper", ["missing", "wrong content"])
def test_a_random_state_that_cannot_be_restored_is_an_error(reference, tmp_path, tamper):
    """accelerate skips an unusable RNG file with an info line; the resumed run would then quietly differ."""
    import torch

    def damage(path):
        path.unlink()
        if tamper == "wrong content":  # loads safely, but holds no generator state
            torch.save({"random_state": [1, 2, 3], "numpy_random_seed": [], "torch_manual_seed": torch.zeros(3)}, path)

    err = resume_from_damaged(reference, tmp_path, "random_states_0.pkl", damage)
    assert ("cannot be loaded" if tamper == "missing" else "holds no valid random state") in err


def test_exports_are_read_from_safetensors_only(uninterrupted, tmp_path):
    """An export whose weights were swapped for a pickle: loading refuses it and runs nothing."""
    import torch

    from pipelines.exports import load_pipeline

    export = tmp_path / "pipeline"
    shutil.copytree(uninterrupted / "pipeline", export)
    weights = export / "model" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    marker = tmp_path / "pwned"
    torch.save({"state": _Exploit(marker)}, export / "model" / "diffusion_pytorch_model.bin")
    with pytest.raises(Exception, match="safetensors"):
        load_pipeline(export)
    assert not marker.exists()


def test_wall_clock_says_when_the_period_has_passed(monkeypatch):
    from pipelines import loop

    now = [1000.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: now[0])
    clock, never = loop.WallClock(0.5), loop.WallClock(None)
    seen = []
    for t in (10, 29, 31, 40, 60, 62):
        now[0] = 1000.0 + t
        seen.append((clock.due(), never.due()))
    assert seen == [(False, False), (False, False), (True, False), (False, False), (False, False), (True, False)]


def test_time_based_checkpoints_come_between_step_intervals(tmp_path):
    out = tmp_path / "timed"
    timed = TINY + ["train.epochs=1", "checkpoint.every_steps=100", "checkpoint.every_minutes=1e-9",
                    "checkpoint.keep=100"]
    assert run_script("train_cgan", CGANConfig, out, timed) == 0
    assert [int(p.name.split("_")[1]) for p in list_checkpoints(out)] == list(range(1, 9))


@pytest.mark.slow  # a multi-process or end-to-end run; the fast suite covers its parts
def test_two_processes_agree_on_time_based_checkpoints(tmp_path):
    """Each process's clock fires at its own time; saving is collective, so the wishes are pooled after every
    step and all act on them one step later (whatever log.every_steps is): a clock due at every step saves at
    every second step."""
    out = tmp_path / "two"
    result = launch(tmp_path, ["--multi_gpu", "--num_processes", "2"],
                    [str(ROOT / "train_cgan.py"), f"output_dir={out}", "log.wandb=disabled", *TINY, "train.epochs=1",
                     "train.batch_size=16", "log.every_steps=3", "checkpoint.every_minutes=1e-9",
                     "checkpoint.keep=100"])
    assert result.returncode == 0, result.report
    assert [p.name for p in list_checkpoints(out)] == ["step_000000002", "step_000000004", "step_000000006",
                                                       "step_000000008"]


# The sizes of the tiny cGAN's checkpoint files: model.safetensors (G) ~101 kB, model_1 (D) ~42 kB,
# optimizer.bin ~197 kB. A file-size limit below the first fails in safetensors; between G and its optimizer,
# in torch.save.
@pytest.mark.parametrize("limit,raised_by", [(20_000, "SafetensorError"), (150_000, "RuntimeError")])
def test_a_write_refused_by_the_os_while_checkpointing_keeps_the_last_checkpoint(uninterrupted, tmp_path, limit,
                                                                                 raised_by):
    """A real failed write (RLIMIT_FSIZE: EFBIG) as each library reports it, in the second checkpoint."""
    out = tmp_path / "limited"
    proc = harness("cgan", out, f"file-size-at-checkpoint:2:{limit}")
    err = proc.stderr_text
    assert proc.returncode == 2, err[-3000:]
    assert "writing the checkpoint at step 8 failed" in err and "step_000000004 is intact" in err
    assert "Traceback" not in err
    assert {"SafetensorError": "file too large", "RuntimeError": "the write was cut short"}[raised_by] in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000000004"]  # no half-written folder
    assert not (out / "pipeline").exists()
    assert resume_and_compare("cgan", out, uninterrupted) == 4


def _mounted_tmpfs(path, size):
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


def test_a_really_full_disk_while_checkpointing_keeps_the_last_checkpoint(uninterrupted, tmp_path):
    """ENOSPC from a real filesystem: a small tmpfs, filled as the third checkpoint starts."""
    disk = tmp_path / "disk"
    if not _mounted_tmpfs(disk, "32m"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        out = disk / "run"
        proc = harness("cgan", out, "fill-disk-at-checkpoint:3:150000")
        err = proc.stderr_text
        assert proc.returncode == 2, err[-3000:]
        assert "writing the checkpoint at step 12 failed" in err and "step_000000008 is intact" in err
        assert "no space left on device" in err or "write was cut short" in err
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000000004", "step_000000008"]
        (out / "filler").unlink()
        assert resume_and_compare("cgan", out, uninterrupted) == 8
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_disk_full_while_exporting_keeps_the_previous_export(uninterrupted, tmp_path):
    """The export's own write failing for real (file-size limit) in a child process: the old export stays."""
    export = tmp_path / "pipeline"
    shutil.copytree(uninterrupted / "pipeline", export)
    before = load_safetensors_dir(export)
    code = f"""
import resource, signal
from pipelines.pipeline_cgan import CGANPipeline
from pipelines.exports import save_pipeline
from pipelines.rundir import RunDirError
pipeline = CGANPipeline.from_pretrained({str(export)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_pipeline(pipeline, {str(export)!r})
except RunDirError as err:
    print(err)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert f"file too large" in result.stdout and f"{export} is intact" in result.stdout, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]  # the partial copy is gone
    assert_same_tensors(load_safetensors_dir(export), before)


# What each launcher file is for: (mixed precision, processes in all, machines).
LAUNCHER_FILES = {"multi_gpu_bf16": ("bf16", 8, 1), "multi_gpu_fp16": ("fp16", 8, 1), "multi_node": ("bf16", 16, 2),
                  "single_gpu": ("bf16", 1, 1)}


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_launcher_files_give_the_processes_what_their_names_say(path, monkeypatch):
    """Read by accelerate's own launcher: the processes it would start and the environment they get; then the
    trainers' Accelerator under that environment (train.mixed_precision=no defers to the launcher)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    from pipelines.run import make_accelerator

    precision, processes, machines = LAUNCHER_FILES[path.stem]
    args = launch_command_parser().parse_args(["--config_file", str(path), str(ROOT / "train_ddpm.py")])
    args, _, _ = _validate_launch_command(args)
    if processes > 1:
        env = prepare_multi_gpu_env(args)  # torchrun's arguments land on `args`
        assert args.multi_gpu and int(args.nproc_per_node) * machines == processes
        if machines > 1:
            assert int(args.nnodes) == machines and "10.0.0.1" in str(vars(args))
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
        assert not args.multi_gpu and args.num_processes == 1
    assert env["ACCELERATE_MIXED_PRECISION"] == precision
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = load_config(CGANConfig, None, ["train.mixed_precision=no"])
    assert make_accelerator(cfg, ROOT).mixed_precision == precision
    AcceleratorState._reset_state(True)


@pytest.mark.slow  # a multi-process or end-to-end run; the fast suite covers its parts
def test_multi_gpu_bf16_launcher_file_runs_two_processes_here(tmp_path):
    """The same file on this GPU-less machine: two gloo processes with bf16 autocast."""
    out = tmp_path / "run"
    result = launch(tmp_path, ["--config_file", str(ROOT / "configs" / "accelerate" / "multi_gpu_bf16.yaml"),
                               "--num_processes", "2"],
                    [str(ROOT / "train_cgan.py"), f"output_dir={out}", "log.wandb=disabled", *TINY, "train.epochs=1",
                     "train.batch_size=16"])
    assert result.returncode == 0, result.report
    assert result.stdout.count("done: 8 steps") == 1
    assert (out / "pipeline" / "model_index.json").exists()


def test_a_run_with_wandb_disabled_needs_no_wandb_installed(tmp_path, monkeypatch):
    # GPU and cluster images often lack wandb; log.wandb=disabled must not import it.
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY + ["train.epochs=1"]) == 0
    assert (out / "grids" / "final.png").exists() and (out / "pipeline" / "model_index.json").exists()
