"""Faults: kill -9 and SIGTERM mid-run, half-written and corrupt checkpoints, bad input to the trainers."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pipelines.config import CGANConfig, DDPMConfig
from pipelines.training import list_checkpoints, resolve_resume
from test_cgan import TINY
from trainer_utils import ROOT, assert_same_tensors, load_safetensors_dir, run_script

# Long enough to be interrupted: 4 epochs of 8 steps, a checkpoint every 4 steps.
LONG = TINY + ["train.epochs=4", "checkpoint.every_steps=4", "checkpoint.keep=10", "train.ema_decay=0.9"]


def start(out, *extra):
    cmd = [sys.executable, str(ROOT / "train_cgan.py"), f"output_dir={out}", "log.wandb=disabled", *LONG, *extra]
    return subprocess.Popen(cmd, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(out, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if list_checkpoints(out):
            return
        time.sleep(0.05)
    pytest.fail(f"no checkpoint appeared (exit code {proc.poll()})")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "full"
    assert run_script("train_cgan", CGANConfig, out, LONG) == 0
    return out


def test_kill_9_then_resume_latest_equals_an_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = start(out)
    wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list_checkpoints(out)
    assert done and not (out / "pipeline").exists()
    assert run_script("train_cgan", CGANConfig, out, LONG, "--resume", "latest") == 0
    assert_same_tensors(load_safetensors_dir(out / "pipeline"), load_safetensors_dir(uninterrupted / "pipeline"))


def test_sigterm_writes_a_final_checkpoint_and_exits(tmp_path, uninterrupted):
    out = tmp_path / "preempted"
    proc = start(out)
    wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    steps = [int(p.name.split("_")[1]) for p in list_checkpoints(out)]
    state = json.loads((list_checkpoints(out)[-1] / "training_state.json").read_text())
    assert state["step"] == max(steps) and 0 < max(steps) < 32
    assert run_script("train_cgan", CGANConfig, out, LONG, "--resume", "latest") == 0
    assert_same_tensors(load_safetensors_dir(out / "pipeline"), load_safetensors_dir(uninterrupted / "pipeline"))


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


def test_corrupt_checkpoint_gives_a_clear_error(uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    newest = list_checkpoints(out)[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    assert run_script("train_cgan", CGANConfig, out, LONG, "--resume", "latest") == 2
    err = capsys.readouterr().err
    assert str(newest) in err and "corrupt" in err


@pytest.mark.parametrize("overrides,message", [
    (["data.name=imagenet"], "valid choices: fashion_mnist, cifar10, synthetic"),
    (["train.batch_size=0"], "train.batch_size=0: must be positive"),
    (["model.channels=3"], "model.channels=3 but the data has 1-channel images"),
    (["data.pad_to=30"], "must be a multiple of 4"),
    (["data.path=/nonexistent/folder"], "does not exist"),
    (["trian.epochs=3"], "unknown config key 'trian'"),
])
def test_bad_input_fails_early_with_a_clear_message_and_no_run_left(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY + overrides) == 2
    assert message in capsys.readouterr().err
    assert not (out / "pipeline").exists() and not list_checkpoints(out)


def test_ddpm_rejects_images_the_unet_cannot_take(tmp_path, capsys):
    from test_ddpm import TINY as DDPM_TINY

    bad = DDPM_TINY + ["model.block_out_channels=[8,8,8,8]", "model.attention=[false,false,false,false]"]
    assert run_script("train_ddpm", DDPMConfig, tmp_path / "run", bad) == 2
    assert "cannot be halved 3 times" in capsys.readouterr().err


class _Exploit:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_never_unpickle_code(uninterrupted, tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    newest = list_checkpoints(out)[-1]
    names = {p.name for p in newest.iterdir()}
    assert {"model.safetensors", "model_1.safetensors", "extra.safetensors", "training_state.json"} <= names
    marker = tmp_path / "pwned"
    torch.save({"state": _Exploit(marker)}, newest / "optimizer.bin")
    assert run_script("train_cgan", CGANConfig, out, LONG, "--resume", "latest") == 2
    assert not marker.exists()  # weights_only loading refused the object instead of running it
    assert "cannot be loaded" in capsys.readouterr().err


def test_wall_clock_says_when_the_period_has_passed(monkeypatch):
    from pipelines import training

    now = [1000.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: now[0])
    clock, never = training.WallClock(0.5), training.WallClock(None)
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


def test_two_processes_agree_on_time_based_checkpoints(tmp_path):
    """Each process's clock fires at its own time; saving is collective, so they act together at log steps."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           str(ROOT / "train_cgan.py"), f"output_dir={out}", "log.wandb=disabled", *TINY, "train.epochs=1",
           "train.batch_size=16", "log.every_steps=3", "checkpoint.every_minutes=1e-9", "checkpoint.keep=100"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["step_000000003", "step_000000006", "step_000000008"]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(uninterrupted, tmp_path, monkeypatch, capsys):
    from accelerate import Accelerator

    real_save_state, calls = Accelerator.save_state, []

    def save_state_then_fill_the_disk(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        real_save_state(self, output_dir, **kwargs)  # the files land, then the disk is full
        if len(calls) == 2:
            _disk_full()

    monkeypatch.setattr(Accelerator, "save_state", save_state_then_fill_the_disk)
    out = tmp_path / "full"
    assert run_script("train_cgan", CGANConfig, out, LONG) == 2
    err = capsys.readouterr().err
    assert "no space left on device" in err and "step_000000004 is intact" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000000004"]  # no half-written folder
    assert not (out / "pipeline").exists()
    monkeypatch.setattr(Accelerator, "save_state", real_save_state)
    assert run_script("train_cgan", CGANConfig, out, LONG, "--resume", "latest") == 0
    assert_same_tensors(load_safetensors_dir(out / "pipeline"), load_safetensors_dir(uninterrupted / "pipeline"))


def test_disk_full_while_exporting_keeps_the_previous_export(uninterrupted, tmp_path, monkeypatch):
    import safetensors.torch

    from pipelines.pipeline_cgan import CGANPipeline
    from pipelines.training import RunDirError, save_pipeline

    export = tmp_path / "pipeline"
    shutil.copytree(uninterrupted / "pipeline", export)
    before = load_safetensors_dir(export)
    pipeline = CGANPipeline.from_pretrained(str(export))
    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full)
    with pytest.raises(RunDirError, match=f"no space left on device.*{export} is intact"):
        save_pipeline(pipeline, export)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]  # the partial copy is gone
    assert_same_tensors(load_safetensors_dir(export), before)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_launcher_files_are_valid_accelerate_configs(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.mixed_precision in {"no", "bf16", "fp16"} and cfg.num_processes >= 1
    assert (cfg.num_machines > 1) == (path.stem == "multi_node")


def test_multi_gpu_bf16_launcher_file_runs_two_processes_here(tmp_path):
    """The same file on this GPU-less machine: two gloo processes with bf16 autocast."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "multi_gpu_bf16.yaml"), "--num_processes", "2",
           str(ROOT / "train_cgan.py"), f"output_dir={out}", "log.wandb=disabled", *TINY, "train.epochs=1",
           "train.batch_size=16"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: 8 steps") == 1
    assert (out / "pipeline" / "model_index.json").exists()


def test_a_run_with_wandb_disabled_needs_no_wandb_installed(tmp_path, monkeypatch):
    # GPU and cluster images often lack wandb; log.wandb=disabled must not import it.
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY + ["train.epochs=1"]) == 0
    assert (out / "grids" / "final.png").exists() and (out / "pipeline" / "model_index.json").exists()
