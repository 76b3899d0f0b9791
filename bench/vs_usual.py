"""Our U-Net training against the usual approach: the same model, data, batch and optimizer.

OURS: the path `train_ddpm.py` runs: `BatchLoader` batches of device-resident uint8 tensors,
`DiffusionStep` (accelerate, gradient clipping, LR schedule, foreach EMA, label dropout,
non-finite guard, decided on the device: no host sync per step).
USUAL: a loop in the style of diffusers' `examples/unconditional_image_generation/train_unconditional.py`:
a `DataLoader(shuffle=True)` over the `datasets` set with per-sample torchvision transforms
(`set_transform`), `accelerator.accumulate`, `accelerator.clip_grad_norm_`, the example's
`EMAModel` (warm-up decay, per-parameter update) and `loss.detach().item()` logged every step.
The only change to the example is the class label passed to the U-Net, so both train the same
conditional model.

Both run the same number of timed steps after warm-up, on real Fashion-MNIST.

    python bench/vs_usual.py [--config configs/ddpm/demo_cpu.yaml] [--steps 30] [--workers 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader

from common import device_name, machine_line
from data import usual_transform
from train_step import bench_ddpm, timed

from pipelines.config import DDPMConfig, load_config
from pipelines.data import load_hf_dataset
from pipelines.diffusion import build_lr_schedule, build_noise_scheduler
from pipelines.models.unet import build_unet


def bench_usual(path: str, steps: int, warmup: int, workers: int) -> float:
    """Seconds for `steps` steps of the example-style loop."""
    cfg = load_config(DDPMConfig, path)
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    torch.manual_seed(cfg.seed)
    dataset = load_hf_dataset(cfg.data)
    dataset.set_transform(usual_transform(cfg.data.pad_to))
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, num_workers=workers, drop_last=True)
    size = cfg.data.pad_to or 28
    model = build_unet(cfg.model, 10, 1, size, null_class=cfg.diffusion.label_dropout > 0)
    noise_scheduler = build_noise_scheduler(cfg.diffusion)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    lr_scheduler = build_lr_schedule(optimizer, cfg.optim, 10**6, 1)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=cfg.train.ema_decay or 0.9999,
                   use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    ema.to(accelerator.device)
    batches = iter(loader)
    logs = []

    def step() -> None:
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        clean_images, labels = batch["pixel_values"], batch["labels"]
        noise = torch.randn_like(clean_images)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],),
                                  device=clean_images.device).long()
        noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        with accelerator.accumulate(model):
            model_output = model(noisy_images, timesteps, class_labels=labels).sample
            loss = F.mse_loss(model_output.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema.step(accelerator.unwrap_model(model).parameters())
        logs.append({"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "ema_decay": ema.cur_decay_value})

    return timed(step, steps, warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ddpm/demo_cpu.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the usual loop")
    p.add_argument("--json")
    args = p.parse_args()
    usual = bench_usual(args.config, args.steps, args.warmup, args.workers)
    ours = bench_ddpm(args.config, args.steps, args.warmup)
    batch = ours["batch"]
    device = device_name()
    result = {"config": args.config, "batch": batch, "steps": args.steps, "workers": args.workers, "device": device,
              "ours_img_s": ours["ours_img_s"], "usual_img_s": batch * args.steps / usual,
              "ceiling_img_s": ours["ceiling_img_s"]}
    result["ours_over_usual"] = result["ours_img_s"] / result["usual_img_s"]
    print(machine_line())
    print(f"{'config':32} {'batch':>5} {'usual img/s':>12} {'ours img/s':>11} {'bare img/s':>11} {'ours/usual':>10}")
    print(f"{args.config:32} {batch:>5} {result['usual_img_s']:>12.1f} {result['ours_img_s']:>11.1f} "
          f"{result['ceiling_img_s']:>11.1f} {result['ours_over_usual']:>10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
