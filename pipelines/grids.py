"""Sample grids: one row per class, written as PNG (and logged to W&B during training)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from .tracking import log_image


def class_grid_labels(num_classes: int, per_class: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Fixed grid labels: one row per class, `per_class` images in each row."""
    return torch.arange(num_classes, device=device).repeat_interleave(per_class)


def write_grid(images: torch.Tensor, nrow: int, path: Path) -> Path:
    """The one grid writer: `images` in [0, 1] (B, C, H, W), `nrow` per row, as a PNG."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.float().cpu(), str(path), nrow=nrow, padding=2, pad_value=1.0)
    return path


def save_grid(accelerator: Accelerator, images: torch.Tensor, nrow: int, path: Path, key: str, step: int,
              caption: str = "") -> None:
    """Save `images` in [0, 1] as a PNG grid and log it to W&B (main process only)."""
    if not accelerator.is_main_process:
        return
    write_grid(images, nrow, path)
    log_image(accelerator, key, path, step, caption)


def save_class_grid(images: torch.Tensor, labels: torch.Tensor, num_classes: int, path: Path,
                    per_class: int = 10) -> None:
    """uint8 samples with their `labels` as a grid: the first `per_class` of each class, one row per class."""
    rows = [images[labels == k][:per_class] for k in range(num_classes)]
    write_grid(torch.cat(rows).float() / 255, per_class, path)
