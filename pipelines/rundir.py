"""The run directory on disk: whose it is, its layout, and writes that are whole or absent."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import yaml


class RunDirError(RuntimeError):
    """The output directory holds another run, or the checkpoint to resume from is missing."""


def prepare_run_dir(output_dir: str | Path, resume: Optional[str], overwrite: bool, state) -> Path:
    """Make sure `output_dir` is ours to write: empty, ours to resume, or explicitly overwritten.

    Every process checks before any of them writes (so all agree), then the main process (of
    accelerate's `state`) acts.
    """
    out = Path(output_dir)
    if overwrite and resume is not None:
        raise RunDirError(f"--overwrite deletes {out} and --resume {resume} continues it: choose one (a requeued "
                          "or repeated job wants --resume latest alone; it starts from step 0 when there is "
                          "nothing to resume)")
    occupied = out.exists() and any(out.iterdir())
    if occupied and not overwrite and resume is None:
        kind = "a run" if (out / "config.yaml").exists() else "files"
        raise RunDirError(f"{out} already holds {kind}; pass --resume latest to continue it, --overwrite to "
                          "replace it, or choose another output_dir")
    state.wait_for_everyone()
    if state.is_main_process:
        if occupied and overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        for line in recover_interrupted_writes(out):
            print(line, flush=True)
    state.wait_for_everyone()
    if state.num_processes > 1:
        check_shared(out, state)
    return out


def sees_token(path: Path, nonce: str) -> bool:
    try:
        return path.read_text() == nonce
    except OSError:
        return False


def check_shared(out: Path, state) -> None:
    """Every process must see the same `out`: checkpoints are renamed by the main process and each
    process reads its own RNG file back on resume, so several machines need a shared filesystem.

    The main process writes a file with a fresh nonce there; every process reads it; the verdicts are
    gathered, so all processes fail together (no rank is left waiting in a collective)."""
    import secrets
    import socket

    from accelerate.utils import broadcast_object_list, gather_object

    nonce = [secrets.token_hex(8) if state.is_main_process else None]
    broadcast_object_list(nonce)
    token = out / f".shared-check-{nonce[0]}"
    if state.is_main_process:
        token.write_text(nonce[0])
    state.wait_for_everyone()
    seen = gather_object([(state.process_index, socket.gethostname(), sees_token(token, nonce[0]))])
    state.wait_for_everyone()
    if state.is_main_process:
        token.unlink(missing_ok=True)
    blind = [f"process {rank} on {host}" for rank, host, ok in seen if not ok]
    if blind:
        raise RunDirError(f"output_dir {out} is not shared: {', '.join(blind)} cannot see what the main process "
                          f"({socket.gethostname() if state.is_main_process else 'process 0'}) writes there. With "
                          "several machines, put output_dir on a filesystem all of them mount (NFS, Lustre, ...)")


def recover_interrupted_writes(out: Path) -> list[str]:
    """Undo what a kill in the middle of an atomic write left in the run directory `out`; returns what it did.

    An export is swapped in by two renames (`X` -> `.old-X`, `.tmp-X` -> `X`): a kill between them leaves
    `.old-X` and no `X`, which is put back. A `.tmp-*` is always a write cut short: removed."""
    said = []
    folders = [out, out / "snapshots", checkpoint_dir(out)]
    for folder in (f for f in folders if f.is_dir()):
        for old in sorted(folder.glob(".old-*")):
            target = folder / old.name[len(".old-"):]
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, target)
                said.append(f"{target} was being replaced when the run stopped: the previous copy is put back")
        for tmp in sorted([*folder.glob(".tmp-*"), *folder.glob(".*.push-*")]):  # .X.push-*: a push's staging copy
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            said.append(f"removed {tmp}, a write that was cut short")
    return said


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def snapshot_dir(output_dir: Path, epoch: int) -> Path:
    """Where `eval.snapshot_epochs` exports the pipeline as it was after `epoch`."""
    return Path(output_dir) / "snapshots" / f"epoch_{epoch:03d}"


def export_folder(path: str | Path, name: str = "pipeline") -> Optional[Path]:
    """The export meant by `path`: the folder itself when it holds `model_index.json`, else a run directory's
    `name` export (`pipeline/`, `best/`); None when it is neither."""
    path = Path(path)
    for folder in (path / name, path):
        if (folder / "model_index.json").is_file():
            return folder
    return None


def run_of(path: Path) -> Optional[Path]:
    """The run directory that `path` is or lies in: the run, its `pipeline/` or `best/`, or a snapshot."""
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder
    return None


def run_config(path: Path) -> Optional[dict]:
    """The saved `config.yaml` of the run that `path` is or lies in (`run_of`), as a dict; None outside a run."""
    folder = run_of(path)
    return (yaml.safe_load((folder / "config.yaml").read_text()) or {}) if folder else None


# What torch.save's zip writer says when the disk refuses bytes (it raises a RuntimeError, as it does for
# everything); any other RuntimeError (CUDA out of memory, a failed collective) is not about the disk.
TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def is_write_error(err: BaseException) -> bool:
    """Whether `err` is a failed write, library by library: OSError from Python's own files and shutil,
    SafetensorError from safetensors, and torch.save's RuntimeErrors that say so."""
    from safetensors import SafetensorError

    if isinstance(err, (OSError, SafetensorError)):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in TORCH_WRITE_FAILURES)


def _write_failure(err: BaseException) -> str:
    text = str(err)
    if getattr(err, "errno", None) == errno.ENOSPC or "os error 28" in text or "No space left" in text:
        return "no space left on device"
    if getattr(err, "errno", None) == errno.EFBIG or "os error 27" in text or "File too large" in text:
        return "file too large for this filesystem or the file-size limit (ulimit -f)"
    if isinstance(err, RuntimeError):  # torch.save cut short: the disk refused bytes
        return f"the write was cut short, most likely a full disk ({type(err).__name__}: {text})"
    return f"{type(err).__name__}: {text}"


@contextlib.contextmanager
def cleaned_up_on_write_error(tmp: Path, what: str, intact: list[Path]) -> Iterator[None]:
    """Any failure removes the half-written `tmp`; a failed write (a full disk, a size limit) becomes an
    error that says what is still intact. Others (out of memory, a collective's error) go on as they are."""
    try:
        yield
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_error(err):
            raise
        kept = f"{intact[-1]} is intact" if intact else "nothing earlier was saved"
        raise RunDirError(f"writing the {what} failed ({_write_failure(err)}); the partial copy was removed and "
                          f"{kept}. Free space (or set checkpoint.keep lower), then --resume latest") from err
