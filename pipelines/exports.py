"""Exported pipelines: saved whole or not at all, loaded safely, their sampler swapped or chosen."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from .families import UnknownFamily, for_pipeline_class, pipeline_class_name
from .model_card import GRID_FILE, write_model_card
from .rundir import cleaned_up_on_write_error, export_folder


def save_pipeline(pipeline, path: Path, finish: Optional[Callable[[Path], None]] = None) -> Path:
    """`save_pretrained` (weights, configs and the code) into a temporary folder, `finish(folder)` to add
    files (model card, sample grid), then swap it in: a crash never leaves half an export."""
    path = Path(path)
    tmp, old = path.with_name(f".tmp-{path.name}"), path.with_name(f".old-{path.name}")
    if old.exists() and not path.exists():  # an earlier swap was cut between its renames: the copy it had
        os.replace(old, path)
    shutil.rmtree(tmp, ignore_errors=True)
    with cleaned_up_on_write_error(tmp, f"pipeline export {path}", [path] if path.exists() else []):
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
        if finish is not None:
            finish(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
}


def load_pipeline(path: str | Path, scheduler: Optional[str] = None):
    """The pipeline of an export folder (or of a run's `pipeline/`), as its family's class (`families.py`)."""
    path = Path(path)
    export = export_folder(path)
    if export is None:
        raise FileNotFoundError(f"{path} is not an exported pipeline (no model_index.json) nor a run directory")
    path, index = export, export / "model_index.json"
    try:
        kind = pipeline_class_name(json.loads(index.read_text()))
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{index} is malformed ({err})") from None
    try:
        family = for_pipeline_class(kind)
    except UnknownFamily as err:
        raise ValueError(f"{path} holds {err}") from None
    try:
        # use_safetensors: never fall back to a pickled .bin, even one that weights_only would accept.
        pipe = family.pipeline.from_pretrained(str(path), use_safetensors=True)
    except Exception as err:  # diffusers/safetensors raise many kinds for a damaged folder
        raise ValueError(f"{path} cannot be loaded as a {kind} ({type(err).__name__}: {err}); the export may be "
                         "truncated or corrupt: export it again from the run's checkpoints") from None
    if scheduler is not None:
        if not family.iterative:
            raise ValueError(f"--scheduler applies to diffusion pipelines only (those that sample in steps); "
                             f"this is a {kind} ({family.summary})")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {scheduler!r}: valid choices are {', '.join(SCHEDULERS)}")
        import diffusers

        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def choose_default_sampler(run: Path, tolerance: float = 0.1, num_samples: Optional[int] = None) -> dict:
    """Make the fastest evaluated sampler whose FID is within `tolerance` of the best the export's default.

    Reads the run's `eval/*/metrics.json` of diffusion samplers at `num_samples` (default: the most common count),
    then rewrites `pipeline/` (atomically) with that scheduler, step count, guidance scale and interval.
    """
    import diffusers

    results = [json.loads(p.read_text()) for p in sorted((run / "eval").glob("*/metrics.json"))]
    results = [r for r in results if r.get("sampler", {}).get("scheduler") and "num_inference_steps" in r["sampler"]]
    if not results:
        raise FileNotFoundError(f"{run}/eval has no diffusion sampler evaluations; run eval.py with --scheduler, "
                                "--steps and --guidance first")
    counts = [r["num_samples"] for r in results]
    if num_samples is not None and num_samples not in counts:
        raise ValueError(f"no sampler evaluation of {num_samples} samples in {run}/eval; evaluated: "
                         f"{', '.join(map(str, sorted(set(counts))))}")
    n = num_samples or max(set(counts), key=counts.count)
    results = [r for r in results if r["num_samples"] == n]
    best = min(r["fid"] for r in results)
    within = [r for r in results if r["fid"] <= (1 + tolerance) * best]
    chosen = min(within, key=lambda r: r["seconds_per_image"])
    sampler = chosen["sampler"]
    pipe = load_pipeline(run)
    pipe.scheduler = getattr(diffusers, sampler["scheduler"]).from_config(pipe.scheduler.config)
    pipe.register_to_config(default_steps=sampler["num_inference_steps"],
                            default_guidance=sampler.get("guidance_scale", 1.0),
                            default_guidance_interval=sampler.get("guidance_interval"))
    folder = run / "pipeline" if (run / "pipeline").is_dir() else run
    save_pipeline(pipe, folder, finish=lambda tmp: keep_card(folder, tmp))
    return {"chosen": sampler, "fid": chosen["fid"], "best_fid": best, "seconds_per_image": chosen["seconds_per_image"],
            "num_samples": n, "tolerance": tolerance}


def keep_card(old: Path, new: Path) -> None:
    """A re-saved export keeps its sample grid, and its model card is rebuilt (the defaults changed)."""
    if (old / GRID_FILE).is_file():
        shutil.copyfile(old / GRID_FILE, new / GRID_FILE)
    write_model_card(new, final=old)
