"""`scripts/pack_export.py`: an export as one tar with fp16 weights, which loads as the export does."""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.exports import load_pipeline, save_pipeline
from test_hub_exports import FAMILIES, images

ROOT = Path(__file__).resolve().parents[1]


def pack(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "pack_export.py"), *map(str, args)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_packed_export_holds_fp16_weights_and_loads_to_the_same_images(family, tmp_path):
    pipe = FAMILIES[family]()
    save_pipeline(pipe, tmp_path / "export")
    result = pack(tmp_path / "export", tmp_path / "out" / "x_fp16.tar")
    assert result.returncode == 0, result.stderr
    with tarfile.open(tmp_path / "out" / "x_fp16.tar") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    folder = tmp_path / "unpacked" / "export"
    weights = [load_file(str(p)) for p in folder.rglob("*.safetensors")]
    assert weights and all(v.dtype == torch.float16 for w in weights for v in w.values() if v.is_floating_point())
    before = sum(p.stat().st_size for p in (tmp_path / "export").rglob("*.safetensors"))
    after = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert after < 0.55 * before
    loaded = load_pipeline(folder)
    # fp16 weights: about 3 significant digits, through a few layers (a few sampling steps for the DDPM).
    assert abs(images(loaded) - images(pipe)).max() < 0.02


def test_an_export_over_the_limit_writes_nothing(tmp_path):
    save_pipeline(FAMILIES["ddpm"](), tmp_path / "export")
    result = pack(tmp_path / "export", tmp_path / "x.tar", "--max-mib", "0.001")
    assert result.returncode != 0 and "over --max-mib 0.001" in result.stderr
    assert not list(tmp_path.glob("x.tar*"))


def test_a_folder_that_is_no_export_is_refused(tmp_path):
    result = pack(tmp_path, tmp_path / "x.tar")
    assert result.returncode != 0 and "not an exported pipeline" in result.stderr
