"""Images from Hugging Face `datasets`, decoded once into uint8 tensors, served as shuffled batches.

Sources, in the order they are tried:
  * `data.path`: an IDX folder (the original Fashion-MNIST files), a `save_to_disk` dataset, or a
    folder of class sub-folders (loaded with the `imagefolder` builder; `data.name=imagefolder`);
  * `fashion_mnist` offline: the Debian package `dataset-fashion-mnist`'s IDX files;
  * the Hub: `zalando-datasets/fashion_mnist`, `uoft-cs/cifar10`, or any labelled image set
    (`data.name=hub`, `data.hub_id`), through `datasets.load_dataset` and its cache;
  * `synthetic`: a tiny deterministic set of class-dependent shapes, for tests.
Whatever the source, the result is a `datasets.Dataset` with an `image` Image column and a
`label` ClassLabel column, then an `ImageTensors` of uint8 images kept in memory: decoded once,
converted to grayscale or RGB and, with `data.image_size`, resized and centre-cropped, so that no
step ever touches a file or a PIL image.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataConfig
from .console import Progress

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


@dataclass
class ImageTensors:
    """A whole split in memory: `images` uint8 (N, C, H, W), `labels` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    source: dict = field(default_factory=dict)  # where the images came from (`data_identity`), for config.yaml

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def to(self, device: torch.device | str) -> "ImageTensors":
        return ImageTensors(self.images.to(device), self.labels.to(device), self.class_names, self.source)


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


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def is_idx_folder(folder: Path) -> bool:
    return any(_find_idx(folder, stem) for pair in IDX_FILES.values() for stem in pair)


def read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) and labels (N,) of one split of an IDX folder."""
    images_file, labels_file = (_find_idx(folder, stem) for stem in IDX_FILES[split])
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


def _hub_offline() -> bool:
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
                    "or HF_TOKEN" + ("; HF_HUB_OFFLINE is set, so only a cached copy can load" if _hub_offline() else ""))
        elif _hub_offline():
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


def _idx_source(cfg: DataConfig) -> Optional[Path]:
    """The IDX folder this config reads, if it reads one."""
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        return path if path.is_dir() and is_idx_folder(path) else None
    if cfg.name == "fashion_mnist" and is_idx_folder(DEBIAN_FASHION_MNIST):
        return DEBIAN_FASHION_MNIST
    return None


def _idx_class_names(cfg: DataConfig) -> list[str]:
    return FASHION_MNIST_CLASSES if cfg.name == "fashion_mnist" else [str(i) for i in range(10)]


def load_hf_dataset(cfg: DataConfig, split: Optional[str] = None):
    """The configured split as a `datasets.Dataset` with `image` (Image) and `label` (ClassLabel) columns."""
    split = split or cfg.split
    idx = _idx_source(cfg)
    if idx is not None:
        ds = load_idx_split(idx, split, _idx_class_names(cfg))
    elif cfg.path is not None:
        ds = _from_path(Path(cfg.path).expanduser(), split, cfg.name)
    elif cfg.name == "synthetic":
        ds = synthetic_split(cfg, split)
    else:
        ds = _from_hub(cfg, split)
    return _standardise(ds, cfg)


GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F")  # PIL modes with one colour channel


def _pixels(image, size: Optional[int], channels: Optional[int]) -> np.ndarray:
    """One decoded PIL image as uint8 (H, W) or (H, W, 3): grayscale or RGB (alpha dropped, palettes expanded),
    resized so its shorter side is `size` and centre-cropped to a square (`ImageOps.fit`, bicubic)."""
    from PIL import Image, ImageOps

    mode = {1: "L", 3: "RGB"}.get(channels) or ("L" if image.mode in GRAYSCALE_MODES else "RGB")
    if image.mode.startswith("I;16"):  # 16-bit grey: PIL's convert("L") clips at 255; scale the range instead
        image = Image.fromarray((np.asarray(image, np.uint32) * 255 + 32767) // 65535).convert("L")
    if image.mode != mode:
        image = image.convert(mode)
    if size is not None and image.size != (size, size):
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def dataset_to_tensors(ds, image_size: Optional[int] = None, channels: Optional[int] = None,
                       batch_size: int = 2000) -> ImageTensors:
    """Decode every image once into one uint8 (N, C, H, W) tensor.

    `channels` None keeps grayscale sets grayscale and makes a set RGB if any of its images is in colour
    (grey images replicated, as PIL's L -> RGB does). Without `image_size` the images must already be
    one square size.
    """
    class_names = list(ds.features["label"].names)
    pixels, labels = [], []
    # Every process decodes its own copy; the first one says how far it is.
    with Progress("decoding", len(ds), show=os.environ.get("RANK", "0") == "0") as shown:
        for batch in ds.iter(batch_size=batch_size):  # the Image feature decodes to PIL here
            pixels.extend(_pixels(image, image_size, channels) for image in batch["image"])
            labels.extend(batch["label"])
            shown.update(len(batch["label"]))
    if not pixels:
        raise DataError("the dataset is empty")
    shapes = {p.shape[:2] for p in pixels}
    if len(shapes) > 1:
        examples = ", ".join(f"{w}x{h}" for h, w in sorted(shapes)[:3])
        raise DataError(f"images differ in size ({examples}, ...): set data.image_size=N to resize and centre-crop "
                        "them to NxN when they are decoded")
    (height, width), = shapes
    if height != width:
        raise DataError(f"images are {width}x{height}, not square: set data.image_size=N to resize and centre-crop "
                        "them to NxN when they are decoded")
    if any(p.ndim == 3 for p in pixels):
        pixels = [np.repeat(p[..., None], 3, axis=2) if p.ndim == 2 else p for p in pixels]
        images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
    else:
        images = torch.from_numpy(np.stack(pixels))[:, None]
    return ImageTensors(images, torch.tensor(labels, dtype=torch.int64), class_names)


def select_classes(data: ImageTensors, classes: list[int]) -> ImageTensors:
    """Keep only `classes`, relabelled 0..k-1 in the given order; the class names follow."""
    bad = [c for c in classes if not 0 <= c < data.num_classes]
    if bad:
        raise DataError(f"data.classes contains {bad}; valid class ids are 0..{data.num_classes - 1} "
                        f"({', '.join(f'{i}={n}' for i, n in enumerate(data.class_names))})")
    lookup = torch.full((data.num_classes,), -1, dtype=torch.int64)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    new_labels = lookup[data.labels]
    keep = new_labels >= 0
    return ImageTensors(data.images[keep], new_labels[keep], [data.class_names[c] for c in classes], data.source)


def load_tensors(cfg: DataConfig, split: Optional[str] = None) -> ImageTensors:
    """The configured split, class subset and limit applied, as uint8 tensors on the CPU."""
    split = split or cfg.split
    idx = _idx_source(cfg)
    if idx is not None and cfg.image_size in (None, 28) and cfg.channels in (None, 1):
        # The IDX bytes are the pixels: skip the PNG encode/decode round trip of an Image column
        # (lossless, so the result equals dataset_to_tensors(load_hf_dataset(cfg)); ~0.2 s instead of ~10 s).
        images, labels = read_idx_split(idx, split)
        data = ImageTensors(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)),
                            _idx_class_names(cfg))
        data.source = {"path": str(idx.resolve()), "files": [f.name for f in (_find_idx(idx, stem) for stem in
                                                                              IDX_FILES[split])]}
    else:
        ds = load_hf_dataset(cfg, split)
        data = dataset_to_tensors(ds, cfg.image_size, cfg.channels)
        data.source = _dataset_source(cfg, ds)
    data.source.update(split=split, images=len(data))
    if cfg.classes is not None:
        data = select_classes(data, cfg.classes)
    if cfg.limit is not None:
        data = ImageTensors(data.images[: cfg.limit], data.labels[: cfg.limit], data.class_names, data.source)
    return data


def _dataset_source(cfg: DataConfig, ds) -> dict:
    """What identifies the images: a folder's path and file count, or the Hub id, config and revision, with
    `datasets`' fingerprint of the loaded table (it changes when the data files do)."""
    def folder(path: Path) -> dict:
        path = path.expanduser().resolve()
        return {"path": str(path), "files": sum(1 for f in path.rglob("*") if f.is_file())}

    if cfg.path is not None:
        path = Path(cfg.path)
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()  # counted by its fingerprint
        source = {"path": str(path.expanduser().resolve())} if saved or not path.is_dir() else folder(path)
    elif cfg.name == "synthetic":
        source = {"synthetic": {"size": cfg.synthetic_size, "image_size": cfg.synthetic_image_size,
                                "channels": cfg.synthetic_channels}}
    elif Path(hub_repo(cfg)).expanduser().is_dir():  # data.hub_id may name a local copy of a Hub repo
        source = {**folder(Path(hub_repo(cfg))), "hub_config": cfg.hub_config}
    else:
        source = {"hub_id": hub_repo(cfg), "hub_config": cfg.hub_config, "revision": cfg.revision or "main"}
    if ds.cache_files:  # a table on disk: datasets' own content hash (no public accessor); in memory it is random
        source["fingerprint"] = ds._fingerprint  # noqa: SLF001
    return source


def data_identity(data: ImageTensors) -> dict:
    """`data.source` with, for a Hub dataset, the commit its revision resolves to (asked of the Hub once, by
    the main process; offline it stays unknown and the fingerprint identifies the cached copy)."""
    source = dict(data.source)
    if "hub_id" in source and not _hub_offline():
        try:
            from huggingface_hub import HfApi

            source["commit"] = HfApi().dataset_info(source["hub_id"], revision=source["revision"]).sha
        except Exception:  # a private or unreachable repo: the run goes on, identified by its fingerprint
            source["commit"] = None
    return source


def to_model_range(images: torch.Tensor, pad_to: Optional[int] = None) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (torchvision's ToDtype(scale=True) + Normalize(0.5, 0.5)), padded with -1."""
    x = images.float() / 127.5 - 1.0  # out of place: a float input must not be modified
    if pad_to is not None and pad_to != x.shape[-1]:
        total = pad_to - x.shape[-1]
        if total < 0:
            raise DataError(f"data.pad_to={pad_to} is smaller than the images ({x.shape[-1]}px)")
        x = F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2), value=-1.0)
    return x


class BatchLoader:
    """Shuffled batches from in-memory uint8 images, with no per-sample Python work.

    Every process draws the same global permutation from (seed, epoch) and takes its own slice of
    each global batch, so N processes with batch B see exactly what one process with batch N*B
    would, and resuming at (epoch, step) reproduces the rest of the order.

    Batches arrive on `device`. The images live there too, or with `on_device=False` in host memory:
    then each batch is cut on the host and moved as uint8 (a quarter of float32's bytes), from pinned
    memory without blocking on CUDA, and only then converted, padded and flipped on `device`.
    """

    def __init__(self, data: ImageTensors, batch_size: int, seed: int, *, process_index: int = 0,
                 num_processes: int = 1, pad_to: Optional[int] = None, hflip: bool = False,
                 device: torch.device | str = "cpu", on_device: bool = True):
        self.device = torch.device(device)
        self.data = data.to(self.device if on_device else "cpu")
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.pad_to = pad_to
        self.hflip = hflip
        # Page-locked staging lets the host-to-device copy run asynchronously; only CUDA has it.
        self.pin = self.data.images.device.type == "cpu" and self.device.type == "cuda"
        global_batch = batch_size * num_processes
        self.steps_per_epoch = len(data) // global_batch  # drop the ragged end: every step sees a full batch
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(data)} images are fewer than one global batch ({batch_size} x {num_processes} processes)")

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.pad_to or self.data.image_size
        return (self.data.channels, size, size)

    def _to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if self.pin:
            tensors = tuple(t.pin_memory() for t in tensors)
        return [t.to(self.device, non_blocking=True) for t in tensors]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `(images in [-1, 1], labels)` of `epoch` on `device`, starting at `start_step` (for resume)."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.data), generator=gen)
        flips = torch.rand(len(self.data), generator=gen) < 0.5 if self.hflip else None
        storage = self.data.images.device  # the order and flips index where the images are
        order = order.to(storage)
        flips = flips.to(storage) if flips is not None else None
        global_batch = self.batch_size * self.num_processes
        for step in range(start_step, self.steps_per_epoch):
            lo = step * global_batch + self.process_index * self.batch_size
            idx = order[lo: lo + self.batch_size]
            batch = [self.data.images[idx], self.data.labels[idx]] + ([flips[idx]] if flips is not None else [])
            if storage != self.device:
                batch = self._to_device(*batch)
            images, labels, *flip = batch
            x = to_model_range(images, self.pad_to)
            if flip:
                x = torch.where(flip[0].view(-1, 1, 1, 1), x.flip(-1), x)
            yield x, labels
