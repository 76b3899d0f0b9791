"""The speed options measured in one run: each trainer's real step (the path `train_*.py` runs)
with `train.channels_last`, `train.compile` (in its modes) and channels-last with compile, against the defaults.
The CUDA-graph modes (reduce-overhead, max-autotune) run on a CUDA device only; elsewhere they are skipped,
since the trainers would compile them in another mode (`pipelines.run.compile_mode`).

Every variant builds fresh models from the same config, then times the same number of steps after
warm-up (compilation happens in the warm-up). The table shows images/s and the ratio to the default.

    python bench/speed_options.py [--cgan configs/cgan/demo_cpu.yaml] [--ddpm configs/ddpm/demo_cpu.yaml]
                                  [--steps 30] [--json out.json]
    python bench/speed_options.py --set train.mixed_precision=bf16     # on a GPU: the variants under bf16
    python bench/speed_options.py --trainers cgan --variants compile "compile reduce-overhead"
"""

from __future__ import annotations

import argparse
import json

import torch

from common import add_trainer_args, device_name, machine_line
from train_step import bench_cgan, bench_ddpm

COMPILE = ["train.compile=true"]
VARIANTS = {"default": [], "channels_last": ["train.channels_last=true"], "compile": COMPILE,
            "channels_last + compile": ["train.channels_last=true", *COMPILE],
            "compile reduce-overhead": [*COMPILE, "train.compile_mode=reduce-overhead"],
            "compile max-autotune": [*COMPILE, "train.compile_mode=max-autotune"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trainer_args(p)
    p.add_argument("--set", nargs="*", default=[], metavar="section.key=value", help="overrides for every variant")
    p.add_argument("--trainers", nargs="+", choices=["cgan", "ddpm"], default=["cgan", "ddpm"])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="the variants to time (default is always timed: the ratios are to it)")
    p.add_argument("--json")
    args = p.parse_args()
    variants = {name: VARIANTS[name] for name in VARIANTS if name == "default" or name in args.variants}
    rows = []
    for trainer, bench, config in (("cgan", bench_cgan, args.cgan), ("ddpm", bench_ddpm, args.ddpm)):
        if trainer not in args.trainers:
            continue
        for name, overrides in variants.items():
            if "compile_mode" in " ".join(overrides) and not torch.cuda.is_available():
                print(f"{trainer} {name}: skipped, CUDA graphs need a CUDA device")
                continue
            result = bench(config, args.steps, args.warmup, [*args.set, *overrides])
            rows.append({"trainer": trainer, "config": config, "variant": name, "img_s": result["ours_img_s"],
                         "bare_img_s": result["ceiling_img_s"]})
    for row in rows:
        default = next(r for r in rows if r["trainer"] == row["trainer"] and r["variant"] == "default")
        row["vs_default"] = row["img_s"] / default["img_s"]
    device = device_name()
    print(machine_line(f"{' '.join(args.set)}"))
    print(f"{'trainer':8} {'config':28} {'variant':24} {'img/s':>8} {'bare img/s':>11} {'vs default':>10}")
    for r in rows:
        print(f"{r['trainer']:8} {r['config']:28} {r['variant']:24} {r['img_s']:>8.1f} {r['bare_img_s']:>11.1f} "
              f"{r['vs_default']:>10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "set": args.set, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
