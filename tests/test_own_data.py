"""The user's own labelled images: `data.name=imagefolder` / `hub`, decoding (modes, resize + centre crop),
column discovery, the dataset's identity in config.yaml, and a classifier for data none ships for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipelines.config import CGANConfig, ConfigError, DataConfig, load_config
from pipelines.data import DataError, load_tensors

from trainer_utils import ROOT

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_image(k: int, i: int, size: int, mode: str = "RGB") -> Image.Image:
    """A class-dependent picture: a bright square whose place and colour depend on the class, seeded jitter."""
    rng = np.random.default_rng(1000 * k + i)
    pixels = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
    x, y = (k % 2) * size // 2 + rng.integers(0, 4), (k // 2) * size // 3 + rng.integers(0, 4)
    pixels[y: y + size // 3, x: x + size // 3] = [(200, 60, 60), (60, 200, 60), (60, 60, 200)][k % 3]
    return Image.fromarray(pixels).convert(mode)


def write_folder(root: Path, classes=("cat", "dog", "fox"), per_class=(12, 4), size: int = 40, mode: str = "RGB"):
    for split, n in zip(("train", "test"), per_class):
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                class_image(k, i + (100 if split == "test" else 0), size, mode).save(root / split / name / f"{i}.png")
    return root


# ---------------------------------------------------------------- decoding


def test_imagefolder_is_resized_and_centre_cropped_once_at_decode(tmp_path):
    """A 40x60 portrait, white rows 0-19, grey 20-39, black 40-59: image_size=20 scales it to 20x30 and keeps
    the middle 20 rows (originals 10-49): 5 white rows, 10 grey, 5 black."""
    pixels = np.full((60, 40, 3), 128, np.uint8)
    pixels[:20] = 255
    pixels[40:] = 0
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(pixels).save(tmp_path / name / "0.png")
    data = load_tensors(DataConfig(name="imagefolder", path=str(tmp_path), image_size=20))
    assert data.images.shape == (2, 3, 20, 20) and data.images.dtype == torch.uint8
    assert data.class_names == ["a", "b"]
    rows = data.images[0, 0].float().mean(1)
    assert (rows[:4] > 240).all() and (rows[-4:] < 15).all() and ((rows[7:13] - 128).abs() < 3).all(), rows


def test_images_already_at_image_size_are_left_untouched(tmp_path):
    write_folder(tmp_path, size=32, per_class=(2, 1))
    plain = load_tensors(DataConfig(name="imagefolder", path=str(tmp_path)))
    sized = load_tensors(DataConfig(name="imagefolder", path=str(tmp_path), image_size=32))
    assert torch.equal(plain.images, sized.images)
    expected = np.asarray(Image.open(tmp_path / "train" / "cat" / "0.png"))
    assert torch.equal(plain.images[0].permute(1, 2, 0), torch.from_numpy(expected))


def test_mixed_modes_become_rgb_and_channels_1_makes_grayscale(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3, "L")
    grey.save(tmp_path / "x" / "0.png")
    class_image(0, 0, 8).convert("RGBA").save(tmp_path / "x" / "1.png")
    class_image(1, 0, 8).convert("P").save(tmp_path / "y" / "2.png")
    data = load_tensors(DataConfig(name="imagefolder", path=str(tmp_path)))
    assert data.images.shape == (3, 3, 8, 8)
    assert all(torch.equal(data.images[0, c], torch.from_numpy(np.asarray(grey))) for c in range(3))  # replicated
    assert torch.equal(data.images[1].permute(1, 2, 0), torch.from_numpy(np.asarray(class_image(0, 0, 8))))
    one = load_tensors(DataConfig(name="imagefolder", path=str(tmp_path), channels=1))
    assert one.images.shape == (3, 1, 8, 8)
    assert torch.equal(one.images[1, 0], torch.from_numpy(np.asarray(class_image(0, 0, 8).convert("L"))))


def test_16_bit_grey_is_scaled_to_8_bits_not_clipped(tmp_path):
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.array([[0, 257], [32896, 65535]], np.uint16)).save(tmp_path / name / "0.png")
    assert Image.open(tmp_path / "x" / "0.png").mode == "I;16"
    data = load_tensors(DataConfig(name="imagefolder", path=str(tmp_path)))
    assert data.images[0, 0].tolist() == [[0, 1], [128, 255]]


def test_grayscale_folder_stays_one_channel(tmp_path):
    write_folder(tmp_path, mode="L", per_class=(2, 1), size=16)
    assert load_tensors(DataConfig(name="imagefolder", path=str(tmp_path))).images.shape == (6, 1, 16, 16)


def test_images_of_different_sizes_without_image_size_name_the_option(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    class_image(0, 0, 16).save(tmp_path / "x" / "0.png")
    class_image(0, 1, 20).save(tmp_path / "y" / "1.png")
    with pytest.raises(DataError, match=r"images differ in size \(16x16, 20x20.*data.image_size=N"):
        load_tensors(DataConfig(name="imagefolder", path=str(tmp_path)))
    assert load_tensors(DataConfig(name="imagefolder", path=str(tmp_path), image_size=12)).images.shape == (2, 3, 12, 12)


def test_non_square_images_name_the_option(tmp_path):
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (20, 10)).save(tmp_path / name / "0.png")
    with pytest.raises(DataError, match="images are 20x10, not square: set data.image_size"):
        load_tensors(DataConfig(name="imagefolder", path=str(tmp_path)))


def test_a_folder_of_one_class_says_it_needs_two(tmp_path):
    (tmp_path / "only").mkdir()
    class_image(0, 0, 8).save(tmp_path / "only" / "0.png")
    with pytest.raises(DataError, match=r"one class folder \(only\); a class-conditional model needs at least 2"):
        load_tensors(DataConfig(name="imagefolder", path=str(tmp_path)))


# ---------------------------------------------------------------- Hub schema, columns, splits


def write_parquet_repo(root: Path, columns=("img", "label"), label_names=CIFAR10_NAMES, splits=(("train", 20), ("test", 10)),
                       string_labels=False, size=32):
    """A local copy of a Hub dataset repo as the Hub stores CIFAR-10: plain_text/<split>-00000-of-00001.parquet."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    image_col, label_col = columns
    label_feature = Value("string") if string_labels else ClassLabel(names=list(label_names))
    features = Features({image_col: ImageFeature(), label_col: label_feature})
    served = {}
    for split, n in splits:
        labels = [i % len(label_names) for i in range(n)]
        images = [np.asarray(class_image(k, i, size)) for i, k in enumerate(labels)]
        values = [label_names[k] for k in labels] if string_labels else labels
        (root / "plain_text").mkdir(parents=True, exist_ok=True)
        Dataset.from_dict({image_col: images, label_col: values}, features=features).to_parquet(
            str(root / "plain_text" / f"{split}-00000-of-00001.parquet"))
        served[split] = (np.stack(images), labels)
    return served


def test_hub_schema_copy_loads_for_cifar10_and_as_hub_id(tmp_path):
    served = write_parquet_repo(tmp_path / "cifar10")
    for cfg in (DataConfig(name="cifar10", path=str(tmp_path / "cifar10"), split="test"),
                DataConfig(name="hub", hub_id=str(tmp_path / "cifar10"), split="test")):
        data = load_tensors(cfg)
        images, labels = served["test"]
        assert torch.equal(data.images, torch.from_numpy(images).permute(0, 3, 1, 2))
        assert data.labels.tolist() == labels and data.class_names == CIFAR10_NAMES
        assert data.source["images"] == 10 and data.source["files"] == 2 and data.source["fingerprint"]


def test_string_labels_and_named_columns(tmp_path):
    write_parquet_repo(tmp_path, columns=("photo", "kind"), label_names=["wolf", "bear", "ant"], string_labels=True)
    with pytest.raises(DataError, match=r"columns \['photo', 'kind'\]: no image column .* data.image_column"):
        load_tensors(DataConfig(name="hub", hub_id=str(tmp_path)))
    data = load_tensors(DataConfig(name="hub", hub_id=str(tmp_path), image_column="photo", label_column="kind"))
    assert data.class_names == ["ant", "bear", "wolf"]  # sorted
    assert [data.class_names[k] for k in data.labels[:3]] == ["wolf", "bear", "ant"]
    with pytest.raises(DataError, match=r"data.label_column=species: the dataset's columns are \['photo', 'kind'\]"):
        load_tensors(DataConfig(name="hub", hub_id=str(tmp_path), image_column="photo", label_column="species"))


def test_a_missing_test_split_reads_validation_or_the_only_split(tmp_path):
    only = write_parquet_repo(tmp_path / "only", splits=(("train", 10),))
    assert load_tensors(DataConfig(name="hub", hub_id=str(tmp_path / "only"), split="test")).labels.tolist() == only["train"][1]
    served = write_parquet_repo(tmp_path / "val", splits=(("train", 10), ("validation", 20)))
    assert len(load_tensors(DataConfig(name="hub", hub_id=str(tmp_path / "val"), split="test"))) == 20
    assert len(served["validation"][1]) == 20


@pytest.mark.parametrize("overrides, message", [
    (["data.name=imagefolder"], "data.name=imagefolder needs data.path"),
    (["data.name=hub"], "data.name=hub needs data.hub_id"),
    (["data.name=cifar10", "data.hub_id=a/b"], "data.hub_id=a/b is only read with data.name=hub"),
    (["data.name=hub", "data.hub_id=a/b", "data.path=x"], "give one source"),
    (["data.image_size=4"], "data.image_size=4: must be at least 8"),
    (["data.channels=2"], "data.channels=2: valid choices are 1 (grayscale), 3 (RGB) or null"),
    (["data.name=pets"], "data.name"),
])
def test_bad_data_options_fail_at_load_time(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(CGANConfig, None, overrides)


# ---------------------------------------------------------------- end to end: both families, classifier, eval.py

CGAN = ["model.base_channels=8", "model.latent_dim=16", "model.label_emb_dim=8", "train.batch_size=12", "train.epochs=2",
        "log.every_steps=1"]
DDPM = ["model.block_out_channels=[8,16]", "model.attention=[false,false]", "model.layers_per_block=1",
        "model.norm_num_groups=4", "diffusion.num_train_timesteps=50", "diffusion.sample_steps=2",
        "train.batch_size=12", "train.epochs=2", "log.every_steps=1"]


def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    """An RGB 40x40 class-folder set (3 classes, 36 train / 12 test) and its classifier at 32x32, via eval.py."""
    root = tmp_path_factory.mktemp("own")
    folder = write_folder(root / "pets")
    classifier = root / "classifiers" / "pets"
    printed = run([str(ROOT / "eval.py"), "train-classifier", "--data", "imagefolder", "--data-path", str(folder),
                   "--image-size", "32", "--hflip", "--epochs", "2", "--out", str(classifier)], root).stdout
    return folder, classifier, printed


def test_train_classifier_on_an_image_folder_writes_its_accuracy(pets):
    folder, classifier, printed = pets
    info = json.loads((classifier / "classifier_info.json").read_text())
    assert f"test accuracy {info['test_accuracy']:.4f}" in printed and info["test_images"] == 12
    assert (info["image_size"], info["channels"], info["class_names"]) == (32, 3, ["cat", "dog", "fox"])
    assert info["data_source"]["path"] == str(folder.resolve()) and info["hflip"] is True


def test_train_classifier_on_own_data_needs_out(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "eval.py"), "train-classifier", "--data", "imagefolder",
                             "--data-path", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--data imagefolder: give --out DIR" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("script, family", [("train_cgan.py", CGAN),
                                            pytest.param("train_ddpm.py", DDPM, marks=pytest.mark.slow)])
def test_own_rgb_folder_40px_trains_at_32_and_its_classifier_scores_it(pets, tmp_path, script, family):
    folder, classifier, _ = pets
    out = tmp_path / "run"
    run([str(ROOT / script), "data.name=imagefolder", f"data.path={folder}", "data.image_size=32",
         "log.wandb=disabled", f"eval.classifier={classifier}", *family, f"output_dir={out}", "eval.every_epochs=1",
         "eval.num_per_class=4"], tmp_path)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["image_size"] == 32 and saved["data"]["name"] == "imagefolder"
    assert saved["dataset"] == {"path": str(folder.resolve()), "files": 48, "fingerprint": saved["dataset"]["fingerprint"],
                                "split": "train", "images": 36}
    assert saved["dataset"]["fingerprint"]
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "eval/accuracy" in r] == [1, 2]  # scored by the folder's classifier
    run([str(ROOT / "eval.py"), str(out), "--classifier", str(classifier), "--num-per-class", "4", "--no-pngs"], tmp_path)
    metrics = json.loads((out / "eval" / "classifier" / "metrics.json").read_text())
    assert metrics["num_samples"] == 12 and np.isfinite(metrics["fid"]) and 0 <= metrics["accuracy"] <= 1
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["id2label"] == {"0": "cat", "1": "dog", "2": "fox"}


def test_a_resume_on_changed_data_says_what_changed(tmp_path):
    folder = write_folder(tmp_path / "pets", per_class=(4, 1), size=16)
    out = tmp_path / "run"
    args = [str(ROOT / "train_cgan.py"), "data.name=imagefolder", f"data.path={folder}", "log.wandb=disabled",
            *CGAN, "train.epochs=1", f"output_dir={out}"]
    run(args, tmp_path)
    assert "the training data changed" not in run([*args, "--resume", "latest"], tmp_path).stdout
    class_image(0, 99, 16).save(folder / "train" / "cat" / "extra.png")
    printed = run([*args, "--resume", "latest"], tmp_path).stdout
    assert "warning: the training data changed since this run started (fingerprint" in printed
    assert "; images 12 -> 13; files 15 -> 16)" in printed
