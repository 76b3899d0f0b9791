"""The training hot loop reads no tensor value to the host between log steps, for every model family.

On a GPU each such read is a device-to-host sync that stalls the launch queue (torch.cuda.set_sync_debug_mode
would flag it); on the CPU there is no copy to catch, so these tests count the Python-level reads instead:
`torch.Tensor`'s value-reading methods are wrapped with counters, switched on only while the loop's
per-step calls run (`family.train_step`, `family.scalars`, `Upkeep.after_step`). Every `train_step` --
those before a log step that measure gradient norms included -- and every `after_step` that is neither a
log step, nor an epoch end, nor the last step must read nothing; a log step must read (its one sync),
which shows that the counters see what the run does.
"""

from __future__ import annotations

import contextlib
import json
import threading
import traceback

import pytest
import torch

from pipelines.config import CGANConfig, DDPMConfig
from pipelines.diffusion import DDPM
from pipelines.gan import CGAN
from pipelines.loop import Upkeep
from trainer_utils import run_script

# torch.Tensor methods that hand a tensor's value to Python (each a device-to-host copy on a GPU).
READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__", "__repr__")

# 48 16x16 images in batches of 8: 6 steps an epoch, 2 epochs, a log every 4 steps. Log steps 4, 8, 12; epoch
# ends 6, 12 (grids, checkpoints); the hot steps 1-3, 5, 7, 9-11 (7 and 9-11 after an epoch end's upkeep).
SCHEDULE = ["data.name=synthetic", "data.synthetic_size=48", "data.synthetic_image_size=16", "train.batch_size=8",
            "train.epochs=2", "log.every_steps=4"]
TOTAL_STEPS, STEPS_PER_EPOCH, LOG_EVERY = 12, 6, 4

CGAN_TINY = [*SCHEDULE, "model.base_channels=8", "model.latent_dim=16", "model.label_emb_dim=8"]
CGAN_MODERN = [*CGAN_TINY, "model.arch=resnet", "loss.name=hinge", "loss.diffaugment=[color,translation,cutout]",
               "loss.r1_gamma=1.0", "loss.r1_every=2", "train.ema_decay=0.9", "train.ema_start_step=2"]
# The other branches of the GAN step: the gradient penalty, the D-only steps of critic_steps, mode seeking.
CGAN_WGAN = [*CGAN_TINY, "loss.name=wgan_gp", "loss.critic_steps=2", "loss.mode_seeking=1.0"]
DDPM_TINY = [*SCHEDULE, "model.block_out_channels=[8,16]", "model.attention=[false,true]", "model.layers_per_block=1",
             "model.norm_num_groups=4", "diffusion.num_train_timesteps=50", "diffusion.sample_steps=2",
             "optim.lr=0.002", "optim.warmup_steps=2", "train.ema_decay=0.9", "train.ema_start_step=2"]
GRAD_NORM = {"train_cgan": "grad_norm_d", "train_ddpm": "grad_norm"}  # a metric of the measuring steps


class HostReads:
    """Counts calls of `READS` on any tensor while a window is open, with where each came from."""

    def __init__(self):
        self.window = None  # (phase, step) while counting
        self.counts: dict[tuple[str, int], int] = {}
        self.where: dict[tuple[str, int], list[str]] = {}
        self._inside = threading.local()  # a read inside a read (__format__ calls item) counts once

    def install(self, monkeypatch) -> None:
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name), name))

    def _counted(self, original, name: str):
        def counted(tensor, *args, **kwargs):
            key = self.window
            if key is None or getattr(self._inside, "on", False):
                return original(tensor, *args, **kwargs)
            self.counts[key] += 1
            stack = traceback.format_stack(limit=8)[:-1]  # source lines only: reads no tensor
            self.where[key].append(f"Tensor.{name}\n" + "".join(stack))
            self._inside.on = True
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._inside.on = False

        return counted

    @contextlib.contextmanager
    def counting(self, phase: str, step: int):
        assert self.window is None, f"window {self.window} still open"
        key = (phase, step)
        assert key not in self.counts, f"{key} ran twice"
        self.counts[key], self.where[key] = 0, []
        self.window = key
        try:
            yield
        finally:
            self.window = None

    def report(self, keys, shown: int = 2) -> str:
        """Each key's count, and where the first `shown` keys' first reads came from."""
        counts = ", ".join(f"{phase} {step}: {self.counts[phase, step]}" for phase, step in keys)
        return counts + "\n" + "\n".join(f"{key}, first read:\n{self.where[key][0]}" for key in keys[:shown])


def test_the_counter_sees_every_kind_of_read(monkeypatch):
    reads = HostReads()
    reads.install(monkeypatch)
    t, v = torch.tensor(2.0), torch.tensor([1.0, 2.0])
    i = torch.tensor(1)
    kinds = [lambda: t.item(), lambda: v.tolist(), lambda: v.numpy(), lambda: bool(t), lambda: float(t),
             lambda: int(t), lambda: [0, 1, 2][i], lambda: f"{t:.3f}", lambda: repr(t), lambda: t > 1 and None]
    for n, read in enumerate(kinds):
        with reads.counting("read", n):
            read()
        assert reads.counts["read", n] == 1, (n, reads.report([("read", n)]))
    # Device-side work is no read, and nothing is counted outside a window.
    with reads.counting("device", 0):
        (v * t).sum().clamp(max=1.0)
        torch.maximum(t, v).isfinite().any().float()
    float(t)
    assert reads.counts == {**{("read", n): 1 for n in range(len(kinds))}, ("device", 0): 0}


def count_hot_loop(monkeypatch, family: type, reads: HostReads) -> dict:
    """Open a counting window around each of the loop's per-step calls; returns what the run's upkeep knows."""
    seen: dict = {"measured": set(), "completed": 0}
    original_step, original_scalars, original_after = family.train_step, family.scalars, Upkeep.after_step

    def train_step(self, step, micro_batches, measure_grads):
        if measure_grads:
            seen["measured"].add(step + 1)
        with reads.counting("train_step", step + 1):  # keyed by the step it completes, as after_step is
            metrics = original_step(self, step, micro_batches, measure_grads=measure_grads)
        seen["completed"] = step + 1
        return metrics

    def scalars(self):
        # The loop's call after each step (the set-up's call, for the peak rates, comes before any step)
        step = seen["completed"]
        if not step or ("scalars", step) in reads.counts:
            return original_scalars(self)
        with reads.counting("scalars", step):
            return original_scalars(self)

    def after_step(self, step, metrics, **scalars):
        seen.update(steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                    log_every=self.cfg.log.every_steps)
        with reads.counting("after_step", step):
            return original_after(self, step, metrics, **scalars)

    monkeypatch.setattr(family, "train_step", train_step)
    monkeypatch.setattr(family, "scalars", scalars)
    monkeypatch.setattr(Upkeep, "after_step", after_step)
    return seen


@pytest.mark.parametrize("script,config,family,overrides", [
    pytest.param("train_cgan", CGANConfig, CGAN, CGAN_TINY, id="cgan_default"),
    pytest.param("train_cgan", CGANConfig, CGAN, CGAN_MODERN, id="cgan_modern"),
    pytest.param("train_cgan", CGANConfig, CGAN, CGAN_WGAN, id="cgan_wgan_gp_critic_mode_seeking"),
    pytest.param("train_ddpm", DDPMConfig, DDPM, DDPM_TINY, id="ddpm_ema"),
])
def test_no_host_reads_between_log_steps(script, config, family, overrides, tmp_path):
    reads = HostReads()
    with pytest.MonkeyPatch.context() as patch:  # undone before any assertion formats a tensor
        seen = count_hot_loop(patch, family, reads)
        reads.install(patch)
        assert run_script(script, config, tmp_path / "run", overrides) == 0

    # The schedule the assertions assume is the run's.
    assert (seen["total_steps"], seen["steps_per_epoch"], seen["log_every"]) == (TOTAL_STEPS, STEPS_PER_EPOCH,
                                                                                 LOG_EVERY)
    steps = range(1, TOTAL_STEPS + 1)
    for phase in ("train_step", "scalars", "after_step"):
        assert sorted(s for p, s in reads.counts if p == phase) == list(steps), phase
    log_steps = [s for s in steps if s % LOG_EVERY == 0]
    quiet = [s for s in steps if s % LOG_EVERY and s % STEPS_PER_EPOCH and s != TOTAL_STEPS]
    assert log_steps == [4, 8, 12] and quiet == [1, 2, 3, 5, 7, 9, 10, 11]
    # The steps that measure gradient norms were among those counted, and their norms were logged.
    assert sorted(seen["measured"]) == log_steps
    records = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == log_steps
    assert all(GRAD_NORM[script] in r for r in records), records

    # Every optimizer step, gradient-norm steps included, and the learning rates: no read at all.
    busy = [("train_step", s) for s in steps if reads.counts["train_step", s]]
    busy += [("scalars", s) for s in steps if reads.counts["scalars", s]]
    # The upkeep between logs: no read either.
    busy += [("after_step", s) for s in quiet if reads.counts["after_step", s]]
    assert not busy, "host reads in the hot loop:\n" + reads.report(busy)
    # A log step reads its metrics (the one sync): the counters see the run's reads.
    silent = [s for s in log_steps if not reads.counts["after_step", s]]
    assert not silent, f"log steps {silent} read nothing: the counters are not measuring"
