"""Running the real training scripts in-process on tiny synthetic configs."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, config_cls, out: Path, overrides: list[str], *flags: str) -> int:
    """`python NAME.py overrides... flags...` (the command `train_*.py` runs) in this process; returns the exit code.

    `config_cls` is the config the command reads (kept so call sites say which family they train)."""
    import pipelines.commands

    # Each run builds its own Accelerator; accelerate keeps process-wide state between them.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    argv = [f"output_dir={out}", "log.wandb=disabled", *overrides, *flags]
    return getattr(pipelines.commands, name)(argv)


def load_safetensors_dir(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            tensors[f"{path.relative_to(folder)}:{key}"] = value
    return tensors


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def checkpoint_state(folder: Path) -> dict:
    """Everything a checkpoint holds (models, optimizers, LR schedule, EMA, RNG states, step), read safely.

    Except the wall time it records (for the model card): no two runs take the same time."""
    from pipelines.checkpoints import STATE_FILE, read_checkpoint_file

    state = {p.name: read_checkpoint_file(p) for p in sorted(folder.iterdir())}
    assert state[STATE_FILE].pop("train_seconds") > 0
    return state


def assert_same_state(a, b, where: str = "") -> None:
    """Exactly equal, through nested dicts, lists, tensors and numpy arrays."""
    import numpy as np

    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def final_checkpoint(out: Path) -> Path:
    from pipelines.checkpoints import list_checkpoints

    return list_checkpoints(out)[-1]


def logged_steps(out: Path) -> list[int]:
    """The steps of `stats.jsonl`, in the order the runs wrote them."""
    import json

    return [json.loads(line)["step"] for line in (out / "stats.jsonl").read_text().splitlines()]


def file_stamp(path: Path) -> tuple[int, int]:
    """Inode and modification time: a file rewritten (or replaced by a rename) gets a new one."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, launcher_args: list[str], script_args: list[str], timeout: int = 600):
    """`accelerate launch` on a free port, with a timeout; on failure the message holds every rank's output."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
           *launcher_args, *script_args]
    try:
        result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"accelerate launch ran past {timeout} s\nstdout:\n{err.stdout}\nstderr:\n{err.stderr}")
    result.report = f"exit code {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result
