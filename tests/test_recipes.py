"""Every shipped recipe in configs/ loads, validates and builds its model."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import CGANConfig, DDPMConfig, load_config
from pipelines.gan import build_cgan
from pipelines.models.unet import build_unet

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPES = {"fashion_mnist": (1, 28), "cifar10": (3, 32), "synthetic": (1, 28)}


@pytest.mark.parametrize("path", sorted((CONFIGS / "cgan").glob("*.yaml")), ids=lambda p: p.stem)
def test_cgan_recipe_builds(path):
    cfg = load_config(CGANConfig, path)
    channels, size = SHAPES[cfg.data.name]
    generator, discriminator = build_cgan(cfg, len(cfg.data.classes or range(10)), channels, cfg.data.pad_to or size)
    assert generator.config.latent_dim == cfg.model.latent_dim


@pytest.mark.parametrize("path", sorted((CONFIGS / "ddpm").glob("*.yaml")), ids=lambda p: p.stem)
def test_ddpm_recipe_builds(path):
    cfg = load_config(DDPMConfig, path)
    channels, size = SHAPES[cfg.data.name]
    classes = len(cfg.data.classes or range(10))
    unet = build_unet(cfg.model, classes, channels, cfg.data.pad_to or size, null_class=cfg.diffusion.label_dropout > 0)
    assert unet.config.num_class_embeds == classes + (cfg.diffusion.label_dropout > 0)


def test_seed_recipes_match_the_reports():
    a = load_config(CGANConfig, CONFIGS / "cgan" / "report_a.yaml")
    assert (a.model.latent_dim, a.model.label_emb_dim, a.train.batch_size, a.loss.name) == (100, 50, 32, "bce")
    b = load_config(CGANConfig, CONFIGS / "cgan" / "report_b_wgan_gp_emb32.yaml")
    assert (b.model.latent_dim, b.model.label_emb_dim, b.train.batch_size, b.loss.name) == (200, 32, 64, "wgan_gp")
    d = load_config(DDPMConfig, CONFIGS / "ddpm" / "report_a.yaml")
    assert d.diffusion.num_train_timesteps == 300
    c = load_config(DDPMConfig, CONFIGS / "ddpm" / "report_c_cifar10.yaml")
    assert (c.diffusion.beta_schedule, c.optim.schedule) == ("squaredcos_cap_v2", "onecycle")
    assert c.train.ema_decay is not None and c.optim.max_grad_norm is not None
