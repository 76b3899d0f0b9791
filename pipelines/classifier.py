"""A small dataset-specific classifier: its accuracy checks samples, its features feed a dataset FID.

Inception features know nothing about 28x28 clothing, so a CNN trained on the dataset itself gives a
more telling Fréchet distance (and a classifier accuracy on generated samples). The model is a
diffusers `ModelMixin` + `ConfigMixin`, so it saves and loads with `save_pretrained` /
`from_pretrained` (safetensors) next to a `classifier_info.json` that records how well it does.

The classifier sees images at their native size (28x28 Fashion-MNIST, 32x32 CIFAR-10), whatever
`data.pad_to` says: samples of a model trained on padded images must be centre-cropped back first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from torch import nn

from .config import DataConfig
from .data import BatchLoader, ImageTensors, load_tensors, to_model_range

INFO_FILE = "classifier_info.json"
# Mirror images are still of the same class here; the synthetic classes are coded by position.
HFLIP_DATASETS = ("fashion_mnist", "cifar10")


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    # No conv bias: the BatchNorm right after it has its own.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DatasetClassifier(ModelMixin, ConfigMixin):
    """Three conv blocks with max-pooling (size/8), flatten, Linear to `feature_dim`, dropout, Linear to logits.

    Input: images in [-1, 1], (B, channels, image_size, image_size).
    """

    @register_to_config
    def __init__(self, channels: int = 1, image_size: int = 28, num_classes: int = 10, width: int = 32,
                 feature_dim: int = 64, dropout: float = 0.3):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image_size={image_size}: the classifier pools three times, so it needs at least 8")
        s = image_size // 8
        self.body = nn.Sequential(
            _conv_block(channels, width), nn.MaxPool2d(2),
            _conv_block(width, 2 * width), nn.MaxPool2d(2),
            _conv_block(2 * width, 4 * width), nn.MaxPool2d(2),
            nn.Flatten(),
            # Flatten keeps where things are (a collar vs a sleeve), which global pooling would throw away.
            nn.Linear(4 * width * s * s, feature_dim), nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim), after the ReLU: the dataset-FID features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.body(x))


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `pad` pixels (pad with -1, the background, then crop), all in one gather."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, b), generator=generator)).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


@torch.no_grad()
def accuracy_on(model: DatasetClassifier, data: ImageTensors, batch_size: int = 1000) -> tuple[float, list[float]]:
    """Top-1 accuracy and per-class accuracy of `model` on `data` (eval mode, no grad, batched)."""
    model.eval()
    preds = []
    for i in range(0, len(data), batch_size):
        x = to_model_range(data.images[i: i + batch_size].to(model.device))
        preds.append(model(x).argmax(1).cpu())
    correct = (torch.cat(preds) == data.labels).float()
    per_class = [correct[data.labels == k].mean().item() if (data.labels == k).any() else float("nan")
                 for k in range(data.num_classes)]
    return correct.mean().item(), per_class


def train_classifier(data_cfg: DataConfig, epochs: int = 8, batch_size: int = 128, lr: float = 5e-3, seed: int = 0,
                     width: int = 32, feature_dim: int = 64, device: str = "cpu", log=print,
                     crop_pad: int = 0) -> tuple[DatasetClassifier, dict]:
    """Train a `DatasetClassifier` on the train split of `data_cfg` and measure it on the test split.

    AdamW with a OneCycle schedule. Augmentation: horizontal flips where a mirror image keeps its
    class, and random shifts of up to `crop_pad` pixels if asked (off by default: on Fashion-MNIST in
    8 epochs, 2px shifts cost ~1 point of test accuracy, 1px ~0.2; they may pay off on longer runs).
    The defaults reach ~93% on Fashion-MNIST in ~2.5 min on 2 CPU cores. The same seed gives the
    same weights (on one device). Returns the model in eval mode and an info dict.
    """
    torch.manual_seed(seed)
    train = load_tensors(dataclasses.replace(data_cfg, split="train"))
    test = load_tensors(dataclasses.replace(data_cfg, split="test"))
    model = DatasetClassifier(channels=train.channels, image_size=train.image_size, num_classes=train.num_classes,
                              width=width, feature_dim=feature_dim).to(device)
    hflip = data_cfg.hflip or data_cfg.name in HFLIP_DATASETS  # flips where a mirror image keeps its class
    loader = BatchLoader(train, min(batch_size, len(train)), seed, hflip=hflip, device=device)  # a small set: one batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loader))
    crop_gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total = torch.zeros((), device=device)  # summed on the device: one host sync per epoch
        for x, y in loader.epoch(epoch):
            if crop_pad:
                x = random_crop(x, crop_pad, crop_gen)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.detach()
        elapsed = time.perf_counter() - start
        eta = elapsed / (epoch + 1) * (epochs - epoch - 1)
        log(f"classifier epoch {epoch + 1}/{epochs}: train loss {total.item() / len(loader):.4f} "
            f"({elapsed:.0f}s, ETA {timedelta(seconds=round(eta))})")
    train_seconds = time.perf_counter() - start
    accuracy, per_class = accuracy_on(model, test)
    log(f"classifier test accuracy {accuracy:.4f} on {len(test)} images")
    info = {
        "test_accuracy": accuracy, "per_class_accuracy": per_class, "dataset": data_cfg.name,
        "data_path": data_cfg.path, "data_source": train.source, "classes": data_cfg.classes,
        "class_names": train.class_names, "image_size": train.image_size, "channels": train.channels, "hflip": hflip,
        "train_images": len(train), "test_images": len(test), "epochs": epochs, "seed": seed,
        "batch_size": batch_size, "lr": lr, "crop_pad": crop_pad, "train_seconds": train_seconds,
    }
    return model.eval(), info


def save_classifier(model: DatasetClassifier, info: dict, path: str | os.PathLike) -> None:
    """Write the weights (safetensors + config.json) and `classifier_info.json` to the folder `path`.

    Written to a temporary sibling folder first and moved into place, so a crash never leaves a
    half-written classifier where `load_classifier` would pick it up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.with_name(f".{path.name}.tmp-{os.getpid()}"), path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if path.exists():  # os.replace cannot overwrite a non-empty folder: move the old one aside first
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_classifier(path: str | os.PathLike) -> tuple[DatasetClassifier, dict]:
    """The classifier saved at `path` (eval mode) and its info dict; FileNotFoundError if it is not there."""
    path = Path(path)
    name = path.name if path.name in ("fashion_mnist", "cifar10", "synthetic") else "<name>"
    for needed in (path, path / "config.json", path / SAFETENSORS_WEIGHTS_NAME, path / INFO_FILE):
        if not needed.exists():
            raise FileNotFoundError(f"no trained classifier at {path} ({needed} is missing); train one with "
                                    f"`python eval.py train-classifier --data {name}`")
    model = DatasetClassifier.from_pretrained(path)
    info = json.loads((path / INFO_FILE).read_text())
    return model.eval(), info
