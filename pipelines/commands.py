"""The user commands. `pip install` puts them on the PATH; `python -m pipelines COMMAND` and the
top-level scripts (`train_cgan.py`, `train_ddpm.py`, `eval.py`) run the same functions.

    ccg-train-cgan  ccg-train-ddpm  ccg-eval  ccg-generate  ccg-sweep  ccg-publish  ccg-recipes

Each model family's training command is `train-NAME` (`python -m pipelines train-NAME`), an installed
family's included (see `families.py`).
"""

from __future__ import annotations

import importlib
import sys
from functools import partial
from typing import Callable, Optional

from .families import all_families

def _run(module: str, function: str, *args) -> int:
    """`module.function(*args)`, the module imported only now: listing recipes or asking for --help should not
    wait seconds for torch, diffusers and accelerate, which the training and evaluation modules import."""
    return getattr(importlib.import_module(f".{module}", __package__), function)(*args)


def train(family_name: str, argv: Optional[list[str]] = None) -> int:
    """`python -m pipelines train-NAME`: the training command of a model family."""
    return _run("train_cli", "train", family_name, argv)


def train_cgan(argv: Optional[list[str]] = None) -> int:
    return train("cgan", argv)


def train_ddpm(argv: Optional[list[str]] = None) -> int:
    return train("ddpm", argv)


def evaluate(argv: Optional[list[str]] = None) -> int:
    """`eval.py`, `ccg-eval`."""
    return _run("eval_cli", "main", argv)


def generate(argv: Optional[list[str]] = None) -> int:
    return _run("generate", "main", argv)


def publish(argv: Optional[list[str]] = None) -> int:
    return _run("publish", "main", argv)


def recipes(argv: Optional[list[str]] = None) -> int:
    return _run("recipes", "main", argv)


def sweep(argv: Optional[list[str]] = None) -> int:
    return _run("sweep", "main", argv)


COMMANDS: dict[str, Callable[[Optional[list[str]]], int]] = {
    "eval": evaluate, "generate": generate, "sweep": sweep, "publish": publish, "recipes": recipes,
}


def all_commands() -> dict[str, Callable[[Optional[list[str]]], int]]:
    """`train-NAME` for each model family, installed ones included, and the other commands."""
    return {**{f.command: partial(train, f.name) for f in all_families().values()}, **COMMANDS}


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m pipelines COMMAND [ARGS]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    commands = all_commands()  # the families' commands: loads them
    if not argv or argv[0] not in commands:
        print(f"usage: python -m pipelines {{{','.join(commands)}}} [ARGS ...]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])
