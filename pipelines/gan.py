"""The conditional-GAN family (`train_cgan.py`): building G and D, one training step, its pictures.

`CGAN` is what `trainer.fit` trains; the rest are its parts, usable on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from accelerate import Accelerator

from .augment import diff_augment
from .config_help import choices
from .ema import ema_step, make_ema, measure_batchnorm_statistics
from .families import ModelFamily
from .gan_config import DEFAULT_GAN_LR, CGANConfig
from .grids import save_grid
from .loop import FUSED_DEVICES, NonFiniteGuard
from .losses import GANLoss, gan_loss, gradient_penalty, mode_seeking_penalty, r1_penalty
from .models.cgan import CGANDiscriminator, CGANGenerator
from .pipeline_cgan import CGANPipeline
from .run import Run, apply_speed_options
from .typed_yaml import ConfigError


def build_cgan(cfg: CGANConfig, num_classes: int, channels: int, image_size: int
               ) -> tuple[CGANGenerator, CGANDiscriminator]:
    m = cfg.model
    if m.channels is not None and m.channels != channels:
        raise ConfigError(f"model.channels={m.channels} but the data has {channels}-channel images")
    if m.image_size is not None and m.image_size != image_size:
        raise ConfigError(f"model.image_size={m.image_size} but the data has {image_size}x{image_size} images "
                         "(after data.pad_to)")
    if image_size % 4:
        raise ConfigError(f"the cGANs up-sample twice, so the image size must be a multiple of 4; the data gives "
                          f"{image_size} (data.pad_to can fix that)")
    shared = dict(arch=m.arch, num_classes=num_classes, label_emb_dim=m.label_emb_dim, bn_momentum=m.bn_momentum,
                  bn_eps=m.bn_eps, image_size=image_size, channels=channels)
    generator = CGANGenerator(latent_dim=m.latent_dim, noise=m.noise, hierarchical_z=m.hierarchical_z,
                              base_channels=m.base_channels, **shared)
    norm, conditioning = m.discriminator()
    discriminator = CGANDiscriminator(norm=norm, conditioning=conditioning, class_std=m.d_class_std,
                                      base_channels=m.d_base_channels or m.base_channels, **shared)
    return generator, discriminator


def make_optimizers(cfg: CGANConfig, generator: torch.nn.Module, discriminator: torch.nn.Module, device: torch.device,
                    lr_scale: float = 1.0):
    default = DEFAULT_GAN_LR[cfg.loss.name]
    # The fused kernel is one launch for all parameters, and it skips a non-finite step on the device.
    fused = {"fused": True} if device.type in FUSED_DEVICES else {}
    opt_g = torch.optim.Adam(generator.parameters(), lr=(cfg.optim.lr_g or default) * lr_scale, betas=cfg.optim.betas,
                             **fused)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=(cfg.optim.lr_d or default) * lr_scale,
                             betas=cfg.optim.betas, **fused)
    return opt_g, opt_d


def make_lr_schedules(cfg: CGANConfig, optimizers: Sequence[torch.optim.Optimizer], total_steps: int,
                      num_processes: int) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """`optim.schedule=linear` for each optimizer, counted as accelerate steps it: once per process a step.

    No schedule for constant rates: their checkpoints hold none and stay those of earlier versions."""
    if cfg.optim.schedule == "constant":
        return []
    total = max(total_steps * num_processes, 1)
    start = int(cfg.optim.decay_start * total)

    def factor(count: int) -> float:
        return 1.0 if count < start else max(total - count, 0) / (total - start)

    return [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers]


def paired_labels(labels: torch.Tensor) -> torch.Tensor:
    """The batch's labels with the second half copied from the first, so fakes i and i + B/2 share a class.

    The fakes' class frequencies stay those of the data in expectation; mode seeking needs the pairs.
    """
    half = labels.shape[0] // 2
    return torch.cat([labels[:half], labels[:half], labels[2 * half:]])


def grad_norm(accelerator: Accelerator, optimizer: torch.optim.Optimizer, parameters) -> torch.Tensor:
    """The global norm of `optimizer`'s gradients, unscaled first under fp16. Only that optimizer's:
    accelerate's `clip_grad_norm_` unscales every optimizer, the other network's stale gradients too."""
    accelerator.unscale_gradients(optimizer)
    return torch.nn.utils.clip_grad_norm_(parameters, float("inf"))


@dataclass(kw_only=True)
class GANStep:
    """One discriminator update, and a generator update every `critic_steps` calls.

    Returns detached tensors (no host sync) so the caller reads them only at logging time.
    """

    accelerator: Accelerator
    generator: torch.nn.Module
    discriminator: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    loss: GANLoss
    gp_weight: float = 10.0
    critic_steps: int = 1
    guard: NonFiniteGuard
    ema: Optional[object] = None
    mode_seeking: float = 0.0  # MSGAN weight; > 0 gives both halves of the fake batch the same labels
    augment: Sequence[str] = ()  # DiffAugment policy: every image D sees, real or fake, goes through it
    r1_gamma: float = 0.0
    r1_every: int = 16

    def __call__(self, step: int, real: torch.Tensor, labels: torch.Tensor, measure_grads: bool = False) -> dict:
        acc, G, D = self.accelerator, self.generator, self.discriminator
        unwrapped = acc.unwrap_model(G)
        z = unwrapped.sample_noise(real.shape[0], device=real.device)
        fake_labels = paired_labels(labels) if self.mode_seeking else labels
        fake = G(z, fake_labels)

        # Discriminator (critic) update.
        real_input = diff_augment(real, self.augment)
        # Lazy R1: on its steps (decided from the step number, no host sync) the real batch D scores anyway
        # is the one differentiated, scaled by the interval so its mean weight is r1_gamma.
        r1_step = self.r1_gamma > 0 and step % self.r1_every == 0
        if r1_step:
            real_input = real_input.detach().requires_grad_(True)
        real_logits = D(real_input, labels)
        fake_logits = D(diff_augment(fake.detach(), self.augment), fake_labels)
        loss_d = self.loss.discriminator(real_logits, fake_logits)
        if self.loss.gradient_penalty:
            loss_d = loss_d + self.gp_weight * gradient_penalty(D, real, fake, labels)
        metrics = {"loss_d": loss_d.detach(), "d_real": real_logits.detach().mean(),
                   "d_fake": fake_logits.detach().mean()}
        if r1_step:
            r1 = r1_penalty(real_logits, real_input)
            metrics["r1"] = r1.detach()
            loss_d = loss_d + (self.r1_gamma / 2 * self.r1_every) * r1
        # Every process runs every backward (a skipped one would leave the others waiting in the gradient
        # all-reduce); a non-finite loss on any process skips the update on all, on the device.
        skip_d = self.guard.check(loss_d)
        self.opt_d.zero_grad(set_to_none=True)
        acc.backward(self.guard.marked(loss_d, skip_d, self.opt_d))
        if measure_grads:
            metrics["grad_norm_d"] = grad_norm(acc, self.opt_d, D.parameters())
        self.guard.step(self.opt_d, skip_d)

        if (step + 1) % self.critic_steps:
            self.guard.record(skip_d)
            return metrics

        # Generator update, against the discriminator just updated, reusing this step's fakes.
        loss_g = self.loss.generator(D(diff_augment(fake, self.augment), fake_labels))
        metrics["loss_g"] = loss_g.detach()
        if self.mode_seeking and real.shape[0] >= 2:
            penalty = mode_seeking_penalty(fake, z)
            metrics["mode_seeking"] = penalty.detach()
            loss_g = loss_g + self.mode_seeking * penalty
        skip_g = torch.maximum(skip_d, self.guard.check(loss_g))  # as before: no G update after a skipped D one
        self.guard.record(skip_g)
        self.opt_g.zero_grad(set_to_none=True)
        acc.backward(self.guard.marked(loss_g, skip_g, self.opt_g))
        if measure_grads:
            metrics["grad_norm_g"] = grad_norm(acc, self.opt_g, G.parameters())
        self.guard.step(self.opt_g, skip_g)
        if self.ema is not None:
            ema_step(self.ema, unwrapped.parameters(), skip_g)
        return metrics


@torch.no_grad()
def latent_interpolation(generator: CGANGenerator, num_classes: int, steps: int, seed: int) -> torch.Tensor:
    """One row per class: images along the line between two fixed latent codes."""
    gen = torch.Generator().manual_seed(seed)
    z0, z1 = (generator.sample_noise(1, gen, torch.device("cpu")) for _ in range(2))
    w = torch.linspace(0, 1, steps).view(-1, 1)
    z = ((1 - w) * z0 + w * z1).repeat(num_classes, 1).to(generator.device)
    labels = torch.arange(num_classes, device=generator.device).repeat_interleave(steps)
    return generator(z, labels)


@torch.no_grad()
def class_interpolation(generator: CGANGenerator, num_classes: int, steps: int, seed: int) -> torch.Tensor:
    """One row per class pair (k, k+1): fixed noise, label embedding moved from class k to k+1."""
    gen = torch.Generator().manual_seed(seed)
    z = generator.sample_noise(1, gen, torch.device("cpu")).to(generator.device)
    table = generator.label_emb.weight
    w = torch.linspace(0, 1, steps, device=generator.device).view(-1, 1)
    rows = [(1 - w) * table[k] + w * table[(k + 1) % num_classes] for k in range(num_classes)]
    embeddings = torch.cat(rows)
    return generator(z.expand(embeddings.shape[0], -1), label_embeddings=embeddings)


class CGAN:
    """The conditional GAN as a `trainer.FamilyTrainer`: G, D, their Adam optimizers, G's EMA, the step, the pipeline."""

    name = "cgan"
    grid_per_class = 10  # a 10x10 grid for 10 classes
    progress_keys = ("loss_d", "loss_g")
    sample_kwargs: dict = {}

    def __init__(self, run: Run):
        cfg, acc = run.cfg, run.accelerator
        channels, size = run.image_shape
        generator, discriminator = build_cgan(cfg, run.data.num_classes, channels, size)
        apply_speed_options(cfg, acc, generator, discriminator)
        opt_g, opt_d = make_optimizers(cfg, generator, discriminator, run.device, run.lr_scale)
        schedules = make_lr_schedules(cfg, (opt_g, opt_d), run.total_steps, acc.num_processes)
        (self.generator, self.discriminator, self.opt_g, self.opt_d,
         *self.lr_schedules) = acc.prepare(generator, discriminator, opt_g, opt_d, *schedules)
        self.model = acc.unwrap_model(self.generator)
        self.ema = make_ema(self.model, cfg.train.ema_decay, run.device, cfg.train.ema_start_step)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, acc)
        self.step = GANStep(accelerator=acc, generator=self.generator, discriminator=self.discriminator,
                            opt_g=self.opt_g, opt_d=self.opt_d, loss=gan_loss(cfg.loss.name),
                            gp_weight=cfg.loss.gp_weight, critic_steps=cfg.loss.critic_steps, guard=self.guard,
                            ema=self.ema, mode_seeking=cfg.loss.mode_seeking, augment=tuple(cfg.loss.diffaugment),
                            r1_gamma=cfg.loss.r1_gamma, r1_every=cfg.loss.r1_every)
        self.pipeline = CGANPipeline(model=self.model, class_names=run.data.class_names)
        self.run = run
        # Fixed noise for the grids, drawn from the run's seed (a generator of its own: no global draw).
        grid_size = run.data.num_classes * self.grid_per_class
        self.grid_noise = self.model.sample_noise(grid_size, torch.Generator().manual_seed(cfg.seed), torch.device("cpu"))
        self.statistics = self.measure_statistics if cfg.model.ema_bn_batches else None

    def measure_statistics(self) -> None:
        """G's BatchNorm statistics for the weights it holds (the EMA's): `model.ema_bn_batches` batches of 256,
        codes and labels drawn from the run's seed (labels as often as the training data has them), so the
        same weights always get the same statistics."""
        gen = torch.Generator().manual_seed(self.run.cfg.seed)
        labels = self.run.data.labels
        device = self.run.device

        def forward(_: int) -> None:
            z = self.model.sample_noise(256, gen, torch.device("cpu")).to(device)
            pick = torch.randint(len(labels), (256,), generator=gen).to(labels.device)
            # forward, not __call__: eager even under train.compile (no graph compiled for 8 one-off batches)
            self.model.forward(z, labels[pick].to(device))

        measure_batchnorm_statistics(self.model, forward, self.run.cfg.model.ema_bn_batches)

    def train_step(self, step: int, micro_batches: list, measure_grads: bool) -> dict[str, torch.Tensor]:
        [(real, labels)] = micro_batches  # one batch per step: the cGAN does not accumulate
        metrics = self.step(step, real, labels, measure_grads=measure_grads)
        for schedule in self.lr_schedules:
            schedule.step()
        return metrics

    def scalars(self) -> dict[str, float]:
        return {"lr_g": self.opt_g.param_groups[0]["lr"], "lr_d": self.opt_d.param_groups[0]["lr"]}

    def peak_rates(self) -> dict[str, float]:
        # the schedule's start (its base rate), whatever step a resumed run is at
        return {name: opt.param_groups[0].get("initial_lr", opt.param_groups[0]["lr"])
                for name, opt in (("lr_g", self.opt_g), ("lr_d", self.opt_d))}

    def checkpoint_extra(self) -> dict[str, torch.Tensor]:
        return {}

    def restore(self, extra: dict[str, torch.Tensor], checkpoint: Path) -> None:
        pass

    def grid_images(self, labels: torch.Tensor) -> torch.Tensor:
        return self.pipeline(labels, latents=self.grid_noise, output_type="pt").images

    def final_pictures(self, step: int) -> None:
        """Latent and class interpolations."""
        run, per_row = self.run, self.grid_per_class
        for name, fn in (("latent_interpolation", latent_interpolation), ("class_interpolation", class_interpolation)):
            images = (fn(self.model, run.data.num_classes, per_row, run.cfg.seed) / 2 + 0.5).clamp(0, 1)
            save_grid(run.accelerator, images, per_row, run.out / f"{name}.png", name, step)


HELP = """Train a conditional GAN ({archs} networks; {losses} losses).

    python train_cgan.py (or ccg-train-cgan) --config cgan/demo_cpu [section.key=value ...]
    accelerate launch train_cgan.py --config cgan/report_a train.mixed_precision=bf16
    python train_cgan.py --config ... --resume latest

Writes to `output_dir`: config.yaml, stats.jsonl, grids/ (one row per class, every epoch),
checkpoints/, and pipeline/ (a `CGANPipeline` for `from_pretrained`).
"""


def describe_run(cfg: dict) -> dict:
    model = cfg.get("model", {})
    return {"model": f"cGAN ({model.get('arch')})", "loss": cfg.get("loss", {}).get("name"),
            "emb": model.get("label_emb_dim")}


FAMILY = ModelFamily(
    name="cgan", summary="conditional GANs", config=CGANConfig, trainer=CGAN, pipeline=CGANPipeline,
    help=lambda: HELP.format(archs=", ".join(choices(CGANConfig, "model.arch")),
                             losses=", ".join(choices(CGANConfig, "loss.name"))),
    describe=lambda index: "a conditional GAN generator (one forward pass per batch)", report=describe_run,
    card_tag="gan", network="model",
    resume_may_change=("model.ema_bn_batches",),  # the EMA's statistics: measured at each export, not trained
)
