"""Train a conditional GAN: `python train_cgan.py --help` (the same as `ccg-train-cgan`; see pipelines/commands.py)."""

import sys

from pipelines.commands import train_cgan

if __name__ == "__main__":
    sys.exit(train_cgan())
