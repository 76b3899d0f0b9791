"""Checkpoints: written whole or not at all, rotated, found for `--resume`, read back without running code."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator

from .rundir import RunDirError, checkpoint_dir, cleaned_up_on_write_error

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "training_state.json"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written ones have a temporary name and are ignored."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int,
                    extra: Optional[dict[str, torch.Tensor]] = None, info: Optional[dict] = None) -> Path:
    """Write models, optimizers, RNG states and `extra` tensors (and `info` numbers beside the step in
    its state file); visible only once complete.

    The state goes to a temporary folder that is renamed when everything is on disk, so a kill
    mid-write leaves the previous checkpoint as the latest complete one.
    """
    from safetensors.torch import save_file

    root = checkpoint_dir(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step:09d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:09d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with cleaned_up_on_write_error(tmp, f"checkpoint at step {step}", list_checkpoints(output_dir)):
        accelerator.save_state(str(tmp))
        # Every process writes its own random_states_R.pkl into tmp: wait for the slowest before the main
        # process completes and renames the folder, else a late process's RNG file is missing from the
        # checkpoint (save_state re-creates tmp and writes it there, or the write fails).
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if extra:
                save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / "extra.safetensors"))
            with open(tmp / STATE_FILE, "w") as f:
                json.dump({"step": step, **(info or {})}, f)
                f.flush()
                os.fsync(f.fileno())
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(output_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """`latest` -> newest complete checkpoint (None on a fresh run); a path -> that checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            from accelerate import PartialState

            if PartialState().is_main_process:
                logger.warning(f"--resume latest: no complete checkpoint in {checkpoint_dir(output_dir)}; "
                               "starting from step 0")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise RunDirError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); "
                          f"complete ones: {[str(p) for p in list_checkpoints(output_dir)] or 'none'}")
    return path


def read_checkpoint_file(path: Path) -> Any:
    """One file of a checkpoint, read without running code from it: safetensors, JSON, or a
    `weights_only` pickle (accelerate's optimizer, LR-schedule and RNG files, with the numpy types
    RNG states need allowed, as accelerate itself loads them)."""
    from accelerate.utils import load
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return load(str(path), map_location="cpu", weights_only=True)


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore what `save_checkpoint` wrote; return its state (`step` and the `info` numbers) and the `extra` tensors.

    Every file is read safely first, so a damaged or tampered one is an error that names it
    (accelerate itself skips an unreadable RNG file with an info message, and the resumed run
    would then quietly differ); afterwards the RNG states are checked to be the ones on disk.
    """
    rng_file = path / f"random_states_{accelerator.process_index}.pkl"
    contents = {}
    for file in sorted(p for p in path.iterdir() if p.is_file()) + ([] if rng_file.exists() else [rng_file]):
        try:
            contents[file.name] = read_checkpoint_file(file)
        except Exception as err:
            raise RunDirError(f"checkpoint file {file} cannot be loaded ({type(err).__name__}: {err}); the "
                              "checkpoint may be corrupt: remove it to resume from the one before") from None
    # accelerate writes one scheduler*.bin per prepared LR schedule; one written without (the cGAN's constant
    # rates) cannot give a schedule its state, and accelerate's own error would read like a damaged checkpoint.
    schedule_files = [name for name in contents if name.startswith("scheduler")]
    if len(schedule_files) < len(accelerator._schedulers):
        raise RunDirError(f"checkpoint {path} holds {len(schedule_files)} LR schedule(s) but this run has "
                          f"{len(accelerator._schedulers)}: it was written with other learning-rate settings "
                          "(for the cGAN, optim.schedule=constant); resume with the settings it was trained with")
    try:
        accelerator.load_state(str(path))
    except Exception as err:
        raise RunDirError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}); "
                          "it may be corrupt: remove it to resume from the one before") from None
    if not _rng_restored(contents[rng_file.name]):
        raise RunDirError(f"checkpoint file {rng_file} holds no valid random state (accelerate could not restore "
                          "it); the resumed run would differ from an uninterrupted one. Remove this checkpoint to "
                          "resume from the one before")
    state = contents[STATE_FILE]
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise RunDirError(f"checkpoint file {path / STATE_FILE} holds no step; remove this checkpoint to resume "
                          "from the one before")
    return state, contents.get("extra.safetensors", {})


def _rng_restored(saved: Any) -> bool:
    """Whether the process's Python, numpy and torch generators (the CPU's, and an accelerator's where
    the checkpoint holds one this machine has) now hold the states in `saved`."""
    import random

    import numpy as np

    try:
        numpy_now, numpy_saved = np.random.get_state(), saved["numpy_random_seed"]
        return (random.getstate() == tuple(saved["random_state"])
                and torch.equal(torch.get_rng_state(), saved["torch_manual_seed"])
                and numpy_now[0] == numpy_saved[0] and np.array_equal(numpy_now[1], numpy_saved[1])
                and tuple(numpy_now[2:]) == tuple(numpy_saved[2:])
                and all(_device_rng_restored(key, value) for key, value in saved.items()
                        if key.startswith("torch_") and key.endswith("_manual_seed") and key != "torch_manual_seed"))
    except (KeyError, TypeError, IndexError, ValueError):
        return False


def _device_rng_restored(key: str, saved: Any) -> bool:
    """An accelerator's generator (`torch_cuda_manual_seed`: one state, or one per device as accelerate saves
    it), compared where that accelerator exists; a run resumed without it draws nothing from it."""
    device_type = key[len("torch_"):-len("_manual_seed")]
    module = getattr(torch, device_type, None)
    if module is None or not module.is_available():
        return True
    if isinstance(saved, (list, tuple)):
        now = module.get_rng_state_all()
        return len(now) == len(saved) and all(torch.equal(a, b) for a, b in zip(now, saved))
    return torch.equal(module.get_rng_state(), saved)


def generator_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"noise_rng": generator.get_state()}


def load_generator_state(generator: torch.Generator, extra: dict[str, torch.Tensor], checkpoint: Path) -> None:
    if "noise_rng" not in extra:  # written before the training noise had its own generator
        logger.warning(f"{checkpoint} holds no training-noise generator state; the resumed run draws other noise "
                       "than an uninterrupted one would")
        return
    generator.set_state(extra["noise_rng"])
