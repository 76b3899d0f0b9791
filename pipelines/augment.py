"""DiffAugment (Zhao et al., 2020): random, differentiable transforms of every image the discriminator sees.

D then judges real and fake images through the same random transforms, so on a small data set it cannot
simply memorise the real images, and G still gets gradients through them (each is a differentiable
function of its input). Whole-batch tensor operations, on the device, from the global RNG (seeded by
accelerate, saved in checkpoints): no per-image Python work, no host sync.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")


def _rand(x: torch.Tensor, *shape: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    return torch.rand(x.shape[0], *shape, device=x.device, dtype=x.dtype, generator=generator)


def color(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Brightness +-0.5, saturation x[0, 2], contrast x[0.5, 1.5], per image (images in [-1, 1]).

    Saturation leaves a one-channel image as it is (it has no colour to scale)."""
    x = x + (_rand(x, 1, 1, 1, generator=generator) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(x, 1, 1, 1, generator=generator) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, 1, 1, 1, generator=generator) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Shift each image by up to `ratio` of its size in each direction, filling with zeros (mid-grey)."""
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    shift_y = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device, generator=generator)
    shift_x = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device, generator=generator)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + shift_y + 1  # +1: the zero padding's offset
    cols = torch.arange(w, device=x.device).view(1, 1, w) + shift_x + 1
    rows, cols = rows.clamp(0, h + 1).expand(b, h, w), cols.clamp(0, w + 1).expand(b, h, w)
    padded = F.pad(x, [1, 1, 1, 1])  # every out-of-range index lands on the padding
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, ratio: float = 0.5, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Zero one square of `ratio` x the image size per image, at a random place (it may overhang the edge)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device, generator=generator) - ch // 2
    left = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device, generator=generator) - cw // 2
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


TRANSFORMS: dict[str, Callable[..., torch.Tensor]] = {"color": color, "translation": translation, "cutout": cutout}


def check_policy(policy: Sequence[str]) -> None:
    bad = [p for p in policy if p not in TRANSFORMS]
    if bad or len(set(policy)) != len(policy):
        raise ValueError(f"DiffAugment policy {list(policy)}: each of {', '.join(POLICIES)} at most once")


def diff_augment(x: torch.Tensor, policy: Sequence[str], generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The policy's transforms in the paper's order (colour, translation, cutout); an empty policy is identity."""
    for name in POLICIES:
        if name in policy:
            x = TRANSFORMS[name](x, generator=generator)
    return x
