"""Evaluate trained pipelines: FID / KID / IS with clean-fid, conditional accuracy, diversity, comparisons.

`python eval.py ...` and the `ccg-eval` command are the same:

    python eval.py runs/demo/ddpm --num-per-class 200                     # offline classifier features
    python eval.py runs/x/pipeline --features inception --num-per-class 1000
    python eval.py runs/x --scheduler dpmsolver --steps 20 --guidance 2
    python eval.py runs/x --guidance 3 --guidance-interval 0 0.6              # guide the low-noise steps only
    accelerate launch --num_processes 2 eval.py runs/x                     # generation split across processes
    python eval.py train-classifier --data fashion_mnist                   # the offline metrics' classifier
    python eval.py train-classifier --data imagefolder --data-path DIR --image-size 32 --out classifiers/mine
    python eval.py compare runs/a runs/b --out reports/a_vs_b              # Markdown table + side-by-side grids
    python eval.py baselines --data fashion_mnist --num-per-class 200      # real-data floor, blurred real, noise
    python eval.py set-default runs/x                                      # fastest sampler within 10% of best FID

Results go to `<run or pipeline>/eval/<name>/metrics.json` beside the samples (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from functools import partial
from pathlib import Path
from typing import Optional

from .classifier import save_classifier, train_classifier
from .config import ConfigError, DataConfig
from .data import DataError
from .evaluation import (
    SHIPPED_CLASSIFIERS, classifier_cache_path, classifier_identity, evaluate_export, reference_baselines,
)
from .exports import choose_default_sampler
from .metrics import MetricsError
from .model_card import write_model_card
from .pipeline_ddpm import check_interval
from .report import compare_runs
from .run import multi_cpu
from .rundir import export_folder
from .tracking import log_evaluation, start_eval_tracking

USER_ERRORS = (ConfigError, DataError, MetricsError, FileNotFoundError, ValueError)


def evaluate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="an exported pipeline folder, or a run directory holding pipeline/")
    p.add_argument("--num-per-class", type=int, default=100)
    p.add_argument("--features", choices=["classifier", "inception"], default="classifier")
    p.add_argument("--classifier", help="classifier folder (default: the one shipped for the dataset)")
    add_data_args(p, None, "the dataset, when the pipeline has no run config beside it")
    p.add_argument("--ref-split", choices=["train", "test"], default="test")
    p.add_argument("--scheduler", choices=["ddpm", "ddim", "dpmsolver"], help="swap the diffusion sampler")
    p.add_argument("--steps", type=int, help="diffusion sampling steps")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only the steps with LO <= t/T <= HI, e.g. 0 0.6")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network for the batch first; on a GPU each sampling step replays a CUDA "
                        "graph (pays for many images; compilation takes a minute or so)")
    p.add_argument("--out", help="output folder (default: <path>/eval/<features>-<sampler>)")
    p.add_argument("--no-pngs", action="store_true", help="do not write one PNG per sample")
    p.add_argument("--wandb", choices=["disabled", "auto", "offline", "online"], default="disabled",
                   help="also log to W&B: into the training's run when PATH is (in) a run directory")
    p.add_argument("--timeout-minutes", type=float, default=60.0,
                   help="how long processes wait for each other (the main one scores alone) before failing")
    p.add_argument("--wandb-new-run", action="store_true",
                   help="log to a separate run of job type eval, grouped with the training run")
    args = p.parse_args(argv)
    if args.timeout_minutes <= 0:
        raise ValueError(f"--timeout-minutes={args.timeout_minutes}: must be positive")
    if args.num_per_class < 2:
        raise ValueError(f"--num-per-class={args.num_per_class}: need at least 2 per class")
    if args.guidance_interval:
        check_interval(args.guidance_interval)

    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    accelerator = Accelerator(cpu=multi_cpu(), log_with="wandb" if args.wandb != "disabled" else None,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=args.timeout_minutes))])
    path = Path(args.path)
    sampler = "-".join(str(v) for v in (args.scheduler, args.steps and f"{args.steps}steps",
                                        args.guidance is not None and f"w{args.guidance}",
                                        args.guidance_interval and "gi{:g}-{:g}".format(*args.guidance_interval))
                       if v)
    out = Path(args.out) if args.out else path / "eval" / f"{args.features}{'-' + sampler if sampler else ''}"
    data_cfg = data_config(args) if args.data else None
    on_scored = None
    if args.wandb != "disabled":
        model_artifact = start_eval_tracking(accelerator, path, out, args.wandb, new_run=args.wandb_new_run)
        step = export_step(path)
        on_scored = partial(log_evaluation, accelerator, out, step=step, model_artifact=model_artifact)
    result = evaluate_export(path, out, num_per_class=args.num_per_class, features=args.features,
                      classifier=args.classifier, data_cfg=data_cfg, ref_split=args.ref_split,
                      scheduler=args.scheduler, steps=args.steps, guidance=args.guidance,
                      guidance_interval=args.guidance_interval, seed=args.seed,
                      batch_size=args.batch_size, accelerator=accelerator, save_pngs=not args.no_pngs,
                      on_scored=on_scored, compile=args.compile)
    accelerator.end_training()
    if accelerator.is_main_process:
        export = export_folder(path)
        if export is not None:  # the evaluated export's card shows its newest metrics
            write_model_card(export, result)
        print(summary_line(result))
        print(f"written: {out / 'metrics.json'}")
    return 0


DATA_FLAGS = {"data_path": "path", "hub_id": "hub_id", "hub_config": "hub_config", "revision": "revision",
              "image_column": "image_column", "label_column": "label_column", "image_size": "image_size",
              "channels": "channels"}


def add_data_args(p: argparse.ArgumentParser, default: Optional[str], help_text: str) -> None:
    """The `data.*` options that name a dataset, as flags (the same names and meanings as in a run's config)."""
    choices = typing.get_args(typing.get_type_hints(DataConfig)["name"])
    p.add_argument("--data", choices=choices, default=default, help=help_text)
    p.add_argument("--data-path", help="data.path: an IDX folder, a save_to_disk dataset or a folder of class "
                                       "sub-folders (with --data imagefolder)")
    p.add_argument("--hub-id", help="data.hub_id, with --data hub: OWNER/NAME of a Hub dataset")
    p.add_argument("--hub-config", help="data.hub_config: the Hub dataset's configuration")
    p.add_argument("--revision", help="data.revision: a branch, tag or commit of the Hub dataset")
    p.add_argument("--image-column", help="data.image_column")
    p.add_argument("--label-column", help="data.label_column")
    p.add_argument("--image-size", type=int, help="data.image_size: resize + centre crop to this square")
    p.add_argument("--channels", type=int, choices=[1, 3], help="data.channels: 1 grayscale, 3 RGB")
    p.add_argument("--hflip", action="store_true", help="data.hflip: the images keep their class when mirrored")


def data_config(args: argparse.Namespace) -> DataConfig:
    cfg = DataConfig(name=args.data, hflip=args.hflip, **{key: getattr(args, flag) for flag, key in DATA_FLAGS.items()})
    cfg.validate()
    return cfg


def export_step(path: Path) -> Optional[int]:
    """The training step of the evaluated export (its `training.json`), for the W&B x-axis."""
    info = (export_folder(path) or path) / "training.json"
    return json.loads(info.read_text()).get("steps") if info.is_file() else None


def _prog() -> str:
    return Path(sys.argv[0]).name or "eval.py"


def summary_line(result: dict) -> str:
    parts = [f"{k}={result[k]:.4g}" for k in ("fid", "kid", "accuracy", "inception_score", "classifier_score",
                                               "diversity_ratio", "combined_score", "seconds_per_image")
             if isinstance(result.get(k), float)]
    if result.get("real_floor"):
        parts.append(f"real_floor_fid={result['real_floor']['fid']:.4g}")
    flagged = result.get("flagged_classes")
    parts.append(f"flagged={','.join(flagged) if flagged else 'none'}")
    return " ".join(parts)


def train_classifier_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{_prog()} train-classifier",
                                description="Train the dataset classifier behind the offline metrics.")
    add_data_args(p, "fashion_mnist", "the dataset to train on (its train split; accuracy on its test split)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="default: the per-user cache (XDG_CACHE_HOME, or ~/.cache) for this data, where "
                                 "evaluations on the same data find it; never the package's shipped classifiers")
    args = p.parse_args(argv)

    import torch

    kwargs = {"epochs": args.epochs} if args.epochs else {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.out is None and args.data not in ("fashion_mnist", "cifar10", "synthetic"):
        raise ValueError(f"--data {args.data}: give --out DIR for the classifier (then `eval.py RUN --classifier DIR`, "
                         "or eval.classifier: DIR in the run's config)")
    data_cfg = data_config(args)
    model, info = train_classifier(data_cfg, seed=args.seed, device=device, **kwargs)
    # Never into the package: a replaced shipped classifier makes the documented FIDs incomparable, and an
    # installed package may be read-only. The cache is where evaluations look for this data's own classifier.
    if args.out is None:
        info["data_identity"] = classifier_identity(data_cfg)
    out = Path(args.out) if args.out else classifier_cache_path(data_cfg)
    save_classifier(model, info, out)
    print(f"test accuracy {info['test_accuracy']:.4f}; saved to {out}")
    shipped = SHIPPED_CLASSIFIERS / args.data
    if shipped.is_dir():
        print(f"evaluations on {args.data} keep using the classifier shipped in the package ({shipped}); to score "
              f"with this one, give --classifier {out} (or eval.classifier: {out} in a run's config)")
    elif args.out is None:
        print("evaluations on this data use it unless --classifier PATH is given")
    return 0


def baselines_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{_prog()} baselines",
                                description="Reference points: real train images (the floor), the same blurred (sigma 1) "
                                            "and uniform noise, "
                                            "scored like generated samples against the test split.")
    add_data_args(p, "fashion_mnist", "the dataset")
    p.add_argument("--num-per-class", type=int, default=100)
    p.add_argument("--classifier")
    p.add_argument("--out", help="JSON file to write (default: print only)")
    args = p.parse_args(argv)

    import json

    import torch

    result = reference_baselines(data_config(args), args.num_per_class,
                                 args.classifier, torch.device("cpu"))
    for name, metrics in result.items():
        print(f"{name}: {summary_line(metrics)}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def set_default_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{_prog()} set-default",
                                description="Make the fastest evaluated sampler within a FID tolerance of the best "
                                            "the exported diffusion pipeline's default.")
    p.add_argument("run", help="a diffusion run directory with eval/*/metrics.json from several samplers")
    p.add_argument("--tolerance", type=float, default=0.1, help="allowed relative FID above the best (0.1 = 10%%)")
    p.add_argument("--num-samples", type=int,
                   help="compare the evaluations of this many samples (default: the most common count)")
    args = p.parse_args(argv)

    result = choose_default_sampler(Path(args.run), args.tolerance, args.num_samples)
    print(f"default sampler: {result['chosen']} (FID {result['fid']:.4g}, best {result['best_fid']:.4g}, "
          f"{result['seconds_per_image']:.4g} s/image, N={result['num_samples']})")
    return 0


def compare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{_prog()} compare", description="Compare evaluated runs side by side.")
    p.add_argument("runs", nargs="+", help="run directories (each evaluated with eval.py first)")
    p.add_argument("--out", required=True, help="folder for report.md, grids.png and report.json")
    p.add_argument("--metrics", help="which eval/<name>/metrics.json to read (default: the newest)")
    p.add_argument("--per-class", type=int, default=6, help="images per class in the side-by-side grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb", choices=["disabled", "auto", "offline", "online"], default="disabled",
                   help="also log the table and the grid as a W&B run of job type compare")
    args = p.parse_args(argv)

    report = compare_runs([Path(r) for r in args.runs], Path(args.out), metrics_name=args.metrics,
                          per_class=args.per_class, seed=args.seed, wandb=args.wandb)
    print(report)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train-classifier": train_classifier_main, "compare": compare_main, "baselines": baselines_main,
                "set-default": set_default_main}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return evaluate_main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
