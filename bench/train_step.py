"""Training throughput of each trainer's real step next to its ceiling, on this machine.

OURS: the code path `train_*.py` runs (BatchLoader batches, accelerate, `GANStep` / `DiffusionStep`,
EMA, the non-finite guard). CEILING: the same model's bare forward + backward + optimizer step on
one batch already in memory, in a tight loop. Both run for the same number of timed steps after
warm-up; the table shows images/s and ours / ceiling.

    python bench/train_step.py                                   # the two CPU demo recipes
    python bench/train_step.py --cgan configs/cgan/report_a.yaml --ddpm configs/ddpm/report_a.yaml --steps 20
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from common import add_trainer_args, device_name, machine_line

from pipelines.config import CGANConfig, DDPMConfig, load_config
from pipelines.data import BatchLoader, load_tensors
from pipelines.diffusion import DiffusionStep, build_lr_schedule, build_noise_scheduler
from pipelines.gan import GANStep, build_cgan, make_optimizers
from pipelines.losses import gan_loss
from pipelines.models.unet import build_unet
from pipelines.training import NonFiniteGuard, apply_speed_options, make_ema


def timed(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def loader_for(cfg, accelerator) -> BatchLoader:
    data = load_tensors(cfg.data)
    return BatchLoader(data, cfg.train.batch_size, cfg.seed, pad_to=cfg.data.pad_to, hflip=cfg.data.hflip,
                       device=accelerator.device)


def batches(loader: BatchLoader):
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def bench_cgan(path: str, steps: int, warmup: int, overrides: tuple = ()) -> dict:
    cfg = load_config(CGANConfig, path, list(overrides))
    AcceleratorState._reset_state(True)
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision)
    loader = loader_for(cfg, acc)
    c, s, _ = loader.image_shape
    g, d = build_cgan(cfg, loader.data.num_classes, c, s)
    apply_speed_options(cfg, g, d)
    opt_g, opt_d = make_optimizers(cfg, g, d, acc.device)
    g, d, opt_g, opt_d = acc.prepare(g, d, opt_g, opt_d)
    ema = make_ema(acc.unwrap_model(g), cfg.train.ema_decay, acc.device)
    step_fn = GANStep(acc, g, d, opt_g, opt_d, gan_loss(cfg.loss.name), cfg.loss.gp_weight, cfg.loss.critic_steps,
                      NonFiniteGuard(10), ema, mode_seeking=cfg.loss.mode_seeking)
    it = batches(loader)
    counter = iter(range(10**9))
    ours = timed(lambda: step_fn(next(counter), *next(it)), steps, warmup)

    # Ceiling: one fixed batch, plain PyTorch, the same losses and both updates.
    real, labels = next(it)
    loss = gan_loss(cfg.loss.name)
    gen, disc = acc.unwrap_model(g), acc.unwrap_model(d)

    def bare() -> None:
        fake = gen(torch.randn(real.shape[0], cfg.model.latent_dim, device=real.device), labels)
        loss_d = loss.discriminator(disc(real, labels), disc(fake.detach(), labels))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = loss.generator(disc(fake, labels))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

    ceiling = timed(bare, steps, warmup)
    return row("cgan", path, cfg.train.batch_size, steps, ours, ceiling)


def bench_ddpm(path: str, steps: int, warmup: int, overrides: tuple = ()) -> dict:
    cfg = load_config(DDPMConfig, path, list(overrides))
    AcceleratorState._reset_state(True)
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision)
    loader = loader_for(cfg, acc)
    c, s, _ = loader.image_shape
    unet = build_unet(cfg.model, loader.data.num_classes, c, s, null_class=cfg.diffusion.label_dropout > 0)
    apply_speed_options(cfg, unet)
    noise_scheduler = build_noise_scheduler(cfg.diffusion)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.optim.lr)
    sched = build_lr_schedule(opt, cfg.optim, 10**6, 1)
    unet, opt, sched = acc.prepare(unet, opt, sched)
    ema = make_ema(acc.unwrap_model(unet), cfg.train.ema_decay, acc.device)
    step_fn = DiffusionStep(acc, unet, opt, sched, noise_scheduler, cfg.diffusion, loader.data.num_classes,
                            cfg.optim.max_grad_norm, NonFiniteGuard(10), torch.Generator(acc.device).manual_seed(0),
                            ema)
    it = batches(loader)
    ours = timed(lambda: step_fn(*next(it)), steps, warmup)

    x0, labels = next(it)
    model = acc.unwrap_model(unet)
    t = torch.randint(0, cfg.diffusion.num_train_timesteps, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    x_t = noise_scheduler.add_noise(x0, noise, t)

    def bare() -> None:
        loss = F.mse_loss(model(x_t, t, class_labels=labels).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ceiling = timed(bare, steps, warmup)
    return row("ddpm", path, cfg.train.batch_size, steps, ours, ceiling)


def row(name: str, path: str, batch: int, steps: int, ours: float, ceiling: float) -> dict:
    return {"trainer": name, "config": path, "batch": batch, "steps": steps,
            "ours_s_per_step": ours / steps, "ceiling_s_per_step": ceiling / steps,
            "ours_img_s": batch * steps / ours, "ceiling_img_s": batch * steps / ceiling, "ratio": ceiling / ours}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trainer_args(p)
    p.add_argument("--set", nargs="*", default=[], metavar="section.key=value",
                   help="config overrides for both, e.g. train.compile=true train.channels_last=true")
    p.add_argument("--ddpm-set", nargs="*", default=[], metavar="section.key=value",
                   help="overrides for the diffusion model alone, e.g. train.mixed_precision=bf16")
    p.add_argument("--json")
    args = p.parse_args()
    rows = [bench_cgan(args.cgan, args.steps, args.warmup, args.set),
            bench_ddpm(args.ddpm, args.steps, args.warmup, args.set + args.ddpm_set)]
    device = device_name()
    print(machine_line(" ".join(args.set + [f"(ddpm: {' '.join(args.ddpm_set)})"] * bool(args.ddpm_set))))
    print(f"{'trainer':8} {'config':32} {'batch':>5} {'ours s/step':>12} {'bare s/step':>12} {'ours img/s':>11} "
          f"{'bare img/s':>11} {'ours/bare':>9}")
    for r in rows:
        print(f"{r['trainer']:8} {r['config']:32} {r['batch']:>5} {r['ours_s_per_step']:>12.4f} "
              f"{r['ceiling_s_per_step']:>12.4f} {r['ours_img_s']:>11.1f} {r['ceiling_img_s']:>11.1f} {r['ratio']:>9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
