"""`pip install .` (not only -e): the wheel holds the package data, and the commands work from any folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from trainer_utils import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project as a fresh clone has it, built as a wheel and installed (without dependencies) into a
    folder of its own. Built from a copy: a build in the repository would reuse a stale build/ folder."""
    root = tmp_path_factory.mktemp("install")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (root / "clone" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / "clone" / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "wheel"), str(root / "clone")], check=True, capture_output=True)
    [wheel] = (root / "wheel").glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(root / "site"),
                    str(wheel)], check=True, capture_output=True)
    return root


def run_installed(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed copy first on the path, run from a folder that is not the repository."""
    env = dict(os.environ, PYTHONPATH=str(installed / "site"), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_has_its_own_name_the_data_and_the_commands(installed):
    [wheel] = (installed / "wheel").glob("*.whl")
    assert wheel.name.startswith("class_conditional_generation-")
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("pipelines/classifiers/fashion_mnist/diffusion_pytorch_model.safetensors",
                 "pipelines/classifiers/fashion_mnist/config.json",
                 "pipelines/classifiers/fashion_mnist/classifier_info.json", "pipelines/pipeline_ddpm.py",
                 "pipelines/configs/cgan/demo_cpu.yaml", "pipelines/configs/accelerate/multi_gpu_bf16.yaml"):
        assert data in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for command in ("ccg-train-cgan", "ccg-train-ddpm", "ccg-eval", "ccg-generate", "ccg-sweep", "ccg-publish",
                    "ccg-recipes"):
        assert f"{command} = pipelines.commands:" in text


@pytest.mark.slow  # three fresh Pythons and a training: 45 s
def test_the_installed_package_finds_its_classifier_and_trains_outside_the_repository(installed, tmp_path):
    found = run_installed(installed, tmp_path, "-c", "import pipelines, pipelines.evaluation as e; "
                          "print(pipelines.__file__); print(e.SHIPPED_CLASSIFIERS)")
    assert found.returncode == 0, found.stderr
    package_file, classifiers = found.stdout.split()
    assert package_file.startswith(str(installed / "site"))  # the installed copy, not the repository's
    assert (Path(classifiers) / "fashion_mnist" / "diffusion_pytorch_model.safetensors").is_file()

    trained = run_installed(installed, tmp_path, "-m", "pipelines", "train-cgan", "output_dir=run",
                            "data.name=synthetic", "data.synthetic_size=64", "model.base_channels=8",
                            "model.latent_dim=8", "model.label_emb_dim=4", "train.batch_size=32")
    assert trained.returncode == 0, trained.stderr
    index = json.loads((tmp_path / "run" / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "CGANPipeline"]
    recipe = run_installed(installed, tmp_path, "-m", "pipelines", "train-cgan", "--config", "cgan/demo_cpu",
                           "--dry-run")
    assert recipe.returncode == 0 and "arch: resnet" in recipe.stdout, recipe.stderr  # shipped in the wheel
    helped = run_installed(installed, tmp_path, "-m", "pipelines", "eval", "--help")
    assert helped.returncode == 0 and "--num-per-class" in helped.stdout
