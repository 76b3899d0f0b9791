"""Sampling speed: images/s of the cGAN pipeline and of the diffusion pipeline per sampler, with and without guidance.

Speed does not depend on the weights, so by default the models are built (untrained) from the
recipes; pass exported pipelines to time those instead.

    python bench/sampling.py                                            # the CPU demo recipes
    python bench/sampling.py --ddpm-config configs/ddpm/report_a.yaml --batch 100
    python bench/sampling.py --cgan runs/demo/cgan/pipeline --ddpm runs/demo/ddpm/pipeline
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from common import machine_line

from pipelines import CGANPipeline, ClassConditionalDiffusionPipeline
from pipelines.config import CGANConfig, DDPMConfig, load_config
from pipelines.diffusion import build_noise_scheduler
from pipelines.evaluation import compile_sampler
from pipelines.gan import build_cgan
from pipelines.models.unet import build_unet

SHAPES = {"fashion_mnist": (1, 28), "cifar10": (3, 32), "synthetic": (1, 28)}


def cgan_pipeline(path, config) -> CGANPipeline:
    if path:
        return CGANPipeline.from_pretrained(path)
    cfg = load_config(CGANConfig, config)
    c, s = SHAPES[cfg.data.name]
    generator, _ = build_cgan(cfg, 10, c, cfg.data.pad_to or s)
    return CGANPipeline(model=generator.eval())


def ddpm_pipeline(path, config) -> ClassConditionalDiffusionPipeline:
    if path:
        return ClassConditionalDiffusionPipeline.from_pretrained(path)
    cfg = load_config(DDPMConfig, config)
    c, s = SHAPES[cfg.data.name]
    unet = build_unet(cfg.model, 10, c, cfg.data.pad_to or s, null_class=True).eval()
    return ClassConditionalDiffusionPipeline(unet=unet, scheduler=build_noise_scheduler(cfg.diffusion), image_size=s,
                                             num_classes=10)


def time_call(fn, images: int) -> dict:
    fn()  # warm-up (allocations, lazy init)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"images_per_s": images / seconds, "s_per_image": seconds / images, "peak_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cgan", help="exported cGAN pipeline (default: untrained, from --cgan-config)")
    p.add_argument("--ddpm", help="exported diffusion pipeline (default: untrained, from --ddpm-config)")
    p.add_argument("--cgan-config", default="configs/cgan/demo_cpu.yaml")
    p.add_argument("--ddpm-config", default="configs/ddpm/demo_cpu.yaml")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--skip-ddpm-full", action="store_true", help="skip the slow T-step ancestral sampler")
    p.add_argument("--compile", action="store_true",
                   help="also time each pipeline's default sampler with its network compiled as `eval.py --compile` "
                        "does it (CUDA graphs on a GPU)")
    p.add_argument("--json")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    labels = [i % 10 for i in range(args.batch)]
    rows = []

    gan = cgan_pipeline(args.cgan, args.cgan_config).to(device)
    gan.set_progress_bar_config(disable=True)
    rows.append({"model": "cgan", "sampler": "one forward pass", "steps": 1, "guidance": None,
                 **time_call(lambda: gan(labels, output_type="pt"), args.batch)})

    pipe = ddpm_pipeline(args.ddpm, args.ddpm_config).to(device)
    pipe.set_progress_bar_config(disable=True)
    T = pipe.scheduler.config.num_train_timesteps
    settings = [("ddpm", DDPMScheduler, T)] if not args.skip_ddpm_full else []
    settings += [("ddim", DDIMScheduler, n) for n in (50, 20, 10)] + [("dpmsolver++", DPMSolverMultistepScheduler, n)
                                                                       for n in (20, 10)]
    base, base_scheduler = pipe.scheduler.config, pipe.scheduler
    for name, cls, steps in settings:
        pipe.scheduler = cls.from_config(base)
        for w in (1.0, 2.0):
            rows.append({"model": "ddpm", "sampler": name, "steps": steps, "guidance": w,
                         **time_call(lambda: pipe(labels, num_inference_steps=steps, guidance_scale=w,
                                                  output_type="pt"), args.batch)})

    if args.compile:  # each pipeline's own default sampler, eager and then compiled as `eval.py --compile` does
        pipe.scheduler = base_scheduler
        default = f"{type(base_scheduler).__name__} default {pipe.config.default_steps}"
        for name, sampler, model in (("cgan", "one forward pass", gan), ("ddpm", default, pipe)):
            eager = time_call(lambda: model(labels, output_type="pt"), args.batch)
            mode, _ = compile_sampler(model)
            rows.append({"model": name, "sampler": f"{sampler}, eager", "steps": None, "guidance": None, **eager})
            rows.append({"model": name, "sampler": f"{sampler}, compiled {mode}", "steps": None, "guidance": None,
                         **time_call(lambda: model(labels, output_type="pt"), args.batch)})

    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(machine_line(f"batch {args.batch}"))
    print(f"{'model':6} {'sampler':16} {'steps':>5} {'guid.':>5} {'img/s':>9} {'s/img':>9} {'peak MiB':>9}")
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"{r['model']:6} {r['sampler']:16} {str(r['steps'] or '-'):>5} {str(r['guidance'] or '-'):>5} "
              f"{r['images_per_s']:>9.1f} {r['s_per_image']:>9.4f} {peak:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "batch": args.batch, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
