"""Data-loading throughput: the project's in-memory BatchLoader against the usual DataLoader pipeline.

Both loaders serve real Fashion-MNIST (train split, 60,000 images, from the Debian IDX files via
`pipelines.data.load_hf_dataset`) as shuffled batches of float images in [-1, 1], shape
(B, 1, 28, 28) or (B, 1, 32, 32) with --pad-to 32, and int64 labels:

  ours   `load_tensors` decodes every image once into a uint8 tensor (timed separately, a one-off
         cost), then `BatchLoader.epoch(e)` gathers, scales and pads whole batches at once.
  usual  `torch.utils.data.DataLoader(shuffle=True)` over the `datasets.Dataset` with
         `with_transform` applying per-sample torchvision v2 transforms (Pad, ToImage, ToDtype,
         Normalize) to the PIL images, which `datasets` decodes from PNG on every access.

Each loader is warmed up for a few batches, then its iteration is timed with the same consumption
of each batch (the tensors are produced and their shapes read, nothing else). Ours is timed over a
full epoch by default; the usual loader over --max-batches (300 by default, as it is slow), and its
images/s is extrapolated from those batches. Before timing, both are checked to give identical
tensors for the same images.

Run:  .venv/bin/python bench/data.py [--batch-size 64] [--pad-to 32] [--max-batches N]
                                      [--workers 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import time

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from pipelines.config import DataConfig
from pipelines.data import BatchLoader, load_hf_dataset, load_tensors, to_model_range

WARMUP = 5
USUAL_DEFAULT_BATCHES = 300


def usual_transform(pad_to):
    steps = [v2.Pad((pad_to - 28) // 2, fill=0)] if pad_to else []  # black (0 -> -1), as BatchLoader pads
    per_sample = v2.Compose(steps + [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5], [0.5])])

    def transform(batch):
        return {"pixel_values": [per_sample(img) for img in batch["image"]], "labels": batch["label"]}

    return transform


def time_batches(batches, limit):
    """Consume `limit` (x, y) batches after `WARMUP` untimed ones; return (images, seconds)."""
    for _ in itertools.islice(batches, WARMUP):
        pass
    images, start = 0, time.perf_counter()
    for x, y in itertools.islice(batches, limit):  # identical, minimal consumption for both loaders
        images += x.shape[0]
    return images, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pad-to", type=int, choices=[32], default=None)
    parser.add_argument("--max-batches", type=int, default=None,
                        help=f"timed batches per loader (default: a full epoch for ours, {USUAL_DEFAULT_BATCHES} for the usual one)")
    parser.add_argument("--workers", type=int, default=0, help="also time the usual loader with this many workers")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    cfg = DataConfig(name="fashion_mnist", pad_to=args.pad_to)

    start = time.perf_counter()
    data = load_tensors(cfg)
    decode_s = time.perf_counter() - start
    ds = load_hf_dataset(cfg)
    ours = BatchLoader(data, args.batch_size, seed=0, pad_to=args.pad_to)
    transform = usual_transform(args.pad_to)

    # Same images, same tensors: the two pipelines are interchangeable.
    a, b = torch.stack(transform(ds[:8])["pixel_values"]), to_model_range(data.images[:8], args.pad_to)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6), "the two pipelines disagree"

    rows = []
    epoch_batches = len(ours)
    n = min(args.max_batches or epoch_batches, epoch_batches)
    batches = itertools.chain(itertools.islice(ours.epoch(0), WARMUP), ours.epoch(1))
    images, seconds = time_batches(batches, n)
    rows.append({"loader": "ours: BatchLoader", "batches": n, "images": images, "seconds": seconds})

    for workers in sorted({0, args.workers}):
        loader = DataLoader(ds.with_transform(transform), batch_size=args.batch_size, shuffle=True,
                            num_workers=workers, drop_last=True)
        n = min(args.max_batches or USUAL_DEFAULT_BATCHES, len(loader) - WARMUP)
        images, seconds = time_batches(((d["pixel_values"], d["labels"]) for d in loader), n)
        rows.append({"loader": f"usual: DataLoader, {workers} workers", "batches": n, "images": images, "seconds": seconds})

    for row in rows:
        row["images_per_s"] = row["images"] / row["seconds"]
        row["ours_over_this"] = rows[0]["images_per_s"] / row["images_per_s"]
        row["epoch_s_extrapolated"] = epoch_batches * args.batch_size / row["images_per_s"]

    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    print(f"{machine['date']}  {machine['platform']}  torch {machine['torch']}, {machine['torch_threads']} threads")
    print(f"Fashion-MNIST train, {len(data)} images, batch {args.batch_size}, images {tuple(ours.image_shape)}; "
          f"load_tensors (one-off decode): {decode_s:.1f} s")
    print(f"{'loader':<32}{'images':>8}{'seconds':>9}{'images/s':>10}{'epoch s':>9}{'ours/this':>11}")
    for r in rows:
        print(f"{r['loader']:<32}{r['images']:>8}{r['seconds']:>9.2f}{r['images_per_s']:>10.0f}"
              f"{r['epoch_s_extrapolated']:>9.1f}{r['ours_over_this']:>10.1f}x")
    print(f"(timed batches after {WARMUP} warm-up ones; 'epoch s' for loaders timed on fewer than "
          f"{epoch_batches} batches is extrapolated from their images/s)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "load_tensors_s": decode_s, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
