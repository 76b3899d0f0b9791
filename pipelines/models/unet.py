"""The conditional U-Net: diffusers' `UNet2DModel` with a class-embedding table, built from config."""

from __future__ import annotations

from diffusers import UNet2DModel

from ..config import ConfigError, UNetConfig


def build_unet(cfg: UNetConfig, num_classes: int, channels: int, sample_size: int, null_class: bool) -> UNet2DModel:
    """A `UNet2DModel` whose `class_labels` are 0..num_classes-1, plus `num_classes` as the guidance null class."""
    if cfg.channels is not None and cfg.channels != channels:
        raise ConfigError(f"model.channels={cfg.channels} but the data has {channels}-channel images")
    size = cfg.sample_size or sample_size
    if size != sample_size:
        raise ConfigError(f"model.sample_size={size} but the data gives {sample_size}x{sample_size} images "
                         "(set data.pad_to to pad them)")
    downsamples = len(cfg.block_out_channels) - 1
    if size % (2 ** downsamples):
        raise ConfigError(f"image size {size} cannot be halved {downsamples} times (model.block_out_channels has "
                         f"{len(cfg.block_out_channels)} levels): pad it (data.pad_to=32) or use fewer levels")
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)]
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout,
        attention_head_dim=min(8, cfg.block_out_channels[-1]),
        num_class_embeds=num_classes + 1 if null_class else num_classes,
    )
