"""Evaluating a trained pipeline: generate N images per class, then score them against real data."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .classifier import load_classifier, save_classifier, train_classifier
from .config import DataConfig, config_from_dict
from .console import Progress
from .data import ImageTensors, load_tensors
from .exports import load_pipeline
from .families import for_pipeline
from .grids import save_class_grid
from .metrics import (
    FeatureExtractor, classifier_extractor, collapsed_classes, combined_score, extract, fid, inception_extractor,
    inception_score, kid, lpips_status, mean_lpips, per_class_report,
)
from .run import compile_mode
from .rundir import run_config
from .tracking import log_class_table, write_stats

logger = logging.getLogger(__name__)

SHIPPED_CLASSIFIERS = Path(__file__).resolve().parent / "classifiers"  # package data: installed with the package


def run_data_config(pipeline_path: Path) -> Optional[DataConfig]:
    """The data section of the run that produced this pipeline (its `config.yaml`), if there is one."""
    values = run_config(pipeline_path) or {}
    return config_from_dict(DataConfig, values["data"]) if isinstance(values.get("data"), dict) else None


def is_diffusion(pipe) -> bool:
    """Whether the pipeline samples in steps (its family's `iterative`): steps, guidance, a scheduler."""
    return for_pipeline(pipe).iterative


def sample_call_kwargs(pipe, steps: Optional[int], guidance: Optional[float],
                       guidance_interval: Optional[list[float]] = None) -> dict:
    if not is_diffusion(pipe):
        return {}
    kwargs = {}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if guidance_interval is not None:
        kwargs["guidance_interval"] = list(guidance_interval)
    return kwargs


def sampler_used(pipe, call_kwargs: dict) -> dict:
    """The diffusion sampler a call ran: its arguments, the export's defaults for the rest, the scheduler."""
    if not is_diffusion(pipe):
        return {}
    defaults = {"num_inference_steps": pipe.config.default_steps, "guidance_scale": pipe.config.default_guidance,
                "guidance_interval": pipe.config.get("default_guidance_interval")}
    return defaults | call_kwargs | {"scheduler": type(pipe.scheduler).__name__}


def compile_sampler(pipe) -> tuple[str, Optional[str]]:
    """The pipeline's network compiled in place for sampling at a fixed batch: on a CUDA device each sampling
    step replays a CUDA graph (mode reduce-overhead); elsewhere plain compilation. Returns the mode and, where it
    is not reduce-overhead, why."""
    mode, why = compile_mode("reduce-overhead", pipe.device, option="--compile: mode")
    getattr(pipe, for_pipeline(pipe).network).compile(mode=mode)
    return mode, why


@torch.no_grad()
def generate(pipe, labels: torch.Tensor, batch_size: int, seed: int, accelerator=None, preemption=None,
             progress: Optional[str] = None, **call_kwargs) -> torch.Tensor:
    """uint8 (N, C, H, W) images for `labels`, batched, split across processes, gathered in order.

    Batch b always uses the seed (seed, b), so the images do not depend on the number of processes.
    `preemption` (a `preemption.Preemption`): checked before each batch and, for diffusion, after each
    denoising step; a SIGTERM then raises `StopRequested` (one process only: the in-training evaluation).
    `progress`: what to call the main process's progress lines (`console.Progress`); None: silent.
    """
    from accelerate.utils import gather_object

    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    device = pipe.device
    if preemption is not None and is_diffusion(pipe):
        def check_each_step(pipe, i, t, tensors):
            preemption.check()
            return tensors
        call_kwargs = {**call_kwargs, "callback_on_step_end": check_each_step}
    mine = []
    starts = list(range(0, len(labels), batch_size))
    share = sum(len(labels[start: start + batch_size]) for b, start in enumerate(starts) if b % world == rank)
    with Progress(progress or "", share, show=progress is not None and rank == 0) as shown:
        for b, start in enumerate(starts):
            if b % world != rank:
                continue
            if preemption is not None:
                preemption.check()
            gen = torch.Generator(device).manual_seed(seed * 1_000_003 + b)
            batch = labels[start: start + batch_size].tolist()
            images = pipe(batch, generator=gen, output_type="pt", **call_kwargs).images
            mine.append((b, (images * 255).round().to(torch.uint8).cpu()))
            shown.update(len(batch))
    gathered = gather_object(mine) if world > 1 else mine
    ordered = [images for _, images in sorted(gathered, key=lambda item: item[0])]
    return torch.cat(ordered)[: len(labels)]


def classifier_cache() -> Path:
    """Where classifiers trained on first use are kept: $XDG_CACHE_HOME (or ~/.cache)/class-conditional-generation."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "class-conditional-generation" / "classifiers"


def classifier_identity(data_cfg: DataConfig) -> dict:
    """What makes two data configs the same data to a classifier: the source and the classes (not split or limit)."""
    return {"name": data_cfg.name, "path": str(Path(data_cfg.path).resolve()) if data_cfg.path else None,
            "classes": data_cfg.classes, "pad_to": data_cfg.pad_to,
            **{k: getattr(data_cfg, k) for k in ("hub_id", "hub_config", "revision", "image_column", "label_column",
                                                  "image_size", "channels") if getattr(data_cfg, k) is not None}}


def classifier_cache_path(data_cfg: DataConfig) -> Path:
    """The per-user folder of the classifier of this data (keyed by `classifier_identity`): where
    `cached_classifier` trains it on first use and `eval.py train-classifier` writes it without --out."""
    identity = json.dumps(classifier_identity(data_cfg), sort_keys=True)
    return classifier_cache() / f"{data_cfg.name}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def cached_classifier(data_cfg: DataConfig, device: torch.device) -> Path:
    """The classifier of data no classifier ships for (CIFAR-10, the user's own, a `data.classes` subset):
    trained on its training split the first time (its test accuracy written beside it), then reused by every
    run on the same data."""
    data_cfg = replace(data_cfg, split="train", limit=None)
    path = classifier_cache_path(data_cfg)
    if path.is_dir():
        logger.info("using the classifier trained earlier for this data: %s", path)
        return path
    why = (f"the classifier shipped for data.name={data_cfg.name} knows all its classes, not data.classes="
           f"{data_cfg.classes}" if (SHIPPED_CLASSIFIERS / data_cfg.name).is_dir()
           else f"no classifier ships for data.name={data_cfg.name}")
    logger.warning("%s: training one on its training split for the offline metrics (once; cached in %s)", why, path)
    model, info = train_classifier(data_cfg, device=str(device), log=logger.info)
    info["data_identity"] = classifier_identity(data_cfg)
    save_classifier(model, info, path)
    logger.warning("classifier trained: test accuracy %.4f (%s)", info["test_accuracy"], path)
    return path


def balanced_subset(data: ImageTensors, per_class: int) -> ImageTensors:
    """The first `per_class` images of every class (the real-data floor at the same N)."""
    keep = torch.cat([(data.labels == k).nonzero().flatten()[:per_class] for k in range(data.num_classes)])
    return ImageTensors(data.images[keep], data.labels[keep], data.class_names)


def make_extractor(kind: str, classifier_path: Optional[str | Path], data_cfg: DataConfig,
                   device: torch.device) -> tuple[FeatureExtractor, dict]:
    if kind == "inception":
        return inception_extractor(device), {}
    if kind != "classifier":
        raise ValueError(f"features {kind!r}: valid choices are inception, classifier")
    shipped = SHIPPED_CLASSIFIERS / data_cfg.name
    if classifier_path:
        path = Path(classifier_path)
    elif shipped.is_dir() and data_cfg.classes is None:  # the data it was trained on: every class, its own labels
        path = shipped
    else:  # none shipped, or a `data.classes` subset (relabelled 0..k-1: the shipped logits score other labels)
        path = cached_classifier(data_cfg, device)  # train one for this data, once
    model, info = load_classifier(path)
    return classifier_extractor(model, device), {"classifier": str(path), "classifier_test_accuracy":
                                                 info.get("test_accuracy")}


def score(images: torch.Tensor, labels: torch.Tensor, real: ImageTensors, extractor: FeatureExtractor,
          floor: Optional[ImageTensors] = None, with_lpips: bool = True,
          real_feats: Optional[np.ndarray] = None, progress: Optional[str] = None) -> dict:
    """All metrics of generated `images` (uint8) with `labels` against the `real` reference split.
    `progress`: what to call the feature extraction's progress lines; None: silent."""
    def named(what: str) -> Optional[str]:
        return f"{progress}: {what}" if progress else None

    gen_feats, gen_logits = extract(images, extractor, with_logits=True, progress=named("features of the samples"))
    if real_feats is None:
        real_feats, _ = extract(real.images, extractor, progress=named("features of the real images"))
    labels_np, real_labels = labels.cpu().numpy(), real.labels.cpu().numpy()
    result: dict = {"num_samples": int(len(images)), "features": extractor.name,
                    "fid": fid(gen_feats, real_feats), "kid": kid(gen_feats, real_feats)}
    predictions = None
    if gen_logits is not None:
        result["inception_score" if extractor.name == "inception" else "classifier_score"] = inception_score(gen_logits)
        if extractor.name == "classifier":
            predictions = gen_logits.argmax(1)
            result["accuracy"] = float((predictions == labels_np).mean())
    per_class = per_class_report(gen_feats, labels_np, real_feats, real_labels, real.class_names, predictions)
    result["per_class"] = per_class
    ratios = [row["diversity_ratio"] for row in per_class.values() if "diversity_ratio" in row]
    result["diversity_ratio"] = float(np.mean(ratios)) if ratios else None
    result["flagged_classes"] = collapsed_classes(per_class)
    if floor is not None:
        floor_feats, _ = extract(floor.images, extractor, progress=named("features of the real-data floor"))
        result["real_floor"] = {"num_samples": int(len(floor)), "fid": fid(floor_feats, real_feats),
                                "kid": kid(floor_feats, real_feats)}
    available, why = lpips_status() if with_lpips else (False, "LPIPS skipped")
    result["lpips"] = mean_lpips(images, labels) if available else None
    result["lpips_note"] = why
    result["combined_score"] = combined_score(result["fid"], result.get("inception_score"), result["lpips"])
    return result


def evaluate_export(pipeline_path: str | Path, out_dir: Path, *, num_per_class: int, features: str = "classifier",
             classifier: Optional[str] = None, data_cfg: Optional[DataConfig] = None, ref_split: str = "test",
             scheduler: Optional[str] = None, steps: Optional[int] = None, guidance: Optional[float] = None,
             guidance_interval: Optional[list[float]] = None, seed: int = 0, batch_size: int = 250, accelerator=None,
             save_pngs: bool = True, on_scored: Optional[Callable[[dict, torch.Tensor, torch.Tensor], None]] = None,
             compile: bool = False) -> dict:
    """Generate `num_per_class` images per class, score them, write `metrics.json` and the samples to `out_dir`.

    `compile`: the network compiled for the fixed batch first (`compile_sampler`); the images are the same up to
    float rounding, and the time per image (`seconds_per_image`) includes the compilation.

    `on_scored(result, images, labels)` runs on the main process once the files are written (W&B logging)."""
    pipeline_path = Path(pipeline_path)
    data_cfg = data_cfg or run_data_config(pipeline_path)
    if data_cfg is None:
        raise ValueError(f"cannot tell which dataset {pipeline_path} was trained on (no config.yaml beside it): "
                         "pass --data")
    device = accelerator.device if accelerator else torch.device("cpu")
    pipe = load_pipeline(pipeline_path, scheduler).to(device)
    compiled = None
    if compile:
        compiled, why = compile_sampler(pipe)
        if why and (accelerator is None or accelerator.is_main_process):
            print(why, flush=True)
    extractor, extractor_info = make_extractor(features, classifier, data_cfg, device)
    real = load_tensors(replace(data_cfg, split=ref_split, limit=None))
    train_split = load_tensors(replace(data_cfg, split="train", limit=None)) if ref_split == "test" else None
    labels = torch.arange(real.num_classes).repeat_interleave(num_per_class)
    call_kwargs = sample_call_kwargs(pipe, steps, guidance, guidance_interval)
    start = time.perf_counter()
    images = generate(pipe, labels, batch_size, seed, accelerator, progress="evaluation: sampling", **call_kwargs)
    seconds = time.perf_counter() - start
    is_main = accelerator is None or accelerator.is_main_process
    if not is_main:
        return {}
    result = score(images, labels, real, extractor,
                   floor=balanced_subset(train_split, num_per_class) if train_split is not None else None,
                   progress="evaluation")
    result.update(extractor_info, pipeline=str(pipeline_path), dataset=data_cfg.name, reference_split=ref_split,
                  num_per_class=num_per_class, seed=seed, sampler=sampler_used(pipe, call_kwargs),
                  seconds_per_image=seconds / len(images), compiled=compiled,
                  num_processes=accelerator.num_processes if accelerator else 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    if save_pngs:
        save_samples(images, labels, real.class_names, out_dir / "samples")
    save_class_grid(images, labels, real.num_classes, out_dir / "grid.png")
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    if on_scored is not None:
        on_scored(result, images, labels)
    return result


evaluate = evaluate_export  # its name before: kept for code that imports it


def save_samples(images: torch.Tensor, labels: torch.Tensor, class_names: list[str], folder: Path) -> None:
    """One PNG per sample in a folder per class: what clean-fid's folder functions read."""
    from PIL import Image

    images = images.cpu()  # one copy from the device, wherever the samples were drawn
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        target = folder / f"{label:02d}_{class_names[label].replace('/', '-').replace(' ', '_')}"
        target.mkdir(parents=True, exist_ok=True)
        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(target / f"{i:06d}.png")


class TrainingEvaluator:
    """FID during training: scores the live pipeline every `eval.every_epochs` and keeps the best export.

    Offline classifier features (cheap, no download); the reference split's features are computed
    once. Build it on the main process only; `best/` is written atomically with `best.json` in it.
    """

    def __init__(self, *, accelerator, cfg, output_dir: Path, pipeline, inference, export,
                 call_kwargs: Optional[dict] = None, preemption=None):
        self.acc, self.cfg, self.out, self.export = accelerator, cfg.eval, output_dir, export
        self.preemption = preemption  # a SIGTERM stops the evaluation between batches: StopRequested
        self.pipeline, self.inference = pipeline, inference
        self.extractor, _ = make_extractor("classifier", cfg.eval.classifier, cfg.data, accelerator.device)
        self.real = load_tensors(replace(cfg.data, split="test", limit=None))
        self.real_feats, _ = extract(self.real.images, self.extractor)
        self.labels = torch.arange(self.real.num_classes).repeat_interleave(cfg.eval.num_per_class)
        self.call_kwargs = dict(call_kwargs or {})
        if cfg.eval.steps is not None:
            self.call_kwargs["num_inference_steps"] = cfg.eval.steps
        if cfg.eval.guidance is not None and "guidance_scale" in self.call_kwargs:
            self.call_kwargs["guidance_scale"] = cfg.eval.guidance
        best_file = output_dir / "best" / "best.json"
        self.best = json.loads(best_file.read_text()) if best_file.is_file() else None
        self.last: Optional[dict] = None  # the newest evaluation's logged numbers

    def is_better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best["value"] if self.cfg.metric == "accuracy" else value < self.best["value"]

    def __call__(self, epoch: int, step: int) -> dict:
        pipeline = self.pipeline
        with self.inference():
            images = generate(pipeline, self.labels, self.cfg.batch_size, self.cfg.seed, preemption=self.preemption,
                              progress=f"evaluation at epoch {epoch}: sampling", **self.call_kwargs)
            result = score(images, self.labels, self.real, self.extractor, with_lpips=False, real_feats=self.real_feats,
                           progress=f"evaluation at epoch {epoch}")
        if self.preemption is not None:
            self.preemption.check()  # before best/ is replaced: a stopped evaluation changes nothing
        value = result[self.cfg.metric]
        if self.is_better(value):  # export(path, texts) swaps the EMA weights in by itself
            self.best = {"metric": self.cfg.metric, "value": value, "epoch": epoch, "step": step}
            self.export(self.out / "best", {"best.json": json.dumps(self.best, indent=2)})
        record = {f"eval/{k}": result[k] for k in ("fid", "kid", "accuracy", "diversity_ratio", "classifier_score")
                  if isinstance(result.get(k), float)}
        record.update({"eval/flagged_classes": len(result["flagged_classes"]), "step": step, "epoch": epoch,
                       f"eval/best_{self.cfg.metric}": self.best["value"]})
        self.acc.log(record, step=step)
        log_class_table(self.acc, result, images, self.labels, step)
        write_stats(self.out, record)
        self.last = record
        return result


BASELINE_BLUR_SIGMA = 1.0


def reference_baselines(data_cfg: DataConfig, num_per_class: int, classifier: Optional[str],
                        device: torch.device) -> dict:
    """The scale of the metrics, against the test split: real train images (the floor), the same images
    Gaussian-blurred (sigma 1: what the metrics make of samples that are right but soft) and uniform noise."""
    from torchvision.transforms.v2.functional import gaussian_blur

    extractor, info = make_extractor("classifier", classifier, data_cfg, device)
    test = load_tensors(replace(data_cfg, split="test", limit=None))
    real_feats, _ = extract(test.images, extractor)
    train = balanced_subset(load_tensors(replace(data_cfg, split="train", limit=None)), num_per_class)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, train.images.shape, generator=gen, dtype=torch.uint8)
    result = {}
    blurred = gaussian_blur(train.images.float(), kernel_size=5, sigma=BASELINE_BLUR_SIGMA).round().to(torch.uint8)
    for name, images in (("real_train", train.images), ("real_train_blurred", blurred), ("uniform_noise", noise)):
        result[name] = score(images, train.labels, test, extractor, with_lpips=False, real_feats=real_feats)
        result[name].update(info, num_per_class=num_per_class)
    return result
