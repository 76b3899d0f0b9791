"""The model families, and the one place the rest of the project asks about them.

A family declares a `ModelFamily`: its name, config schema, trainer, exported pipeline class, and how it is
described, sampled and reported. Exports, evaluation, model cards, the commands, sweeps and reports look the
family up here (by name, by pipeline class, by config, or for a run directory); none of them names one.

Built in: the conditional GAN (`pipelines.gan`) and the conditional DDPM (`pipelines.diffusion`). A family of
your own is a module with a `ModelFamily`, named in the entry-point group `ccg.families` of its package:

    [options.entry_points]
    ccg.families =
        mean = my_package.mean_family:FAMILY

Installed, it trains with `python -m pipelines train-mean`, and eval.py, generate, sweeps (`program:
train_mean.py`) and reports take its runs and exports.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Optional

from .rundir import export_folder, run_config
from .typed_yaml import ConfigError, config_from_dict

ENTRY_POINT_GROUP = "ccg.families"
BUILT_IN = ("pipelines.gan:FAMILY", "pipelines.diffusion:FAMILY")


@dataclass(frozen=True)
class ModelFamily:
    """What the project needs to know of a model family."""

    name: str  # `python -m pipelines train-NAME`; a study's `program: train_NAME.py`
    summary: str  # one line, for listings: "conditional GANs"
    config: type  # its runs' config: a `config.RunConfig` with the family's own sections (model, optim, ...)
    trainer: Callable[[Any], Any]  # builds the `trainer.FamilyTrainer` (networks, optimizers, the step) from a `run.Run`
    pipeline: type  # the exported pipeline class: `model_index.json` names it
    help: Callable[[], str]  # the training command's description (--help)
    describe: Callable[[dict], str]  # the model card's "This is ..." from the export's `model_index.json`
    report: Callable[[dict], dict]  # a report's `model`, `loss` and `emb` columns from a run's saved config
    card_tag: str  # the model card's tag for the kind of model
    network: str = "model"  # the pipeline component that is the trained network (compiled for sampling)
    # The pipeline samples in steps, as diffusers' diffusion pipelines do: it takes `num_inference_steps`,
    # `guidance_scale`, `guidance_interval` and `callback_on_step_end`, has a swappable `scheduler`, and keeps its
    # defaults in its config (`default_steps`, `default_guidance`, `default_guidance_interval`).
    iterative: bool = False
    resume_may_change: tuple[str, ...] = ()  # the family's settings that a resumed run may change (config_changes)

    @property
    def command(self) -> str:
        return f"train-{self.name}"

    @property
    def script(self) -> str:
        """The name a study's `program:` gives it (the built-ins' scripts of the clone have this name)."""
        return f"train_{self.name}.py"


class UnknownFamily(ValueError):
    """No registered family fits: the message names what was asked and the valid choices."""


def _load(target: str) -> ModelFamily:
    module, _, attr = target.partition(":")
    family = getattr(importlib.import_module(module), attr)
    if not isinstance(family, ModelFamily):
        raise TypeError(f"{target} is a {type(family).__name__}, not a pipelines.families.ModelFamily")
    return family


@functools.lru_cache(maxsize=8)
def _registry(path: tuple[str, ...]) -> dict[str, ModelFamily]:
    """The built-in families and those of installed packages (keyed by `sys.path`: a new entry may add some)."""
    found: dict[str, ModelFamily] = {}
    targets = [*BUILT_IN, *(ep.value for ep in entry_points(group=ENTRY_POINT_GROUP))]
    for target in targets:
        family = _load(target)
        if family.name in found and found[family.name] is not family:
            raise ConfigError(f"two model families are named {family.name!r} ({target} is the second)")
        found[family.name] = family
    return found


def all_families() -> dict[str, ModelFamily]:
    return dict(_registry(tuple(sys.path)))


def get(name: str) -> ModelFamily:
    families = all_families()
    if name not in families:
        raise UnknownFamily(f"model family {name!r}; valid choices: {', '.join(families)}")
    return families[name]


def for_script(script: str) -> ModelFamily:
    """The family of a study's `program:` (`train_cgan.py`)."""
    by_script = {f.script: f for f in all_families().values()}
    if script not in by_script:
        raise UnknownFamily(f"program {script!r}; valid choices: {', '.join(by_script)}")
    return by_script[script]


def for_pipeline_class(class_name: str) -> ModelFamily:
    """The family whose exports are `class_name` pipelines (`model_index.json`'s `_class_name`)."""
    by_class = {f.pipeline.__name__: f for f in all_families().values()}
    if class_name not in by_class:
        raise UnknownFamily(f"a {class_name}; valid kinds: {', '.join(by_class)}")
    return by_class[class_name]


def for_pipeline(pipe: Any) -> ModelFamily:
    """The family of a loaded pipeline (also of an export's own copy of the class, loaded by stock diffusers)."""
    return for_pipeline_class(type(pipe).__name__)


def for_config(cfg: Any) -> ModelFamily:
    for family in all_families().values():
        if type(cfg) is family.config:
            return family
    raise UnknownFamily(f"a {type(cfg).__name__} config; valid: "
                        + ", ".join(f.config.__name__ for f in all_families().values()))


def pipeline_class_name(index: dict) -> str:
    """The pipeline class a `model_index.json` names: `"Name"`, or `["pipeline", "Name"]` when the export
    names its own code for stock diffusers."""
    kind = index["_class_name"]
    return kind[-1] if isinstance(kind, list) else kind


def for_run(run: Path) -> Optional[ModelFamily]:
    """The family that trained a run directory: its export's pipeline class or, before the export exists, the
    family whose config schema reads its `config.yaml`; None when neither tells."""
    export = export_folder(run)
    if export is not None:
        try:
            return for_pipeline_class(pipeline_class_name(json.loads((export / "model_index.json").read_text())))
        except (UnknownFamily, KeyError, json.JSONDecodeError):
            pass
    saved = run_config(run)
    if saved is None:
        return None
    values = {k: v for k, v in saved.items() if k != "dataset"}
    for family in all_families().values():
        try:
            config_from_dict(family.config, values)
        except (ConfigError, TypeError, ValueError):
            continue
        return family
    return None
