"""Train a class-conditional diffusion model (diffusers UNet2DModel + DDPMScheduler) with classifier-free guidance.

    python train_ddpm.py --config configs/ddpm/demo_cpu.yaml [section.key=value ...]
    accelerate launch train_ddpm.py --config configs/ddpm/report_c_cifar10.yaml train.mixed_precision=bf16
    python train_ddpm.py --config ... --resume latest

Writes to `output_dir`: config.yaml, stats.jsonl, grids/ (DDIM samples, one row per class),
checkpoints/, pictures (schedule, loss curve, denoising strip, samples), and pipeline/ (a
`ClassConditionalDiffusionPipeline` with the EMA weights, loadable with stock diffusers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import DDIMScheduler

import pipelines.pipeline_ddpm as pipeline_module
from pipelines.cli import run_cli
from pipelines.config import ConfigError, DDPMConfig
from pipelines.evaluation import TrainingEvaluator
from pipelines.diffusion import DiffusionStep, build_lr_schedule, build_noise_scheduler
from pipelines.models.unet import build_unet
from pipelines.pipeline_ddpm import ClassConditionalDiffusionPipeline
from pipelines.plots import denoising_strip, plot_losses, plot_schedule
from pipelines.training import (
    NonFiniteGuard, Upkeep, apply_speed_options, class_grid_labels, ema_state, generator_state, inference_mode,
    load_checkpoint, load_ema_state, load_generator_state, log_image, make_accelerator, make_ema, prepare_run_dir,
    progress, resolve_resume, save_grid, save_pipeline, start_run, steps_from, training_batches,
)

GRID_PER_CLASS = 8


def train(cfg: DDPMConfig, args: argparse.Namespace) -> Path:
    out = prepare_run_dir(cfg.output_dir, args.resume, args.overwrite)
    accelerator = make_accelerator(cfg, out)
    device = accelerator.device

    # Data: decoded once, kept as uint8 on the device, sharded by process.
    loader = training_batches(cfg, accelerator)
    data = loader.data
    channels, size, _ = loader.image_shape
    accumulation = cfg.train.gradient_accumulation_steps
    steps_per_epoch = len(loader) // accumulation
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    if cfg.log.showcase_class >= data.num_classes:
        raise ConfigError(f"log.showcase_class={cfg.log.showcase_class}: the data has {data.num_classes} classes "
                          f"(valid: 0..{data.num_classes - 1})")

    # Model, noise schedule, optimizer, LR schedule, EMA.
    guidance = cfg.diffusion.label_dropout > 0
    unet = build_unet(cfg.model, data.num_classes, channels, size, null_class=guidance)
    apply_speed_options(cfg, unet)
    noise_scheduler = build_noise_scheduler(cfg.diffusion)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay, **fused)
    lr_schedule = build_lr_schedule(optimizer, cfg.optim, total_steps, accelerator.num_processes)
    unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)
    unwrapped = accelerator.unwrap_model(unet)
    ema = make_ema(unwrapped, cfg.train.ema_decay, device)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    # One generator for the training noise, seeded alike on every process (see DiffusionStep).
    noise_rng = torch.Generator(device).manual_seed(cfg.seed)
    step_fn = DiffusionStep(accelerator, unet, optimizer, lr_schedule, noise_scheduler, cfg.diffusion,
                            data.num_classes, cfg.optim.max_grad_norm, guard, noise_rng, ema)

    # Resume: one integer (the step) plus the saved state.
    step = 0
    checkpoint = resolve_resume(out, args.resume)
    if checkpoint is not None:
        step, extra = load_checkpoint(accelerator, checkpoint)
        if ema is not None:
            load_ema_state(ema, extra)
        load_generator_state(noise_rng, extra, checkpoint)
        accelerator.print(f"resumed from {checkpoint} at step {step}")

    # The one sampling path: the exported pipeline (DDIM by default) draws every grid.
    pipeline = ClassConditionalDiffusionPipeline(
        unet=unwrapped, scheduler=DDIMScheduler.from_config(noise_scheduler.config),
        class_names=data.class_names, image_size=data.image_size, num_classes=data.num_classes,
        default_steps=cfg.diffusion.sample_steps, default_guidance=cfg.diffusion.sample_guidance if guidance else 1.0,
        default_guidance_interval=cfg.diffusion.sample_guidance_interval)
    pipeline.set_progress_bar_config(disable=True)
    grid_labels = class_grid_labels(data.num_classes, GRID_PER_CLASS)
    sample_kwargs = dict(num_inference_steps=cfg.diffusion.sample_steps,
                         guidance_scale=cfg.diffusion.sample_guidance if guidance else 1.0)

    def sample(labels: torch.Tensor, seed: int) -> torch.Tensor:
        with inference_mode(unwrapped, ema):
            return pipeline(labels, generator=torch.Generator(device).manual_seed(seed), output_type="pt",
                            **sample_kwargs).images

    def draw_grid(name: str, at_step: int) -> None:
        if accelerator.is_main_process:
            save_grid(accelerator, sample(grid_labels, cfg.seed), GRID_PER_CLASS, out / "grids" / f"{name}.png",
                      "samples", at_step, name)

    # Exports carry the pipeline's own source, so stock diffusers can load them (trust_remote_code).
    extra_files = {"pipeline.py": Path(pipeline_module.__file__)}

    def export(path: Path) -> None:
        with inference_mode(unwrapped, ema):
            save_pipeline(pipeline, path, extra_files=extra_files)

    evaluator = None
    if cfg.eval.every_epochs and accelerator.is_main_process:
        evaluator = TrainingEvaluator(accelerator, cfg, out, pipeline, lambda: inference_mode(unwrapped, ema),
                                      sample_kwargs, extra_files=extra_files)
    upkeep = Upkeep(accelerator, cfg, out, steps_per_epoch, total_steps,
                    lambda: {**(ema_state(ema) if ema else {}), **generator_state(noise_rng)}, draw_grid, evaluator,
                    export)
    start_run(accelerator, cfg, out)  # set-up passed: only now does the run write config.yaml and open W&B
    bar = progress(accelerator, total_steps, step, "ddpm")
    for _, micro_batches in steps_from(loader, step, total_steps, accumulation):
        for x0, labels in micro_batches:
            metrics = step_fn(x0, labels)
        step += 1
        bar.update(1)
        record = upkeep.after_step(step, metrics, lr=lr_schedule.get_last_lr()[0], nonfinite_skipped=guard.total)
        if record:
            bar.set_postfix(loss=f"{record['loss']:.4f}")
    bar.close()

    # Pictures and the exported pipeline, from the EMA weights.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pictures = {
            "noise_schedule": plot_schedule(noise_scheduler, out / "noise_schedule.png"),
            "loss_curve": plot_losses(out / "stats.jsonl", ["loss"], out / "loss_curve.png"),
        }
        for name, path in pictures.items():
            log_image(accelerator, name, path, step)
        draw_grid("final", step)
        save_grid(accelerator, sample(torch.arange(data.num_classes), cfg.seed + 1), data.num_classes,
                  out / "one_per_class.png", "one_per_class", step)
        showcase = cfg.log.showcase_class
        save_grid(accelerator, sample(torch.full((64,), showcase), cfg.seed + 2), 8,
                  out / f"class_{showcase}_samples.png", "one_class", step, data.class_names[showcase])
        with inference_mode(unwrapped, ema):
            strip = denoising_strip(pipeline, data.num_classes, cfg.diffusion.sample_steps, 6, cfg.seed,
                                    guidance_scale=sample_kwargs["guidance_scale"])
            save_grid(accelerator, strip, 6, out / "denoising_strip.png", "denoising_strip", step)
        export(out / "pipeline")
        accelerator.print(f"done: {step} steps; pipeline in {out / 'pipeline'}; grids in {out / 'grids'}")
    accelerator.end_training()
    return out


if __name__ == "__main__":
    sys.exit(run_cli(DDPMConfig, train, __doc__))
