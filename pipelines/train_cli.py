"""The training commands' line (`train_cgan.py`, `python -m pipelines train-NAME`), the same for every model
family: --config, dotted overrides, --resume, --overwrite, --dry-run, --help-config."""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from typing import Callable, Optional

import yaml

from .config import ConfigError, load_config, to_dict
from .config_help import config_help
from .data import DataError
from .families import get
from .publish import PublishError
from .rundir import RunDirError
from .trainer import fit

# Errors the user can fix: one clear line, no traceback.
USER_ERRORS = (ConfigError, DataError, RunDirError, FloatingPointError, PublishError)


def parse_args(doc: str, argv: Optional[list[str]] = None, config_cls: Optional[type] = None) -> argparse.Namespace:
    epilog = None
    if config_cls is not None:
        epilog = ("config fields (override any with section.key=value; --help-config SECTION shows one section):\n"
                  + config_help(config_cls))
    parser = argparse.ArgumentParser(description=doc, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a shipped recipe's name (cgan/demo_cpu; `python -m pipelines recipes` lists them) or a YAML "
                             "file; defaults apply without one")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
    parser.add_argument("--resume", metavar="latest|PATH", help="continue from the newest or a given checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete output_dir first if it holds a run (not with --resume)")
    parser.add_argument("--accept-config-changes", action="store_true",
                        help="with --resume: continue even though the model, objective, optimizer, data, batch or "
                             "seed differ from the run's config.yaml (refused otherwise; other changes are printed)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", nargs="?", const="", metavar="SECTION",
                        help="list the config fields (of one section: data, train, model, ...) and exit")
    return parser.parse_intermixed_args(argv)


def run_cli(config_cls: type, train: Callable, doc: str, argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipelines").setLevel(logging.INFO)
    args = parse_args(doc, argv, config_cls)
    if args.help_config is not None:
        try:
            print(config_help(config_cls, args.help_config or None))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    try:
        cfg = load_config(config_cls, args.config, args.overrides)
        if args.dry_run:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        train(cfg, args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def train(family_name: str, argv: Optional[list[str]] = None) -> int:
    """The training command of a model family (`families.py`)."""
    family = get(family_name)
    return run_cli(family.config, partial(fit, family.trainer), family.help(), argv)
