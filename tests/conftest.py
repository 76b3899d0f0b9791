"""Shared test setup: no test touches the network, and real-data tests skip when the data is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before any test module imports `datasets` / `huggingface_hub`, which read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_SKIP_REASON = "real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"


def fmnist_installed() -> bool:
    return FMNIST_DIR.is_dir() and any(FMNIST_DIR.glob("*-idx?-ubyte*"))


# Usage: `@requires_fmnist` on a test (from conftest import requires_fmnist), or request `fmnist_available`.
requires_fmnist = pytest.mark.skipif(not fmnist_installed(), reason=FMNIST_SKIP_REASON)


@pytest.fixture(scope="session")
def fmnist_available() -> Path:
    if not fmnist_installed():
        pytest.skip(FMNIST_SKIP_REASON)
    return FMNIST_DIR


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    """Re-assert the offline switches for every test, so none can reach the Hub even if one cleared them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
