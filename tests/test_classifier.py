"""The dataset classifier: shapes, learning, determinism, save/load; one slow run on real Fashion-MNIST."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import requires_fmnist

from pipelines.classifier import DatasetClassifier, load_classifier, random_crop, save_classifier, train_classifier
from pipelines.config import DataConfig

SYNTHETIC = DataConfig(name="synthetic", synthetic_size=512)
FAST = dict(epochs=2, batch_size=32, lr=1e-2, width=8, feature_dim=16, log=lambda *_: None)


@pytest.fixture(scope="module")
def trained():
    return train_classifier(SYNTHETIC, **FAST)


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_shapes(channels, size):
    model = DatasetClassifier(channels=channels, image_size=size, num_classes=7, width=8, feature_dim=64).eval()
    x = torch.rand(5, channels, size, size) * 2 - 1
    features = model.features(x)
    assert features.shape == (5, 64)
    assert (features >= 0).all()  # taken after the ReLU
    assert model(x).shape == (5, 7)


def test_random_crop_shifts_within_padding():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    assert torch.equal(random_crop(x, 0, torch.Generator().manual_seed(0)), x)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # Every kept pixel comes from the same image and channel; the rest is background (-1).
    for b in range(2):
        for c in range(3):
            kept = out[b, c][out[b, c] != -1]
            assert set(kept.tolist()) <= set(x[b, c].flatten().tolist())


def test_learns_synthetic(trained):
    model, info = trained
    assert not model.training
    assert info["test_accuracy"] > 0.9, info
    assert len(info["per_class_accuracy"]) == 10
    assert info["dataset"] == "synthetic" and info["train_images"] == 512 and info["test_images"] == 512
    assert info["class_names"] == [f"class_{k}" for k in range(10)]
    assert info["epochs"] == 2 and info["seed"] == 0 and info["train_seconds"] > 0


def test_same_seed_same_weights(trained):
    model, _ = trained
    again, _ = train_classifier(SYNTHETIC, **FAST)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_save_load_round_trip(trained, tmp_path):
    model, info = trained
    path = tmp_path / "classifiers" / "synthetic"
    save_classifier(model, info, path)
    save_classifier(model, info, path)  # overwriting an existing classifier works too
    loaded, loaded_info = load_classifier(path)
    assert not loaded.training
    assert loaded_info == json.loads(json.dumps(info))
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert sorted(p.name for p in path.parent.iterdir()) == ["synthetic"]  # no temporary folders left


def test_load_missing_says_how_to_train(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="train-classifier --data fashion_mnist") as err:
        load_classifier(tmp_path / "fashion_mnist")
    assert str(tmp_path / "fashion_mnist") in str(err.value)
    path = tmp_path / "synthetic"
    save_classifier(*trained, path)
    (path / "classifier_info.json").unlink()
    with pytest.raises(FileNotFoundError, match="classifier_info.json.*train-classifier"):
        load_classifier(path)


@pytest.mark.slow
@pytest.mark.realdata
@requires_fmnist
def test_fashion_mnist_defaults_reach_92_percent():
    """The default settings on real Fashion-MNIST (~2.5 min on 2 CPU cores)."""
    _, info = train_classifier(DataConfig(name="fashion_mnist"), log=lambda *_: None)
    assert info["test_accuracy"] >= 0.92, info


def folder_state(folder) -> dict:
    """Every file under `folder` with its bytes' hash and its modification time, and every folder's (which any
    entry made or removed in it changes): what writing there changes."""
    import hashlib

    return {str(p.relative_to(folder)): (p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns) for p in [folder, *sorted(folder.rglob("*"))]}


def test_train_classifier_without_out_goes_to_the_cache_evaluations_use_not_into_the_package(tmp_path, monkeypatch,
                                                                                             capsys):
    from pipelines.eval_cli import train_classifier_main
    from pipelines.evaluation import SHIPPED_CLASSIFIERS, classifier_cache_path, make_extractor

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    package, names = folder_state(SHIPPED_CLASSIFIERS), {p.name for p in SHIPPED_CLASSIFIERS.iterdir()}
    try:
        assert train_classifier_main(["--data", "synthetic", "--epochs", "1"]) == 0
        assert folder_state(SHIPPED_CLASSIFIERS) == package  # byte for byte, nothing added
    finally:  # a failure here must not leave a classifier in the checkout's package
        for added in {p.name for p in SHIPPED_CLASSIFIERS.iterdir()} - names:
            shutil.rmtree(SHIPPED_CLASSIFIERS / added, ignore_errors=True)
    data_cfg = DataConfig(name="synthetic")
    cached = classifier_cache_path(data_cfg)
    assert str(cached).startswith(str(tmp_path / "cache"))
    _, info = load_classifier(cached)
    assert info["epochs"] == 1 and info["data_identity"]["name"] == "synthetic"
    printed = capsys.readouterr().out
    assert f"saved to {cached}" in printed and "evaluations on this data use it" in printed
    _, used = make_extractor("classifier", None, data_cfg, torch.device("cpu"))
    assert used["classifier"] == str(cached)  # the one evaluations find, not trained again


def test_train_classifier_leaves_a_shipped_classifier_as_it_was(trained, tmp_path, monkeypatch, capsys):
    from pipelines.eval_cli import train_classifier_main
    from pipelines.evaluation import classifier_cache_path

    shipped = tmp_path / "package" / "classifiers"
    save_classifier(*trained, shipped / "synthetic")  # as if one shipped for the synthetic set
    monkeypatch.setattr("pipelines.eval_cli.SHIPPED_CLASSIFIERS", shipped)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    before = folder_state(shipped)
    assert train_classifier_main(["--data", "synthetic", "--epochs", "1"]) == 0
    assert folder_state(shipped) == before
    cached = classifier_cache_path(DataConfig(name="synthetic"))
    assert load_classifier(cached)[1]["epochs"] == 1
    printed = capsys.readouterr().out
    assert (f"evaluations on synthetic keep using the classifier shipped in the package ({shipped / 'synthetic'}); "
            f"to score with this one, give --classifier {cached}") in printed


def test_a_class_subset_is_not_scored_by_the_shipped_classifier_of_all_classes(trained, tmp_path, monkeypatch,
                                                                               caplog):
    """`data.classes` relabels its classes 0..k-1: the shipped 10-class logits would score other labels."""
    import logging

    from pipelines.evaluation import classifier_cache_path, make_extractor
    from pipelines.metrics import extract

    shipped = tmp_path / "package" / "classifiers"
    save_classifier(*trained, shipped / "synthetic")  # as if one shipped for the synthetic set
    monkeypatch.setattr("pipelines.evaluation.SHIPPED_CLASSIFIERS", shipped)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    full = DataConfig(name="synthetic", synthetic_size=128)
    _, used = make_extractor("classifier", None, full, torch.device("cpu"))
    assert used["classifier"] == str(shipped / "synthetic")  # the data it was trained on: the shipped one
    subset = DataConfig(name="synthetic", synthetic_size=128, classes=[0, 1])
    with caplog.at_level(logging.WARNING, logger="pipelines.evaluation"):
        extractor, used = make_extractor("classifier", None, subset, torch.device("cpu"))
    assert used["classifier"] == str(classifier_cache_path(subset))
    assert "knows all its classes, not data.classes=[0, 1]: training one" in caplog.text
    _, logits = extract(torch.zeros(3, 1, 28, 28, dtype=torch.uint8), extractor, with_logits=True)
    assert logits.shape == (3, 2)
    assert load_classifier(used["classifier"])[1]["class_names"] == ["class_0", "class_1"]
