"""The model card (`README.md`) of an export: what the model is, how it was trained, its latest metrics,
a sample grid, and how to load it with stock diffusers. Rebuilt from the folder and its run at any time.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Optional

import yaml

from .config import RunConfig
from .families import for_pipeline_class, pipeline_class_name
from .rundir import export_folder, run_config

DATASETS = {"fashion_mnist": "zalando-datasets/fashion_mnist", "cifar10": "uoft-cs/cifar10"}
GRID_FILE = "samples.png"
TRAINING_FILE = "training.json"  # steps, images, wall time and hardware of the training, written with the export
METRICS = (("fid", "FID"), ("kid", "KID"), ("accuracy", "conditional accuracy"),
           ("diversity_ratio", "diversity ratio (samples / real)"), ("inception_score", "Inception Score"),
           ("classifier_score", "classifier score"))


def latest_metrics(export: Path) -> Optional[dict]:
    """The newest `metrics.json` that `eval.py` wrote for this export (in its run's or its own `eval/`)."""
    found = []
    for root in {export, export.parent}:
        for path in root.glob("eval/*/metrics.json"):
            try:
                metrics = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            target = export_folder(metrics.get("pipeline", ""))  # evaluated as a run: its final export
            if target is not None and target.resolve() == export.resolve():
                found.append((path.stat().st_mtime, metrics))
    return max(found, key=lambda item: item[0])[1] if found else None


def training_time(export: Path) -> Optional[str]:
    """How long the training took and on what, from the export's `training.json`."""
    info_file = export / TRAINING_FILE
    if not info_file.is_file():
        return None
    info = json.loads(info_file.read_text())
    seconds = info["wall_seconds"]
    span = (f"{seconds / 3600:.1f} hours" if seconds >= 7200 else f"{seconds / 60:.1f} minutes" if seconds >= 120
            else f"{seconds:.1f} seconds")
    processes = info["processes"]
    return (f"time: {span} of wall time (set-up, training and evaluation, summed over resumes) on "
            f"{processes} process{'es' if processes > 1 else ''} ({info['device']}, mixed precision "
            f"`{info['mixed_precision']}`): {info['steps']:,} steps, {info['images']:,} images "
            f"({info['epochs']:.3g} epochs)")


def card_text(export: Path, cfg: Optional[dict], metrics: Optional[dict], repo_id: Optional[str] = None,
              revision: Optional[str] = None) -> str:
    index = json.loads((export / "model_index.json").read_text())
    class_name = pipeline_class_name(index)
    family = for_pipeline_class(class_name)
    id2label = index.get("id2label") or {str(i): n for i, n in enumerate(index.get("class_names") or [])}
    names = [id2label[k] for k in sorted(id2label, key=int)]
    data = (cfg or {}).get("data", {})
    dataset = DATASETS.get(data.get("name"))
    if data.get("name") == "hub" and not Path(str(data.get("hub_id"))).expanduser().exists():
        dataset = data.get("hub_id")  # a Hub id, not a local folder laid out as one
    header = {"library_name": "diffusers", "license": "apache-2.0",
              "tags": ["diffusers", "class-conditional", "image-generation",
                       family.card_tag, *(cfg or {}).get("log", {}).get("tags", [])]}
    if dataset and not data.get("path"):
        header["datasets"] = [dataset]
    model = family.describe(index)
    # the export's own code beside pipeline.py: components whose class is not diffusers'
    own_code = [f"`{name}/{value[0]}.py`" for name, value in sorted(index.items()) if not name.startswith("_")
                and isinstance(value, list) and len(value) == 2 and value[0] not in ("diffusers", "transformers")]
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {class_name}", "", f"This is {model}, trained with "
             "[class-conditional-generation](https://pypi.org/project/class-conditional-generation/). "
             f"It draws images of {len(names)} classes:", "",
             ", ".join(f"{i} `{n}`" for i, n in enumerate(names)), ""]
    if (export / GRID_FILE).is_file():
        lines += [f"![samples: one row per class]({GRID_FILE})", ""]
    lines += ["## Use", "", "With stock diffusers (`trust_remote_code=True` runs the `pipeline.py` and "
              "`pipeline_common.py` of this repository" + "".join(f" and {code}" for code in own_code)
              + ": read them first if you did not write them):", "", "```python", "import torch",
              "from diffusers import DiffusionPipeline", "",
              f'pipe = DiffusionPipeline.from_pretrained("{repo_id or "REPO_OR_FOLDER"}", '
              + (f'revision="{revision}", ' if revision and revision != "main" else "") + 'trust_remote_code=True)',
              f'images = pipe([0, "{names[min(1, len(names) - 1)] if names else 0}"], '
              'generator=torch.Generator().manual_seed(0)).images', "```", ""]
    if family.iterative:
        lines += [f"Defaults: {index.get('default_steps')} steps, guidance scale {index.get('default_guidance')}"
                  + (f" on t/T in {index['default_guidance_interval']}" if index.get("default_guidance_interval")
                     else "") + "; pass `num_inference_steps`, `guidance_scale` or `guidance_interval` to "
                  "change them.", ""]
    if cfg:
        train, model_cfg = cfg.get("train", {}), cfg.get("model", {})
        recipe = [f"data: `{data.get('name')}`" + (f" from `{data['path']}`" if data.get("path") else "")
                  + (f", classes {data['classes']}" if data.get("classes") else ""),
                  f"model: {json.dumps(model_cfg, sort_keys=True)}",
                  f"training: {train.get('epochs')} epochs" + (f" (at most {train['max_steps']} steps)"
                                                             if train.get("max_steps") else "")
                  + f", batch {train.get('batch_size')} per process, mixed precision `{train.get('mixed_precision')}`"
                  + (f", EMA {train['ema_decay']}" if train.get("ema_decay") else "") + f", seed {cfg.get('seed')}"]
        for section in family_sections(cfg):
            recipe.append(f"{section}: {json.dumps(cfg[section], sort_keys=True)}")
        if training_time(export):
            recipe.append(training_time(export))
        lines += ["## Training", "", *[f"- {r}" for r in recipe], ""]
    if metrics:
        rows = [(label, metrics[key]) for key, label in METRICS if isinstance(metrics.get(key), (int, float))]
        floor = (metrics.get("real_floor") or {}).get("fid")
        lines += ["## Metrics", "", f"{metrics.get('num_samples')} samples ({metrics.get('num_per_class')} per class, "
                  f"seed {metrics.get('seed')}), {metrics.get('features')} features, against the "
                  f"`{metrics.get('reference_split')}` split of `{metrics.get('dataset')}`"
                  + (f"; the real-data floor (real train images, same N) has FID {floor:.4g}" if floor else "") + ".",
                  "", "| metric | value |", "|---|---|", *[f"| {label} | {value:.4g} |" for label, value in rows]]
        flagged = metrics.get("flagged_classes")
        lines += ["", f"Classes flagged as collapsed (diversity ratio < 0.8): {', '.join(flagged) or 'none'}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def family_sections(cfg: dict) -> list[str]:
    """The config sections of the family (loss, diffusion, optim, ...): all but the model and those every run has."""
    shared = {f.name for f in fields(RunConfig)} | {"model", "dataset"}
    return [name for name, value in cfg.items() if name not in shared and isinstance(value, dict)]


def write_model_card(export: Path, metrics: Optional[dict] = None, final: Optional[Path] = None,
                     repo_id: Optional[str] = None, revision: Optional[str] = None) -> Path:
    """Write (or rewrite) `export/README.md`; `metrics` default to the newest evaluation of the export.

    `final`: where the export will live, when `export` is the temporary folder it is written in.
    `repo_id`, `revision`: where it is published, for the loading code.
    """
    export = Path(export)
    final = Path(final or export)
    text = card_text(export, run_config(final), metrics if metrics is not None else latest_metrics(final),
                     repo_id, revision)
    tmp = export / ".README.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, export / "README.md")
    return export / "README.md"
