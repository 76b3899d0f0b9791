"""What identifies a run's training images, written to its config.yaml: a folder and its file count, or a Hub id,
config, revision and the commit it resolves to, with `datasets`' fingerprint of the loaded table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .config import DataConfig
from .data_sources import hub_offline, hub_repo

if TYPE_CHECKING:
    from .decoding import ImageTensors


def dataset_source(cfg: DataConfig, ds) -> dict:
    """What identifies the images: a folder's path and file count, or the Hub id, config and revision, with
    `datasets`' fingerprint of the loaded table (it changes when the data files do)."""
    def folder(path: Path) -> dict:
        path = path.expanduser().resolve()
        return {"path": str(path), "files": sum(1 for f in path.rglob("*") if f.is_file())}

    if cfg.path is not None:
        path = Path(cfg.path)
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()  # counted by its fingerprint
        source = {"path": str(path.expanduser().resolve())} if saved or not path.is_dir() else folder(path)
    elif cfg.name == "synthetic":
        source = {"synthetic": {"size": cfg.synthetic_size, "image_size": cfg.synthetic_image_size,
                                "channels": cfg.synthetic_channels}}
    elif Path(hub_repo(cfg)).expanduser().is_dir():  # data.hub_id may name a local copy of a Hub repo
        source = {**folder(Path(hub_repo(cfg))), "hub_config": cfg.hub_config}
    else:
        source = {"hub_id": hub_repo(cfg), "hub_config": cfg.hub_config, "revision": cfg.revision or "main"}
    if ds.cache_files:  # a table on disk: datasets' own content hash (no public accessor); in memory it is random
        source["fingerprint"] = ds._fingerprint  # noqa: SLF001
    return source


def data_identity(data: ImageTensors) -> dict:
    """`data.source` with, for a Hub dataset, the commit its revision resolves to (asked of the Hub once, by
    the main process; offline it stays unknown and the fingerprint identifies the cached copy)."""
    source = dict(data.source)
    if "hub_id" in source and not hub_offline():
        try:
            from huggingface_hub import HfApi

            source["commit"] = HfApi().dataset_info(source["hub_id"], revision=source["revision"]).sha
        except Exception:  # a private or unreachable repo: the run goes on, identified by its fingerprint
            source["commit"] = None
    return source
