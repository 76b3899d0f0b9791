"""Sharing GPUs between a study's runs: how many at a time on each, started least-loaded first, memory allowing."""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from typing import Optional

logger = logging.getLogger(__name__)


def gpu_free_gib(gpu: str) -> Optional[float]:
    """Free memory of one GPU as nvidia-smi reports it (no CUDA context in this process); None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", gpu],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return float(out.strip().splitlines()[0]) / 1024
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


class GpuSlots:
    """Up to `per_gpu` runs at a time on each GPU, least-loaded GPU first: one small run leaves most of a
    large GPU idle. A run joins a GPU already in use only once the last run started there has had
    `stagger_seconds` to allocate its memory and at least `min_free_gib` is still free; otherwise it
    waits for a run to end (or for memory to free up), so a full GPU is not pushed out of memory."""

    def __init__(self, gpus: list[Optional[str]], per_gpu: int = 1, min_free_gib: float = 4.0,
                 stagger_seconds: float = 30.0, free_gib=gpu_free_gib, clock=time.monotonic):
        self.active = {gpu: 0 for gpu in gpus}
        self.started = {gpu: float("-inf") for gpu in gpus}
        self.per_gpu, self.min_free_gib, self.stagger = per_gpu, min_free_gib, stagger_seconds
        self.free_gib, self.clock = free_gib, clock
        self.changed = threading.Condition()

    def _room(self, gpu: Optional[str]) -> tuple[bool, float]:
        """(may a run start on `gpu` now, how long to wait before asking again)."""
        if self.active[gpu] >= self.per_gpu:
            return False, 30.0
        if self.active[gpu] == 0 or gpu is None:
            return True, 0.0
        settle = self.started[gpu] + self.stagger - self.clock()
        if settle > 0:
            return False, settle
        free = self.free_gib(gpu)
        if free is not None and free < self.min_free_gib:
            logger.info("GPU %s: %.1f GiB free, below %.1f GiB: the next run waits", gpu, free, self.min_free_gib)
            return False, 30.0
        return True, 0.0

    def acquire(self) -> Optional[str]:
        with self.changed:
            while True:
                waits = []
                for gpu in sorted(self.active, key=lambda g: self.active[g]):
                    ok, wait = self._room(gpu)
                    if ok:
                        self.active[gpu] += 1
                        self.started[gpu] = self.clock()
                        return gpu
                    waits.append(wait)
                self.changed.wait(timeout=min(waits))  # a run ends, a start settles, or memory frees up

    def release(self, gpu: Optional[str]) -> None:
        with self.changed:
            self.active[gpu] -= 1
            self.changed.notify_all()
