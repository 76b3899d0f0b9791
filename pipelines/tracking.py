"""Where a run's numbers and pictures go: W&B (online, offline or off) and the run's own `stats.jsonl`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from .config import LogConfig, to_dict

logger = logging.getLogger(__name__)


def wandb_mode(cfg: LogConfig, warn: bool = True) -> str:
    """'auto' means online when an API key is configured, offline (synced later) otherwise."""
    if cfg.wandb != "auto":
        return cfg.wandb
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _read(Path.home() / ".netrc")
    if not has_key and warn:
        logger.warning("no W&B API key found: logging offline to <output_dir>/wandb (upload later with `wandb sync`)")
    return "online" if has_key else "offline"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def start_tracking(accelerator: Accelerator, cfg: Any, output_dir: Path) -> None:
    """Open the W&B run (in `output_dir/wandb`), unless `log.wandb` is disabled."""
    mode = wandb_mode(cfg.log)
    if mode != "disabled":
        accelerator.init_trackers(
            cfg.log.project,
            config=to_dict(cfg),
            init_kwargs={"wandb": {"name": cfg.log.run_name or output_dir.name, "tags": list(cfg.log.tags),
                                   "mode": mode, "dir": str(output_dir)}},
        )


def log_image(accelerator: Accelerator, key: str, path: Path, step: int, caption: str = "") -> None:
    if not accelerator.is_main_process:
        return
    # With W&B off the PNG on disk is the record, and wandb need not even be installed.
    if not any(tracker.name == "wandb" for tracker in accelerator.trackers):
        return
    import wandb

    accelerator.get_tracker("wandb", unwrap=True).log({key: wandb.Image(str(path), caption=caption)}, step=step)


def write_stats(output_dir: Path, record: dict) -> None:
    """Append one JSON line to `stats.jsonl` (the run's own log, readable without W&B)."""
    with open(output_dir / "stats.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
