"""Sample from an exported pipeline: a grid PNG or a folder of PNGs.

    python -m pipelines.generate runs/demo/ddpm/pipeline --class Sneaker --num 64 --out grid.png
    python -m pipelines.generate runs/demo/cgan --class 3 --class Bag --num 16 --out samples/ --seed 1
    python -m pipelines.generate runs/x/pipeline --class 7 --scheduler dpmsolver --steps 20 --guidance 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from .console import Progress
from .evaluation import sample_call_kwargs, sampler_used, save_samples
from .exports import load_pipeline
from .grids import write_grid
from .pipeline_ddpm import check_interval


def parse_class(value: str, class_names: list[str]) -> int:
    """A class given by index or by name (case-insensitive)."""
    if value.isdigit():
        index = int(value)
        if index < len(class_names):
            return index
        raise ValueError(f"class index {index} is out of range; valid: 0..{len(class_names) - 1}")
    lowered = [n.lower() for n in class_names]
    if value.lower() not in lowered:
        raise ValueError(f"unknown class {value!r}; valid classes: "
                         + ", ".join(f"{i}={n}" for i, n in enumerate(class_names)))
    return lowered.index(value.lower())


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline", help="an exported pipeline folder or a run directory")
    p.add_argument("--class", dest="classes", action="append", required=True,
                   help="class name or index; repeat for several (one grid row each)")
    p.add_argument("--num", type=int, default=8, help="images per class")
    p.add_argument("--out", required=True, help="a .png file for a grid, or a folder for one PNG per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=["ddpm", "ddim", "dpmsolver"])
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only the steps with LO <= t/T <= HI")
    args = p.parse_args(argv)
    try:
        pipe = load_pipeline(args.pipeline, args.scheduler)
        names = pipe.class_names or [str(i) for i in range(10)]
        classes = [parse_class(c, names) for c in args.classes]
        if args.guidance_interval:
            check_interval(args.guidance_interval)
        if args.num < 1:
            raise ValueError(f"--num={args.num}: must be at least 1")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    labels = torch.tensor(classes).repeat_interleave(args.num)
    call_kwargs = sample_call_kwargs(pipe, args.steps, args.guidance, args.guidance_interval)
    steps = sampler_used(pipe, call_kwargs).get("num_inference_steps", 0)  # 0: a GAN, one forward pass
    with Progress(f"generate: {len(labels)} images", steps, unit="steps") as shown:
        if steps:
            def step_done(pipe, i, t, tensors):
                shown.update()
                return tensors
            call_kwargs["callback_on_step_end"] = step_done
        images = pipe(labels.tolist(), generator=torch.Generator(device).manual_seed(args.seed), output_type="pt",
                      **call_kwargs).images
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        write_grid(images, args.num, out)
    else:
        save_samples((images * 255).round().to(torch.uint8), labels, names, out)
    print(f"{len(images)} images of {', '.join(names[c] for c in classes)} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
