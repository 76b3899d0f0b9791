"""Images from Hugging Face `datasets`, decoded once into uint8 tensors, served as shuffled batches.

This module gathers the data API; the work is in `data_sources.py` (where images come from), `decoding.py`
(into memory), `provenance.py` (what identifies them) and `batches.py` (the training batches).

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

from .batches import BatchLoader, to_model_range  # noqa: F401
from .data_sources import (  # noqa: F401
    CIFAR10_CLASSES, DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, HUB_IDS, IDX_FILES, DataError, hub_repo,
    is_idx_folder, load_hf_dataset, load_idx_split, pick_split, read_idx_split, synthetic_split,
)
from .decoding import GRAYSCALE_MODES, ImageTensors, dataset_to_tensors, load_tensors, select_classes  # noqa: F401
from .provenance import data_identity, dataset_source  # noqa: F401
