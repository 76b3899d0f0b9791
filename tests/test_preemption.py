"""Preemption and requeue: SIGTERM as a flag read at safe points, interrupted swaps put back, prompt checkpoints
with several processes, and the rules of a resume (no --overwrite with it, the config compared, the log kept once).

The trainers run in a subprocess under tests/fault_harness.py, which lands the signal at an exact moment."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pipelines.checkpoints import list_checkpoints
from pipelines.config import CGANConfig, ConfigError, load_config
from pipelines.config_changes import check_resume_config, config_changes
from pipelines.preemption import Preemption, StopRequested
from pipelines.rundir import recover_interrupted_writes
from pipelines.typed_yaml import to_dict
from test_cgan import TINY
from test_faults import HARNESS, LONG, harness
from trainer_utils import (
    ROOT, assert_same_state, assert_same_tensors, checkpoint_state, final_checkpoint, free_port, load_safetensors_dir,
    logged_steps, run_script,
)


def test_the_sigterm_handler_only_records_the_request():
    before = signal.getsignal(signal.SIGTERM)
    try:
        preemption = Preemption().install()
        preemption.check()  # nothing yet
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode: it must not raise
        time.sleep(0.05)
        assert preemption.requested
        with pytest.raises(StopRequested):
            preemption.check()
    finally:
        signal.signal(signal.SIGTERM, before)


# ---------------------------------------------------------------------------------------------------------
# Interrupted swaps


def folder_with(path, text):
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(text)
    return path


def test_a_start_puts_back_an_interrupted_swap_and_removes_cut_writes(tmp_path):
    out = tmp_path / "run"
    folder_with(out / ".old-best", "the best so far")  # cut between `best -> .old-best` and `.tmp-best -> best`
    folder_with(out / ".tmp-best", "half written")
    folder_with(out / "snapshots" / "epoch_001", "new")  # cut after both renames: the old copy is obsolete
    folder_with(out / "snapshots" / ".old-epoch_001", "old")
    folder_with(out / "checkpoints" / ".tmp-step_000000004", "half a checkpoint")
    said = recover_interrupted_writes(out)
    assert (out / "best" / "model_index.json").read_text() == "the best so far"
    assert (out / "snapshots" / "epoch_001" / "model_index.json").read_text() == "new"
    assert sorted(p.name for p in out.rglob("*") if p.name.startswith((".old-", ".tmp-"))) == []
    assert f"{out / 'best'} was being replaced when the run stopped: the previous copy is put back" in said
    assert f"removed {out / 'checkpoints' / '.tmp-step_000000004'}, a write that was cut short" in said


@pytest.fixture(scope="module")
def evaluated_reference(tmp_path_factory, classifier_dir):
    """An uninterrupted run with an evaluation every epoch and snapshots: what an interrupted one must end as.
    Beside it, `training_seconds`: from its first logged step to its exit, the window a random SIGTERM lands in."""
    out = tmp_path_factory.mktemp("evaluated") / "full"
    proc = harness("cgan", out, "slow:0", *evaluated(classifier_dir), wait=False)
    first_step = wait_for_training(out, proc)
    printed, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (out.parent / "training_seconds").write_text(str(time.time() - first_step))
    return out


def wait_for_training(out, proc, timeout=300) -> float:
    """When the run's first step is logged (its SIGTERM handler is installed by then)."""
    deadline = time.time() + timeout
    while not (out / "stats.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    return time.time()


def evaluated(classifier_dir):
    return [f"eval.classifier={classifier_dir}", "eval.num_per_class=4", "eval.every_epochs=1",
            "eval.snapshot_epochs=[1,3]"]


def test_sigterm_between_the_renames_of_the_best_swap_leaves_a_complete_best(evaluated_reference, classifier_dir,
                                                                             tmp_path):
    """The signal lands between `best -> .old-best` and `.tmp-best -> best`: the swap completes, then the run
    checkpoints and stops; nothing is left half-swapped."""
    out = tmp_path / "run"
    shutil.copytree(evaluated_reference, out)
    shutil.rmtree(out / "pipeline")
    for old in list_checkpoints(out)[2:]:  # back to step 8, the end of epoch 1, whose evaluation made best/
        shutil.rmtree(old)
    best = json.loads((out / "best" / "best.json").read_text())
    # As if epoch 1 had scored worse: epoch 2's evaluation replaces best/, by the swap under test.
    (out / "best" / "best.json").write_text(json.dumps({**best, "value": 1e9}))
    proc = harness("cgan", out, "sigterm-in-swap:best", *evaluated(classifier_dir), "--resume", "latest")
    assert proc.returncode == 143, proc.stderr_text[-3000:]
    assert "SIGTERM: saved a checkpoint at step 16" in proc.stdout_text
    assert json.loads((out / "best" / "best.json").read_text())["epoch"] == 2
    assert load_safetensors_dir(out / "best")  # complete: its weights load
    assert not [p for p in out.rglob("*") if p.name.startswith((".old-", ".tmp-"))]


def test_a_run_started_after_a_cut_swap_gets_its_export_back(evaluated_reference, classifier_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(evaluated_reference, out)
    kept = load_safetensors_dir(out / "best")
    os.replace(out / "best", out / ".old-best")  # killed (-9) between the two renames
    assert run_script("train_cgan", CGANConfig, out, LONG + evaluated(classifier_dir), "--resume", "latest") == 0
    assert "was being replaced when the run stopped: the previous copy is put back" in capsys.readouterr().out
    assert_same_tensors(load_safetensors_dir(out / "best"), kept)
    assert not (out / ".old-best").exists()


def test_sigterm_while_the_ema_puts_the_training_weights_back_saves_the_training_weights(evaluated_reference,
                                                                                        classifier_dir, tmp_path):
    """Landing inside `ema.restore` after an evaluation, the signal must not leave the EMA weights in the model
    that the preemption checkpoint then saves: the checkpoint is the uninterrupted run's at that step."""
    out = tmp_path / "run"
    proc = harness("cgan", out, "sigterm-in-ema-restore", *evaluated(classifier_dir))
    assert proc.returncode == 143, proc.stderr_text[-3000:]
    [checkpoint] = [p for p in list_checkpoints(out) if p.name == "step_000000008"]
    assert_same_state(checkpoint_state(checkpoint),
                      checkpoint_state(evaluated_reference / "checkpoints" / "step_000000008"))


def export_folders(out):
    return [p for p in [out / "best", out / "pipeline", *sorted((out / "snapshots").glob("epoch_*"))]
            if (p / "model_index.json").is_file()]


def sigterm_at_a_random_moment_then_resume(evaluated_reference, classifier_dir, tmp_path, seed):
    """SIGTERM at a seeded random moment of a run with evaluations, snapshots and an export; then resume."""
    out = tmp_path / "run"
    proc = harness("cgan", out, "slow:0", *evaluated(classifier_dir), wait=False)
    wait_for_training(out, proc)
    window = float((evaluated_reference.parent / "training_seconds").read_text())
    time.sleep(random.Random(seed).uniform(0, window))
    before = export_folders(out)
    proc.send_signal(signal.SIGTERM)
    printed, err = proc.communicate(timeout=300)
    # -15: the signal came after the run had ended, while Python was shutting down (its handlers are gone by then)
    assert proc.returncode in (0, 143) or (proc.returncode == -signal.SIGTERM and "done: 32 steps" in printed), \
        err[-3000:]
    for folder in before:  # every export that existed is complete: its weights load
        assert (folder / "model_index.json").is_file() and load_safetensors_dir(folder), folder
    assert not [p for p in out.rglob("*") if p.name.startswith((".old-", ".tmp-"))]
    assert run_script("train_cgan", CGANConfig, out, LONG + evaluated(classifier_dir), "--resume", "latest") == 0
    assert_same_state(checkpoint_state(final_checkpoint(out)), checkpoint_state(final_checkpoint(evaluated_reference)))
    assert_same_tensors(load_safetensors_dir(out / "pipeline"), load_safetensors_dir(evaluated_reference / "pipeline"))
    return {p.name for p in export_folders(out)}


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow),
                                  pytest.param(3, marks=pytest.mark.slow)])
def test_sigterm_at_a_random_moment_loses_nothing(evaluated_reference, classifier_dir, tmp_path, seed):
    exports = sigterm_at_a_random_moment_then_resume(evaluated_reference, classifier_dir, tmp_path, seed)
    assert exports >= {"pipeline", "epoch_001", "epoch_003"}


# ---------------------------------------------------------------------------------------------------------
# Several processes: the checkpoint does not wait for a log step


@pytest.mark.slow  # a 2-process launch with slow steps: about a minute here
def test_sigterm_to_the_launcher_checkpoints_two_processes_within_two_steps_whatever_the_log_interval(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), "--multi_gpu",
           "--num_processes", "2", str(HARNESS), "slow-steps:0.5", "train_cgan", f"output_dir={out}",
           "log.wandb=disabled", *TINY, "train.epochs=8", "train.batch_size=16", "log.every_steps=50",
           "checkpoint.every_steps=1000"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ((tmp_path / "step.0").exists() and int((tmp_path / "step.0").read_text() or 0) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    at_signal = int((tmp_path / "step.0").read_text())
    start = time.time()
    proc.send_signal(signal.SIGTERM)  # to the launcher, as Slurm or a scheduler does; it forwards it to the workers
    printed, err = proc.communicate(timeout=120)
    seconds = time.time() - start
    [checkpoint] = list_checkpoints(out)
    step = json.loads((checkpoint / "training_state.json").read_text())["step"]
    print(f"SIGTERM to the launcher after step {at_signal}: checkpoint at step {step}, exit after {seconds:.1f} s")
    assert at_signal <= step <= at_signal + 3, (at_signal, step)  # not the next log step (50)
    assert seconds < 15, seconds  # well inside the launcher's 30 s before its SIGKILL
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    assert f"SIGTERM: saved a checkpoint at step {step}" in printed + err


# ---------------------------------------------------------------------------------------------------------
# The rules of a resume


def test_overwrite_with_resume_is_refused_and_the_run_is_kept(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY + ["train.max_steps=2"]) == 0
    kept = sorted(p.name for p in out.rglob("*"))
    assert run_script("train_cgan", CGANConfig, out, TINY + ["train.max_steps=2"], "--overwrite", "--resume",
                      "latest") == 2
    err = capsys.readouterr().err
    assert f"error: --overwrite deletes {out} and --resume latest continues it: choose one" in err
    assert sorted(p.name for p in out.rglob("*")) == kept


def test_the_slurm_scripts_never_pass_overwrite():
    for path in (ROOT / "scripts" / "slurm").iterdir():
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert "--overwrite" not in code, path


def saved_config(**changes):
    cfg = load_config(CGANConfig, None, TINY)
    values = json.loads(json.dumps(to_dict(cfg)))
    for name, value in changes.items():
        section, key = name.split(".")
        values[section][key] = value
    return values


@pytest.mark.parametrize("name,old,refused", [
    ("model.base_channels", 16, True), ("loss.name", "hinge", True), ("optim.lr_g", 0.1, True),
    ("data.classes", [0, 1], True), ("train.batch_size", 8, True), ("train.ema_decay", 0.5, True),
    ("train.epochs", 9, False), ("train.max_steps", 3, False), ("train.mixed_precision", "bf16", False),
    ("eval.every_epochs", 3, False), ("checkpoint.keep", 1, False), ("log.every_steps", 7, False),
    ("model.ema_bn_batches", 0, False), ("data.on_device", False, False),
])
def test_config_changes_are_sorted_into_another_training_and_the_same_one(name, old, refused):
    cfg = load_config(CGANConfig, None, TINY)
    no, yes = config_changes(saved_config(**{name: old}), cfg)
    assert [c.split(":")[0] for c in (no if refused else yes)] == [name]
    assert not (yes if refused else no)
    assert config_changes(saved_config(), cfg) == ([], [])


def test_a_resume_under_another_model_is_refused_with_the_differences_and_accepted_when_asked(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY + ["train.max_steps=2"]) == 0
    changed = TINY + ["train.max_steps=4", "optim.lr_g=0.001", "log.every_steps=1"]
    assert run_script("train_cgan", CGANConfig, out, changed, "--resume", "latest") == 2
    err = capsys.readouterr().err
    assert "optim.lr_g: None -> 0.001" in err and "--accept-config-changes" in err
    assert "max_steps" not in err  # the length of a run is not another training
    assert logged_steps(out) == [2]  # nothing ran
    # The run's own config.yaml is a config file: it resumes with what the message names.
    assert run_script("train_cgan", CGANConfig, out, ["--config", str(out / "config.yaml")], "--resume", "latest") == 0
    assert logged_steps(out) == [2]  # the same run, already at its end
    assert run_script("train_cgan", CGANConfig, out, changed, "--resume", "latest", "--accept-config-changes") == 0
    printed = capsys.readouterr().out
    assert "resuming with changed settings: log.every_steps: 4 -> 1; train.max_steps: 2 -> 4\n" in printed
    assert "changed training settings (--accept-config-changes): optim.lr_g: None -> 0.001" in printed
    assert logged_steps(out) == [2, 3, 4]


def test_check_resume_config_raises_a_config_error_naming_the_file(tmp_path):
    from pipelines.config import save_config

    save_config(load_config(CGANConfig, None, TINY + ["model.latent_dim=4"]), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"config.yaml was trained with other settings.*model.latent_dim: 4 -> 16"):
        check_resume_config(load_config(CGANConfig, None, TINY), tmp_path, accept=False)


def test_a_resume_with_no_complete_checkpoint_logs_each_step_once(tmp_path):
    """Killed (-9) in its first checkpoint's first write: steps 1-4 were logged, nothing can be resumed."""
    out = tmp_path / "run"
    proc = harness("cgan", out, "kill-at-write:1")
    assert proc.returncode == -signal.SIGKILL
    assert logged_steps(out) == [1, 2, 3, 4] and not list_checkpoints(out)
    assert run_script("train_cgan", CGANConfig, out, LONG, "--resume", "latest") == 0
    assert logged_steps(out) == list(range(1, 33))


def test_a_sigterm_stops_a_diffusion_evaluation_at_its_next_denoising_step():
    """A diffusion batch can take long (hundreds of steps): the request is read after every denoising step."""
    import torch

    from pipelines.evaluation import generate
    from test_ddpm import tiny_pipeline

    pipe = tiny_pipeline()
    preemption, steps = Preemption(), []
    real_step = pipe.scheduler.step

    def step(*args, **kwargs):  # the second denoising step: as if SIGTERM arrived during it
        steps.append(1)
        preemption.requested = len(steps) >= 2
        return real_step(*args, **kwargs)

    pipe.scheduler.step = step
    with pytest.raises(StopRequested):
        generate(pipe, torch.tensor([0, 1]), 2, seed=0, preemption=preemption, num_inference_steps=8)
    assert len(steps) == 2  # not the 8 of the batch
    preemption.requested, steps[:] = False, []
    pipe.scheduler.step = real_step
    assert generate(pipe, torch.tensor([0, 1]), 2, seed=0, preemption=preemption, num_inference_steps=8).shape[0] == 2
