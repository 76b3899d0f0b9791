"""A resumed run against the config it was trained with: which changes continue the same training, which make
another one.

Changing the length of a run, its evaluation, logging, checkpoints, export, or how fast it computes (precision,
compilation, memory format) continues the same training; changing the model, the objective, the optimizer,
the data, the batch or the seed would splice two different trainings into one run without a trace. Those are
refused unless `--accept-config-changes` says it is meant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError
from .families import for_config
from .typed_yaml import to_dict

# Dotted names (or whole sections, ending in ".") that a resume may change.
ACCEPTED = (
    "output_dir", "checkpoint.", "eval.", "log.", "export.",
    "train.epochs", "train.max_steps", "train.mixed_precision", "train.compile", "train.compile_mode",
    "train.channels_last", "train.max_nonfinite_steps", "train.process_group_timeout_minutes",
    "train.process_group_backend", "data.on_device",
)  # and each family's own (`ModelFamily.resume_may_change`)


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(values, dict):
        return {prefix[:-1]: values}
    flat = {}
    for key, value in values.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def accepted(name: str, family_accepted: tuple[str, ...] = ()) -> bool:
    return any(name == a or (a.endswith(".") and name.startswith(a)) for a in (*ACCEPTED, *family_accepted))


def config_changes(saved: dict, cfg: Any) -> tuple[list[str], list[str]]:
    """(refused, accepted) changes from the `saved` config (a run's config.yaml) to `cfg`, as 'name: old -> new'.

    Settings the saved config lacks (added to the schema since) are not compared."""
    before = flatten({k: v for k, v in saved.items() if k != "dataset"})
    now = flatten(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))  # the same YAML types as the saved file
    family_accepted = for_config(cfg).resume_may_change
    refused, kept = [], []
    for name in sorted(now):
        if name in before and before[name] != now[name]:
            (kept if accepted(name, family_accepted) else refused).append(f"{name}: {before[name]!r} -> {now[name]!r}")
    return refused, kept


def check_resume_config(cfg: Any, out: Path, accept: bool) -> list[str]:
    """Before a resume from a checkpoint: raise `ConfigError` listing the changes that make another training
    (unless `accept`); returns the lines to print about the accepted ones."""
    path = out / "config.yaml"
    if not path.is_file():
        return []
    saved = yaml.safe_load(path.read_text()) or {}
    refused, kept = config_changes(saved, cfg)
    if refused and not accept:
        raise ConfigError(f"--resume: {path} was trained with other settings of the model, objective, optimizer, "
                          "data, batch or seed than this command gives: " + "; ".join(refused) + ". Resume with "
                          "the run's own config (--config " + str(path) + "), start a new output_dir, or pass "
                          "--accept-config-changes to continue this run under the new settings")
    lines = [f"resuming with changed settings: {'; '.join(kept)}"] if kept else []
    if refused:
        lines.append(f"resuming with changed training settings (--accept-config-changes): {'; '.join(refused)}")
    return lines
