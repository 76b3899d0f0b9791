"""Median and range over seeds of the metrics that `eval.py` wrote, as the README's results table gives them.

    python scripts/seed_spread.py runs/demo_seeds/cgan/seed*/eval/classifier/metrics.json

A GAN's FID moves by several points between seeds of the same recipe, so one run is no figure to quote:
the table says the median, the range and the number of seeds, with the versions and CPU they came from.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from importlib import metadata
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.json files, one per seed")
    args = parser.parse_args()
    runs = [json.loads(path.read_text()) for path in args.metrics]
    for path, run in zip(args.metrics, runs):
        print(f"{path}: FID {run['fid']:.1f}  accuracy {run['accuracy']:.3f}  "
              f"diversity {run['diversity_ratio']:.2f}  flagged {len(run['flagged_classes'])}")
    print(f"\n{len(runs)} seeds, N = {runs[0]['num_samples']:,} ({runs[0]['features']} features), median (range):")
    print(f"| FID | accuracy | diversity | classes flagged |\n|---|---|---|---|")
    print(f"| {spread([r['fid'] for r in runs], 1)} | {spread([r['accuracy'] for r in runs], 3)} "
          f"| {spread([r['diversity_ratio'] for r in runs], 2)} "
          f"| {spread([float(len(r['flagged_classes'])) for r in runs], 0)} |")
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("torch", "diffusers", "accelerate", "numpy"))
    print(f"\n{versions}; Python {platform.python_version()}; {cpu_name()}")


if __name__ == "__main__":
    main()
