"""Running the real training scripts in-process on tiny synthetic configs."""

from __future__ import annotations

import importlib.util

from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import `train_cgan.py` / `train_ddpm.py` as a module (they are scripts, not package modules)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, config_cls, out: Path, overrides: list[str], *flags: str) -> int:
    """`python NAME.py overrides... flags...` in this process; returns the exit code."""
    from pipelines.cli import run_cli

    # Each run builds its own Accelerator; accelerate keeps process-wide state between them.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    module = load_script(name)
    argv = [f"output_dir={out}", "log.wandb=disabled", *overrides, *flags]
    return run_cli(config_cls, module.train, module.__doc__, argv)


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



