"""Evaluate trained pipelines: `python eval.py --help` (the same as `ccg-eval`; see pipelines/eval_cli.py)."""

import sys

from pipelines.commands import evaluate

if __name__ == "__main__":
    sys.exit(evaluate())
