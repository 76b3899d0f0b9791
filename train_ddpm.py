"""Train a class-conditional diffusion model: `python train_ddpm.py --help` (the same as `ccg-train-ddpm`; see pipelines/commands.py)."""

import sys

from pipelines.commands import train_ddpm

if __name__ == "__main__":
    sys.exit(train_ddpm())
