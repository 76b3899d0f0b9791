"""Where a run's numbers, tables, pictures and exports go: W&B (online, offline or off), and the run's own
`stats.jsonl`.

One training run is one W&B run: its id is chosen once, kept in `<output_dir>/wandb_run.json`, and every
`--resume` (and `eval.py` on the run) continues it with `resume="allow"`. Only the main process logs.
"""

from __future__ import annotations

import configparser
import json
import logging
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from accelerate import Accelerator

from .config import LogConfig, to_dict
from .rundir import run_config
from .rundir import run_of

STATS_FILE = "stats.jsonl"  # a run's log, one JSON record per line: written, cut back and read here only
logger = logging.getLogger(__name__)

DEFAULT_PROJECT = "class-conditional-generation"
DEFAULT_HOST = "https://api.wandb.ai"
RUN_FILE = "wandb_run.json"  # the run's W&B id, project and entity
# How the dashboard summarises each metric: the best value, not the last (sweeps rank by these).
SUMMARIES = {"eval/fid": "min", "eval/kid": "min", "eval/accuracy": "max", "eval/diversity_ratio": "max",
             "eval/flagged_classes": "min"}


def wandb_host() -> str:
    """The W&B server this machine talks to, as wandb itself finds it: WANDB_BASE_URL, then `wandb login --host`'s
    settings file, then W&B's cloud."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    settings = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb") / "settings"
    parser = configparser.ConfigParser()
    try:
        parser.read(settings)
    except configparser.Error:
        return DEFAULT_HOST
    return parser.get("default", "base_url", fallback=DEFAULT_HOST)


def logged_in() -> bool:
    """Whether wandb has credentials for its host: an API key or identity token in the environment, or a
    `.netrc` entry for the host (what `wandb login` writes), looked up as wandb does."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = Path(os.environ["NETRC"]).expanduser() if os.environ.get("NETRC") else Path.home() / ".netrc"
    try:
        entries = netrc.netrc(str(path))
    except (OSError, netrc.NetrcParseError):
        return False
    return entries.authenticators(urlsplit(wandb_host()).netloc) is not None


def wandb_mode(cfg: LogConfig, warn: bool = True) -> str:
    """`log.wandb`, where `auto` defers to the user's W&B set-up: WANDB_MODE (or WANDB_DISABLED) if set,
    online with a login for the configured host (any server), else offline (synced later).

    An explicit choice gives way to a stricter environment (disabled > offline > online): WANDB_MODE=offline
    is how compute nodes without a network are set up, and a config written elsewhere must not override it."""
    env = None  # the environment's mode and the variable that sets it
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        env = ("disabled", f"WANDB_DISABLED={os.environ['WANDB_DISABLED']}")
    elif os.environ.get("WANDB_MODE"):
        value = os.environ["WANDB_MODE"]
        env = ({"dryrun": "offline", "run": "online"}.get(value, value), f"WANDB_MODE={value}")
    if cfg.wandb != "auto":
        strictness = ("online", "offline", "disabled")  # a mode the list does not know (shared) changes nothing
        if env and env[0] in strictness and strictness.index(env[0]) > strictness.index(cfg.wandb):
            if warn:
                logger.warning("log.wandb=%s, but %s in the environment: %s", cfg.wandb, env[1],
                               "not logging to W&B" if env[0] == "disabled" else f"logging {env[0]}")
            return env[0]
        return cfg.wandb
    if env:
        return env[0]
    if logged_in():
        return "online"
    if warn:
        logger.warning("no W&B login for %s: logging offline to <output_dir>/wandb (upload later with `wandb sync`)",
                       wandb_host())
    return "offline"


def new_run_id() -> str:
    """A W&B run id as wandb makes them: 8 random lower-case letters and digits."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def run_identity(cfg: Any, output_dir: Path) -> dict:
    """The W&B run of this training: read from the run directory, or chosen now and written there.

    A `wandb agent` gives the run its id in WANDB_RUN_ID; otherwise wandb's own generator picks one.
    """
    path = output_dir / RUN_FILE
    if path.is_file():
        return json.loads(path.read_text())
    identity = {"id": os.environ.get("WANDB_RUN_ID") or new_run_id(),
                "project": cfg.log.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                "entity": cfg.log.entity or os.environ.get("WANDB_ENTITY"),
                "name": cfg.log.run_name or output_dir.name}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(identity, indent=2))
    os.replace(tmp, path)
    return identity


def start_tracking(accelerator: Accelerator, cfg: Any, output_dir: Path, dataset: Optional[dict] = None) -> None:
    """Open (or continue) the training's W&B run in `output_dir/wandb`, unless W&B is off."""
    mode = wandb_mode(cfg.log)
    if mode == "disabled" or not accelerator.is_main_process:
        return
    identity = run_identity(cfg, output_dir)
    config = {**to_dict(cfg), **({"dataset": dataset} if dataset else {})}
    open_run(accelerator, identity, mode, output_dir, config=config, tags=list(cfg.log.tags),
             group=cfg.log.group, job_type="train")


def open_run(accelerator: Accelerator, identity: dict, mode: str, folder: Path, config: Optional[dict] = None,
             **init: Any) -> None:
    """`accelerator.init_trackers` for the W&B run `identity` (continued if it exists), with its summaries."""
    kwargs = {"id": identity["id"], "resume": "allow", "name": identity.get("name"), "mode": mode,
              "dir": str(folder), **({"entity": identity["entity"]} if identity.get("entity") else {}),
              **{k: v for k, v in init.items() if v}}
    accelerator.init_trackers(identity["project"], config=config, init_kwargs={"wandb": kwargs})
    run = wandb_run(accelerator)
    if run is not None:
        run.define_metric("step")
        run.define_metric("epoch", step_metric="step")
        for key, summary in SUMMARIES.items():
            run.define_metric(key, summary=summary, step_metric="step")


def wandb_run(accelerator: Accelerator):
    """The W&B run (on the main process, with W&B on), else None."""
    if not accelerator.is_main_process or not any(t.name == "wandb" for t in accelerator.trackers):
        return None
    return accelerator.get_tracker("wandb", unwrap=True)


def log_image(accelerator: Accelerator, key: str, path: Path, step: int, caption: str = "") -> None:
    run = wandb_run(accelerator)
    if run is None:  # with W&B off the PNG on disk is the record, and wandb need not even be installed
        return
    import wandb

    run.log({key: wandb.Image(str(path), caption=caption)}, step=step)


SAMPLES_PER_ROW = 4  # sample images shown in each class row of the per-class table


def log_class_table(accelerator: Accelerator, result: dict, images, labels, step: int) -> None:
    """The per-class table of an evaluation during training, at its step."""
    run = wandb_run(accelerator)
    if run is not None:
        run.log({"eval/per_class": class_table(result, images, labels)}, step=step)


def class_table(result: dict, images, labels):
    """One row per class: its name, a few samples, per-class FID, accuracy, diversity ratio, flagged."""
    import torch
    import wandb
    from torchvision.utils import make_grid

    flagged = set(result.get("flagged_classes") or [])
    table = wandb.Table(columns=["class", "samples", "fid", "accuracy", "diversity_ratio", "flagged"])
    for k, (name, row) in enumerate(result["per_class"].items()):
        picked = images[labels.cpu() == k][:SAMPLES_PER_ROW]
        strip = make_grid(picked, nrow=SAMPLES_PER_ROW, padding=1) if len(picked) else torch.zeros(3, 1, 1)
        table.add_data(name, wandb.Image(strip.permute(1, 2, 0).cpu().numpy()), row.get("fid"),
                       row.get("accuracy"), row.get("diversity_ratio"), name in flagged)
    return table


def log_export(accelerator: Accelerator, folder: Path, aliases: list[str], metadata: dict,
               artifact_type: str = "model", name: Optional[str] = None) -> None:
    """Log `folder` as a W&B artifact of this run (`model-<run id>` by default, as W&B's integrations name
    models); offline runs keep it staged for `wandb sync`."""
    run = wandb_run(accelerator)
    if run is None:
        return
    import wandb

    artifact = wandb.Artifact(name or f"model-{run.id}", type=artifact_type, metadata=metadata)
    artifact.add_dir(str(folder))
    run.log_artifact(artifact, aliases=aliases)


def run_log_config(path: Path) -> dict:
    """The `log` section of the config of the run that `path` is (or lies in); {} outside a run."""
    return (run_config(Path(path)) or {}).get("log") or {}


def start_eval_tracking(accelerator: Accelerator, path: Path, out: Path, mode: str,
                        new_run: bool = False) -> Optional[str]:
    """`eval.py --wandb`: continue the W&B run of the training that `path` belongs to, or (with `new_run`,
    or for an export outside a run) open a run of job type `eval`, in the training's project and group.
    Returns the version of the training's model artifact that is evaluated: `model-<id>:step-N` for the final
    export (`latest` moves on when the run is resumed and exports again), `:best` for `best/`, None for a
    snapshot (not logged as an artifact) or without a training run."""
    mode = wandb_mode(LogConfig(wandb=mode))  # a stricter WANDB_MODE / WANDB_DISABLED wins over --wandb too
    if mode == "disabled" or not accelerator.is_main_process:
        return None
    run_dir = run_of(path)
    training = json.loads((run_dir / RUN_FILE).read_text()) if run_dir and (run_dir / RUN_FILE).is_file() else None
    model_artifact = None
    export = Path(path).relative_to(run_dir).parts if training else None  # () is the run dir: its pipeline/
    if export in ((), ("pipeline",)):
        info = run_dir / "pipeline" / "training.json"
        steps = json.loads(info.read_text()).get("steps") if info.is_file() else None
        model_artifact = f"model-{training['id']}:" + (f"step-{steps}" if steps is not None else "latest")
    elif export == ("best",):
        model_artifact = f"model-{training['id']}:best"
    if training and not new_run:
        open_run(accelerator, training, mode, run_dir)
        return model_artifact
    log = run_log_config(path)
    identity = {"id": new_run_id(), "name": f"eval-{(training or {}).get('name') or Path(path).name}",
                "project": (training or {}).get("project") or log.get("project") or os.environ.get("WANDB_PROJECT")
                or DEFAULT_PROJECT, "entity": (training or {}).get("entity") or log.get("entity")}
    open_run(accelerator, identity, mode, out, job_type="eval", group=log.get("group") or (training or {}).get("name"))
    return model_artifact


def log_evaluation(accelerator: Accelerator, out: Path, result: dict, images, labels, step: Optional[int],
                   model_artifact: Optional[str]) -> None:
    """An `eval.py` result: its numbers (on the x-axis `step`, the export's training step), its per-class table,
    and `metrics.json` with the grid as an `evaluation` artifact, used with the export's model artifact online."""
    run = wandb_run(accelerator)
    if run is None:
        return
    import wandb

    values = {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    values["eval/flagged_classes"] = len(result.get("flagged_classes") or [])
    values["eval/per_class"] = class_table(result, images, labels)
    run.log({**values, **({"step": step} if step is not None else {})})
    artifact = wandb.Artifact(f"eval-{run.id}", type="evaluation", metadata={
        **{k: v for k, v in values.items() if k != "eval/per_class"}, "sampler": result.get("sampler"),
        "pipeline": result.get("pipeline"), "model_artifact": model_artifact})
    for name in ("metrics.json", "grid.png"):
        if (out / name).is_file():
            artifact.add_file(str(out / name))
    if model_artifact and run.settings.mode != "offline":  # offline, the link stays in the metadata
        try:
            run.use_artifact(model_artifact)
        except Exception as err:  # a run without artifacts (log.artifacts=false): the evaluation still logs
            logger.warning("the evaluation is not linked to %s (%s)", model_artifact, err)
    run.log_artifact(artifact, aliases=["latest"])


def log_comparison(runs: list[Path], rows: list[dict], grids: Path, mode: str, folder: Path) -> Optional[str]:
    """`eval.py compare --wandb`: the comparison table and the side-by-side grid as a run of job type `compare`,
    in the first run's project and group. Returns the W&B run's id (None with W&B off)."""
    import wandb

    mode = wandb_mode(LogConfig(wandb=mode))  # a stricter WANDB_MODE / WANDB_DISABLED wins over --wandb
    if mode == "disabled":
        return None
    log = run_log_config(runs[0])
    run = wandb.init(project=log.get("project") or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                     entity=log.get("entity"), group=log.get("group"), job_type="compare", mode=mode,
                     dir=str(folder), name="compare-" + "-vs-".join(Path(r).name for r in runs),
                     config={"runs": [str(r) for r in runs]})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
    run.log({"compare/table": table, "compare/grids": wandb.Image(str(grids))})
    run.finish()
    return run.id


def drop_stats_after(output_dir: Path, step: int) -> None:
    """Keep only `stats.jsonl`'s records up to `step`, the checkpoint a run resumes from.

    A run killed after its last checkpoint logged steps it will now run again: without this their
    records would be there twice, the second time from the resumed run. A line cut short by the kill is
    dropped too. Rewritten through a temporary file, so a kill here leaves the old file.
    """
    path = output_dir / STATS_FILE
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) < len(lines):
        tmp = path.with_name(f".{STATS_FILE}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def write_stats(output_dir: Path, record: dict) -> None:
    """Append one JSON line to `stats.jsonl` (the run's own log, readable without W&B)."""
    with open(output_dir / STATS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_stats(output_dir: Path) -> list[dict]:
    """The records of `stats.jsonl` (none without the file); a line cut short by a kill is skipped."""
    path = Path(output_dir) / STATS_FILE
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
