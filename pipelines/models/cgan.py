"""Conditional GAN networks: the seeds' DCGAN-style pair, up-sampling by ConvTranspose2d (`transposed_conv`,
configs/cgan/report_a.yaml) or by nearest Upsample + Conv2d (`upsample_conv`, configs/cgan/notes_e.yaml), and a
residual pair (`resnet`, the SNGAN / BigGAN family: class-conditional BatchNorm in G, a projection D of residual
blocks, configs/cgan/fmnist_resnet.yaml).

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
from torch.nn.utils.parametrizations import spectral_norm

ARCHS = ("transposed_conv", "upsample_conv", "resnet")
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
                 bn_eps: float = 1e-5, image_size: int = 28, channels: int = 1, noise: str = "normal",
                 hierarchical_z: bool = False):
        super().__init__()
        if arch in OLD_ARCH_NAMES:  # an old export: same network, saved again under the current name
            arch = OLD_ARCH_NAMES[arch]
            self.register_to_config(arch=arch)
        s = _check(arch, image_size)
        if noise not in ("normal", "uniform"):
            raise ValueError(f"noise={noise!r}: valid choices are normal, uniform")
        if hierarchical_z and arch != "resnet":
            raise ValueError(f"hierarchical_z feeds z to the conditional BatchNorms of arch=resnet; "
                             f"arch={arch!r} has none")
        if hierarchical_z and latent_dim < 3:
            raise ValueError(f"hierarchical_z splits z into 3 chunks (the input and each block): "
                             f"latent_dim={latent_dim} must be at least 3")
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
        elif arch == "resnet":
            # hierarchical_z (BigGAN's skip-z): one chunk of z to the input, one to each block's conditional
            # BatchNorms beside the class embedding, so the noise sets scales and shifts at every resolution
            # instead of only the first layer's input, which a class-driven generator learns to ignore.
            chunk = latent_dim // 3 if hierarchical_z else 0
            self.z_split = [latent_dim - 2 * chunk, chunk, chunk]
            self.fc = nn.Linear(self.z_split[0] + label_emb_dim, wide * s * s)
            self.blocks = nn.ModuleList([GeneratorBlock(wide, wide, label_emb_dim + chunk, **bn),
                                         GeneratorBlock(wide, narrow, label_emb_dim + chunk, **bn)])
            self.net = nn.Sequential(nn.BatchNorm2d(narrow, **bn), nn.ReLU(), nn.Conv2d(narrow, channels, 3, 1, 1),
                                     nn.Tanh())
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
        if self.config.arch != "resnet":
            return self.net(self.fc(torch.cat([z, label_embeddings], dim=1)).view(-1, *self.start))
        z_input, *z_blocks = torch.split(z, self.z_split, dim=1)
        h = self.fc(torch.cat([z_input, label_embeddings], dim=1)).view(-1, *self.start)
        for block, z_block in zip(self.blocks, z_blocks):
            h = block(h, torch.cat([label_embeddings, z_block], dim=1) if z_block.shape[1] else label_embeddings)
        return self.net(h)


class ConditionalBatchNorm(nn.Module):
    """BatchNorm whose scale and shift come from the class embedding (BigGAN's shared-embedding form):
    gain 1 + W_g e, bias W_b e, so a fresh layer is plain BatchNorm."""

    def __init__(self, channels: int, emb_dim: int, momentum: float, eps: float):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False, momentum=momentum, eps=eps)
        self.gain, self.bias = nn.Linear(emb_dim, channels, bias=False), nn.Linear(emb_dim, channels, bias=False)
        nn.init.zeros_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        gain, bias = (1 + self.gain(emb)).view(-1, x.shape[1], 1, 1), self.bias(emb).view(-1, x.shape[1], 1, 1)
        return self.bn(x) * gain.to(x.dtype) + bias.to(x.dtype)


class GeneratorBlock(nn.Module):
    """cBN-ReLU-up-conv3-cBN-ReLU-conv3, plus a nearest-up 1x1-conv shortcut: doubles the resolution."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, momentum: float, eps: float):
        super().__init__()
        self.bn1, self.bn2 = (ConditionalBatchNorm(c, emb_dim, momentum, eps) for c in (in_ch, out_ch))
        self.conv1, self.conv2 = nn.Conv2d(in_ch, out_ch, 3, 1, 1), nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate
        h = self.conv1(up(nn.functional.relu(self.bn1(x, emb)), scale_factor=2))
        h = self.conv2(nn.functional.relu(self.bn2(h, emb)))
        return h + self.shortcut(up(x, scale_factor=2))


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
    `arch="resnet"`: residual blocks summed over positions, spectral norm and projection only.
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
        if arch == "resnet" and (norm, conditioning) != ("spectral", "projection"):
            raise ValueError(f"arch=resnet has a spectral-norm projection discriminator only: got norm={norm!r}, "
                             f"conditioning={conditioning!r} (use norm='spectral', conditioning='projection')")
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
        if arch == "resnet":
            # Residual blocks down to s x s, ReLU and a sum over positions (SNGAN's D): one feature vector of
            # `wide` values per image, so the head and the projection stay small.
            self.features = nn.Sequential(
                DiscriminatorBlock(in_channels, narrow, down=True, first=True),
                DiscriminatorBlock(narrow, wide, down=True), DiscriminatorBlock(wide, wide), nn.ReLU(), SumPool())
            num_features = wide
        else:
            self.features = self._dcgan_features(in_channels, narrow, wide, bn_momentum, bn_eps, norm, sn)
            num_features = wide * s * s
        self.head = sn(nn.Linear(num_features + int(class_std), 1))
        if conditioning == "projection":
            self.projection = sn(nn.Embedding(num_classes, num_features))

    @staticmethod
    def _dcgan_features(in_channels: int, narrow: int, wide: int, bn_momentum: float, bn_eps: float, norm: str,
                        sn) -> nn.Sequential:
        return nn.Sequential(
            sn(nn.Conv2d(in_channels, narrow, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(narrow, wide, 4, 2, 1)),
            nn.BatchNorm2d(wide, momentum=bn_momentum, eps=bn_eps) if norm == "batch" else nn.Identity(),
            nn.LeakyReLU(0.2), nn.Flatten(),
        )

    # Spectral norm is the parametrization form (torch.compile can trace it; the old hook form updates its
    # power-iteration vector in place and breaks the compiled backward). Checkpoints written with the hook
    # form load: the same tensors under the old names.
    OLD_SPECTRAL_KEYS = {"weight_orig": "parametrizations.weight.original", "weight_u": "parametrizations.weight.0._u",
                         "weight_v": "parametrizations.weight.0._v"}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            head, _, last = key.rpartition(".")
            if last in self.OLD_SPECTRAL_KEYS:
                state_dict[f"{head}.{self.OLD_SPECTRAL_KEYS[last]}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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


class DiscriminatorBlock(nn.Module):
    """ReLU-conv3-ReLU-conv3 (+ 2x2 average pool), spectrally normalised, with a 1x1-conv shortcut.

    The first block skips the leading ReLU (its input is the image), as in SNGAN's "optimized" block. The
    shortcut pools before its 1x1 conv: both are linear, so the order does not change the function, and the
    conv then runs on a quarter of the positions."""

    def __init__(self, in_ch: int, out_ch: int, down: bool = False, first: bool = False):
        super().__init__()
        self.down, self.first = down, first
        self.conv1 = spectral_norm(nn.Conv2d(in_ch, out_ch, 3, 1, 1))
        self.conv2 = spectral_norm(nn.Conv2d(out_ch, out_ch, 3, 1, 1))
        self.shortcut = spectral_norm(nn.Conv2d(in_ch, out_ch, 1)) if in_ch != out_ch or down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu, pool = nn.functional.relu, nn.functional.avg_pool2d
        h = self.conv2(relu(self.conv1(x if self.first else relu(x))))
        skip = x
        if self.down:
            h, skip = pool(h, 2), pool(x, 2)
        return h + (skip if self.shortcut is None else self.shortcut(skip))


class SumPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=(2, 3))
