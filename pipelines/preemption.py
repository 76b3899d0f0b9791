"""Preemption: SIGTERM recorded as a request, acted on where stopping loses nothing; with several processes,
the request and the wish for a checkpoint pooled every step, on the host.

A signal handler runs between any two bytecodes of whatever code is running: raising from it can cut an
`os.replace` pair or an EMA swap in half. So the handler only sets a flag; the training loop reads it after
each step, an evaluation between batches (and between denoising steps), the end of a run between its phases.
"""

from __future__ import annotations

import signal
import threading
from datetime import timedelta
from typing import Optional

import torch


class StopRequested(Exception):
    """Raised by `Preemption.check` (ordinary code, never the handler) where a phase stops for a SIGTERM."""


class Preemption:
    """Whether SIGTERM has arrived, in this process (its handler: `install()`, main thread only) or in another
    (`learn`, from what the processes pooled). The one owner of that state: everything else reads `requested`."""

    def __init__(self):
        self.requested = False

    def learn(self, pooled: Optional[bool]) -> None:
        """What the processes pooled (`StepConsensus`): a SIGTERM that reached another process stops this one too."""
        if pooled:
            self.requested = True

    def install(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True  # only a flag: the code running now finishes what it is doing

    def check(self) -> None:
        """A safe point: raise `StopRequested` if SIGTERM has arrived."""
        if self.requested:
            raise StopRequested


class StepConsensus:
    """What the processes wish after a step (a checkpoint by wall time, a SIGTERM), pooled so that all act on
    the same step: saving is collective, and a signal or the wall clock reaches each process at its own step.

    With several processes the flags go through a host-side (gloo) all-reduce started after every step and read
    one step later, so the pooling neither syncs the device nor waits for the slowest rank: a wish raised by any
    process after step k is acted on by all after step k + 1, whatever `log.every_steps` is."""

    def __init__(self, num_processes: int, timeout_minutes: float = 60.0):
        self.num_processes = num_processes
        self.group, self.pending = None, None
        self.ignore_checkpoint_wish = False
        if num_processes > 1:
            import torch.distributed as dist

            # A gloo group of its own, whatever the run's backend (NCCL on GPUs): the flags stay on the host, and
            # the line runs the same on CPUs as on GPUs.
            self.group = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))

    def pooled(self, wants_checkpoint: bool, preempted: bool) -> tuple[bool, bool]:
        """The pooled (checkpoint, preempted) to act on now. Call once per step on every process."""
        if self.num_processes == 1:
            return wants_checkpoint, preempted
        import torch.distributed as dist

        result = (False, False)
        if self.pending is not None:
            work, flags = self.pending
            work.wait()
            result = (bool(flags[0] > 0) and not self.ignore_checkpoint_wish, bool(flags[1] > 0))
        self.ignore_checkpoint_wish = False
        flags = torch.tensor([float(wants_checkpoint), float(preempted)])
        self.pending = (dist.all_reduce(flags, group=self.group, async_op=True), flags)
        return result

    def saved(self) -> None:
        """A checkpoint was just written: the wish in flight (posted before it) is fulfilled."""
        self.ignore_checkpoint_wish = True

    def close(self) -> Optional[bool]:
        """Wait for the all-reduce in flight (every process posted it); returns whether it carried a SIGTERM."""
        if self.pending is None:
            return None
        work, flags = self.pending
        work.wait()
        self.pending = None
        return bool(flags[1] > 0)
