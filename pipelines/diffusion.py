"""Conditional-diffusion training pieces used by `train_ddpm.py`: noise scheduler, LR schedule, one step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import DDPMScheduler

from .config import DDPMOptimConfig, DiffusionConfig
from .losses import diffusion_loss, min_snr_weights
from .training import NonFiniteGuard


def build_noise_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type)


def build_lr_schedule(optimizer: torch.optim.Optimizer, cfg: DDPMOptimConfig, total_steps: int, num_processes: int):
    """The LR schedule, counted as accelerate steps it: once per process for each optimizer step."""
    from diffusers.optimization import get_scheduler

    total = total_steps * num_processes
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(total, 2))
    name = "cosine" if cfg.schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps * num_processes, num_training_steps=total)


@dataclass
class DiffusionStep:
    """One micro-batch of the noise-prediction objective; the optimizer steps when accumulation is complete.

    The noise, timesteps and label dropout are drawn for the whole global batch from `generator`
    (seeded alike on every process) and each process keeps its own rows, the rows its data shard
    holds: N processes of batch B then train exactly as one process of batch N x B does.
    Returns detached tensors (no host sync) so the caller reads them only at logging time.
    """

    accelerator: object
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    noise_scheduler: DDPMScheduler
    cfg: DiffusionConfig
    num_classes: int
    max_grad_norm: Optional[float]
    guard: NonFiniteGuard
    generator: torch.Generator
    ema: Optional[object] = None
    _alphas_cumprod: Optional[torch.Tensor] = None

    def _draw(self, draw, size: int, *shape, **kwargs) -> torch.Tensor:
        """`draw` for the global batch, this process's rows of it (N x the random numbers: cheap next to the U-Net)."""
        acc = self.accelerator
        full = draw((size * acc.num_processes, *shape), generator=self.generator, device=self.generator.device,
                    **kwargs)
        return full[acc.process_index * size: (acc.process_index + 1) * size]

    def __call__(self, x0: torch.Tensor, labels: torch.Tensor) -> dict:
        acc, cfg = self.accelerator, self.cfg
        metrics: dict = {}
        with acc.accumulate(self.unet):
            b = x0.shape[0]
            noise = self._draw(torch.randn, b, *x0.shape[1:], dtype=x0.dtype)
            t = self._draw(lambda shape, **kw: torch.randint(0, cfg.num_train_timesteps, shape, **kw), b)
            if cfg.label_dropout > 0:
                drop = self._draw(torch.rand, b) < cfg.label_dropout
                labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
            x_t = self.noise_scheduler.add_noise(x0, noise, t)
            target = noise if cfg.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(x0, noise, t)
            prediction = self.unet(x_t, t, class_labels=labels).sample
            weights = None
            if cfg.snr_gamma is not None:
                if self._alphas_cumprod is None:  # moved to the device once, not every step
                    self._alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(x0.device)
                abar = self._alphas_cumprod[t]
                weights = min_snr_weights(abar / (1 - abar), cfg.snr_gamma, cfg.prediction_type)
            loss = diffusion_loss(prediction, target, weights)
            metrics["loss"] = loss.detach()
            if not self.guard.ok(loss):
                self.optimizer.zero_grad(set_to_none=True)
                return metrics
            acc.backward(loss)
            if acc.sync_gradients and self.max_grad_norm is not None:
                metrics["grad_norm"] = acc.clip_grad_norm_(self.unet.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.lr_schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients and self.ema is not None:
            self.ema.step(acc.unwrap_model(self.unet).parameters())
        return metrics
