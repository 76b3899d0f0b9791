"""What every benchmark prints first: the date, the machine and the device."""

from __future__ import annotations

import datetime
import platform

import torch


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"


def machine_line(extra: str = "") -> str:
    return (f"{datetime.datetime.now().isoformat(timespec='seconds')}  {platform.platform()}  "
            f"torch {torch.__version__}  {device_name()}  {extra}").rstrip()


def add_trainer_args(parser) -> None:
    """The configs and step counts shared by the training-step benchmarks."""
    parser.add_argument("--cgan", default="configs/cgan/demo_cpu.yaml")
    parser.add_argument("--ddpm", default="configs/ddpm/demo_cpu.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
