"""Pack an exported pipeline as one tar with its weights in fp16: what a lent GPU brings back for `pretrained/`.

    python scripts/pack_export.py runs/x/pipeline out/x_fp16.tar [--max-mib 16]

Every floating-point tensor of every `*.safetensors` file is stored in fp16 under the same name, so the
unpacked folder loads exactly like the export (`DiffusionPipeline.from_pretrained`, `pipelines.generate`),
with half the bytes. Fails, writing nothing, when the tar would exceed --max-mib (the device returns files
of at most 16 MiB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def half_folder(src: Path, dst: Path) -> None:
    """A copy of the export folder `src` at `dst` with each safetensors file's float tensors in fp16."""
    shutil.copytree(src, dst)
    for path in dst.rglob("*.safetensors"):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path), metadata={"format": "pt"})


def pack(src: Path, tar_path: Path, max_mib: float = 16.0) -> int:
    """Write `tar_path` (the folder's name as its top entry) atomically; returns its size in bytes."""
    if not (src / "model_index.json").is_file():
        raise SystemExit(f"{src}: not an exported pipeline (no model_index.json)")
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    partial = tar_path.with_name(tar_path.name + ".partial")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / src.name
        half_folder(src, folder)
        with tarfile.open(partial, "w") as tar:
            tar.add(folder, arcname=src.name)
    size = partial.stat().st_size
    if size > max_mib * 2**20:
        partial.unlink()
        raise SystemExit(f"{src}: {size / 2**20:.1f} MiB in fp16, over --max-mib {max_mib}")
    os.replace(partial, tar_path)
    return size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="an exported pipeline folder (model_index.json inside)")
    p.add_argument("tar", type=Path)
    p.add_argument("--max-mib", type=float, default=16.0)
    args = p.parse_args()
    size = pack(args.export, args.tar, args.max_mib)
    print(f"{args.tar}: {size / 2**20:.2f} MiB ({torch.float16} weights of {args.export})")


if __name__ == "__main__":
    main()
