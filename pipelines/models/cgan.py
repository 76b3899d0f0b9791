"""Conditional DCGAN-style networks: up-sampling by ConvTranspose2d (`transposed_conv`, configs/cgan/report_a.yaml)
or by nearest Upsample + Conv2d (`upsample_conv`, configs/cgan/notes_e.yaml).

The generator is a diffusers `ModelMixin` + `ConfigMixin`, so it saves and loads with
`save_pretrained` / `from_pretrained` (safetensors) and travels inside `CGANPipeline`.
The discriminator returns raw logits; each loss applies what it needs.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.nn.utils import spectral_norm

ARCHS = ("transposed_conv", "upsample_conv")
OLD_ARCH_NAMES = {"report_a": "transposed_conv", "notes_e": "upsample_conv"}  # exports made before the rename


def _check(arch: str, image_size: int) -> int:
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: valid choices are {', '.join(ARCHS)}")
    if image_size % 4:
        raise ValueError(f"image_size={image_size}: the cGANs up-sample twice, so it must be a multiple of 4 (28, 32)")
    return image_size // 4


class CGANGenerator(ModelMixin, ConfigMixin):
    """G(z, y): latent noise and a class label to an image in [-1, 1]."""

    @register_to_config
    def __init__(self, arch: str = "transposed_conv", num_classes: int = 10, latent_dim: int = 100,
                 label_emb_dim: int = 50, base_channels: int = 64, bn_momentum: float = 0.1,
                 bn_eps: float = 1e-5, image_size: int = 28, channels: int = 1, noise: str = "normal"):
        super().__init__()
        if arch in OLD_ARCH_NAMES:  # an old export: same network, saved again under the current name
            arch = OLD_ARCH_NAMES[arch]
            self.register_to_config(arch=arch)
        s = _check(arch, image_size)
        if noise not in ("normal", "uniform"):
            raise ValueError(f"noise={noise!r}: valid choices are normal, uniform")
        wide, narrow = 2 * base_channels, base_channels
        self.label_emb = nn.Embedding(num_classes, label_emb_dim)
        bn = dict(momentum=bn_momentum, eps=bn_eps)
        if arch == "transposed_conv":
            self.fc = nn.Sequential(nn.Linear(latent_dim + label_emb_dim, wide * s * s),
                                    nn.BatchNorm1d(wide * s * s, **bn), nn.LeakyReLU(0.2))
            self.net = nn.Sequential(
                nn.ConvTranspose2d(wide, narrow, 4, 2, 1), nn.BatchNorm2d(narrow, **bn), nn.LeakyReLU(0.2),
                nn.ConvTranspose2d(narrow, channels, 4, 2, 1), nn.Tanh(),
            )
        else:
            self.fc = nn.Sequential(nn.Linear(latent_dim + label_emb_dim, wide * s * s), nn.ReLU())
            self.net = nn.Sequential(
                nn.BatchNorm2d(wide, **bn), nn.Upsample(scale_factor=2), nn.Conv2d(wide, narrow, 3, 1, 1),
                nn.BatchNorm2d(narrow, **bn), nn.ReLU(), nn.Upsample(scale_factor=2),
                nn.Conv2d(narrow, channels, 3, 1, 1), nn.Tanh(),
            )
        self.start = (wide, s, s)

    def sample_noise(self, batch_size: int, generator: Union[None, torch.Generator, List[torch.Generator]] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
        """Latent codes from the configured distribution (normal, or uniform in [-1, 1]).

        With a list of generators (one per code), each code is what its generator draws alone.
        """
        device = device or self.device
        shape = (batch_size, self.config.latent_dim)
        if isinstance(generator, list) and self.config.noise == "uniform":
            if len(generator) != batch_size:
                raise ValueError(f"{len(generator)} generators for {batch_size} codes: give one per code")
            return torch.cat([torch.rand((1, shape[1]), generator=g, device=g.device).to(device)
                              for g in generator]) * 2 - 1
        if self.config.noise == "uniform":
            return torch.rand(shape, generator=generator, device=generator.device if generator else device).to(device) * 2 - 1
        return randn_tensor(shape, generator=generator, device=device)

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None,
                label_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images for labels, or for label embeddings given directly (class interpolation)."""
        if label_embeddings is None:
            label_embeddings = self.label_emb(labels)
        h = self.fc(torch.cat([z, label_embeddings], dim=1))
        return self.net(h.view(-1, *self.start))


def class_feature_std(h: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 1): for each sample, the mean over features of the std of its class's features in the batch.

    Unbiased per-class variance, all classes at once with one-hot matrix products (no Python loop);
    a class with one sample in the batch has spread 0.
    """
    onehot = nn.functional.one_hot(labels, num_classes).to(h.dtype)  # (B, K)
    counts = onehot.sum(0).unsqueeze(1)  # (K, 1)
    mean = onehot.t() @ h / counts.clamp(min=1)
    var = onehot.t() @ (h - mean[labels]).square() / (counts - 1).clamp(min=1)
    return (var + 1e-8).sqrt().mean(dim=1)[labels].unsqueeze(1)


class CGANDiscriminator(nn.Module):
    """D(x, y) -> one logit per image.

    `conditioning="label_map"`: the label becomes an extra image channel (transposed_conv: Embedding ->
    Linear -> HxW map; upsample_conv: Embedding(K, 1) broadcast over HxW).
    `conditioning="projection"` (Miyato & Koyama, 2018) adds <embed(y), features> to the logit.
    `norm="spectral"` replaces BatchNorm by spectral normalisation of every layer.
    `class_std=True` gives the head one more input: the spread of the batch's features within each
    sample's class (ProGAN's minibatch standard deviation, taken per class). A generator that draws
    every sample of a class alike shows a smaller spread than real batches do, so D can punish it.
    """

    def __init__(self, arch: str = "transposed_conv", num_classes: int = 10, label_emb_dim: int = 50,
                 base_channels: int = 64, bn_momentum: float = 0.1, bn_eps: float = 1e-5, image_size: int = 28,
                 channels: int = 1, norm: str = "batch", conditioning: str = "label_map", class_std: bool = False):
        super().__init__()
        arch = OLD_ARCH_NAMES.get(arch, arch)
        s = _check(arch, image_size)
        if norm not in ("batch", "spectral"):
            raise ValueError(f"norm={norm!r}: valid choices are batch, spectral")
        if conditioning not in ("label_map", "projection"):
            raise ValueError(f"conditioning={conditioning!r}: valid choices are label_map, projection")
        sn = spectral_norm if norm == "spectral" else (lambda m: m)
        self.arch, self.conditioning, self.image_size = arch, conditioning, image_size
        self.num_classes, self.class_std = num_classes, class_std
        in_channels = channels
        if conditioning == "label_map":
            in_channels += 1
            if arch == "transposed_conv":
                self.label_map = nn.Sequential(nn.Embedding(num_classes, label_emb_dim),
                                               nn.Linear(label_emb_dim, image_size * image_size))
            else:
                self.label_map = nn.Embedding(num_classes, 1)
        wide, narrow = 2 * base_channels, base_channels
        self.features = nn.Sequential(
            sn(nn.Conv2d(in_channels, narrow, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(narrow, wide, 4, 2, 1)),
            nn.BatchNorm2d(wide, momentum=bn_momentum, eps=bn_eps) if norm == "batch" else nn.Identity(),
            nn.LeakyReLU(0.2), nn.Flatten(),
        )
        self.head = sn(nn.Linear(wide * s * s + int(class_std), 1))
        if conditioning == "projection":
            self.projection = sn(nn.Embedding(num_classes, wide * s * s))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.conditioning == "label_map":
            size = self.image_size
            label_map = self.label_map(labels).view(-1, 1, *(1, 1) if self.arch == "upsample_conv" else (size, size))
            x = torch.cat([x, label_map.expand(-1, 1, size, size).to(x.dtype)], dim=1)
        h = self.features(x)
        head_input = torch.cat([h, class_feature_std(h, labels, self.num_classes)], dim=1) if self.class_std else h
        logits = self.head(head_input).squeeze(1)
        if self.conditioning == "projection":
            logits = logits + (self.projection(labels) * h).sum(dim=1)
        return logits
