"""Pictures for reports and W&B: noise schedules, loss curves, denoising strips, sample grids."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_schedule(noise_scheduler, path: Path) -> Path:
    """beta_t and alpha-bar_t over t."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(noise_scheduler.betas.cpu().numpy())
    axes[0].set(title="beta_t", xlabel="t")
    axes[1].plot(noise_scheduler.alphas_cumprod.cpu().numpy())
    axes[1].set(title="alpha-bar_t", xlabel="t")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_losses(records: list[dict], keys: list[str], path: Path) -> Path:
    """Curves of the logged `keys` over steps, from a run's records (`tracking.read_stats`)."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set(xlabel="step", title="training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def denoising_strip(pipeline, num_classes: int, steps: int, columns: int, seed: int, **call_kwargs) -> torch.Tensor:
    """For each class (a row), the sample at `columns` evenly spaced steps of the reverse process, x_T to x_0."""
    # A list, not a set: with fewer steps than columns a step repeats, so every row still has `columns`
    # frames and the caller's grid (nrow=columns) keeps one class per row.
    keep = torch.linspace(0, steps - 1, columns).round().long().tolist()
    frames: dict[int, torch.Tensor] = {}
    size = pipeline.config.image_size or pipeline.unet.config.sample_size

    def grab(i: int, t: torch.Tensor, sample: torch.Tensor) -> None:
        if i in keep:
            frames[i] = _crop(sample, size).float().cpu()

    pipeline(list(range(num_classes)), num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
             output_type="pt", callback=grab, **call_kwargs)
    strip = torch.stack([frames[i] for i in keep], dim=1).flatten(0, 1)  # class-major: row k holds class k's frames
    return (strip / 2 + 0.5).clamp(0, 1)


def _crop(sample: torch.Tensor, size: int) -> torch.Tensor:
    top = (sample.shape[-2] - size) // 2
    left = (sample.shape[-1] - size) // 2
    return sample[..., top: top + size, left: left + size]
