"""Train a conditional GAN (report A / notes E architectures; BCE, WGAN-GP, LSGAN or hinge loss).

    python train_cgan.py --config configs/cgan/demo_cpu.yaml [section.key=value ...]
    accelerate launch train_cgan.py --config configs/cgan/report_a.yaml train.mixed_precision=bf16
    python train_cgan.py --config ... --resume latest

Writes to `output_dir`: config.yaml, stats.jsonl, grids/ (one row per class, every epoch),
checkpoints/, and pipeline/ (a `CGANPipeline` for `from_pretrained`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipelines.cli import run_cli
from pipelines.config import CGANConfig
from pipelines.evaluation import TrainingEvaluator
from pipelines.gan import GANStep, build_cgan, class_interpolation, latent_interpolation, make_optimizers
from pipelines.losses import gan_loss
from pipelines.pipeline_cgan import CGANPipeline
from pipelines.training import (
    NonFiniteGuard, Upkeep, apply_speed_options, class_grid_labels, ema_state, inference_mode, load_checkpoint,
    load_ema_state, make_accelerator, make_ema, prepare_run_dir, progress, resolve_resume, save_grid, save_pipeline,
    start_run, steps_from, training_batches,
)

GRID_PER_CLASS = 10  # report A's 10x10 grid


def train(cfg: CGANConfig, args: argparse.Namespace) -> Path:
    out = prepare_run_dir(cfg.output_dir, args.resume, args.overwrite)
    accelerator = make_accelerator(cfg, out)
    device = accelerator.device

    # Data: decoded once, kept as uint8 on the device, sharded by process.
    loader = training_batches(cfg, accelerator)
    data = loader.data
    channels, size, _ = loader.image_shape

    # Models, optimizers, EMA.
    generator, discriminator = build_cgan(cfg, data.num_classes, channels, size)
    apply_speed_options(cfg, generator, discriminator)
    opt_g, opt_d = make_optimizers(cfg, generator, discriminator, device)
    generator, discriminator, opt_g, opt_d = accelerator.prepare(generator, discriminator, opt_g, opt_d)
    ema = make_ema(accelerator.unwrap_model(generator), cfg.train.ema_decay, device)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    step_fn = GANStep(accelerator, generator, discriminator, opt_g, opt_d, gan_loss(cfg.loss.name),
                      cfg.loss.gp_weight, cfg.loss.critic_steps, guard, ema, mode_seeking=cfg.loss.mode_seeking)

    # Resume: one integer (the step) plus the saved state.
    step = 0
    checkpoint = resolve_resume(out, args.resume)
    if checkpoint is not None:
        step, extra = load_checkpoint(accelerator, checkpoint)
        if ema is not None:
            load_ema_state(ema, extra)
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    steps_per_epoch = len(loader)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    # Fixed noise for the per-epoch grids, drawn from the run's seed.
    unwrapped = accelerator.unwrap_model(generator)
    grid_labels = class_grid_labels(data.num_classes, GRID_PER_CLASS, device)
    grid_noise = unwrapped.sample_noise(len(grid_labels), torch.Generator().manual_seed(cfg.seed), torch.device("cpu"))
    pipeline = CGANPipeline(model=unwrapped, class_names=data.class_names)

    def sample(labels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        with inference_mode(unwrapped, ema):
            return pipeline(labels, latents=noise, output_type="pt").images

    def draw_grid(name: str, at_step: int) -> None:
        if accelerator.is_main_process:
            save_grid(accelerator, sample(grid_labels, grid_noise), GRID_PER_CLASS, out / "grids" / f"{name}.png",
                      "samples", at_step, name)

    def export(path: Path) -> None:
        with inference_mode(unwrapped, ema):
            save_pipeline(pipeline, path)

    evaluator = None
    if cfg.eval.every_epochs and accelerator.is_main_process:
        evaluator = TrainingEvaluator(accelerator, cfg, out, pipeline, lambda: inference_mode(unwrapped, ema))
    upkeep = Upkeep(accelerator, cfg, out, steps_per_epoch, total_steps, lambda: ema_state(ema) if ema else None,
                    draw_grid, evaluator, export)
    start_run(accelerator, cfg, out)  # set-up passed: only now does the run write config.yaml and open W&B
    bar = progress(accelerator, total_steps, step, "cgan")
    for _, [(real, labels)] in steps_from(loader, step, total_steps):
        metrics = step_fn(step, real, labels, measure_grads=(step + 1) % cfg.log.every_steps == 0)
        step += 1
        bar.update(1)
        record = upkeep.after_step(step, metrics, lr_g=opt_g.param_groups[0]["lr"],
                                   lr_d=opt_d.param_groups[0]["lr"], nonfinite_skipped=guard.total)
        if record:
            bar.set_postfix(loss_d=f"{record['loss_d']:.3f}", loss_g=f"{record.get('loss_g', float('nan')):.3f}")
    bar.close()

    # Final grids, interpolations (notes E) and the exported pipeline, all from the EMA weights if any.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        draw_grid("final", step)
        with inference_mode(unwrapped, ema):
            for name, fn in (("latent_interpolation", latent_interpolation), ("class_interpolation", class_interpolation)):
                images = (fn(unwrapped, data.num_classes, GRID_PER_CLASS, cfg.seed) / 2 + 0.5).clamp(0, 1)
                save_grid(accelerator, images, GRID_PER_CLASS, out / f"{name}.png", name, step)
        export(out / "pipeline")
        accelerator.print(f"done: {step} steps; pipeline in {out / 'pipeline'}; grids in {out / 'grids'}")
    accelerator.end_training()
    return out


if __name__ == "__main__":
    sys.exit(run_cli(CGANConfig, train, __doc__))
