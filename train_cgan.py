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

from pipelines.cli import run_cli
from pipelines.config import CGANConfig
from pipelines.gan import CGAN
from pipelines.trainer import fit


def train(cfg: CGANConfig, args: argparse.Namespace) -> Path:
    """Set up the run, resume, train with logs, grids, evaluation and checkpoints, then export (`trainer.fit`)."""
    return fit(CGAN, cfg, args)


if __name__ == "__main__":
    sys.exit(run_cli(CGANConfig, train, __doc__))
