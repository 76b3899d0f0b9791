"""The training run, written once for every model family: set-up, resume, the loop and its upkeep, the export.

A family's trainer (`pipelines.gan.CGAN`, `pipelines.diffusion.DDPM`) knows only what differs between
families: its networks and optimizers, one optimizer step, what it samples and exports (see
`FamilyTrainer`). A family is declared, with its config schema and pipeline, in `families.ModelFamily`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch

from .checkpoints import load_checkpoint, resolve_resume
from .ema import ema_state, inference_mode, load_ema_state
from .evaluation import TrainingEvaluator
from .exports import save_pipeline
from .grids import class_grid_labels, save_grid, write_grid
from .console import RunLog, TrainingProgress
from .loop import NonFiniteGuard, Upkeep, steps_from
from .model_card import GRID_FILE, TRAINING_FILE, write_model_card
from .preemption import Preemption
from .publish import check_can_push, push_run
from .run import Run, start_run
from .tracking import drop_stats_after, log_export
from .typed_yaml import to_dict


class FamilyTrainer(Protocol):
    """What the run needs from a model family's trainer. Built from the `Run` (models, optimizers, EMA, the step)."""

    name: str  # the progress bar's label
    grid_per_class: int  # images in each class row of the training grids
    progress_keys: tuple[str, ...]  # logged values shown on the progress bar
    model: torch.nn.Module  # the unwrapped network that the EMA tracks and the pipeline holds
    ema: Optional[Any]  # a diffusers EMAModel, or None
    guard: NonFiniteGuard
    pipeline: Any  # the export: a DiffusionPipeline around `model`; it draws every grid
    sample_kwargs: dict  # its call arguments for the grids and the evaluation
    # Run with the EMA weights in place before anything is sampled or exported from them: measures what depends
    # on the weights (the cGAN's BatchNorm statistics); None where nothing does.
    statistics: Optional[Callable[[], None]]

    def train_step(self, step: int, micro_batches: list, measure_grads: bool) -> dict[str, torch.Tensor]: ...

    def scalars(self) -> dict[str, float]: ...  # logged beside the metrics: learning rates

    def peak_rates(self) -> dict[str, float]: ...  # the learning rates in use, at their schedule's peak

    def checkpoint_extra(self) -> dict[str, torch.Tensor]: ...  # state beyond models, optimizers and RNGs

    def restore(self, extra: dict[str, torch.Tensor], checkpoint: Path) -> None: ...

    def grid_images(self, labels: torch.Tensor) -> torch.Tensor: ...  # [0, 1] samples, the same every call

    def final_pictures(self, step: int) -> None: ...  # the family's own pictures after training


class Training:
    """One run of one family: what the upkeep calls back into (grids, exports, evaluation, checkpoint state)."""

    def __init__(self, run: Run, family: FamilyTrainer, step: int, preemption: Preemption):
        self.run, self.family, self.preemption = run, family, preemption
        self.step = step  # completed optimizer steps, kept current by the loop
        self.grid_labels = class_grid_labels(run.data.num_classes, family.grid_per_class, run.device)
        self.evaluator = None
        if run.cfg.eval.every_epochs and run.accelerator.is_main_process:
            self.evaluator = TrainingEvaluator(accelerator=run.accelerator, cfg=run.cfg, output_dir=run.out,
                                               pipeline=family.pipeline, inference=self.inference,
                                               export=self.export, call_kwargs=family.sample_kwargs,
                                               preemption=preemption)

    def inference(self):
        """Eval mode, the EMA weights and their own statistics, for everything sampled or exported."""
        return inference_mode(self.family.model, self.family.ema, self.family.statistics)

    def draw_grid(self, name: str, step: int) -> None:
        if self.run.accelerator.is_main_process:
            with self.inference():
                images = self.family.grid_images(self.grid_labels)
            save_grid(self.run.accelerator, images, self.family.grid_per_class, self.run.out / "grids" / f"{name}.png",
                      "samples", step, name)

    def export(self, path: Path, texts: Optional[dict[str, str]] = None) -> None:
        """The pipeline with the EMA weights, its sample grid and model card (and `texts`, by file name)."""

        def finish(folder: Path) -> None:
            write_grid(self.family.grid_images(self.grid_labels), self.family.grid_per_class, folder / GRID_FILE)
            for name, text in {TRAINING_FILE: json.dumps(self.training_info(), indent=2), **(texts or {})}.items():
                (folder / name).write_text(text)
            write_model_card(folder, final=path)

        with self.inference():
            save_pipeline(self.family.pipeline, path, finish=finish)

    def training_info(self) -> dict:
        """What the model card says of the training: steps, images, time and hardware."""
        run, acc = self.run, self.run.accelerator
        images = self.step * run.cfg.train.batch_size * run.accumulation * acc.num_processes
        device = torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda" else acc.device.type.upper()
        return {"steps": self.step, "epochs": round(self.step / run.steps_per_epoch, 3), "images": images,
                "wall_seconds": round(run.clock.seconds(), 1), "processes": acc.num_processes, "device": device,
                "mixed_precision": acc.mixed_precision}

    def log_exports(self) -> None:
        """The final export (aliases `latest`, `step-N`) and `best/` (alias `best`) as model artifacts of the W&B run.

        `best/` first: W&B's server gives `latest` to the version logged last, whatever the aliases asked."""
        cfg, acc, out = self.run.cfg, self.run.accelerator, self.run.out
        if not cfg.log.artifacts:
            return
        config = to_dict(cfg)
        last_eval = self.evaluator.last if self.evaluator is not None else None
        if (out / "best" / "best.json").is_file():
            log_export(acc, out / "best", ["best"], {**json.loads((out / "best" / "best.json").read_text()),
                                                     "config": config})
        log_export(acc, out / "pipeline", ["latest", f"step-{self.step}"],
                   {**self.training_info(), "metrics": last_eval, "config": config})

    def evaluate(self, epoch: int, step: int) -> Optional[dict]:
        if self.evaluator is None:
            return None
        self.evaluator(epoch, step)
        return self.evaluator.last

    def checkpoint_extra(self) -> dict[str, torch.Tensor]:
        ema = self.family.ema
        return {**(ema_state(ema) if ema is not None else {}), **self.family.checkpoint_extra()}


def resume(run: Run, family: FamilyTrainer, resume_from: Optional[str]) -> int:
    """The step to start from: 0, or the checkpoint's, with every saved state put back."""
    checkpoint = resolve_resume(run.out, resume_from)
    if checkpoint is None:
        if resume_from is not None and run.accelerator.is_main_process:
            drop_stats_after(run.out, 0)  # an attempt killed before its first checkpoint: its steps run again
        return 0
    state, extra = load_checkpoint(run.accelerator, checkpoint)
    step = state["step"]
    run.clock.resumed(state.get("train_seconds", 0.0))
    if family.ema is not None:
        load_ema_state(family.ema, extra)
    family.restore(extra, checkpoint)
    if run.accelerator.is_main_process:
        drop_stats_after(run.out, step)  # the steps after the checkpoint run again and log again
    run.accelerator.print(f"resumed from {checkpoint} at step {step}")
    return step


def fit(family_type: type, cfg: Any, args: argparse.Namespace) -> Path:
    """Train `cfg` with the family `family_type` (`--resume`, `--overwrite` in `args`); returns the run directory.
    What the main process prints goes to `train.log` in the run directory too."""
    with RunLog() as log:
        return _fit(family_type, cfg, args, log)


def _fit(family_type: type, cfg: Any, args: argparse.Namespace, log: RunLog) -> Path:
    run = Run.open(cfg, args.resume, args.overwrite, args.accept_config_changes)
    family = family_type(run)  # networks, optimizers, EMA, the training step
    run.accelerator.print(run.scaling_line(family.peak_rates()))
    step = resume(run, family, args.resume)
    preemption = Preemption().install()  # SIGTERM from here on: a flag that the loop and the phases below read
    training = Training(run, family, step, preemption)
    acc = run.accelerator
    progress = TrainingProgress(total=run.total_steps, initial=step, desc=family.name,
                                steps_per_epoch=run.steps_per_epoch, keys=family.progress_keys,
                                images_per_step=cfg.train.batch_size * run.accumulation * acc.num_processes,
                                show=acc.is_local_main_process, log=log)
    upkeep = Upkeep(run=run, tasks=training, guard=family.guard, preemption=preemption, progress=progress)
    if acc.is_main_process:
        check_can_push(cfg.export)  # a token, not offline, a namespace it may write: known before hours of training
    start_run(acc, cfg, run.out, run.data)  # set-up passed: only now does the run write config.yaml and open W&B
    log.attach(run.out)  # and train.log, with what was printed so far

    for _, micro_batches in steps_from(run.loader, step, run.total_steps, run.accumulation):
        if cfg.train.compile:  # a new step: CUDA graphs (on CUDA) may reuse the last step's outputs, all read by
            torch.compiler.cudagraph_mark_step_begin()  # now; without graphs this only counts the step
        metrics = family.train_step(step, micro_batches, measure_grads=(step + 1) % cfg.log.every_steps == 0)
        step += 1
        training.step = step
        progress.update()
        record = upkeep.after_step(step, metrics, **family.scalars())  # checkpoints, and exits on a SIGTERM
        if record:
            progress.logged(record)
    progress.close()
    upkeep.finishing(step)  # the final checkpoint is written: a SIGTERM from here on ends the run at a stop point

    # The final grid, the family's pictures and the export, all from the EMA weights if any.
    acc.wait_for_everyone()
    if acc.is_main_process:
        upkeep.stop_point("draws the final pictures and writes the export")
        training.draw_grid("final", step)
        upkeep.stop_point("draws the final pictures and writes the export")
        with training.inference():
            family.final_pictures(step)
        upkeep.stop_point("writes the export")
        training.export(run.out / "pipeline")
        upkeep.stop_point("logs the export" + (" and pushes it" if cfg.export.push_to_hub else ""))
        training.log_exports()
        acc.print(f"done: {step} steps; pipeline in {run.out / 'pipeline'}; grids in {run.out / 'grids'}")
    acc.end_training()
    if cfg.export.push_to_hub and acc.is_main_process:
        upkeep.stop_point("pushes the export")
        push_run(run.out, cfg.export)  # last: a failed push leaves a finished run, and says how to push it again
    return run.out
