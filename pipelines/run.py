"""The run context, built once per training: the run directory, the Accelerator (seeded), the training batches."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from .checkpoints import list_checkpoints
from .config import ConfigError, save_config
from .config_changes import check_resume_config
from .data import BatchLoader, data_identity, load_tensors
from .rundir import prepare_run_dir
from .tracking import start_tracking, wandb_mode


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
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        accelerator.print(f"mixed_precision=fp16 on {accelerator.device.type}: accelerate has no GradScaler there and "
                          "trains in float32; bf16 autocasts on CPUs")
    # seed + process index: each process draws its own noise from the global generators (the cGAN's codes);
    # DDP broadcasts rank 0's initial weights, and the data order and the DDPM's training noise come from
    # generators of their own, seeded alike on every process.
    set_seed(cfg.seed, device_specific=True)
    return accelerator


def start_run(accelerator: Accelerator, cfg: Any, output_dir: Path, data: Any = None) -> None:
    """The first writes of a run: `config.yaml` (the config, then under `dataset:` what identifies the training
    images, `data.data_identity`) and the W&B run (the same in its config)."""
    if not accelerator.is_main_process:
        return
    dataset = data_identity(data) if data is not None else None
    path = output_dir / "config.yaml"
    if dataset and path.is_file():  # a resume: say so if the images are not the ones the run started on
        before = (yaml.safe_load(path.read_text()) or {}).get("dataset") or {}
        changed = [k for k in ("fingerprint", "commit", "images", "files") if before.get(k) != dataset.get(k)
                   and before.get(k) is not None and dataset.get(k) is not None]
        if changed:
            print("warning: the training data changed since this run started ("
                  + "; ".join(f"{k} {before[k]} -> {dataset[k]}" for k in changed) + ")", flush=True)
    start_tracking(accelerator, cfg, output_dir, dataset=dataset)
    save_config(cfg, path, extra={"dataset": dataset} if dataset else None)


def compile_mode(mode: str, device: torch.device, option: str = "train.compile_mode") -> tuple[str, Optional[str]]:
    """The torch.compile mode to use for `mode` on `device`, and why it differs (naming `option`), if it does.

    CUDA graphs exist on CUDA devices only: elsewhere the modes that capture them fall back to the same
    compilation without them, rather than to a silent no-op of torch's."""
    if device.type == "cuda" or mode in ("default", "max-autotune-no-cudagraphs"):
        return mode, None
    fallback = "default" if mode == "reduce-overhead" else "max-autotune-no-cudagraphs"
    return fallback, (f"{option}={mode}: CUDA graphs need a CUDA device, this run is on {device.type}; "
                      f"compiling with mode={fallback} instead")


def uses_cuda_graphs(cfg: Any, device: torch.device) -> bool:
    return cfg.train.compile and compile_mode(cfg.train.compile_mode, device)[0] in ("reduce-overhead", "max-autotune")


def apply_speed_options(cfg: Any, accelerator: Accelerator, *models: torch.nn.Module) -> None:
    """`train.channels_last` and `train.compile` (in `train.compile_mode`), in place: no wrapper module, so
    state-dict keys, checkpoints and exports do not depend on them and a run may resume with them switched."""
    mode, why = compile_mode(cfg.train.compile_mode, accelerator.device)
    if cfg.train.compile and why:
        accelerator.print(why)
    for model in models:
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            model.compile(mode=mode)


def training_batches(cfg: Any, accelerator: Accelerator):
    """The training split decoded once into uint8 tensors (on the device, or in host memory with
    `data.on_device=false`), as batches on the device, sharded by process."""
    with accelerator.main_process_first():
        data = load_tensors(cfg.data)
    return BatchLoader(data, cfg.train.batch_size, cfg.seed, process_index=accelerator.process_index,
                       num_processes=accelerator.num_processes, pad_to=cfg.data.pad_to, hflip=cfg.data.hflip,
                       device=accelerator.device, on_device=cfg.data.on_device)


class TrainClock:
    """Wall time of a run's work (set-up, training, evaluation), summed over resumes: checkpoints store it."""

    def __init__(self):
        self.start, self.before = time.monotonic(), 0.0

    def resumed(self, seconds_before: float) -> None:
        """A resumed run: the time its earlier attempts took (their checkpoint's) counts too."""
        self.before = float(seconds_before)

    def seconds(self) -> float:
        return self.before + time.monotonic() - self.start


@dataclass(kw_only=True)
class Run:
    """What every training of every family is built on; made once, before any model."""

    cfg: Any
    out: Path
    accelerator: Accelerator
    loader: Any  # `data.BatchLoader`: the training split on the device, sharded by process
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    clock: TrainClock = field(default_factory=TrainClock)

    @classmethod
    def open(cls, cfg: Any, resume: Optional[str], overwrite: bool, accept_config_changes: bool = False) -> "Run":
        """Check `cfg.output_dir` is ours (every process agrees before any writes) and, for a resume, that `cfg`
        continues the same training; then build the run."""
        from accelerate import PartialState

        clock = TrainClock()  # from the start: data loading is part of the run's time
        # The first collective creates the process group: its timeout is set here, for the whole run.
        backend = cfg.train.process_group_backend
        if backend == "nccl" and not torch.cuda.is_available():
            raise ConfigError("train.process_group_backend=nccl needs CUDA, which this machine lacks; use gloo or null")
        state = PartialState(cpu=multi_cpu(), timeout=timedelta(minutes=cfg.train.process_group_timeout_minutes),
                             **({"backend": backend} if backend else {}))
        out = prepare_run_dir(cfg.output_dir, resume, overwrite, state)
        if resume is not None and (resume != "latest" or list_checkpoints(out)):  # every process: all stop alike
            for line in check_resume_config(cfg, out, accept_config_changes):
                state.print(line)
        return cls.build(cfg, make_accelerator(cfg, out), out, clock)

    @classmethod
    def build(cls, cfg: Any, accelerator: Accelerator, out: Path, clock: Optional[TrainClock] = None) -> "Run":
        """The run on an existing Accelerator (benchmarks build this way, so they time what training runs)."""
        loader = training_batches(cfg, accelerator)
        steps_per_epoch = len(loader) // cfg.train.gradient_accumulation_steps
        total_steps = cfg.train.epochs * steps_per_epoch
        if cfg.train.max_steps is not None:
            total_steps = min(total_steps, cfg.train.max_steps)
        return cls(cfg=cfg, out=out, accelerator=accelerator, loader=loader, steps_per_epoch=steps_per_epoch,
                   total_steps=total_steps, clock=clock or TrainClock())

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def data(self):
        """The training split (`data.ImageTensors`): class names, number of classes, image size."""
        return self.loader.data

    @property
    def image_shape(self) -> tuple[int, int]:
        """(channels, size) of the images the networks see (after `data.pad_to`)."""
        channels, size, _ = self.loader.image_shape
        return channels, size

    @property
    def accumulation(self) -> int:
        return self.cfg.train.gradient_accumulation_steps

    @property
    def lr_scale(self) -> float:
        """`optim.scale_lr`: the rates times processes x accumulation (the recipes are tuned on one process)."""
        return float(self.accelerator.num_processes * self.accumulation) if self.cfg.optim.scale_lr else 1.0

    def scaling_line(self, rates: dict[str, float]) -> str:
        """What a user changing the GPU count needs to see: processes, batches, accumulation, the rates in use."""
        acc, train = self.accelerator, self.cfg.train
        scaled = (f"scaled x{self.lr_scale:g} by optim.scale_lr" if self.cfg.optim.scale_lr
                  else "as configured; optim.scale_lr=true scales them with the global batch")
        return (f"{acc.num_processes} process{'es' if acc.num_processes > 1 else ''} ({acc.device.type}) x batch "
                f"{train.batch_size} x accumulation {self.accumulation} = global batch "
                f"{acc.num_processes * train.batch_size * self.accumulation}; learning rates "
                + ", ".join(f"{k}={v:.3g}" for k, v in rates.items()) + f" ({scaled})")
