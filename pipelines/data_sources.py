"""Where the images come from: an IDX folder, a `save_to_disk` dataset, a folder of class sub-folders, the Hub
(`datasets.load_dataset` and its cache), or a synthetic set; each as a `datasets.Dataset` with an `image` Image
column and a `label` ClassLabel column (`load_hf_dataset`). Decoding them is `decoding.py`'s.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional

import numpy as np

from .config import DataConfig


FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
HUB_IDS = {"fashion_mnist": "zalando-datasets/fashion_mnist", "cifar10": "uoft-cs/cifar10"}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DataError(RuntimeError):
    """The requested data cannot be found or does not have the expected form."""


def _features(class_names: list[str]):
    from datasets import ClassLabel, Features, Image

    return Features({"image": Image(), "label": ClassLabel(names=class_names)})


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, OSError) as err:
        raise DataError(f"{path} is truncated or corrupt ({err}); download or reinstall it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{path} is truncated or corrupt: {len(data)} bytes, expected {expected}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def is_idx_folder(folder: Path) -> bool:
    return any(find_idx(folder, stem) for pair in IDX_FILES.values() for stem in pair)


def read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) and labels (N,) of one split of an IDX folder."""
    images_file, labels_file = (find_idx(folder, stem) for stem in IDX_FILES[split])
    if images_file is None or labels_file is None:
        raise DataError(f"{folder} has no {split} split: expected {IDX_FILES[split][0]}[.gz] and {IDX_FILES[split][1]}[.gz]")
    images, labels = _read_idx(images_file), _read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{images_file} and {labels_file} do not match: shapes {images.shape} and {labels.shape}")
    return images, labels


def load_idx_split(folder: Path, split: str, class_names: list[str] = FASHION_MNIST_CLASSES):
    """The original (Fashion-)MNIST IDX files as a `datasets.Dataset` with the Hub's features."""
    from datasets import Dataset

    images, labels = read_idx_split(folder, split)
    return Dataset.from_dict(
        {"image": list(images), "label": labels.astype(np.int64)}, features=_features(class_names)
    )


def synthetic_split(cfg: DataConfig, split: str):
    """Ten classes of simple shapes whose position and size depend on the class, with seeded jitter.

    Deterministic for a given split, so tests can assert exact values; small enough to build in
    milliseconds; learnable, so a short training run visibly lowers the loss.
    """
    from datasets import Dataset

    size, channels, n = cfg.synthetic_image_size, cfg.synthetic_channels, cfg.synthetic_size
    rng = np.random.default_rng(0 if split == "train" else 1)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    palette = np.array([[1, 0.2, 0.2], [0.2, 1, 0.2], [0.2, 0.2, 1], [1, 1, 0.2], [1, 0.2, 1],
                        [0.2, 1, 1], [1, 0.6, 0.2], [0.6, 0.2, 1], [1, 1, 1], [0.6, 0.6, 0.6]])
    images = np.zeros((n, size, size, channels), np.uint8)
    for i, c in enumerate(labels):
        cx, cy = 0.25 + 0.5 * (c % 3) / 2, 0.25 + 0.5 * (c // 3) / 3
        cx, cy = cx + rng.normal(0, 0.03), cy + rng.normal(0, 0.03)
        r = 0.12 + 0.02 * (c % 4) + rng.normal(0, 0.01)
        if c % 2:
            mask = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r)  # squares for odd classes
        else:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2  # discs for even ones
        colour = palette[c] if channels == 3 else palette[c][:1] * 0 + 0.5 + 0.05 * c
        images[i][mask] = (255 * colour).astype(np.uint8)
    columns = images[..., 0] if channels == 1 else images
    return Dataset.from_dict(
        {"image": list(columns), "label": labels.astype(np.int64)},
        features=_features([f"class_{k}" for k in range(10)]),
    )


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _how_to_get(name: str) -> str:
    if name == "fashion_mnist":
        return ("install the Debian package (apt-get install dataset-fashion-mnist, which puts the IDX files in "
                f"{DEBIAN_FASHION_MNIST}), set data.path to a folder of IDX files, a save_to_disk dataset or a "
                f"folder of class sub-folders, or go online so '{HUB_IDS[name]}' can be downloaded from the Hub")
    return (f"go online so '{HUB_IDS[name]}' can be downloaded from the Hub (once; it is cached), or set data.path "
            "to a save_to_disk copy of it or a folder of class sub-folders")


def _from_path(path: Path, split: str, name: str):
    import datasets

    if not path.exists():
        raise DataError(f"data.path={path} does not exist")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:
            raise DataError(f"data.path={path} looks like a save_to_disk dataset but cannot be read: {err}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"data.path={path} has splits {list(loaded)}, not '{split}'")
            loaded = loaded[split]
        return loaded
    if path.is_dir() and next(path.rglob("*.parquet"), None) is not None:
        # A local copy of a Hub dataset repo (`hf download --repo-type dataset ID --local-dir PATH`): the
        # parquet builder reads it as `load_dataset(ID)` would, splits from the file names.
        try:
            loaded = datasets.load_dataset(str(path))
        except Exception as err:
            raise DataError(f"data.path={path}: cannot read its parquet files as a dataset: {err}") from None
        return loaded[pick_split(loaded, split, f"data.path={path}")]
    if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        has_splits = any((path / name).is_dir() for name in IDX_FILES)
        if has_splits and not (path / split).is_dir():
            raise DataError(f"data.path={path} has split folders {[n for n in IDX_FILES if (path / n).is_dir()]} "
                            f"but no '{split}' folder")
        split_dir = path / split if has_splits else path
        try:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(split_dir), split="train")
        except Exception as err:
            raise DataError(f"data.path={split_dir}: cannot read it as a folder of class sub-folders: {err}") from None
        if "label" not in loaded.column_names:  # the builder labels by folder only when there are several
            classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
            raise DataError(f"data.path={split_dir}: one class folder ({', '.join(classes)}); a class-conditional "
                            "model needs at least 2 class sub-folders")
        return loaded
    raise DataError(f"data.path={path} is not an IDX folder, a save_to_disk dataset, a folder of parquet files "
                    "(a local copy of a Hub dataset) or a folder of class sub-folders")


def hub_repo(cfg: DataConfig) -> str:
    return cfg.hub_id if cfg.name == "hub" else HUB_IDS[cfg.name]


def pick_split(splits, split: str, where: str) -> str:
    """`split`, else for `test` a `validation` split, else the only split there is (as a folder without split
    sub-folders serves both); several splits and none of these is an error that lists them."""
    splits = list(splits)
    for name in (split, *(["validation", "valid", "val"] if split == "test" else [])):
        if name in splits:
            return name
    if len(splits) == 1:
        return splits[0]
    raise DataError(f"{where} has splits {splits}, none of them '{split}'")


def _from_hub(cfg: DataConfig, split: str):
    import datasets

    repo = hub_repo(cfg)
    try:
        loaded = datasets.load_dataset(repo, cfg.hub_config, revision=cfg.revision)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = f"'{repo}'" + (f" (revision {cfg.revision})" if cfg.revision else "")
        if cfg.name == "hub":
            hint = ("check data.hub_id, data.hub_config and data.revision; a private dataset needs `hf auth login` "
                    "or HF_TOKEN" + ("; HF_HUB_OFFLINE is set, so only a cached copy can load" if hub_offline() else ""))
        elif hub_offline():
            hint = f"there is no cached copy and HF_HUB_OFFLINE is set; to get it: {_how_to_get(cfg.name)}"
        else:
            hint = f"to get it: {_how_to_get(cfg.name)}"
        raise DataError(f"cannot load {where} ({first_line}); {hint}") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[pick_split(loaded, split, f"'{repo}'")]
    return loaded


def _standardise(ds, cfg: DataConfig):
    """Rename the image and label columns to `image` and `label` (CIFAR-10 calls them `img`); string or integer
    labels become a ClassLabel (classes sorted), as the models need class ids 0..k-1 with names."""
    from datasets import ClassLabel, Image

    def column(configured, candidates, kind):
        if configured is not None:
            if configured not in ds.column_names:
                raise DataError(f"data.{kind}_column={configured}: the dataset's columns are {ds.column_names}")
            return configured
        found = next((c for c in candidates if c in ds.column_names), None)
        if found is None:
            raise DataError(f"dataset columns {ds.column_names}: no {kind} column among {list(candidates)}; "
                            f"name it with data.{kind}_column")
        return found

    image_col = column(cfg.image_column, ("image", "img", "pixel_values"), "image")
    label_col = column(cfg.label_column, ("label", "labels", "fine_label"), "label")
    if not isinstance(ds.features[image_col], Image):
        raise DataError(f"column '{image_col}' is {ds.features[image_col]}, not an Image column")
    if not isinstance(ds.features[label_col], ClassLabel):
        try:
            ds = ds.class_encode_column(label_col)
        except Exception as err:
            raise DataError(f"column '{label_col}' ({ds.features[label_col]}) cannot serve as class labels: {err}") from None
    ds = ds.select_columns([image_col, label_col])
    if image_col != "image":
        ds = ds.rename_column(image_col, "image")
    if label_col != "label":
        ds = ds.rename_column(label_col, "label")
    return ds


def idx_source(cfg: DataConfig) -> Optional[Path]:
    """The IDX folder this config reads, if it reads one."""
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        return path if path.is_dir() and is_idx_folder(path) else None
    if cfg.name == "fashion_mnist" and is_idx_folder(DEBIAN_FASHION_MNIST):
        return DEBIAN_FASHION_MNIST
    return None


def idx_class_names(cfg: DataConfig) -> list[str]:
    return FASHION_MNIST_CLASSES if cfg.name == "fashion_mnist" else [str(i) for i in range(10)]


def load_hf_dataset(cfg: DataConfig, split: Optional[str] = None):
    """The configured split as a `datasets.Dataset` with `image` (Image) and `label` (ClassLabel) columns."""
    split = split or cfg.split
    idx = idx_source(cfg)
    if idx is not None:
        ds = load_idx_split(idx, split, idx_class_names(cfg))
    elif cfg.path is not None:
        ds = _from_path(Path(cfg.path).expanduser(), split, cfg.name)
    elif cfg.name == "synthetic":
        ds = synthetic_split(cfg, split)
    else:
        ds = _from_hub(cfg, split)
    return _standardise(ds, cfg)
