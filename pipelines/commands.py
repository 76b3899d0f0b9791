"""The user commands. `pip install` puts them on the PATH; `python -m pipelines COMMAND` and the
top-level scripts (`train_cgan.py`, `train_ddpm.py`, `eval.py`) run the same functions.

    ccg-train-cgan  ccg-train-ddpm  ccg-eval  ccg-generate  ccg-sweep  ccg-publish  ccg-recipes
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Callable, Optional

TRAIN_CGAN = """Train a conditional GAN ({archs} networks; {losses} losses).

    python train_cgan.py (or ccg-train-cgan) --config cgan/demo_cpu [section.key=value ...]
    accelerate launch train_cgan.py --config cgan/report_a train.mixed_precision=bf16
    python train_cgan.py --config ... --resume latest

Writes to `output_dir`: config.yaml, stats.jsonl, grids/ (one row per class, every epoch),
checkpoints/, and pipeline/ (a `CGANPipeline` for `from_pretrained`).
"""

TRAIN_DDPM = """Train a class-conditional diffusion model (diffusers UNet2DModel + DDPMScheduler) with classifier-free guidance
({predictions} prediction; {samplers} samplers).

    python train_ddpm.py (or ccg-train-ddpm) --config ddpm/demo_cpu [section.key=value ...]
    accelerate launch train_ddpm.py --config ddpm/report_c_cifar10 train.mixed_precision=bf16
    python train_ddpm.py --config ... --resume latest

Writes to `output_dir`: config.yaml, stats.jsonl, grids/ (DDIM samples, one row per class),
checkpoints/, pictures (schedule, loss curve, denoising strip, samples), and pipeline/ (a
`ClassConditionalDiffusionPipeline` with the EMA weights, loadable with stock diffusers).
"""


def train_cgan(argv: Optional[list[str]] = None) -> int:
    from .cli import run_cli
    from .config import CGANConfig
    from .config_help import choices
    from .gan import CGAN
    from .trainer import fit

    doc = TRAIN_CGAN.format(archs=", ".join(choices(CGANConfig, "model.arch")),
                            losses=", ".join(choices(CGANConfig, "loss.name")))
    return run_cli(CGANConfig, partial(fit, CGAN), doc, argv)


def train_ddpm(argv: Optional[list[str]] = None) -> int:
    from .cli import run_cli
    from .config import DDPMConfig
    from .config_help import choices
    from .diffusion import DDPM
    from .trainer import fit

    doc = TRAIN_DDPM.format(predictions=", ".join(choices(DDPMConfig, "diffusion.prediction_type")),
                            samplers=", ".join(choices(DDPMConfig, "diffusion.sample_scheduler")))
    return run_cli(DDPMConfig, partial(fit, DDPM), doc, argv)


def evaluate(argv: Optional[list[str]] = None) -> int:
    from .eval_cli import main

    return main(argv)


def generate(argv: Optional[list[str]] = None) -> int:
    from .generate import main

    return main(argv)


def publish(argv: Optional[list[str]] = None) -> int:
    from .publish import main

    return main(argv)


def recipes(argv: Optional[list[str]] = None) -> int:
    from .recipes import main

    return main(argv)


def sweep(argv: Optional[list[str]] = None) -> int:
    from .sweep import main

    return main(argv)


COMMANDS: dict[str, Callable[[Optional[list[str]]], int]] = {
    "train-cgan": train_cgan, "train-ddpm": train_ddpm, "eval": evaluate, "generate": generate, "sweep": sweep,
    "publish": publish, "recipes": recipes,
}


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m pipelines COMMAND [ARGS]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m pipelines {{{','.join(COMMANDS)}}} [ARGS ...]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
