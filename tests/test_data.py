"""pipelines.data: dataset sources, class subsets, the [-1, 1] transform and the sharded BatchLoader."""

from __future__ import annotations

import gzip
import struct
import time
from collections import Counter

import datasets  # imported up front so the offline timing test does not measure the import
import numpy as np
import pytest
import torch
from PIL import Image

import pipelines.data_sources as data_mod
from conftest import requires_fmnist
from pipelines.config import DataConfig
from pipelines.data import (
    FASHION_MNIST_CLASSES,
    BatchLoader,
    DataError,
    ImageTensors,
    dataset_to_tensors,
    load_hf_dataset,
    load_tensors,
    select_classes,
    synthetic_split,
    to_model_range,
)

SYNTH_NAMES = [f"class_{k}" for k in range(10)]


@pytest.fixture(scope="module")
def synth() -> ImageTensors:
    """The default synthetic train split: 512 grayscale 28x28 images."""
    return load_tensors(DataConfig(name="synthetic"))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the `imagefolder` builder's cache inside tmp_path instead of ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def indexed(n: int, size: int = 6, channels: int = 1, seed: int = 0) -> ImageTensors:
    """Random (never mirror-symmetric) images whose label is their own index, to trace every sample."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)
    return ImageTensors(images, torch.arange(n), [str(i) for i in range(n)])


def collect(loader: BatchLoader, epoch: int, start_step: int = 0):
    return list(loader.epoch(epoch, start_step=start_step))


def labels_of(batches) -> list[list[int]]:
    return [y.tolist() for _, y in batches]


# ---------------------------------------------------------------- synthetic set


@pytest.mark.parametrize("size, channels", [(28, 1), (32, 3)])
def test_synthetic_shapes_and_labels(size, channels):
    d = load_tensors(DataConfig(name="synthetic", synthetic_image_size=size, synthetic_channels=channels,
                                synthetic_size=200))
    assert d.images.shape == (200, channels, size, size)
    assert d.images.dtype == torch.uint8
    assert d.labels.dtype == torch.int64 and d.labels.shape == (200,)
    assert set(d.labels.tolist()) == set(range(10))  # all ten classes, nothing else
    assert Counter(d.labels.tolist()) == {k: 20 for k in range(10)}  # balanced
    assert d.class_names == SYNTH_NAMES and d.num_classes == 10
    assert d.channels == channels and d.image_size == size
    assert d.images.float().std() > 10  # not blank


def test_synthetic_is_deterministic(synth):
    again = load_tensors(DataConfig(name="synthetic"))
    assert torch.equal(again.images, synth.images)
    assert torch.equal(again.labels, synth.labels)


def test_synthetic_train_and_test_differ(synth):
    test = load_tensors(DataConfig(name="synthetic", split="test"))
    assert test.images.shape == synth.images.shape
    assert not torch.equal(test.labels, synth.labels)
    assert not torch.equal(test.images, synth.images)


def test_synthetic_classes_look_different(synth):
    # class-dependent shapes: the per-class mean images are clearly apart
    means = torch.stack([synth.images[synth.labels == k].float().mean(0) for k in range(10)])
    dists = torch.cdist(means.flatten(1), means.flatten(1))
    assert dists[~torch.eye(10, dtype=torch.bool)].min() > 100


def test_load_hf_dataset_features():
    ds = load_hf_dataset(DataConfig(name="synthetic", synthetic_size=30))
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["image", "label"]
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert ds.features["label"].names == SYNTH_NAMES
    assert len(ds) == 30
    first = ds[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (28, 28)
    assert first["label"] in range(10)


def test_load_hf_dataset_split_argument_overrides_config():
    cfg = DataConfig(name="synthetic", synthetic_size=40, split="train")
    a = dataset_to_tensors(load_hf_dataset(cfg, "test"))
    b = load_tensors(DataConfig(name="synthetic", synthetic_size=40, split="test"))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


# ---------------------------------------------------------------- class subset and limit


def test_classes_subset_relabels(synth):
    d = load_tensors(DataConfig(name="synthetic", classes=[3, 5]))
    assert d.class_names == ["class_3", "class_5"]
    assert set(d.labels.tolist()) == {0, 1}
    keep = (synth.labels == 3) | (synth.labels == 5)
    assert len(d) == int(keep.sum())
    # the same images, in the same order, with 3 -> 0 and 5 -> 1
    assert torch.equal(d.images, synth.images[keep])
    assert torch.equal(d.labels, (synth.labels[keep] == 5).long())


def test_classes_subset_follows_given_order(synth):
    d = select_classes(synth, [5, 3])
    assert d.class_names == ["class_5", "class_3"]
    assert torch.equal(d.labels == 0, synth.labels[(synth.labels == 3) | (synth.labels == 5)] == 5)


def test_classes_out_of_range(synth):
    with pytest.raises(DataError) as err:
        select_classes(synth, [3, 12])
    msg = str(err.value)
    assert "[12]" in msg and "0..9" in msg and "3=class_3" in msg
    with pytest.raises(DataError, match=r"\[-1\]"):
        select_classes(synth, [-1])
    with pytest.raises(DataError, match="0..9"):
        load_tensors(DataConfig(name="synthetic", classes=[10]))


def test_limit(synth):
    d = load_tensors(DataConfig(name="synthetic", limit=50))
    assert len(d) == 50
    assert torch.equal(d.images, synth.images[:50]) and torch.equal(d.labels, synth.labels[:50])
    assert d.class_names == SYNTH_NAMES


def test_limit_applies_after_class_subset(synth):
    d = load_tensors(DataConfig(name="synthetic", classes=[3, 5], limit=20))
    assert len(d) == 20
    keep = (synth.labels == 3) | (synth.labels == 5)
    assert torch.equal(d.images, synth.images[keep][:20])


def test_limit_larger_than_dataset(synth):
    assert len(load_tensors(DataConfig(name="synthetic", limit=10_000))) == len(synth)


# ---------------------------------------------------------------- to_model_range


def test_to_model_range_maps_0_255_to_minus1_1():
    x = to_model_range(torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16))
    assert x.dtype == torch.float32 and x.shape == (1, 1, 16, 16)
    flat = x.flatten()
    assert flat[0].item() == -1.0 and flat[255].item() == 1.0  # exact ends
    assert flat.min().item() == -1.0 and flat.max().item() == 1.0
    assert torch.allclose(flat, torch.arange(256) / 127.5 - 1)
    assert (flat[1:] > flat[:-1]).all()  # monotonic


def test_to_model_range_pad_to_32():
    images = torch.randint(0, 256, (3, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = to_model_range(images, pad_to=32)
    assert x.shape == (3, 1, 32, 32)
    assert torch.equal(x[..., 2:30, 2:30], to_model_range(images))  # centred: 2 pixels on each side
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[..., border] == -1.0).all()


def test_to_model_range_pad_odd_and_noop():
    images = torch.full((1, 3, 28, 28), 255, dtype=torch.uint8)
    x = to_model_range(images, pad_to=31)
    assert x.shape == (1, 3, 31, 31)
    assert (x[..., 1:29, 1:29] == 1.0).all()
    assert int((x == 1.0).sum()) == 3 * 28 * 28
    assert torch.equal(to_model_range(images, pad_to=28), to_model_range(images))


def test_to_model_range_pad_smaller_than_image():
    with pytest.raises(DataError, match="smaller"):
        to_model_range(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), pad_to=16)


def test_to_model_range_leaves_uint8_input_alone():
    images = torch.full((1, 1, 4, 4), 200, dtype=torch.uint8)
    to_model_range(images, pad_to=8)
    assert (images == 200).all()


# ---------------------------------------------------------------- BatchLoader


def test_batch_shapes(synth):
    loader = BatchLoader(synth, batch_size=32, seed=0)
    assert len(loader) == 512 // 32
    assert loader.image_shape == (1, 28, 28)
    batches = collect(loader, 0)
    assert len(batches) == 16
    for x, y in batches:
        assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (32,) and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1
    padded = BatchLoader(synth, batch_size=32, seed=0, pad_to=32)
    assert padded.image_shape == (1, 32, 32)
    assert next(padded.epoch(0))[0].shape == (32, 1, 32, 32)


def test_ragged_end_is_dropped():
    loader = BatchLoader(indexed(100), batch_size=8, seed=0)
    assert len(loader) == 12
    batches = collect(loader, 0)
    assert len(batches) == 12 and all(len(y) == 8 for _, y in batches)


def test_labels_match_images(synth):
    """Every yielded (image, label) pair is an (image, label) pair of the dataset."""
    loader = BatchLoader(synth, batch_size=64, seed=1)
    all_x = to_model_range(synth.images).flatten(1)  # (N, D)
    for x, y in collect(loader, 0):
        same = (x.flatten(1)[:, None, :] == all_x[None]).all(-1)  # (B, N): which dataset images equal x_i
        assert same.any(1).all()
        assert ((same & (y[:, None] == synth.labels[None])).any(1)).all()


def test_epoch_is_a_permutation_of_the_data():
    data = indexed(100)
    loader = BatchLoader(data, batch_size=8, seed=0)
    seen = []
    for x, y in collect(loader, 0):
        assert torch.equal(x, to_model_range(data.images[y]))  # the image belongs to its label (= index)
        seen += y.tolist()
    assert len(seen) == 96 and len(set(seen)) == 96  # no repeats; only the 4 left over are missing
    assert seen != sorted(seen)  # shuffled


def test_same_seed_same_order():
    data = indexed(64)
    a = collect(BatchLoader(data, batch_size=8, seed=3), 2)
    b = collect(BatchLoader(data, batch_size=8, seed=3), 2)
    assert labels_of(a) == labels_of(b)
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))


def test_different_epoch_different_order():
    loader = BatchLoader(indexed(64), batch_size=8, seed=3)
    orders = [labels_of(collect(loader, e)) for e in range(3)]
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert labels_of(collect(loader, 1)) == orders[1]  # and an epoch is reproducible


def test_different_seed_different_order():
    data = indexed(64)
    assert labels_of(collect(BatchLoader(data, 8, seed=0), 0)) != labels_of(collect(BatchLoader(data, 8, seed=1), 0))


@pytest.mark.parametrize("hflip", [False, True])
def test_start_step_resumes_the_tail_of_the_epoch(hflip):
    loader = BatchLoader(indexed(80), batch_size=8, seed=5, hflip=hflip)
    full = collect(loader, 4)
    tail = collect(loader, 4, start_step=6)
    assert len(tail) == len(full) - 6 == 4
    for (x, y), (xf, yf) in zip(tail, full[6:]):
        assert torch.equal(y, yf) and torch.equal(x, xf)
    assert collect(loader, 4, start_step=len(loader)) == []


@pytest.mark.parametrize("n, hflip", [(96, False), (100, True)])
def test_two_processes_equal_one_with_double_batch(n, hflip):
    data = indexed(n)
    single = BatchLoader(data, batch_size=8, seed=7, hflip=hflip)
    shards = [BatchLoader(data, batch_size=4, seed=7, hflip=hflip, process_index=p, num_processes=2)
              for p in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(single) == n // 8
    for epoch in (0, 1):
        s0, s1, one = collect(shards[0], epoch), collect(shards[1], epoch), collect(single, epoch)
        assert len(s0) == len(s1) == len(one)
        for (x0, y0), (x1, y1), (x, y) in zip(s0, s1, one):
            assert torch.equal(torch.cat([y0, y1]), y)
            assert torch.equal(torch.cat([x0, x1]), x)
            assert not set(y0.tolist()) & set(y1.tolist())  # the processes see disjoint samples


def test_hflip_flips_about_half_and_only_horizontally():
    data = indexed(400, size=6, channels=3)
    loader = BatchLoader(data, batch_size=50, seed=0, hflip=True)
    flipped = 0
    for x, y in collect(loader, 0):
        original = to_model_range(data.images[y])
        for xi, oi in zip(x, original):
            if torch.equal(xi, oi):
                continue
            assert torch.equal(xi, oi.flip(-1)), "a changed image must be the left-right mirror of the original"
            flipped += 1
    assert 0.4 * 400 <= flipped <= 0.6 * 400


def test_hflip_depends_on_epoch_and_is_off_by_default():
    data = indexed(200)
    plain = BatchLoader(data, batch_size=50, seed=0)
    for x, y in collect(plain, 0):
        assert torch.equal(x, to_model_range(data.images[y]))

    loader = BatchLoader(data, batch_size=200, seed=0, hflip=True)

    def flipped_ids(epoch):
        (x, y), = collect(loader, epoch)
        return {i for i, xi in zip(y.tolist(), x) if not torch.equal(xi, to_model_range(data.images[i]))}

    assert flipped_ids(0) != flipped_ids(1)


def test_too_small_dataset():
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchLoader(indexed(10), batch_size=16, seed=0)
    with pytest.raises(DataError, match="2 processes"):
        BatchLoader(indexed(10), batch_size=8, seed=0, num_processes=2)
    assert len(BatchLoader(indexed(16), batch_size=8, seed=0, num_processes=2)) == 1


# ---------------------------------------------------------------- data.path: IDX folders


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: 2 zero bytes, type 0x08 (unsigned byte), the number of dims, each dim as big-endian uint32."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_split(folder, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = True):
    suffix = ".gz" if gz else ""
    for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        raw = idx_bytes(array)
        (folder / (stem + suffix)).write_bytes(gzip.compress(raw) if gz else raw)


@pytest.fixture
def idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    train_y = np.arange(12) % 10
    test_x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test_y = np.array([9, 0, 4, 4, 1])
    write_idx_split(tmp_path, "train", train_x, train_y, gz=True)
    write_idx_split(tmp_path, "t10k", test_x, test_y, gz=False)  # uncompressed files are read too
    return tmp_path, (train_x, train_y), (test_x, test_y)


def test_idx_header_helper_matches_the_format():
    header = idx_bytes(np.zeros((3, 28, 28), np.uint8))[:16]
    assert struct.unpack(">IIII", header) == (0x00000803, 3, 28, 28)
    assert struct.unpack(">II", idx_bytes(np.zeros(3, np.uint8))[:8]) == (0x00000801, 3)


@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_folder(idx_folder, split):
    folder, train, test = idx_folder
    images, labels = train if split == "train" else test
    d = load_tensors(DataConfig(name="fashion_mnist", path=str(folder), split=split))
    assert d.images.shape == (len(labels), 1, 28, 28) and d.images.dtype == torch.uint8
    assert torch.equal(d.images[:, 0], torch.from_numpy(images))
    assert d.labels.tolist() == labels.tolist()
    assert d.class_names == FASHION_MNIST_CLASSES


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_idx_folder_tensors_equal_decoded_dataset(idx_folder, name):
    folder, _, _ = idx_folder
    for split in ("train", "test"):
        cfg = DataConfig(name=name, path=str(folder), split=split)
        direct = load_tensors(cfg)
        decoded = dataset_to_tensors(load_hf_dataset(cfg))
        assert torch.equal(direct.images, decoded.images)
        assert torch.equal(direct.labels, decoded.labels)
        assert direct.class_names == decoded.class_names


def test_idx_folder_class_names_for_other_datasets(idx_folder):
    folder, _, _ = idx_folder
    ds = load_hf_dataset(DataConfig(name="synthetic", path=str(folder)))
    assert ds.features["label"].names == [str(i) for i in range(10)]


def test_idx_folder_missing_split(tmp_path):
    write_idx_split(tmp_path, "train", np.zeros((2, 28, 28), np.uint8), np.array([0, 1]))
    with pytest.raises(DataError, match="no test split"):
        load_tensors(DataConfig(path=str(tmp_path), split="test"))


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_file(tmp_path, gz):
    images = np.zeros((4, 28, 28), np.uint8)
    raw = idx_bytes(images)[:-100]  # the payload ends early (an interrupted download)
    write_idx_split(tmp_path, "train", images, np.arange(4))
    name = "train-images-idx3-ubyte"
    (tmp_path / (name + ".gz")).unlink()
    (tmp_path / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError, match="truncated"):
        load_tensors(DataConfig(path=str(tmp_path)))


def test_idx_file_with_trailing_bytes(tmp_path):
    write_idx_split(tmp_path, "train", np.zeros((2, 28, 28), np.uint8), np.array([0, 1]), gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes() + bytes(28 * 28))  # a third image the header does not announce
    with pytest.raises(DataError, match="corrupt"):
        load_tensors(DataConfig(path=str(tmp_path)))


def test_idx_file_with_bad_magic(tmp_path):
    write_idx_split(tmp_path, "train", np.zeros((2, 28, 28), np.uint8), np.array([0, 1]), gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"PK\x03\x04" + bytes(10))
    with pytest.raises(DataError, match="not an IDX file"):
        load_tensors(DataConfig(path=str(tmp_path)))


def test_idx_images_and_labels_of_different_length(tmp_path):
    write_idx_split(tmp_path, "train", np.zeros((3, 28, 28), np.uint8), np.array([0, 1]))
    with pytest.raises(DataError, match="do not match"):
        load_tensors(DataConfig(path=str(tmp_path)))


# ---------------------------------------------------------------- data.path: save_to_disk


def synthetic_dict(n_train: int = 40, n_test: int = 20):
    return datasets.DatasetDict({
        "train": synthetic_split(DataConfig(name="synthetic", synthetic_size=n_train), "train"),
        "test": synthetic_split(DataConfig(name="synthetic", synthetic_size=n_test), "test"),
    })


@pytest.mark.parametrize("split, n", [("train", 40), ("test", 20)])
def test_save_to_disk_dataset_dict(tmp_path, split, n):
    synthetic_dict().save_to_disk(str(tmp_path / "ds"))
    d = load_tensors(DataConfig(name="cifar10", path=str(tmp_path / "ds"), split=split))
    expected = load_tensors(DataConfig(name="synthetic", synthetic_size=n, split=split))
    assert len(d) == n
    assert torch.equal(d.images, expected.images) and torch.equal(d.labels, expected.labels)
    assert d.class_names == SYNTH_NAMES


def test_save_to_disk_renames_cifar_style_columns(tmp_path):
    ds = synthetic_split(DataConfig(name="synthetic", synthetic_size=20), "train")
    ds = ds.rename_columns({"image": "img", "label": "fine_label"})
    ds.save_to_disk(str(tmp_path / "one"))  # a single Dataset (state.json), not a DatasetDict
    out = load_hf_dataset(DataConfig(name="cifar10", path=str(tmp_path / "one")))
    assert out.column_names == ["image", "label"]
    assert dataset_to_tensors(out).labels.tolist() == ds["fine_label"]


def test_save_to_disk_missing_split(tmp_path):
    datasets.DatasetDict({"train": synthetic_dict()["train"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match="'test'"):
        load_tensors(DataConfig(path=str(tmp_path / "ds"), split="test"))


# ---------------------------------------------------------------- data.path: class sub-folders


def write_pngs(folder, counts: dict[str, int], mode: str = "L", seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (8, 8) if mode == "L" else (8, 8, 3)
    for cls, n in counts.items():
        (folder / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / cls / f"{i}.png")


def test_image_folder_without_split_folders(tmp_path, hf_cache):
    root = tmp_path / "pngs"
    write_pngs(root, {"cat": 3, "dog": 2})
    ds = load_hf_dataset(DataConfig(name="cifar10", path=str(root)))
    assert ds.features["label"].names == ["cat", "dog"]
    d = dataset_to_tensors(ds)
    assert d.images.shape == (5, 1, 8, 8)
    assert Counter(d.labels.tolist()) == {0: 3, 1: 2}
    # pixels survive the round trip: the first cat image is one of the written ones
    cat0 = torch.from_numpy(np.array(Image.open(root / "cat" / "0.png")))
    assert any(torch.equal(img[0], cat0) for img in d.images[d.labels == 0])


def test_image_folder_with_split_folders(tmp_path, hf_cache):
    root = tmp_path / "pngs"
    write_pngs(root / "train", {"cat": 3, "dog": 4, "emu": 1}, mode="RGB")
    write_pngs(root / "test", {"cat": 1, "dog": 2, "emu": 1}, mode="RGB", seed=1)
    train = load_tensors(DataConfig(name="cifar10", path=str(root), split="train"))
    test = load_tensors(DataConfig(name="cifar10", path=str(root), split="test"))
    assert train.images.shape == (8, 3, 8, 8) and test.images.shape == (4, 3, 8, 8)
    assert Counter(train.labels.tolist()) == {0: 3, 1: 4, 2: 1}
    assert Counter(test.labels.tolist()) == {0: 1, 1: 2, 2: 1}
    assert train.class_names == test.class_names == ["cat", "dog", "emu"]


# ---------------------------------------------------------------- data.path: errors


def test_nonexistent_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_hf_dataset(DataConfig(path=str(tmp_path / "missing")))


@pytest.mark.parametrize("layout", ["empty", "text_file", "plain_file"])
def test_path_of_unknown_form(tmp_path, layout):
    target = tmp_path / "thing"
    if layout == "plain_file":
        target.write_text("hello")
    else:
        target.mkdir()
        if layout == "text_file":
            (target / "README.txt").write_text("not data")
    with pytest.raises(DataError, match="is not an IDX folder, a save_to_disk dataset, a folder of parquet files"):
        load_hf_dataset(DataConfig(path=str(target)))


def test_path_beats_name(idx_folder):
    folder, (train_x, _), _ = idx_folder
    # name=synthetic would give 512 images; the path wins
    assert len(load_tensors(DataConfig(name="synthetic", path=str(folder)))) == len(train_x)


# ---------------------------------------------------------------- offline Hub


def test_offline_cifar10_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_hf_dataset(DataConfig(name="cifar10"))
    assert time.perf_counter() - start < 0.5
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg
    assert "uoft-cs/cifar10" in msg and "data.path" in msg and "save_to_disk" in msg


def test_offline_fashion_mnist_without_debian_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    with pytest.raises(DataError) as err:
        load_hf_dataset(DataConfig(name="fashion_mnist"))
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "data.path" in str(err.value)


# ---------------------------------------------------------------- real Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist_train():
    return load_tensors(DataConfig(name="fashion_mnist", split="train"))


@requires_fmnist
@pytest.mark.realdata
def test_real_fashion_mnist_train(fmnist_train):
    d = fmnist_train
    assert d.images.shape == (60000, 1, 28, 28) and d.images.dtype == torch.uint8
    assert d.labels.dtype == torch.int64
    assert d.class_names[0] == "T-shirt/top" and "Ankle boot" in d.class_names and d.num_classes == 10
    assert d.class_names == FASHION_MNIST_CLASSES
    assert Counter(d.labels.tolist()) == {k: 6000 for k in range(10)}
    assert d.images.float().mean().item() == pytest.approx(72.94, abs=0.5)  # the well-known mean, 0.286 * 255


@requires_fmnist
@pytest.mark.realdata
def test_real_fashion_mnist_test_split():
    ds = load_hf_dataset(DataConfig(name="fashion_mnist", split="test"))
    assert isinstance(ds, datasets.Dataset) and ds.column_names == ["image", "label"]
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert ds.features["label"].names == FASHION_MNIST_CLASSES
    via_hf = dataset_to_tensors(ds)
    d = load_tensors(DataConfig(name="fashion_mnist", split="test"))
    assert d.images.shape == (10000, 1, 28, 28) and d.images.dtype == torch.uint8
    assert Counter(d.labels.tolist()) == {k: 1000 for k in range(10)}
    assert d.class_names == FASHION_MNIST_CLASSES
    # load_tensors gives exactly what decoding the `datasets.Dataset` gives
    assert torch.equal(d.images, via_hf.images) and torch.equal(d.labels, via_hf.labels)


@requires_fmnist
@pytest.mark.realdata
def test_real_fashion_mnist_two_classes(fmnist_train):
    d = select_classes(fmnist_train, [3, 5])
    assert d.class_names == ["Dress", "Sandal"]
    assert len(d) == 12000 and Counter(d.labels.tolist()) == {0: 6000, 1: 6000}
    x, y = next(BatchLoader(d, batch_size=64, seed=0, pad_to=32).epoch(0))
    assert x.shape == (64, 1, 32, 32) and set(y.tolist()) <= {0, 1}
