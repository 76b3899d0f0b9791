"""Studies: a grid of runs from a W&B sweep file, or a list of runs from an experiment file, trained
in turn (or one per GPU), then evaluated and compared in one report.

    python -m pipelines.sweep configs/sweeps/cgan_losses.yaml [--gpus 0,1,2,3] [--dry-run] [--report-only]
    python -m pipelines.sweep configs/sweeps/cgan_losses.yaml --gpus 0,1 --runs-per-gpu 4   # small runs share a GPU
    python -m pipelines.sweep configs/experiments/cgan_vs_ddpm.yaml
    python -m pipelines.sweep STUDY --task 3 && python -m pipelines.sweep STUDY --report-if-done  # one run of
        # the study, then the report if it was the last (scripts/slurm/study_array.sbatch: a Slurm job array)

A sweep file is also a W&B sweep (`wandb sweep FILE`, then `wandb agent ID` on each machine): its
parameters are the trainers' dotted overrides, fixed ones included, and `output_dir` names each run's
folder from the swept values. Running the command again continues a study: finished runs are skipped,
interrupted ones resume from their last checkpoint, and evaluations already written are reused.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import ConfigError, load_config
from .evaluation import evaluate_export
from .families import UnknownFamily, for_script
from .gpu_slots import GpuSlots, gpu_free_gib  # noqa: F401 (gpu_free_gib: also imported from here)
from .metrics import MetricsError, inception_extractor
from .recipes import recipe_path
from .report import write_study_report
from .rundir import snapshot_dir

logger = logging.getLogger(__name__)



class StudyError(ValueError):
    """The study file cannot be run: it names the bad key or value and the valid choices."""


@dataclass
class PlannedRun:
    name: str
    program: str
    config: Optional[str]
    overrides: list[str]
    cfg: Any  # the run's validated config: where it writes, how long it trains, how it is evaluated
    swept: dict = field(default_factory=dict)  # the swept values of this run, e.g. {"loss.name": "bce"}

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    def command(self) -> list[str]:
        config = ["--config", self.config] if self.config else []
        # The installed package's command, not a script's path: it works from any install and folder.
        return [sys.executable, "-m", "pipelines", for_script(self.program).command, *config, *self.overrides,
                "--resume", "latest"]

    def finished(self) -> bool:
        return (self.output_dir / "pipeline" / "model_index.json").is_file()

    def targets(self, kind: str) -> dict[str, Path]:
        """The exports to evaluate: each snapshot epoch in a sweep; the best and final export in an experiment."""
        if kind == "sweep" and self.cfg.eval.snapshot_epochs:
            return {f"epoch_{e:03d}": snapshot_dir(self.output_dir, e) for e in sorted(self.cfg.eval.snapshot_epochs)}
        found = {"final": self.output_dir / "pipeline"}
        if kind == "experiment" and (self.output_dir / "best" / "model_index.json").is_file():
            found = {"best": self.output_dir / "best", **found}
        return found


@dataclass
class Study:
    name: str
    kind: str  # "sweep" (a W&B grid) or "experiment" (named runs)
    description: str
    runs: list[PlannedRun]
    report_dir: Path


def load_study(path: str | Path) -> Study:
    try:
        path = recipe_path(path)  # a file, or a shipped study by name (sweeps/cgan_losses_cpu)
    except ConfigError:
        raise StudyError(f"study file not found: {path}; `python -m pipelines recipes` lists the shipped ones") from None
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict):
        raise StudyError(f"{path}: the top level must be a mapping")
    if "parameters" in doc:
        return _load_sweep(path, doc)
    if "runs" in doc:
        return _load_experiment(path, doc)
    raise StudyError(f"{path} is neither a W&B sweep (with `parameters`) nor an experiment (with `runs`)")


def _config_class(program: Any, where: str) -> type:
    """The config schema of a study's `program:` (a model family's training script, `train_cgan.py`)."""
    try:
        return for_script(program).config
    except UnknownFamily as err:
        raise StudyError(f"{where}: {err}") from None


def _build_run(cls: type, program: str, config: Optional[str], overrides: list[str], swept: dict,
               where: str) -> PlannedRun:
    try:
        cfg = load_config(cls, config, overrides)
    except ConfigError as err:
        raise StudyError(f"{where}: {err}") from None
    return PlannedRun(Path(cfg.output_dir).name, program, config, overrides, cfg, swept)


def _load_sweep(path: Path, doc: dict) -> Study:
    cls = _config_class(doc.get("program"), str(path))
    if doc.get("method") != "grid":
        raise StudyError(f"{path}: method {doc.get('method')!r}; the local runner runs grids only (valid: grid); "
                         "use `wandb sweep` and `wandb agent` for random or bayes searches")
    command = [str(c) for c in doc.get("command", [])]
    config = command[command.index("--config") + 1] if "--config" in command[:-1] else None
    fixed, swept = {}, {}
    for name, spec in doc["parameters"].items():
        if isinstance(spec, dict) and "values" in spec:
            swept[name] = list(spec["values"])
        elif isinstance(spec, dict) and "value" in spec:
            fixed[name] = spec["value"]
        else:
            raise StudyError(f"{path}: parameter {name!r} needs `values: [...]` (swept) or `value: x` (fixed) "
                             "for a grid")
    runs, name = [], doc.get("name", path.stem)
    for combo in itertools.product(*swept.values()):
        values = dict(zip(swept, combo))
        # The same `name=value` arguments that `wandb agent` passes with ${args_no_hyphens} (an agent's runs
        # are grouped by their sweep); the study's name groups the local runs on the dashboard.
        overrides = [f"log.group={json.dumps(str(name))}", *(f"{k}={v}" for k, v in {**fixed, **values}.items())]
        runs.append(_build_run(cls, doc["program"], config, overrides, values, f"{path} run {values}"))
    dirs = [r.output_dir for r in runs]
    if len(set(dirs)) != len(dirs):
        raise StudyError(f"{path}: several runs share an output_dir; put every swept parameter in the output_dir "
                         f"value as a field, e.g. {{{next(iter(swept), 'loss.name')}}}; swept: {', '.join(swept)}")
    root = Path(os.path.commonpath([str(d) for d in dirs])) if len(dirs) > 1 else dirs[0].parent
    return Study(name, "sweep", doc.get("description", ""), runs, root / "report")


def _load_experiment(path: Path, doc: dict) -> Study:
    if "output_dir" not in doc:
        raise StudyError(f"{path}: an experiment needs an `output_dir` (the runs go to OUTPUT_DIR/NAME)")
    root = Path(doc["output_dir"])
    runs, study = [], doc.get("name", path.stem)
    for name, spec in doc["runs"].items():
        where = f"{path} run {name!r}"
        if not isinstance(spec, dict):
            raise StudyError(f"{where}: expected a mapping with program, config and overrides")
        unknown = set(spec) - {"program", "config", "overrides"}
        if unknown:
            raise StudyError(f"{where}: unknown keys {sorted(unknown)}; valid keys: program, config, overrides")
        cls = _config_class(spec.get("program"), where)
        overrides = [f"log.group={json.dumps(str(study))}", *spec.get("overrides", []), f"output_dir={root / name}"]
        runs.append(_build_run(cls, spec["program"], spec.get("config"), overrides, {"run": name}, where))
    return Study(study, "experiment", doc.get("description", ""), runs, root / "report")


def train_all(study: Study, gpus: Optional[list[str]] = None, runs_per_gpu: int = 1,
              min_free_gib: float = 4.0, stagger_seconds: float = 30.0) -> list[dict]:
    """Train every run not yet finished: in turn, or `runs_per_gpu` at a time on each GPU. One record per run."""
    logs = study.report_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    slots = GpuSlots(gpus or [None], runs_per_gpu if gpus else 1, min_free_gib, stagger_seconds)

    def train_one(run: PlannedRun) -> dict:
        if run.finished():
            return {"run": run.name, "status": "finished before"}
        gpu = slots.acquire()
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
        start = time.time()
        logger.info("training %s%s", run.name, f" on GPU {gpu}" if gpu is not None else "")
        try:
            with open(logs / f"{run.name}.log", "a") as log:
                # In this folder: the one the study's relative config paths and output_dirs were read against.
                code = subprocess.call(run.command(), env=env, stdout=log, stderr=subprocess.STDOUT)
        finally:
            slots.release(gpu)
        status = "trained" if code == 0 and run.finished() else f"failed (exit {code}; see {logs / run.name}.log)"
        end = time.time()
        return {"run": run.name, "status": status, "gpu": gpu, "started": round(start, 2), "ended": round(end, 2),
                "seconds": round(end - start, 1)}

    workers = len(gpus) * runs_per_gpu if gpus else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        records = list(pool.map(train_one, study.runs))
    with open(study.report_dir / "runs.jsonl", "a") as f:
        for record in records:
            f.write(json.dumps({**record, "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    return records


def run_task(study: Study, index: int) -> int:
    """One run of the study, in place of this process (so a signal sent to it reaches the trainer): a Slurm array
    task's work. A finished run is left as it is."""
    if not 0 <= index < len(study.runs):
        raise StudyError(f"--task {index}: the study has {len(study.runs)} runs (valid: 0..{len(study.runs) - 1})")
    run = study.runs[index]
    if run.finished():
        print(f"{run.name} is finished ({run.output_dir / 'pipeline'}); nothing to train")
        return 0
    command = run.command()
    print(f"training {run.name}: {' '.join(command[1:])}", flush=True)
    os.execv(command[0], command)


@contextlib.contextmanager
def report_lock(study: Study):
    """Whether this process holds the study's report lock (held for the block): of tasks that end together,
    one builds the report."""
    import fcntl

    study.report_dir.mkdir(parents=True, exist_ok=True)
    with open(study.report_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


class InceptionProbe:
    """Inception FID and IS where clean-fid's weights can be had; one attempt per study, not per export."""

    def __init__(self, mode: str):
        self.mode, self.note, self.loaded = mode, None, False
        if mode == "no":
            self.note = "Inception metrics skipped (--inception no)"

    def available(self) -> bool:
        if self.note is not None or self.loaded:
            return self.loaded
        import torch

        try:
            inception_extractor(torch.device("cpu"))
        except MetricsError as err:
            if self.mode == "yes":
                raise
            self.note = f"Inception metrics not available here: {err}"
            return False
        self.loaded = True  # the weights are on disk now; evaluate_export() loads them itself
        return True


def evaluate_all(study: Study, inception: InceptionProbe) -> None:
    """Score every export of every finished run (offline classifier features, plus Inception where
    available); an evaluation already on disk is reused."""
    for run in study.runs:
        if not run.finished():
            continue
        for name, target in run.targets(study.kind).items():
            if not (target / "model_index.json").is_file():
                logger.warning("%s: %s is missing; skipped", run.name, target)
                continue
            kinds = ["classifier"] + (["inception"] if inception.available() else [])
            for features in kinds:
                out = run.output_dir / "eval" / (f"study-{name}" + ("-inception" if features == "inception" else ""))
                if (out / "metrics.json").is_file():
                    continue
                logger.info("evaluating %s %s (%s features)", run.name, name, features)
                evaluate_export(target, out, num_per_class=run.cfg.eval.num_per_class, features=features,
                         classifier=run.cfg.eval.classifier, data_cfg=run.cfg.data, seed=run.cfg.eval.seed,
                         save_pngs=False)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="a W&B sweep file (configs/sweeps/) or an experiment file (configs/experiments/)")
    parser.add_argument("--gpus", help="comma-separated GPU ids: train one run per GPU at a time (default: in turn)")
    parser.add_argument("--runs-per-gpu", type=int, default=1,
                        help="with --gpus: runs trained at once on each GPU (separate processes)")
    parser.add_argument("--min-free-gib", type=float, default=4.0,
                        help="with --runs-per-gpu > 1: a run joins a busy GPU only with this much memory free")
    parser.add_argument("--stagger-seconds", type=float, default=30.0,
                        help="with --runs-per-gpu > 1: time a run has to allocate before the next joins its GPU")
    parser.add_argument("--inception", choices=["auto", "yes", "no"], default="auto",
                        help="Inception FID/IS besides the offline metrics: auto uses them when the weights load")
    parser.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    parser.add_argument("--count", action="store_true", help="print the number of runs (a job array's size) and exit")
    parser.add_argument("--task", type=int, metavar="INDEX",
                        help="train only run INDEX (0-based, in --dry-run's order) in this process: a job array's task")
    parser.add_argument("--report-if-done", action="store_true",
                        help="evaluate and report only if every run is finished (the last task of a job array does)")
    parser.add_argument("--report-only", action="store_true", help="evaluate and report what is trained; train nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.runs_per_gpu < 1 or (args.runs_per_gpu > 1 and not args.gpus):
            raise StudyError(f"--runs-per-gpu {args.runs_per_gpu}: must be 1 or more, and more than 1 needs --gpus")
        study = load_study(args.study)
        if args.count:
            print(len(study.runs))
            return 0
        if args.task is not None:
            return run_task(study, args.task)
        if args.report_if_done:
            with report_lock(study) as mine:
                unfinished = [r.name for r in study.runs if not r.finished()]
                if unfinished or not mine:
                    print(f"{len(study.runs) - len(unfinished)} of {len(study.runs)} runs finished; the report is "
                          "built after the last one" if unfinished else "another task is building the report")
                    return 0
                probe = InceptionProbe(args.inception)
                evaluate_all(study, probe)
                print(write_study_report(study, inception_note=probe.note))
            return 0
        if args.dry_run:
            for run in study.runs:
                state = "finished" if run.finished() else "to train"
                print(f"{run.name} ({state}): {' '.join(run.command()[1:])}")
            print(f"report: {study.report_dir}")
            return 0
        records = [] if args.report_only else train_all(study, args.gpus.split(",") if args.gpus else None,
                                                        args.runs_per_gpu, args.min_free_gib, args.stagger_seconds)
        probe = InceptionProbe(args.inception)
        evaluate_all(study, probe)
    except (StudyError, MetricsError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = write_study_report(study, inception_note=probe.note)
    print(report)
    failed = [r for r in records if r["status"].startswith("failed")]
    for r in failed:
        print(f"error: {r['run']}: {r['status']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
