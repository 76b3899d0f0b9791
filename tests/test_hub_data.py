"""The pipeline's Hub data path: `datasets.load_dataset` runs for real (its module factory, data-file
resolution, `HfFileSystem`, `hf_hub_download`, the parquet and imagefolder builders); only the server is
replaced, by `hub_fake.FakeHub` serving dataset repos behind huggingface_hub's HTTP client. Every cache
(the hub's, datasets') lives in the test's tmp_path.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import hub_fake
from pipelines.config import DataConfig
from pipelines.data import CIFAR10_CLASSES, DataError, data_identity, load_tensors

CIFAR_FILES = {"train": "plain_text/train-00000-of-00001.parquet", "test": "plain_text/test-00000-of-00001.parquet"}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = hub_fake.FakeHub(user="alice", orgs=("alice-lab",))
    hub_fake.install_datasets(fake, monkeypatch, tmp_path)
    yield fake
    hub_fake.uninstall_datasets()


def parquet(columns: dict, features: dict) -> bytes:
    """A parquet shard as `push_to_hub` writes it: Image columns as {bytes, path} structs (PNG)."""
    from datasets import Dataset, Features

    buffer = io.BytesIO()
    Dataset.from_dict(columns, features=Features(features)).to_parquet(buffer)
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def rgb(rng, n: int, size: int = 32) -> np.ndarray:
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def labelled(rng, n: int, names: list[str]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A shard of `n` random RGB images with `image`/`label` (ClassLabel) columns, and what it holds."""
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    images, labels = rgb(rng, n), rng.integers(0, len(names), n)
    data = parquet({"image": list(images), "label": labels},
                   {"image": ImageFeature(), "label": ClassLabel(names=names)})
    return data, images, labels


def cifar_card(sizes: dict[str, int], nbytes: dict[str, int]) -> bytes:
    """The dataset card of uoft-cs/cifar10 (its YAML as on the Hub, abridged), for shards of `sizes` rows."""
    names = "".join(f"          '{i}': {name}\n" for i, name in enumerate(CIFAR10_CLASSES))
    splits = "".join(f"  - name: {split}\n    num_bytes: {nbytes[split]}\n    num_examples: {n}\n"
                     for split, n in sizes.items())
    return (
        "---\nannotations_creators:\n- crowdsourced\nlanguage:\n- en\nlicense:\n- unknown\n"
        "task_categories:\n- image-classification\npaperswithcode_id: cifar-10\npretty_name: Cifar10\n"
        "dataset_info:\n  config_name: plain_text\n  features:\n  - name: img\n    dtype: image\n"
        "  - name: label\n    dtype:\n      class_label:\n        names:\n" + names
        + "  splits:\n" + splits
        + f"  download_size: {sum(nbytes.values())}\n  dataset_size: {sum(nbytes.values())}\n"
        "configs:\n- config_name: plain_text\n  data_files:\n"
        + "".join(f"  - split: {split}\n    path: plain_text/{split}-*\n" for split in sizes)
        + "  default: true\n---\n\n# Dataset Card for CIFAR-10\n\nThe CIFAR-10 dataset consists of 60000 32x32 "
        "colour images in 10 classes, with 6000 images per class.\n"
    ).encode()


def chw(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2)


def test_cifar10_loads_the_served_pixels_and_labels_with_the_cifar_names_for_both_splits(hub):
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    served, files = {}, {}
    for split, n in (("train", 40), ("test", 20)):
        images, labels = rgb(rng, n), rng.integers(0, 10, n)
        files[CIFAR_FILES[split]] = parquet({"img": list(images), "label": labels},
                                            {"img": ImageFeature(), "label": ClassLabel(names=CIFAR10_CLASSES)})
        served[split] = images, labels
    files["README.md"] = cifar_card({"train": 40, "test": 20}, {s: len(files[CIFAR_FILES[s]]) for s in served})
    commit = hub.add_dataset("uoft-cs/cifar10", files)

    for split, (images, labels) in served.items():
        data = load_tensors(DataConfig(name="cifar10", split=split))
        assert data.images.shape == (len(images), 3, 32, 32)
        np.testing.assert_array_equal(data.images.numpy(), chw(images))
        np.testing.assert_array_equal(data.labels.numpy(), labels)
        assert data.class_names == CIFAR10_CLASSES
        assert data.source["hub_id"] == "uoft-cs/cifar10" and data.source["split"] == split
        assert data_identity(data)["commit"] == commit
    downloads = {url.split(f"/resolve/{commit}/")[-1] for method, url in hub.dataset_calls()
                 if method == "HEAD" and f"/datasets/uoft-cs/cifar10/resolve/{commit}/" in url}
    assert set(CIFAR_FILES.values()) <= downloads  # the shards came from the Hub, by the commit the card named


@pytest.mark.parametrize("ref", ["branch", "tag"])
def test_each_revision_loads_its_own_data_and_identity_records_its_commit(hub, ref):
    rng = np.random.default_rng(1)
    names = ["cat", "dog"]
    old, old_images, old_labels = labelled(rng, 8, names)
    new, new_images, new_labels = labelled(rng, 12, names)
    if ref == "branch":
        main = hub.add_dataset("alice/pets", {"data/train-00000-of-00001.parquet": new})
        v1 = hub.add_dataset("alice/pets", {"data/train-00000-of-00001.parquet": old}, branch="v1")
    else:  # the tag names an older commit of main
        v1 = hub.add_dataset("alice/pets", {"data/train-00000-of-00001.parquet": old})
        hub.tag_dataset("alice/pets", "v1")
        main = hub.add_dataset("alice/pets", {"data/train-00000-of-00001.parquet": new})
    assert v1 != main

    tagged = load_tensors(DataConfig(name="hub", hub_id="alice/pets", revision="v1"))
    head = load_tensors(DataConfig(name="hub", hub_id="alice/pets"))
    np.testing.assert_array_equal(tagged.images.numpy(), chw(old_images))
    np.testing.assert_array_equal(tagged.labels.numpy(), old_labels)
    np.testing.assert_array_equal(head.images.numpy(), chw(new_images))
    np.testing.assert_array_equal(head.labels.numpy(), new_labels)

    identity = data_identity(tagged)
    assert identity["hub_id"] == "alice/pets" and identity["revision"] == "v1"
    assert identity["commit"] == v1
    assert identity["images"] == 8
    head_identity = data_identity(head)
    assert head_identity["commit"] == main and head_identity["revision"] == "main" and head_identity["images"] == 12
    assert isinstance(identity["fingerprint"], str) and identity["fingerprint"] != head_identity["fingerprint"]
    again = load_tensors(DataConfig(name="hub", hub_id="alice/pets", revision="v1"))
    assert again.source["fingerprint"] == identity["fingerprint"]  # the same data, the same fingerprint


def test_string_labels_in_custom_columns_load_with_the_column_options_and_fail_clearly_without(hub):
    from datasets import Image as ImageFeature
    from datasets import Value

    rng = np.random.default_rng(2)
    images = rgb(rng, 9)
    kinds = ["dog", "cat", "bird", "cat", "dog", "dog", "bird", "cat", "dog"]
    hub.add_dataset("alice/photos", {"data/train-00000-of-00001.parquet": parquet(
        {"photo": list(images), "kind": kinds}, {"photo": ImageFeature(), "kind": Value("string")})})

    data = load_tensors(DataConfig(name="hub", hub_id="alice/photos", image_column="photo", label_column="kind"))
    assert data.class_names == ["bird", "cat", "dog"]
    np.testing.assert_array_equal(data.labels.numpy(), [["bird", "cat", "dog"].index(k) for k in kinds])
    np.testing.assert_array_equal(data.images.numpy(), chw(images))

    with pytest.raises(DataError) as caught:
        load_tensors(DataConfig(name="hub", hub_id="alice/photos"))
    message = str(caught.value)
    assert "photo" in message and "kind" in message and "data.image_column" in message


def test_a_train_only_dataset_serves_test_and_validation_serves_test(hub):
    rng = np.random.default_rng(3)
    names = ["a", "b", "c"]
    only, only_images, _ = labelled(rng, 6, names)
    hub.add_dataset("alice/only-train", {"data/train-00000-of-00001.parquet": only})
    train, _, _ = labelled(rng, 6, names)
    validation, validation_images, validation_labels = labelled(rng, 4, names)
    hub.add_dataset("alice/with-val", {"data/train-00000-of-00001.parquet": train,
                                       "data/validation-00000-of-00001.parquet": validation})

    data = load_tensors(DataConfig(name="hub", hub_id="alice/only-train", split="test"))
    np.testing.assert_array_equal(data.images.numpy(), chw(only_images))
    data = load_tensors(DataConfig(name="hub", hub_id="alice/with-val", split="test"))
    np.testing.assert_array_equal(data.images.numpy(), chw(validation_images))
    np.testing.assert_array_equal(data.labels.numpy(), validation_labels)


@pytest.mark.parametrize("case", ["missing", "private of another user", "private, without a token"])
def test_a_missing_or_inaccessible_repo_is_a_data_error_naming_it(hub, monkeypatch, case):
    rng = np.random.default_rng(4)
    shard = {"data/train-00000-of-00001.parquet": labelled(rng, 4, ["a", "b"])[0]}
    hub.add_dataset("bob/secret", shard, private=True)
    hub.add_dataset("alice/secret", shard, private=True)
    hub.add_dataset("alice-lab/secret", shard, private=True)
    # Her token reads her organisation's private dataset (not one of the repos below: once cached, `datasets`
    # would load a dataset from its cache when the Hub refuses it).
    assert len(load_tensors(DataConfig(name="hub", hub_id="alice-lab/secret"))) == 4
    repo = {"missing": "alice/nope", "private of another user": "bob/secret",
            "private, without a token": "alice/secret"}[case]
    if case == "private, without a token":
        monkeypatch.delenv("HF_TOKEN")

    with pytest.raises(DataError) as caught:
        load_tensors(DataConfig(name="hub", hub_id=repo))
    message = str(caught.value)
    assert f"'{repo}'" in message and "doesn't exist on the Hub or cannot be accessed" in message
    assert "check data.hub_id" in message and "hf auth login" in message


def test_grayscale_pngs_on_the_hub_are_resized_to_image_size(hub):
    rng = np.random.default_rng(5)
    files, served = {}, []
    for i in range(6):
        pixels = rng.integers(0, 256, (40, 40), dtype=np.uint8)
        kind = ["circle", "square"][i % 2]
        files[f"train/{kind}/{i}.png"] = png(pixels)
        served.append((kind, pixels))
    hub.add_dataset("alice/shapes", files)

    data = load_tensors(DataConfig(name="hub", hub_id="alice/shapes", image_size=32))
    assert data.images.shape == (6, 1, 32, 32)
    assert data.class_names == ["circle", "square"]
    # in the order the Hub lists the files (by path): circle/0, circle/2, circle/4, square/1, ...
    expected = sorted(served, key=lambda item: item[0])
    fitted = [np.asarray(ImageOps.fit(Image.fromarray(p), (32, 32), method=Image.Resampling.BICUBIC))
              for _, p in expected]
    np.testing.assert_array_equal(data.images.numpy()[:, 0], np.stack(fitted))
    np.testing.assert_array_equal(data.labels.numpy(), [0, 0, 0, 1, 1, 1])


def test_the_fake_serves_dataset_repos_as_huggingface_hub_reads_them(hub, monkeypatch):
    """The endpoints `load_dataset` did not need here but `HfFileSystem` and `HfApi` use (recursive and
    expanded trees, paths-info, blob metadata, LFS downloads by redirect), read by huggingface_hub itself."""
    from huggingface_hub import HfApi, HfFileSystem, hf_hub_download

    shard = labelled(np.random.default_rng(6), 3, ["a", "b"])[0]
    card = b"---\nlicense: mit\npretty_name: Pets\n---\n# Pets\n"
    first = hub.add_dataset("alice/pets", {"README.md": card, "data/train-00000-of-00001.parquet": shard},
                            title="First")
    second = hub.add_dataset("alice/pets", {"README.md": card + b"More.\n", "data/train-00000-of-00001.parquet": shard},
                             title="Second")
    api = HfApi()

    info = api.dataset_info("alice/pets", files_metadata=True)
    assert info.sha == second and info.card_data.pretty_name == "Pets" and info.card_data.license == "mit"
    blobs = {s.rfilename: s for s in info.siblings}
    assert set(blobs) == {".gitattributes", "README.md", "data/train-00000-of-00001.parquet"}
    assert blobs["data/train-00000-of-00001.parquet"].lfs.sha256 == hashlib.sha256(shard).hexdigest()
    assert api.dataset_info("alice/pets", revision=first).sha == first

    tree = list(api.list_repo_tree("alice/pets", repo_type="dataset", recursive=True, expand=True))
    assert [(type(e).__name__, e.path) for e in tree] == [
        ("RepoFolder", "data"), ("RepoFile", ".gitattributes"), ("RepoFile", "README.md"),
        ("RepoFile", "data/train-00000-of-00001.parquet")]
    by_path = {e.path: e for e in tree}
    assert by_path["README.md"].last_commit.oid == second
    assert by_path["data/train-00000-of-00001.parquet"].last_commit.oid == first  # unchanged since
    assert [e.path for e in api.list_repo_tree("alice/pets", repo_type="dataset")] == [
        "data", ".gitattributes", "README.md"]
    paths = api.get_paths_info("alice/pets", ["data", "README.md", "absent"], repo_type="dataset", revision=first)
    assert [(type(e).__name__, e.path) for e in paths] == [("RepoFolder", "data"), ("RepoFile", "README.md")]

    fs = HfFileSystem()
    assert fs.find("datasets/alice/pets", detail=False) == [
        "datasets/alice/pets/.gitattributes", "datasets/alice/pets/README.md",
        "datasets/alice/pets/data/train-00000-of-00001.parquet"]
    assert fs.cat("datasets/alice/pets@" + first + "/README.md") == card
    assert fs.info("datasets/alice/pets/data/train-00000-of-00001.parquet")["size"] == len(shard)

    path = hf_hub_download("alice/pets", "data/train-00000-of-00001.parquet", repo_type="dataset", revision=first)
    assert Path(path).read_bytes() == shard
    cdn = [url for method, url in hub.dataset_calls() if hub_fake.CDN_HOST in url]
    assert cdn  # the LFS bytes came from the CDN the Hub redirected to, without the token
    monkeypatch.delenv("HF_TOKEN")
    assert HfApi().dataset_info("alice/pets").sha == second  # a public dataset needs no token
