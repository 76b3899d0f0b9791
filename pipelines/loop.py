"""The training loop's mechanics: steps in data order, the non-finite guard, and the periodic upkeep."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Protocol

import torch
from accelerate import Accelerator

from .checkpoints import save_checkpoint
from .preemption import Preemption, StepConsensus, StopRequested
from .rundir import snapshot_dir
from .tracking import write_stats

if TYPE_CHECKING:
    from .console import TrainingProgress
    from .run import Run


# Devices with fused Adam/AdamW kernels (torch >= 2.4), which take the guard's skip without a host sync.
FUSED_DEVICES = ("cuda", "cpu")


class NonFiniteGuard:
    """Skips the optimizer steps whose loss is not finite on any process, decided on the device.

    `check(loss)` gives `found_inf` (1.0: skip), the same tensor on every process (a one-number
    all-reduce, no host sync), and every process runs its backward as usual, so the gradient
    all-reduce never waits for a rank that skipped it; `record(found_inf)` counts each step once.
    `step(optimizer, found_inf)` hands it to the fused Adam/AdamW kernel, which then leaves weights,
    moments and step count as they were (as GradScaler's found-inf does); under a GradScaler (fp16) the
    loss is `marked` instead, so that the scaler's own check skips the step. The counts are read at log
    steps only (`read`): too many skips in a row then stop the run, with the last checkpoint intact.
    """

    def __init__(self, limit: int, accelerator: Optional[Accelerator] = None):
        self.limit, self.acc = limit, accelerator
        device = accelerator.device if accelerator is not None else torch.device("cpu")
        # skipped in a row now, the longest run of skips since the last read, skipped in all
        self._counts = torch.zeros(3, device=device)

    def check(self, *losses: torch.Tensor) -> torch.Tensor:
        """`found_inf` of these losses: 1.0 when one is not finite on any process."""
        found_inf = (~torch.isfinite(torch.stack([l.detach().float() for l in losses]))).any().float()
        if self.acc is not None and self.acc.num_processes > 1:
            found_inf = self.acc.reduce(found_inf, reduction="sum").clamp(max=1.0)  # one rank's NaN skips all
        return found_inf

    def record(self, found_inf: torch.Tensor) -> None:
        """Count one optimizer step's verdict (once per step: the limit counts skipped steps in a row)."""
        in_row = (self._counts[0] + 1) * found_inf
        self._counts = torch.stack([in_row, torch.maximum(self._counts[1], in_row), self._counts[2] + found_inf])

    def counts(self) -> torch.Tensor:
        """(skipped in a row now, the longest run of skips since the last read, skipped in all), on the device."""
        return self._counts

    @staticmethod
    def scaled(optimizer: torch.optim.Optimizer) -> bool:
        """Whether a GradScaler steps `optimizer` (accelerate's wrapper under fp16 on a GPU)."""
        return getattr(optimizer, "scaler", None) is not None

    @staticmethod
    def marked(loss: torch.Tensor, found_inf: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """The loss to back-propagate for `optimizer`'s update, carrying the guard's verdict where it must.

        Under a GradScaler the scaler decides the skip from the gradients, and itself sets and deletes
        the fused kernel's `found_inf`; so the verdict travels in the gradients: where `found_inf` is set
        the loss (and every gradient) becomes NaN, and the scaler skips the step (lowering its scale, as
        for any overflow). Otherwise the loss is returned as it is (`step` hands the verdict over)."""
        if not NonFiniteGuard.scaled(optimizer):
            return loss
        return loss * torch.where(found_inf > 0, float("nan"), 1.0)

    @staticmethod
    def step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
        """`optimizer.step()`, skipped on the device where `found_inf` is 1 (fused kernels; others sync once).

        Under a GradScaler the scaler's own found-inf skips it: the loss was `marked`."""
        if NonFiniteGuard.scaled(optimizer):
            optimizer.step()
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
        if not inner.defaults.get("fused"):
            if not bool(found_inf):  # an optimizer without the fused kernel: a host sync decides
                optimizer.step()
            return
        inner.found_inf = found_inf
        try:
            optimizer.step()
        finally:
            del inner.found_inf

    def read(self, counts: Optional[list[float]] = None) -> int:
        """At a log step: the total skipped; raises when the limit in a row was reached since the last read.

        `counts`: `counts()` already read to the host (the log's one sync)."""
        in_row, worst, total = counts if counts is not None else self._counts.tolist()
        self._counts = torch.stack([self._counts[0], self._counts[0], self._counts[2]])
        if worst >= self.limit:
            raise FloatingPointError(
                f"{int(worst)} non-finite losses in a row (limit train.max_nonfinite_steps={self.limit}); "
                "stopping. The last checkpoint is intact: lower the learning rate or use mixed_precision=no/bf16, "
                "then --resume latest"
            )
        return int(total)


class WallClock:
    """Says when `every_minutes` of wall time have passed since it last said so (never without a period)."""

    def __init__(self, every_minutes: Optional[float]):
        self.every_seconds = every_minutes * 60 if every_minutes else None
        self.last = time.monotonic()

    def due(self) -> bool:
        if self.every_seconds is None or time.monotonic() - self.last < self.every_seconds:
            return False
        self.last = time.monotonic()
        return True


def steps_from(loader, step: int, total_steps: int, accumulation: int = 1) -> Iterator[tuple[int, list]]:
    """Yield `(epoch, micro_batches)` for each optimizer step from `step` to `total_steps`.

    An optimizer step uses `accumulation` consecutive batches of one epoch; the position in the
    data is a pure function of the step, which is what makes resume exact.
    """
    per_epoch = len(loader) // accumulation
    if per_epoch == 0:
        raise ValueError(f"an epoch has {len(loader)} batches, fewer than gradient_accumulation_steps={accumulation}")
    while step < total_steps:
        epoch = step // per_epoch
        batches = loader.epoch(epoch, start_step=(step % per_epoch) * accumulation)
        for _ in range(min(per_epoch - step % per_epoch, total_steps - step)):
            yield epoch, [next(batches) for _ in range(accumulation)]
            step += 1


class UpkeepTasks(Protocol):
    """The run's own work that the upkeep schedules (`trainer.Training` does it)."""

    def draw_grid(self, name: str, step: int) -> None: ...

    def export(self, path: Path) -> None: ...  # the pipeline with the EMA weights, written atomically

    def evaluate(self, epoch: int, step: int) -> Optional[dict]: ...  # on the main process (its record); others wait

    def checkpoint_extra(self) -> dict[str, torch.Tensor]: ...  # EMA and other state for the checkpoint


class Upkeep:
    """Everything periodic after an optimizer step: logging, checkpoints, sample grids, evaluation, snapshots.

    Metrics arrive as device tensors and are read (one host sync) only when a log is due.
    """

    def __init__(self, *, run: "Run", tasks: UpkeepTasks, guard: NonFiniteGuard, preemption: Preemption,
                 progress: Optional["TrainingProgress"] = None):
        self.acc, self.cfg, self.out = run.accelerator, run.cfg, run.out
        self.steps_per_epoch, self.total_steps = run.steps_per_epoch, run.total_steps
        self.tasks, self.guard, self.preemption, self.progress = tasks, guard, preemption, progress
        self.clock = run.clock
        self.ckpt_clock = WallClock(self.cfg.checkpoint.every_minutes)
        self.consensus = StepConsensus(self.acc.num_processes, self.cfg.train.process_group_timeout_minutes)
        self.pending: list[dict] = []
        self.wants_checkpoint = False  # by wall time; held until the processes have pooled it
        self.final_step = 0

    def after_step(self, step: int, metrics: dict, **scalars: float) -> Optional[dict]:
        """Call with the number of completed steps; returns the logged record when one was written."""
        self.pending.append(metrics)
        record = None
        log_due = step % self.cfg.log.every_steps == 0 or step == self.total_steps
        if log_due:
            keys = sorted({k for m in self.pending for k in m})
            means = torch.stack([torch.stack([m[k] for m in self.pending if k in m]).float().mean() for k in keys])
            # Averaged over processes too, so the curve is the global batch's whole; the guard's counts (the same
            # on every process) ride along: one host sync per log.
            values = self.acc.reduce(torch.cat([means, self.guard.counts()]), reduction="mean").tolist()
            record = dict(zip(keys, values))
            record.update(step=step, epoch=(step - 1) // self.steps_per_epoch + 1, **scalars,
                          nonfinite_skipped=self.guard.read(values[len(keys):]))
            self.pending.clear()
            self.acc.log(record, step=step)
            if self.acc.is_main_process:
                write_stats(self.out, record)
        end_of_epoch = step % self.steps_per_epoch == 0
        last = step == self.total_steps
        epoch = (step - 1) // self.steps_per_epoch + 1
        if end_of_epoch and (epoch % self.cfg.log.grid_every_epochs == 0 or last):
            self.tasks.draw_grid(f"epoch_{epoch:03d}", step)
        if end_of_epoch and epoch in self.cfg.eval.snapshot_epochs:
            if self.acc.is_main_process:
                self.tasks.export(snapshot_dir(self.out, epoch))
            self.acc.wait_for_everyone()
        every = self.cfg.eval.every_epochs
        if every and end_of_epoch and (epoch % every == 0 or last):
            try:
                if not self.preemption.requested:
                    evaluated = self.tasks.evaluate(epoch, step)  # the main process evaluates; the others wait
                    if self.progress is not None:
                        self.progress.evaluated(evaluated)
            except StopRequested:  # checked between its batches: dropped, the checkpoint and exit follow
                self.acc.print(f"SIGTERM: the evaluation at epoch {epoch} was stopped")
            self.acc.wait_for_everyone()
        ckpt_cfg = self.cfg.checkpoint
        by_steps = step % ckpt_cfg.every_steps == 0 if ckpt_cfg.every_steps else end_of_epoch
        self.wants_checkpoint = self.wants_checkpoint or self.ckpt_clock.due()
        by_wish, preempted = self.consensus.pooled(self.wants_checkpoint, self.preemption.requested)
        if by_steps or by_wish or preempted or last:
            save_checkpoint(self.acc, self.out, step, ckpt_cfg.keep, self.tasks.checkpoint_extra(),
                            info={"train_seconds": round(self.clock.seconds(), 3)})
            self.wants_checkpoint = False
            self.consensus.saved()
        if preempted:
            self.consensus.close()
            self.acc.print(f"SIGTERM: saved a checkpoint at step {step}; continue with --resume latest")
            self.acc.end_training()
            raise SystemExit(143)
        return record

    def finishing(self, step: int) -> None:
        """Training is over and its last checkpoint written; from here on a SIGTERM ends the run at the next
        `stop_point` (a SIGTERM that reached another process during the last step is pooled here too)."""
        self.final_step = step
        self.preemption.learn(self.consensus.close())

    def stop_point(self, what: str) -> None:
        """Between the phases after training: exit at once on a SIGTERM, nothing is lost (`what` is left)."""
        if self.preemption.requested:
            self.acc.print(f"SIGTERM after training: the checkpoint at step {self.final_step} is complete; "
                           f"--resume latest {what}")
            self.acc.end_training()
            raise SystemExit(143)
