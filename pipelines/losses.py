"""Training objectives: four GAN losses (BCE, WGAN-GP, LSGAN, hinge) and their penalties, and the diffusion objective (`DiffusionObjective`).

GAN losses take discriminator logits. Each returns a scalar to minimise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

GAN_LOSSES = ("bce", "wgan_gp", "lsgan", "hinge")


class GANLoss(NamedTuple):
    discriminator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (real logits, fake logits) -> loss
    generator: Callable[[torch.Tensor], torch.Tensor]  # fake logits -> loss
    gradient_penalty: bool  # WGAN-GP adds lambda * E[(||grad D(x_hat)|| - 1)^2] to the critic loss


def bce_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """(BCE(D(x), 1) + BCE(D(G(z)), 0)) / 2, computed from logits (stable for large |logits|)."""
    return 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                  + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


def bce_g(fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss -log D(G(z))."""
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


def wasserstein_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Critic loss D(G(z)) - D(x); the gradient penalty is added by the trainer."""
    return fake.mean() - real.mean()


def wasserstein_g(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def lsgan_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """1/2 [(D(x) - 1)^2 + D(G(z))^2] on the raw (linear) discriminator output."""
    return 0.5 * ((real - 1).pow(2).mean() + fake.pow(2).mean())


def lsgan_g(fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (fake - 1).pow(2).mean()


def hinge_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """max(0, 1 - D(x)) + max(0, 1 + D(G(z)))."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def hinge_g(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def gan_loss(name: str) -> GANLoss:
    table = {
        "bce": GANLoss(bce_d, bce_g, False),
        "wgan_gp": GANLoss(wasserstein_d, wasserstein_g, True),
        "lsgan": GANLoss(lsgan_d, lsgan_g, False),
        "hinge": GANLoss(hinge_d, hinge_g, False),
    }
    if name not in table:
        raise ValueError(f"loss {name!r}: valid choices are {', '.join(GAN_LOSSES)}")
    return table[name]


def gradient_penalty(critic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], real: torch.Tensor,
                     fake: torch.Tensor, labels: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """WGAN-GP: E[(||grad_x_hat D(x_hat, y)||_2 - 1)^2] on random interpolates of real and fake."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, generator=generator, dtype=real.dtype)
    x_hat = (alpha * real + (1 - alpha) * fake.detach()).requires_grad_(True)
    scores = critic(x_hat, labels)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def r1_penalty(real_logits: torch.Tensor, real_input: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al., 2018): E[||grad_x D(x)||^2] at the real images D just scored, kept differentiable
    in D's weights. `real_input` is the tensor D was given, with requires_grad set before the forward pass."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_input, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()


def mode_seeking_penalty(images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """MSGAN (Mao et al., 2019): 1 / (mean |G(z1, y) - G(z2, y)| / mean |z1 - z2| + eps), to minimise.

    Pairs are (i, i + B/2): the trainer gives both halves of the batch the same labels. A generator that
    maps different codes of one class to the same image pays a large penalty; that is within-class collapse.
    """
    half = images.shape[0] // 2
    ratio = ((images[:half] - images[half:2 * half]).abs().mean()
             / (z[:half] - z[half:2 * half]).abs().mean())
    return 1.0 / (ratio + 1e-5)


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor,
                   weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE between the U-Net's output and its target (noise or velocity), optionally weighted per sample."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al., 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


@dataclass(kw_only=True)
class ShardedDraw:
    """Random numbers drawn for the whole global batch from one generator, seeded alike on every
    process; each process keeps its own rows, the rows its data shard holds. N processes of batch B
    then draw exactly what one process of batch N x B draws (N x the numbers: cheap next to a U-Net)."""

    generator: torch.Generator
    process_index: int = 0
    num_processes: int = 1

    def __call__(self, draw: Callable, size: int, *shape: int, **kwargs) -> torch.Tensor:
        full = draw((size * self.num_processes, *shape), generator=self.generator, device=self.generator.device,
                    **kwargs)
        return full[self.process_index * size: (self.process_index + 1) * size]


@dataclass(kw_only=True)
class DiffusionObjective:
    """The class-conditional denoising loss of one batch: noise and timesteps drawn, labels dropped to
    the null class for classifier-free guidance, the target (noise or velocity), min-SNR weights."""

    scheduler: "DDPMScheduler"
    num_classes: int  # the null class is `num_classes`
    label_dropout: float = 0.0
    prediction_type: str = "epsilon"
    snr_gamma: Optional[float] = None
    _alphas_cumprod: Optional[torch.Tensor] = None

    def __call__(self, model: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor,
                 draw: ShardedDraw) -> torch.Tensor:
        b, steps = x0.shape[0], self.scheduler.config.num_train_timesteps
        noise = draw(torch.randn, b, *x0.shape[1:], dtype=x0.dtype)
        t = draw(lambda shape, **kw: torch.randint(0, steps, shape, **kw), b)
        if self.label_dropout > 0:
            drop = draw(torch.rand, b) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        x_t = self.scheduler.add_noise(x0, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, noise, t)
        prediction = model(x_t, t, class_labels=labels).sample
        weights = None
        if self.snr_gamma is not None:
            if self._alphas_cumprod is None:  # moved to the device once, not every step
                self._alphas_cumprod = self.scheduler.alphas_cumprod.to(x0.device)
            abar = self._alphas_cumprod[t]
            weights = min_snr_weights(abar / (1 - abar), self.snr_gamma, self.prediction_type)
        return diffusion_loss(prediction, target, weights)
