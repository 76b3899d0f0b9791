"""Training throughput of each trainer's real step next to its ceiling, on this machine.

OURS: the code path `train_*.py` runs, built by the same builders (`Run.build` and the family):
BatchLoader batches, accelerate, `GANStep` / `DiffusionStep` with the trainer's optimizers, EMA, the
non-finite guard. CEILING: the same model's bare forward + backward + optimizer step on one batch
already in memory, in a tight loop. Both run for the same number of timed steps after
warm-up; the table shows images/s and ours / ceiling.

    python bench/train_step.py                                   # the two CPU demo recipes
    python bench/train_step.py --cgan configs/cgan/report_a.yaml --ddpm configs/ddpm/report_a.yaml --steps 20
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState

from common import add_trainer_args, device_name, machine_line

from pipelines.config import CGANConfig, DDPMConfig, load_config
from pipelines.diffusion import DDPM
from pipelines.gan import CGAN
from pipelines.losses import gan_loss
from pipelines.run import Run, make_accelerator, uses_cuda_graphs


def graphed(cfg, run: Run, fn):
    """`fn` as the trainer runs it: with CUDA graphs (train.compile_mode), each step marked as a new one."""
    if not uses_cuda_graphs(cfg, run.device):
        return fn

    def step() -> None:
        torch.compiler.cudagraph_mark_step_begin()
        fn()

    return step


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


def build(family_type, config_cls, path: str, overrides: tuple):
    """The family exactly as `train_*.py` builds it (data on the device, accelerate, EMA, the guard)."""
    out = Path(tempfile.mkdtemp(prefix="bench-"))  # the run writes nothing there, but it needs an output_dir
    cfg = load_config(config_cls, path, [*overrides, "log.wandb=disabled", f"output_dir={out}"])
    AcceleratorState._reset_state(True)
    run = Run.build(cfg, make_accelerator(cfg, out), out)
    return cfg, run, family_type(run)


def batches(run: Run):
    epoch = 0
    while True:
        yield from run.loader.epoch(epoch)
        epoch += 1


def bench_cgan(path: str, steps: int, warmup: int, overrides: tuple = ()) -> dict:
    cfg, run, gan = build(CGAN, CGANConfig, path, overrides)
    it = batches(run)
    counter = iter(range(10**9))
    ours = timed(graphed(cfg, run, lambda: gan.train_step(next(counter), [next(it)], measure_grads=False)), steps,
                 warmup)

    # Ceiling: one fixed batch, plain PyTorch, the same losses and both updates.
    real, labels = next(it)
    loss = gan_loss(cfg.loss.name)
    gen, disc = gan.model, run.accelerator.unwrap_model(gan.discriminator)
    opt_g, opt_d = gan.opt_g, gan.opt_d

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

    ceiling = timed(graphed(cfg, run, bare), steps, warmup)
    return row("cgan", path, cfg.train.batch_size, steps, ours, ceiling)


def bench_ddpm(path: str, steps: int, warmup: int, overrides: tuple = ()) -> dict:
    cfg, run, ddpm = build(DDPM, DDPMConfig, path, overrides)
    it = batches(run)
    ours = timed(graphed(cfg, run, lambda: ddpm.train_step(0, [next(it)], measure_grads=False)), steps, warmup)

    # Ceiling: the same U-Net and optimizer on one fixed noised batch, plain PyTorch.
    x0, labels = next(it)
    model, opt = ddpm.model, ddpm.optimizer
    t = torch.randint(0, cfg.diffusion.num_train_timesteps, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    x_t = ddpm.noise_scheduler.add_noise(x0, noise, t)

    def bare() -> None:
        loss = F.mse_loss(model(x_t, t, class_labels=labels).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ceiling = timed(graphed(cfg, run, bare), steps, warmup)
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
    rows = [bench_cgan(args.cgan, args.steps, args.warmup, tuple(args.set)),
            bench_ddpm(args.ddpm, args.steps, args.warmup, tuple(args.set + args.ddpm_set))]
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
