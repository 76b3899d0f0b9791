"""A split decoded once into uint8 tensors kept in memory (`ImageTensors`): converted to grayscale or RGB and,
with `data.image_size`, resized and centre-cropped, so that no training step touches a file or a PIL image."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .config import DataConfig
from .console import Progress
from .data_sources import IDX_FILES, DataError, find_idx, idx_class_names, idx_source, load_hf_dataset, read_idx_split
from .provenance import dataset_source


@dataclass
class ImageTensors:
    """A whole split in memory: `images` uint8 (N, C, H, W), `labels` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    source: dict = field(default_factory=dict)  # where the images came from (`data_identity`), for config.yaml

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def to(self, device: torch.device | str) -> "ImageTensors":
        return ImageTensors(self.images.to(device), self.labels.to(device), self.class_names, self.source)


GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F")  # PIL modes with one colour channel


def _pixels(image, size: Optional[int], channels: Optional[int]) -> np.ndarray:
    """One decoded PIL image as uint8 (H, W) or (H, W, 3): grayscale or RGB (alpha dropped, palettes expanded),
    resized so its shorter side is `size` and centre-cropped to a square (`ImageOps.fit`, bicubic)."""
    from PIL import Image, ImageOps

    mode = {1: "L", 3: "RGB"}.get(channels) or ("L" if image.mode in GRAYSCALE_MODES else "RGB")
    if image.mode.startswith("I;16"):  # 16-bit grey: PIL's convert("L") clips at 255; scale the range instead
        image = Image.fromarray((np.asarray(image, np.uint32) * 255 + 32767) // 65535).convert("L")
    if image.mode != mode:
        image = image.convert(mode)
    if size is not None and image.size != (size, size):
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def dataset_to_tensors(ds, image_size: Optional[int] = None, channels: Optional[int] = None,
                       batch_size: int = 2000) -> ImageTensors:
    """Decode every image once into one uint8 (N, C, H, W) tensor.

    `channels` None keeps grayscale sets grayscale and makes a set RGB if any of its images is in colour
    (grey images replicated, as PIL's L -> RGB does). Without `image_size` the images must already be
    one square size.
    """
    class_names = list(ds.features["label"].names)
    pixels, labels = [], []
    # Every process decodes its own copy; the first one says how far it is.
    with Progress("decoding", len(ds), show=os.environ.get("RANK", "0") == "0") as shown:
        for batch in ds.iter(batch_size=batch_size):  # the Image feature decodes to PIL here
            pixels.extend(_pixels(image, image_size, channels) for image in batch["image"])
            labels.extend(batch["label"])
            shown.update(len(batch["label"]))
    if not pixels:
        raise DataError("the dataset is empty")
    shapes = {p.shape[:2] for p in pixels}
    if len(shapes) > 1:
        examples = ", ".join(f"{w}x{h}" for h, w in sorted(shapes)[:3])
        raise DataError(f"images differ in size ({examples}, ...): set data.image_size=N to resize and centre-crop "
                        "them to NxN when they are decoded")
    (height, width), = shapes
    if height != width:
        raise DataError(f"images are {width}x{height}, not square: set data.image_size=N to resize and centre-crop "
                        "them to NxN when they are decoded")
    if any(p.ndim == 3 for p in pixels):
        pixels = [np.repeat(p[..., None], 3, axis=2) if p.ndim == 2 else p for p in pixels]
        images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
    else:
        images = torch.from_numpy(np.stack(pixels))[:, None]
    return ImageTensors(images, torch.tensor(labels, dtype=torch.int64), class_names)


def select_classes(data: ImageTensors, classes: list[int]) -> ImageTensors:
    """Keep only `classes`, relabelled 0..k-1 in the given order; the class names follow."""
    bad = [c for c in classes if not 0 <= c < data.num_classes]
    if bad:
        raise DataError(f"data.classes contains {bad}; valid class ids are 0..{data.num_classes - 1} "
                        f"({', '.join(f'{i}={n}' for i, n in enumerate(data.class_names))})")
    lookup = torch.full((data.num_classes,), -1, dtype=torch.int64)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    new_labels = lookup[data.labels]
    keep = new_labels >= 0
    return ImageTensors(data.images[keep], new_labels[keep], [data.class_names[c] for c in classes], data.source)


def load_tensors(cfg: DataConfig, split: Optional[str] = None) -> ImageTensors:
    """The configured split, class subset and limit applied, as uint8 tensors on the CPU."""
    split = split or cfg.split
    idx = idx_source(cfg)
    if idx is not None and cfg.image_size in (None, 28) and cfg.channels in (None, 1):
        # The IDX bytes are the pixels: skip the PNG encode/decode round trip of an Image column
        # (lossless, so the result equals dataset_to_tensors(load_hf_dataset(cfg)); ~0.2 s instead of ~10 s).
        images, labels = read_idx_split(idx, split)
        data = ImageTensors(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)),
                            idx_class_names(cfg))
        data.source = {"path": str(idx.resolve()), "files": [f.name for f in (find_idx(idx, stem) for stem in
                                                                              IDX_FILES[split])]}
    else:
        ds = load_hf_dataset(cfg, split)
        data = dataset_to_tensors(ds, cfg.image_size, cfg.channels)
        data.source = dataset_source(cfg, ds)
    data.source.update(split=split, images=len(data))
    if cfg.classes is not None:
        data = select_classes(data, cfg.classes)
    if cfg.limit is not None:
        data = ImageTensors(data.images[: cfg.limit], data.labels[: cfg.limit], data.class_names, data.source)
    return data
