"""What both trainers share: the run directory, the Accelerator, W&B, checkpoints, EMA, grids."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from .config import LogConfig, save_config, to_dict

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "training_state.json"


class RunDirError(RuntimeError):
    """The output directory holds another run, or the checkpoint to resume from is missing."""


def prepare_run_dir(output_dir: str | Path, resume: Optional[str], overwrite: bool) -> Path:
    """Make sure `output_dir` is ours to write: empty, ours to resume, or explicitly overwritten.

    Every process checks before any of them writes (so all agree), then the main process acts.
    """
    from accelerate import PartialState

    state = PartialState(cpu=multi_cpu())
    out = Path(output_dir)
    occupied = out.exists() and any(out.iterdir())
    if occupied and not overwrite and resume is None:
        kind = "a run" if (out / "config.yaml").exists() else "files"
        raise RunDirError(f"{out} already holds {kind}; pass --resume latest to continue it, --overwrite to "
                          "replace it, or choose another output_dir")
    state.wait_for_everyone()
    if state.is_main_process:
        if occupied and overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    return out


def wandb_mode(cfg: LogConfig, warn: bool = True) -> str:
    """'auto' means online when an API key is configured, offline (synced later) otherwise."""
    if cfg.wandb != "auto":
        return cfg.wandb
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _read(Path.home() / ".netrc")
    if not has_key and warn:
        logger.warning("no W&B API key found: logging offline to <output_dir>/wandb (upload later with `wandb sync`)")
    return "online" if has_key else "offline"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def multi_cpu() -> bool:
    """Launched as several processes (torchrun / `accelerate launch --multi_gpu`) on a machine without a GPU.

    accelerate only picks its gloo-backed MULTI_CPU mode when told `cpu=True`; without this the
    processes would each train alone on the whole data.
    """
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(cfg: Any, output_dir: Path) -> Accelerator:
    """An Accelerator set up from the config (precision, accumulation, W&B), with the seed applied.

    It writes nothing: `start_run` does, once the set-up that can still fail on the user's input
    (data, model shapes) has passed, so a corrected retry is not refused as an existing run.
    """
    accelerator = Accelerator(
        cpu=multi_cpu(),
        # "no" defers to the launcher (`accelerate launch --mixed_precision bf16`, a config file).
        mixed_precision=None if cfg.train.mixed_precision == "no" else cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with="wandb" if wandb_mode(cfg.log, warn=False) != "disabled" else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
    )
    # seed + process index: each process draws its own noise from the global generators (the cGAN's codes);
    # DDP broadcasts rank 0's initial weights, and the data order and the DDPM's training noise come from
    # generators of their own, seeded alike on every process.
    set_seed(cfg.seed, device_specific=True)
    return accelerator


def start_run(accelerator: Accelerator, cfg: Any, output_dir: Path) -> None:
    """The first writes of a run: `config.yaml` and the W&B run."""
    mode = wandb_mode(cfg.log)
    if mode != "disabled":
        accelerator.init_trackers(
            cfg.log.project,
            config=to_dict(cfg),
            init_kwargs={"wandb": {"name": cfg.log.run_name or output_dir.name, "tags": list(cfg.log.tags),
                                   "mode": mode, "dir": str(output_dir)}},
        )
    if accelerator.is_main_process:
        save_config(cfg, output_dir / "config.yaml")


def apply_speed_options(cfg: Any, *models: torch.nn.Module) -> None:
    """`train.channels_last` and `train.compile`, in place: no wrapper module, so state-dict keys,
    checkpoints and exports do not depend on them and a run may resume with them switched."""
    for model in models:
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            model.compile()


def training_batches(cfg: Any, accelerator: Accelerator):
    """The training split decoded once into uint8 tensors on the device, as batches sharded by process."""
    from .data import BatchLoader, load_tensors

    with accelerator.main_process_first():
        data = load_tensors(cfg.data)
    return BatchLoader(data, cfg.train.batch_size, cfg.seed, process_index=accelerator.process_index,
                       num_processes=accelerator.num_processes, pad_to=cfg.data.pad_to, hflip=cfg.data.hflip,
                       device=accelerator.device if cfg.data.on_device else "cpu")


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def snapshot_dir(output_dir: Path, epoch: int) -> Path:
    """Where `eval.snapshot_epochs` exports the pipeline as it was after `epoch`."""
    return Path(output_dir) / "snapshots" / f"epoch_{epoch:03d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written ones have a temporary name and are ignored."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises, library by library: OSError from Python's own files and shutil,
    SafetensorError from safetensors, RuntimeError from torch.save (its zip writer's "unexpected pos")."""
    from safetensors import SafetensorError

    return OSError, SafetensorError, RuntimeError


def _write_failure(err: BaseException) -> str:
    text = str(err)
    if getattr(err, "errno", None) == errno.ENOSPC or "os error 28" in text or "No space left" in text:
        return "no space left on device"
    if getattr(err, "errno", None) == errno.EFBIG or "os error 27" in text or "File too large" in text:
        return "file too large for this filesystem or the file-size limit (ulimit -f)"
    if isinstance(err, RuntimeError) and "unexpected pos" in text:  # torch.save cut short: the disk refused bytes
        return f"the write was cut short, most likely a full disk ({type(err).__name__}: {text})"
    return f"{type(err).__name__}: {text}"


@contextlib.contextmanager
def cleaned_up_on_write_error(tmp: Path, what: str, intact: list[Path]) -> Iterator[None]:
    """A full disk (or any write error) removes the half-written `tmp` and says what is still intact."""
    try:
        yield
    except _write_errors() as err:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"{intact[-1]} is intact" if intact else "nothing earlier was saved"
        raise RunDirError(f"writing the {what} failed ({_write_failure(err)}); the partial copy was removed and "
                          f"{kept}. Free space (or set checkpoint.keep lower), then --resume latest") from err


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int,
                    extra: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write models, optimizers, RNG states and `extra` tensors; visible only once complete.

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
        if accelerator.is_main_process:
            if extra:
                save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / "extra.safetensors"))
            with open(tmp / STATE_FILE, "w") as f:
                json.dump({"step": step}, f)
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


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """Restore what `save_checkpoint` wrote; return the step and the `extra` tensors.

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
    try:
        accelerator.load_state(str(path))
    except Exception as err:
        raise RunDirError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}); "
                          "it may be corrupt: remove it to resume from the one before") from None
    if not _rng_restored(contents[rng_file.name]):
        raise RunDirError(f"checkpoint file {rng_file} holds no valid random state (accelerate could not restore "
                          "it); the resumed run would differ from an uninterrupted one. Remove this checkpoint to "
                          "resume from the one before")
    return int(contents[STATE_FILE]["step"]), contents.get("extra.safetensors", {})


def _rng_restored(saved: Any) -> bool:
    """Whether the process's Python, numpy and torch generators now hold the states in `saved`."""
    import random

    import numpy as np

    try:
        numpy_now, numpy_saved = np.random.get_state(), saved["numpy_random_seed"]
        return (random.getstate() == tuple(saved["random_state"])
                and torch.equal(torch.get_rng_state(), saved["torch_manual_seed"])
                and numpy_now[0] == numpy_saved[0] and np.array_equal(numpy_now[1], numpy_saved[1])
                and tuple(numpy_now[2:]) == tuple(numpy_saved[2:]))
    except (KeyError, TypeError, IndexError, ValueError):
        return False


class WallClock:
    """Says when `every_minutes` of wall time have passed since it last said so (never without a period)."""

    def __init__(self, every_minutes: Optional[float]):
        self.every_seconds = every_minutes * 60 if every_minutes else None
        self.last = time.monotonic()

    def due(self) -> bool:
        if self.every_seconds is None or time.monotonic() - self.last < self.every_seconds:
            return False
        self.last = time.monotonic()
        return True


def make_ema(model: torch.nn.Module, decay: Optional[float], device: torch.device):
    """A diffusers `EMAModel` of `model`'s weights (None without a decay); foreach: one fused update per step."""
    if decay is None:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=decay, foreach=True)
    ema.to(device)
    return ema


def ema_state(ema) -> dict[str, torch.Tensor]:
    """A diffusers `EMAModel` as flat tensors for safetensors (no pickle in checkpoints)."""
    state = {f"ema.{i}": p for i, p in enumerate(ema.shadow_params)}
    state["ema.optimization_step"] = torch.tensor(ema.optimization_step)
    return state


def load_ema_state(ema, extra: dict[str, torch.Tensor]) -> None:
    for i, p in enumerate(ema.shadow_params):
        p.data.copy_(extra[f"ema.{i}"].to(p.device))
    ema.optimization_step = int(extra["ema.optimization_step"])


def generator_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"noise_rng": generator.get_state()}


def load_generator_state(generator: torch.Generator, extra: dict[str, torch.Tensor], checkpoint: Path) -> None:
    if "noise_rng" not in extra:  # written before the training noise had its own generator
        logger.warning(f"{checkpoint} holds no training-noise generator state; the resumed run draws other noise "
                       "than an uninterrupted one would")
        return
    generator.set_state(extra["noise_rng"])


@contextlib.contextmanager
def ema_weights(ema, model: torch.nn.Module) -> Iterator[None]:
    """Temporarily put the EMA weights into `model` (for sampling and export); no-op without EMA."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module, ema=None) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics) and the EMA weights, restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with ema_weights(ema, model):
            yield
    finally:
        model.train(was_training)


def class_grid_labels(num_classes: int, per_class: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Report A's fixed labels: one row per class, `per_class` images in each row."""
    return torch.arange(num_classes, device=device).repeat_interleave(per_class)


def save_grid(accelerator: Accelerator, images: torch.Tensor, nrow: int, path: Path, key: str, step: int,
              caption: str = "") -> None:
    """Save `images` in [0, 1] (B, C, H, W) as a PNG grid and log it to W&B (main process only)."""
    from torchvision.utils import save_image

    if not accelerator.is_main_process:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.float().cpu(), str(path), nrow=nrow, padding=2, pad_value=1.0)
    log_image(accelerator, key, path, step, caption)


def log_image(accelerator: Accelerator, key: str, path: Path, step: int, caption: str = "") -> None:
    if not accelerator.is_main_process:
        return
    # With W&B off the PNG on disk is the record, and wandb need not even be installed.
    if not any(tracker.name == "wandb" for tracker in accelerator.trackers):
        return
    import wandb

    accelerator.get_tracker("wandb", unwrap=True).log({key: wandb.Image(str(path), caption=caption)}, step=step)


def progress(accelerator: Accelerator, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not accelerator.is_local_main_process,
                dynamic_ncols=True)


def write_stats(output_dir: Path, record: dict) -> None:
    """Append one JSON line to `stats.jsonl` (the run's own log, readable without W&B)."""
    with open(output_dir / "stats.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def save_pipeline(pipeline, path: Path, extra_files: Optional[dict[str, Path]] = None) -> Path:
    """`save_pretrained` into a temporary folder, then swap it in: a crash never leaves half an export."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with cleaned_up_on_write_error(tmp, f"pipeline export {path}", [path] if path.exists() else []):
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
    old = path.with_name(f".old-{path.name}")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


class NonFiniteGuard:
    """Counts non-finite losses; too many in a row stops the run (the last checkpoint stays intact)."""

    def __init__(self, limit: int):
        self.limit, self.in_row, self.total = limit, 0, 0

    def ok(self, *losses: torch.Tensor) -> bool:
        # One host sync per step: the price of never letting a NaN into the weights.
        finite = bool(torch.isfinite(torch.stack([l.detach().float() for l in losses])).all())
        if finite:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.limit:
            raise FloatingPointError(
                f"{self.in_row} non-finite losses in a row (limit train.max_nonfinite_steps={self.limit}); "
                "stopping. The last checkpoint is intact: lower the learning rate or use mixed_precision=no/bf16, "
                "then --resume latest"
            )
        return False


def steps_from(loader, step: int, total_steps: int, accumulation: int = 1) -> Iterator[tuple[int, list]]:
    """Yield `(epoch, micro_batches)` for each optimizer step from `step` to `total_steps`.

    An optimizer step uses `accumulation` consecutive batches of one epoch; the position in the
    data is a pure function of the step, which is what makes resume exact.
    """
    per_epoch = len(loader) // accumulation
    if per_epoch == 0:
        raise ValueError(f"an epoch has {len(loader)} batches, fewer than gradient_accumulation_steps={accumulation}")
    while step < total_steps:
        epoch = step // per_epoch
        batches = loader.epoch(epoch, start_step=(step % per_epoch) * accumulation)
        for _ in range(min(per_epoch - step % per_epoch, total_steps - step)):
            yield epoch, [next(batches) for _ in range(accumulation)]
            step += 1


class Upkeep:
    """Everything periodic after an optimizer step: logging, checkpoints, sample grids.

    Metrics arrive as device tensors and are read (one host sync) only when a log is due.
    """

    def __init__(self, accelerator: Accelerator, cfg: Any, output_dir: Path, steps_per_epoch: int,
                 total_steps: int, checkpoint_extra, draw_grid, evaluate=None, export=None):
        self.acc, self.cfg, self.out = accelerator, cfg, output_dir
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.checkpoint_extra, self.draw_grid, self.evaluate = checkpoint_extra, draw_grid, evaluate
        self.export = export  # export(path): write the pipeline (EMA weights) to path; for snapshots
        self.ckpt_clock = WallClock(cfg.checkpoint.every_minutes)
        self.pending: list[dict] = []
        self.preempted = False
        self.wants_checkpoint = False  # by wall time or SIGTERM; held until the processes agree
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        # Cluster preemption: finish the current step, write a checkpoint, then exit (see after_step).
        self.preempted = True

    def _agree(self, wants_checkpoint: bool, preempted: bool, sync: bool) -> tuple[bool, bool]:
        """Wall time and signals differ between processes, but saving is collective: with several
        processes the wishes are pooled at log steps (already a sync point), so all act on the same step."""
        if self.acc.num_processes == 1:
            return wants_checkpoint, preempted
        if not sync:
            return False, False
        flags = torch.tensor([float(wants_checkpoint), float(preempted)], device=self.acc.device)
        pooled = self.acc.reduce(flags, reduction="sum").tolist()
        return pooled[0] > 0, pooled[1] > 0

    def after_step(self, step: int, metrics: dict, **scalars: float) -> Optional[dict]:
        """Call with the number of completed steps; returns the logged record when one was written."""
        self.pending.append(metrics)
        record = None
        log_due = step % self.cfg.log.every_steps == 0 or step == self.total_steps
        if log_due:
            keys = sorted({k for m in self.pending for k in m})
            means = torch.stack([torch.stack([m[k] for m in self.pending if k in m]).float().mean() for k in keys])
            # Averaged over processes too, so the curve is the global batch's whole; one host sync per log.
            record = dict(zip(keys, self.acc.reduce(means, reduction="mean").tolist()))
            record.update(step=step, epoch=(step - 1) // self.steps_per_epoch + 1, **scalars)
            self.pending.clear()
            self.acc.log(record, step=step)
            if self.acc.is_main_process:
                write_stats(self.out, record)
        end_of_epoch = step % self.steps_per_epoch == 0
        last = step == self.total_steps
        epoch = (step - 1) // self.steps_per_epoch + 1
        if end_of_epoch and (epoch % self.cfg.log.grid_every_epochs == 0 or last):
            self.draw_grid(f"epoch_{epoch:03d}", step)
        if end_of_epoch and epoch in self.cfg.eval.snapshot_epochs:
            if self.acc.is_main_process:
                self.export(snapshot_dir(self.out, epoch))
            self.acc.wait_for_everyone()
        every = self.cfg.eval.every_epochs
        if every and end_of_epoch and (epoch % every == 0 or last):
            if self.evaluate is not None:  # the main process evaluates; the others wait for it
                self.evaluate(epoch, step)
            self.acc.wait_for_everyone()
        ckpt_cfg = self.cfg.checkpoint
        by_steps = step % ckpt_cfg.every_steps == 0 if ckpt_cfg.every_steps else end_of_epoch
        self.wants_checkpoint = self.wants_checkpoint or self.ckpt_clock.due() or self.preempted
        by_wish, preempted = self._agree(self.wants_checkpoint, self.preempted, sync=log_due)
        if by_steps or by_wish or last:
            save_checkpoint(self.acc, self.out, step, ckpt_cfg.keep, self.checkpoint_extra())
            self.wants_checkpoint = False
        if preempted:
            self.acc.print(f"SIGTERM: saved a checkpoint at step {step}; continue with --resume latest")
            self.acc.end_training()
            raise SystemExit(143)
        return record
