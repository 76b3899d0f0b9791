"""A third model family, defined in this file only, driven through everything the built-in families go through.

`MeanImages` learns, per class, a mean image and a per-pixel spread (a diagonal Gaussian); it samples
mean + spread x noise in one pass. The family is installed the way a package would install its own: an
entry point in the group `ccg.families` (a `.dist-info` folder on the path), so the commands, the sweep's
subprocesses and the evaluation find it. Nothing under `pipelines/` names it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
import yaml
from diffusers import ConfigMixin, DiffusionPipeline, ImagePipelineOutput, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from pipelines.config import ConfigError, RunConfig
from pipelines.families import ModelFamily
from pipelines.loop import NonFiniteGuard
from pipelines.pipeline_common import (
    ClassConditionalMixin, class_label_tensor, images_to_output, load_components, make_id2label,
)
from trainer_utils import ROOT, assert_same_tensors, load_safetensors_dir

NAME = "meanimage"


class MeanImages(ModelMixin, ConfigMixin):
    """Per class: a mean image and the log of a per-pixel standard deviation."""

    @register_to_config
    def __init__(self, num_classes: int = 10, channels: int = 1, image_size: int = 28, init_log_std: float = 0.0):
        super().__init__()
        shape = (num_classes, channels, image_size, image_size)
        self.means = torch.nn.Parameter(torch.zeros(shape))
        self.log_std = torch.nn.Parameter(torch.full(shape, init_log_std))

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.means[labels], self.log_std[labels]


class MeanImagePipeline(ClassConditionalMixin, DiffusionPipeline):
    model_cpu_offload_seq = "model"

    def __init__(self, model: MeanImages, id2label: Optional[Dict[str, str]] = None,
                 class_names: Optional[List[str]] = None):
        super().__init__()
        self.register_modules(model=model)
        self.register_to_config(id2label=make_id2label(id2label, class_names))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        return load_components(cls, pretrained_model_name_or_path, {"MeanImages": MeanImages}, **kwargs)

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    @torch.no_grad()
    def __call__(self, class_labels, generator=None, output_type: str = "pil", return_dict: bool = True):
        labels = class_label_tensor(class_labels, self.config.id2label, self.num_classes, self._execution_device)
        mean, log_std = self.model(labels)
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        images = images_to_output((mean + log_std.exp() * noise).clamp(-1, 1), output_type, self.numpy_to_pil)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


@dataclass
class MeanModelConfig:
    init_log_std: float = -1.0  # the spread every pixel starts with (log of a standard deviation)


@dataclass
class MeanOptimConfig:
    lr: float = 0.05
    scale_lr: bool = False  # multiply lr by processes x accumulation

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr}: must be positive")


@dataclass
class MeanImageConfig(RunConfig):
    model: MeanModelConfig = field(default_factory=MeanModelConfig)
    optim: MeanOptimConfig = field(default_factory=MeanOptimConfig)
    output_dir: str = "runs/meanimage"


class MeanImageTrainer:
    """The family's `trainer.FamilyTrainer`: one Adam step on the Gaussian negative log-likelihood."""

    name = NAME
    grid_per_class = 4
    progress_keys = ("loss",)
    ema = None
    statistics = None
    sample_kwargs: dict = {}

    def __init__(self, run):
        cfg, acc = run.cfg, run.accelerator
        channels, size = run.image_shape
        model = MeanImages(num_classes=run.data.num_classes, channels=channels, image_size=size,
                           init_log_std=cfg.model.init_log_std)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr * run.lr_scale)
        self.net, self.optimizer = acc.prepare(model, optimizer)
        self.model = acc.unwrap_model(self.net)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, acc)
        self.pipeline = MeanImagePipeline(model=self.model, class_names=run.data.class_names)
        self.pipeline.set_progress_bar_config(disable=True)
        self.run = run

    def train_step(self, step: int, micro_batches: list, measure_grads: bool) -> dict[str, torch.Tensor]:
        acc = self.run.accelerator
        for x, labels in micro_batches:
            with acc.accumulate(self.net):
                mean, log_std = self.net(labels)
                loss = (0.5 * ((x - mean) * torch.exp(-log_std)) ** 2 + log_std).mean()
                found = self.guard.check(loss)
                acc.backward(self.guard.marked(loss, found, self.optimizer))
                if acc.sync_gradients:
                    self.guard.record(found)
                    self.guard.step(self.optimizer, found)
                self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach()}

    def scalars(self) -> dict[str, float]:
        return {"lr": self.optimizer.param_groups[0]["lr"]}

    def peak_rates(self) -> dict[str, float]:
        return self.scalars()

    def checkpoint_extra(self) -> dict[str, torch.Tensor]:
        return {}

    def restore(self, extra: dict[str, torch.Tensor], checkpoint: Path) -> None:
        pass

    def grid_images(self, labels: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.run.cfg.seed)
        return self.pipeline(labels, generator=generator, output_type="pt").images

    def final_pictures(self, step: int) -> None:
        pass


FAMILY = ModelFamily(
    name=NAME, summary="per-class mean images with a learned spread", config=MeanImageConfig,
    trainer=MeanImageTrainer, pipeline=MeanImagePipeline,
    help=lambda: "Train per-class mean images with a learned per-pixel spread.",
    describe=lambda index: "a per-class mean image with a learned per-pixel spread",
    report=lambda cfg: {"model": "mean image", "loss": "gaussian nll", "emb": None},
    card_tag="mean-image",
)

TINY = ["data.name=synthetic", "data.synthetic_size=96", "train.batch_size=16", "train.epochs=2",
        "log.every_steps=2", "log.wandb=disabled"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """This file's family installed as a package would install it: an entry point on the path, here and in
    every subprocess (PYTHONPATH)."""
    site = tmp_path_factory.mktemp("site")
    info = site / "ccg_meanimage-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ccg-meanimage\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ccg.families]\n{NAME} = {Path(__file__).stem}:FAMILY\n")
    patch = pytest.MonkeyPatch()
    patch.syspath_prepend(str(site))
    path = os.pathsep.join([str(site), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    patch.setenv("PYTHONPATH", path.rstrip(os.pathsep))
    yield site
    patch.undo()


def train(out: Path, *args: str) -> int:
    from accelerate.state import AcceleratorState, GradientState

    from pipelines.commands import main

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return main([f"train-{NAME}", f"output_dir={out}", *TINY, *args])


def test_nothing_in_the_package_names_the_new_family():
    for path in (ROOT / "pipelines").rglob("*"):
        if path.is_file() and path.suffix in (".py", ".yaml", ".cfg", ".json"):
            text = path.read_text(errors="replace").lower()
            assert NAME not in text and "meanimage" not in text, path


def test_the_family_is_found_only_once_installed(installed):
    from pipelines import families
    from pipelines.commands import all_commands

    assert families.get(NAME) is FAMILY and f"train-{NAME}" in all_commands()
    assert families.for_script(f"train_{NAME}.py") is FAMILY
    assert families.for_pipeline_class("MeanImagePipeline") is FAMILY


def test_train_resume_export_eval_generate(installed, tmp_path, classifier_dir, capsys):
    from pipelines.commands import evaluate, generate
    from pipelines.exports import load_pipeline
    from pipelines.report import describe_run

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train(whole) == 0
    assert train(resumed, "train.max_steps=6") == 0  # the first epoch's checkpoint, then stopped
    assert train(resumed, "--resume", "latest") == 0
    assert "resumed from" in capsys.readouterr().out
    assert_same_tensors(load_safetensors_dir(whole / "pipeline"), load_safetensors_dir(resumed / "pipeline"))
    losses = [json.loads(line)["loss"] for line in (whole / "stats.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]  # it trains

    index = json.loads((whole / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "MeanImagePipeline"]
    card = (whole / "pipeline" / "README.md").read_text()
    assert "a per-class mean image with a learned per-pixel spread" in card and "mean-image" in card
    assert "`model/test_new_family.py`" in card  # its own code travels with the export
    pipe = load_pipeline(whole)
    assert isinstance(pipe, MeanImagePipeline)
    images = pipe([0, 1], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, 28, 28)
    assert describe_run(whole)["model"] == "mean image"

    out = tmp_path / "eval"
    assert evaluate([str(whole), "--classifier", str(classifier_dir), "--num-per-class", "4",
                     "--out", str(out), "--no-pngs"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 40 and isinstance(metrics["fid"], float)
    assert evaluate([str(whole), "--classifier", str(classifier_dir), "--scheduler", "ddim"]) == 2
    assert "this is a MeanImagePipeline" in capsys.readouterr().err

    grid = tmp_path / "grid.png"
    assert generate([str(whole), "--class", "1", "--num", "3", "--out", str(grid)]) == 0 and grid.is_file()


def test_a_two_run_experiment_and_its_report(installed, tmp_path, classifier_dir):
    from pipelines.sweep import main

    common = [*TINY, "eval.every_epochs=1", "eval.num_per_class=4", f"eval.classifier={classifier_dir}"]
    doc = {"name": "means", "description": "Two learning rates of the mean-image family.",
           "output_dir": str(tmp_path / "exp"),
           "runs": {"slow": {"program": f"train_{NAME}.py", "overrides": [*common, "optim.lr=0.01"]},
                    "fast": {"program": f"train_{NAME}.py", "overrides": [*common, "optim.lr=0.1"]}}}
    path = tmp_path / "means.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main([str(path), "--inception", "no"]) == 0  # each run is `python -m pipelines train-meanimage`
    report = json.loads((tmp_path / "exp" / "report" / "report.json").read_text())
    assert {(r["run"], r["model"]) for r in report["rows"]} >= {("slow", "mean image"), ("fast", "mean image")}
    assert "Two learning rates of the mean-image family." in (tmp_path / "exp" / "report" / "report.md").read_text()
