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

from pipelines.cli import run_cli
from pipelines.config import DDPMConfig
from pipelines.diffusion import DDPM
from pipelines.trainer import fit


def train(cfg: DDPMConfig, args: argparse.Namespace) -> Path:
    """Set up the run, resume, train with logs, grids, evaluation and checkpoints, then export (`trainer.fit`)."""
    return fit(DDPM, cfg, args)


if __name__ == "__main__":
    sys.exit(run_cli(DDPMConfig, train, __doc__))
