"""Every shipped recipe in configs/ loads, validates and builds its model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.config import CGANConfig, DDPMConfig, load_config
from pipelines.gan import build_cgan
from pipelines.models.unet import build_unet

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHAPES = {"fashion_mnist": (1, 28), "cifar10": (3, 32), "synthetic": (1, 28)}


@pytest.mark.parametrize("path", sorted((CONFIGS / "cgan").glob("*.yaml")), ids=lambda p: p.stem)
def test_cgan_recipe_builds(path):
    cfg = load_config(CGANConfig, path)
    channels, size = SHAPES[cfg.data.name]
    classes = len(cfg.data.classes or range(10))
    size = cfg.data.pad_to or size
    generator, discriminator = build_cgan(cfg, classes, channels, size)
    generator.eval()
    labels = torch.arange(2) % classes
    images = generator(generator.sample_noise(2, torch.Generator().manual_seed(0)), labels)
    assert images.shape == (2, channels, size, size)  # the data's images, whatever the architecture
    assert discriminator(images, labels).shape == (2,)
    with pytest.raises((IndexError, RuntimeError)):  # one label per class of the recipe's data, no more
        generator(generator.sample_noise(1), torch.tensor([classes]))


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


# ---------------------------------------------------------------- CIFAR-10 recipes, 2 steps on Hub-schema data

CIFAR10_RECIPES = sorted(p for family in ("cgan", "ddpm") for p in (CONFIGS / family).glob("*.yaml")
                         if "name: cifar10" in p.read_text())


@pytest.fixture(scope="module")
def cifar10_copy(tmp_path_factory):
    """A local copy in the Hub's CIFAR-10 layout and schema (plain_text/*.parquet, `img` Image, `label` ClassLabel):
    4 train and 2 test images per class."""
    from test_own_data import CIFAR10_NAMES, write_parquet_repo

    root = tmp_path_factory.mktemp("cifar10")
    write_parquet_repo(root, label_names=CIFAR10_NAMES, splits=(("train", 40), ("test", 20)))
    return root


@pytest.mark.slow  # 5 minutes each on 2 cores (cgan/cifar10_resnet: 313 s): CI's whole suite runs them
@pytest.mark.parametrize("path", [pytest.param(p, id=f"{p.parent.name}/{p.stem}") for p in CIFAR10_RECIPES])
def test_cifar10_recipe_starts_and_finishes_two_steps(path, cifar10_copy, tmp_path, monkeypatch):
    """The recipe as shipped, on data of CIFAR-10's schema: the data loads, a classifier is made for its
    in-training evaluation (none ships for CIFAR-10), two steps train, the evaluation, pictures and export follow.
    Only sizes change: a batch that makes an epoch two steps, two samples per class, two sampling steps."""
    import subprocess
    import sys

    import yaml

    cfg = load_config(CGANConfig if path.parent.name == "cgan" else DDPMConfig, path)
    images = 4 * len(cfg.data.classes or range(10))
    out = tmp_path / "run"
    overrides = [f"data.path={cifar10_copy}", f"train.batch_size={images // 2}", "train.max_steps=2",
                 "eval.num_per_class=2", f"output_dir={out}", "log.wandb=disabled"]
    if cfg.eval.every_epochs is not None:
        overrides.append("eval.every_epochs=1")
    if path.parent.name == "ddpm":
        overrides.append("diffusion.sample_steps=2")
    script = ROOT / f"train_{path.parent.name}.py"
    cache = cifar10_copy.parent / "cache"
    env = dict(__import__("os").environ, XDG_CACHE_HOME=str(cache))
    cached = any(cache.rglob("classifier_info.json"))  # an earlier recipe here trained it: reused, not retrained
    result = subprocess.run([sys.executable, str(script), "--config", str(path), *overrides], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert (out / "pipeline" / "model_index.json").is_file()
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2
    if cfg.eval.every_epochs is not None:
        assert any("eval/fid" in r for r in records) and (out / "best" / "best.json").is_file()
        assert cached or "training one on its training split" in result.stderr + result.stdout
        assert any(cache.rglob("classifier_info.json"))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["dataset"]["path"] == str(cifar10_copy.resolve()) and saved["dataset"]["images"] == 40
