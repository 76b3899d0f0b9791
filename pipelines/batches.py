"""The training split as shuffled, sharded batches of float images in [-1, 1] on the device."""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .data_sources import DataError
from .decoding import ImageTensors


def to_model_range(images: torch.Tensor, pad_to: Optional[int] = None) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (torchvision's ToDtype(scale=True) + Normalize(0.5, 0.5)), padded with -1."""
    x = images.float() / 127.5 - 1.0  # out of place: a float input must not be modified
    if pad_to is not None and pad_to != x.shape[-1]:
        total = pad_to - x.shape[-1]
        if total < 0:
            raise DataError(f"data.pad_to={pad_to} is smaller than the images ({x.shape[-1]}px)")
        x = F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2), value=-1.0)
    return x


class BatchLoader:
    """Shuffled batches from in-memory uint8 images, with no per-sample Python work.

    Every process draws the same global permutation from (seed, epoch) and takes its own slice of
    each global batch, so N processes with batch B see exactly what one process with batch N*B
    would, and resuming at (epoch, step) reproduces the rest of the order.

    Batches arrive on `device`. The images live there too, or with `on_device=False` in host memory:
    then each batch is cut on the host and moved as uint8 (a quarter of float32's bytes), from pinned
    memory without blocking on CUDA, and only then converted, padded and flipped on `device`.
    """

    def __init__(self, data: ImageTensors, batch_size: int, seed: int, *, process_index: int = 0,
                 num_processes: int = 1, pad_to: Optional[int] = None, hflip: bool = False,
                 device: torch.device | str = "cpu", on_device: bool = True):
        self.device = torch.device(device)
        self.data = data.to(self.device if on_device else "cpu")
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.pad_to = pad_to
        self.hflip = hflip
        # Page-locked staging lets the host-to-device copy run asynchronously; only CUDA has it.
        self.pin = self.data.images.device.type == "cpu" and self.device.type == "cuda"
        global_batch = batch_size * num_processes
        self.steps_per_epoch = len(data) // global_batch  # drop the ragged end: every step sees a full batch
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(data)} images are fewer than one global batch ({batch_size} x {num_processes} processes)")

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.pad_to or self.data.image_size
        return (self.data.channels, size, size)

    def _to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if self.pin:
            tensors = tuple(t.pin_memory() for t in tensors)
        return [t.to(self.device, non_blocking=True) for t in tensors]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `(images in [-1, 1], labels)` of `epoch` on `device`, starting at `start_step` (for resume)."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.data), generator=gen)
        flips = torch.rand(len(self.data), generator=gen) < 0.5 if self.hflip else None
        storage = self.data.images.device  # the order and flips index where the images are
        order = order.to(storage)
        flips = flips.to(storage) if flips is not None else None
        global_batch = self.batch_size * self.num_processes
        for step in range(start_step, self.steps_per_epoch):
            lo = step * global_batch + self.process_index * self.batch_size
            idx = order[lo: lo + self.batch_size]
            batch = [self.data.images[idx], self.data.labels[idx]] + ([flips[idx]] if flips is not None else [])
            if storage != self.device:
                batch = self._to_device(*batch)
            images, labels, *flip = batch
            x = to_model_range(images, self.pad_to)
            if flip:
                x = torch.where(flip[0].view(-1, 1, 1, 1), x.flip(-1), x)
            yield x, labels
