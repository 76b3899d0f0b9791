"""The conditional-diffusion family (`train_ddpm.py`): U-Net, noise and LR schedules, one step, its pictures.

`DDPM` is what `trainer.fit` trains; the rest are its parts, usable on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import diffusers
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from .checkpoints import generator_state, load_generator_state
from .config_help import choices
from .diffusion_config import DDPMConfig, DDPMOptimConfig, DiffusionConfig
from .ema import ema_step, make_ema
from .exports import SCHEDULERS
from .families import ModelFamily
from .grids import save_grid
from .loop import FUSED_DEVICES, NonFiniteGuard
from .losses import DiffusionObjective, ShardedDraw
from .models.unet import build_unet
from .pipeline_ddpm import ClassConditionalDiffusionPipeline
from .plots import denoising_strip, plot_losses, plot_schedule
from .run import Run, apply_speed_options
from .tracking import log_image, read_stats
from .typed_yaml import ConfigError


def build_noise_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type)


def build_optimizer(unet: torch.nn.Module, cfg: DDPMOptimConfig, device: torch.device,
                    lr_scale: float = 1.0) -> torch.optim.AdamW:
    # The fused kernel is one launch for all parameters, and it skips a non-finite step on the device.
    fused = {"fused": True} if device.type in FUSED_DEVICES else {}
    return torch.optim.AdamW(unet.parameters(), lr=cfg.lr * lr_scale, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             **fused)


def build_lr_schedule(optimizer: torch.optim.Optimizer, cfg: DDPMOptimConfig, total_steps: int, num_processes: int):
    """The LR schedule, counted as accelerate steps it: once per process for each optimizer step."""
    from diffusers.optimization import get_scheduler

    total = total_steps * num_processes
    if cfg.schedule == "onecycle":
        max_lr = optimizer.param_groups[0]["lr"]  # optim.lr, scaled if asked
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(total, 2))
    name = "cosine" if cfg.schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps * num_processes, num_training_steps=total)


def sampling_scheduler(cfg: DiffusionConfig, noise_scheduler: DDPMScheduler):
    """The configured sampler (`diffusion.sample_scheduler`) on the training noise schedule."""
    return getattr(diffusers, SCHEDULERS[cfg.sample_scheduler]).from_config(noise_scheduler.config)


def diffusion_objective(cfg: DiffusionConfig, noise_scheduler: DDPMScheduler, num_classes: int) -> DiffusionObjective:
    return DiffusionObjective(scheduler=noise_scheduler, num_classes=num_classes, label_dropout=cfg.label_dropout,
                              prediction_type=cfg.prediction_type, snr_gamma=cfg.snr_gamma)


@dataclass(kw_only=True)
class DiffusionStep:
    """One micro-batch of the objective; the optimizer steps when accumulation is complete.

    Returns detached tensors (no host sync) so the caller reads them only at logging time.
    """

    accelerator: Accelerator
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    objective: DiffusionObjective
    draw: ShardedDraw  # the training noise: see ShardedDraw for why it is drawn for the global batch
    guard: NonFiniteGuard
    max_grad_norm: Optional[float] = 1.0
    ema: Optional[object] = None
    skip: Optional[torch.Tensor] = None  # the guard's verdict over this update's micro-batches so far

    def __call__(self, x0: torch.Tensor, labels: torch.Tensor) -> dict:
        acc = self.accelerator
        metrics: dict = {}
        with acc.accumulate(self.unet):
            loss = self.objective(self.unet, x0, labels, self.draw)
            metrics["loss"] = loss.detach()
            # A non-finite loss in any micro-batch, on any process, skips the whole update on the device;
            # every process still runs its backward, so none waits alone in the gradient all-reduce.
            found = self.guard.check(loss)
            self.skip = found if self.skip is None else torch.maximum(self.skip, found)
            acc.backward(self.guard.marked(loss, self.skip, self.optimizer))
            if acc.sync_gradients and self.max_grad_norm is not None:
                metrics["grad_norm"] = acc.clip_grad_norm_(self.unet.parameters(), self.max_grad_norm)
            if acc.sync_gradients:
                self.guard.record(self.skip)
                self.guard.step(self.optimizer, self.skip)
            self.lr_schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            if self.ema is not None:
                ema_step(self.ema, acc.unwrap_model(self.unet).parameters(), self.skip)
            self.skip = None
        return metrics


class DDPM:
    """The conditional DDPM as a `trainer.FamilyTrainer`: the U-Net, AdamW and its LR schedule, EMA, the step,
    and the exported pipeline (DDIM by default), which draws every grid."""

    name = "ddpm"
    grid_per_class = 8
    progress_keys = ("loss",)
    statistics = None  # GroupNorm only: nothing depends on the weights but the weights

    def __init__(self, run: Run):
        cfg, acc, data = run.cfg, run.accelerator, run.data
        if cfg.log.showcase_class >= data.num_classes:
            raise ConfigError(f"log.showcase_class={cfg.log.showcase_class}: the data has {data.num_classes} classes "
                              f"(valid: 0..{data.num_classes - 1})")
        guidance = cfg.diffusion.label_dropout > 0
        unet = build_unet(cfg.model, data.num_classes, *run.image_shape, null_class=guidance)
        apply_speed_options(cfg, acc, unet)
        self.noise_scheduler = build_noise_scheduler(cfg.diffusion)
        optimizer = build_optimizer(unet, cfg.optim, run.device, run.lr_scale)
        lr_schedule = build_lr_schedule(optimizer, cfg.optim, run.total_steps, acc.num_processes)
        self.unet, self.optimizer, self.lr_schedule = acc.prepare(unet, optimizer, lr_schedule)
        self.model = acc.unwrap_model(self.unet)
        self.ema = make_ema(self.model, cfg.train.ema_decay, run.device, cfg.train.ema_start_step)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, acc)
        # One generator for the training noise, seeded alike on every process.
        self.noise_rng = torch.Generator(run.device).manual_seed(cfg.seed)
        self.step = DiffusionStep(
            accelerator=acc, unet=self.unet, optimizer=self.optimizer, lr_schedule=self.lr_schedule,
            objective=diffusion_objective(cfg.diffusion, self.noise_scheduler, data.num_classes),
            draw=ShardedDraw(generator=self.noise_rng, process_index=acc.process_index,
                             num_processes=acc.num_processes),
            guard=self.guard, max_grad_norm=cfg.optim.max_grad_norm, ema=self.ema)
        self.sample_kwargs = dict(num_inference_steps=cfg.diffusion.sample_steps,
                                  guidance_scale=cfg.diffusion.sample_guidance if guidance else 1.0)
        self.pipeline = ClassConditionalDiffusionPipeline(
            unet=self.model, scheduler=sampling_scheduler(cfg.diffusion, self.noise_scheduler),
            class_names=data.class_names, image_size=data.image_size, num_classes=data.num_classes,
            default_steps=cfg.diffusion.sample_steps, default_guidance=self.sample_kwargs["guidance_scale"],
            default_guidance_interval=cfg.diffusion.sample_guidance_interval)
        self.pipeline.set_progress_bar_config(disable=True)
        self.run = run

    def train_step(self, step: int, micro_batches: list, measure_grads: bool) -> dict[str, torch.Tensor]:
        for x0, labels in micro_batches:
            metrics = self.step(x0, labels)
        return metrics  # the last micro-batch's: grad_norm exists only where the gradients were synced

    def scalars(self) -> dict[str, float]:
        return {"lr": self.lr_schedule.get_last_lr()[0]}

    def peak_rates(self) -> dict[str, float]:
        group = self.optimizer.param_groups[0]  # the schedule's peak: OneCycle's max_lr, else the base rate
        return {"lr": group.get("max_lr", group.get("initial_lr", group["lr"]))}

    def checkpoint_extra(self) -> dict[str, torch.Tensor]:
        return generator_state(self.noise_rng)

    def restore(self, extra: dict[str, torch.Tensor], checkpoint: Path) -> None:
        load_generator_state(self.noise_rng, extra, checkpoint)

    def sample(self, labels: torch.Tensor, seed: int) -> torch.Tensor:
        generator = torch.Generator(self.run.device).manual_seed(seed)
        return self.pipeline(labels, generator=generator, output_type="pt", **self.sample_kwargs).images

    def grid_images(self, labels: torch.Tensor) -> torch.Tensor:
        return self.sample(labels, self.run.cfg.seed)

    def final_pictures(self, step: int) -> None:
        """Noise schedule, loss curve, one sample per class, many of one class, and a denoising strip."""
        run, acc, data, seed = self.run, self.run.accelerator, self.run.data, self.run.cfg.seed
        pictures = {"noise_schedule": plot_schedule(self.noise_scheduler, run.out / "noise_schedule.png"),
                    "loss_curve": plot_losses(read_stats(run.out), ["loss"], run.out / "loss_curve.png")}
        for name, path in pictures.items():
            log_image(acc, name, path, step)
        save_grid(acc, self.sample(torch.arange(data.num_classes), seed + 1), data.num_classes,
                  run.out / "one_per_class.png", "one_per_class", step)
        showcase = run.cfg.log.showcase_class
        save_grid(acc, self.sample(torch.full((64,), showcase), seed + 2), 8, run.out / f"class_{showcase}_samples.png",
                  "one_class", step, data.class_names[showcase])
        strip = denoising_strip(self.pipeline, data.num_classes, run.cfg.diffusion.sample_steps, 6, seed,
                                guidance_scale=self.sample_kwargs["guidance_scale"])
        save_grid(acc, strip, 6, run.out / "denoising_strip.png", "denoising_strip", step)


HELP = """Train a class-conditional diffusion model (diffusers UNet2DModel + DDPMScheduler) with classifier-free guidance
({predictions} prediction; {samplers} samplers).

    python train_ddpm.py (or ccg-train-ddpm) --config ddpm/demo_cpu [section.key=value ...]
    accelerate launch train_ddpm.py --config ddpm/report_c_cifar10 train.mixed_precision=bf16
    python train_ddpm.py --config ... --resume latest

Writes to `output_dir`: config.yaml, stats.jsonl, grids/ (DDIM samples, one row per class),
checkpoints/, pictures (schedule, loss curve, denoising strip, samples), and pipeline/ (a
`ClassConditionalDiffusionPipeline` with the EMA weights, loadable with stock diffusers).
"""


def describe_export(index: dict) -> str:
    return ("a class-conditional diffusion model (diffusers `UNet2DModel`, classifier-free guidance), "
            f"sampled with {index.get('scheduler', ['', 'a scheduler'])[1]}")


FAMILY = ModelFamily(
    name="ddpm", summary="conditional diffusion", config=DDPMConfig, trainer=DDPM,
    pipeline=ClassConditionalDiffusionPipeline,
    help=lambda: HELP.format(predictions=", ".join(choices(DDPMConfig, "diffusion.prediction_type")),
                             samplers=", ".join(choices(DDPMConfig, "diffusion.sample_scheduler"))),
    describe=describe_export,
    report=lambda cfg: {"model": "DDPM (UNet2DModel)", "loss": cfg.get("diffusion", {}).get("prediction_type"),
                        "emb": None},
    card_tag="ddpm", network="unet", iterative=True,
    # the sampler: the grids' and the export's defaults
    resume_may_change=("diffusion.sample_scheduler", "diffusion.sample_steps", "diffusion.sample_guidance",
                       "diffusion.sample_guidance_interval"),
)
