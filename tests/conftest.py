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


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory):
    """A small offline classifier of the synthetic set: the feature extractor of the tests' metrics."""
    from pipelines.classifier import save_classifier, train_classifier
    from pipelines.config import DataConfig

    synthetic = DataConfig(name="synthetic", synthetic_size=600)
    model, info = train_classifier(synthetic, epochs=10, width=8, feature_dim=16, log=lambda *a: None)
    assert info["test_accuracy"] > 0.9
    path = tmp_path_factory.mktemp("clf") / "synthetic"
    save_classifier(model, info, path)
    return path
