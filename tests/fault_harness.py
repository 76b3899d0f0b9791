"""Run a trainer in this process with a fault injected at an exact moment (test_faults.py starts it).

    python tests/fault_harness.py FAULT SCRIPT [trainer arguments ...]

FAULT is one of
    log-writes:FILE           append the path of every file the run writes (safetensors, torch.save, JSON) to FILE
    kill-at-write:K           SIGKILL this process in the middle of its K-th file write (the file is left half-written)
    file-size-at-checkpoint:N:BYTES
                              as the N-th checkpoint starts, limit every file to BYTES (RLIMIT_FSIZE): its
                              first larger write fails as a real one does, with that library's own exception
    fill-disk-at-checkpoint:N:BYTES
                              as the N-th checkpoint starts, fill the output's filesystem up to BYTES free (ENOSPC)
    slow:SECONDS              sleep after each logged step (the results are unchanged), to give a signal time to land
    slow-steps:SECONDS        sleep in every step, before its upkeep, and write the step number to `step.RANK`
    slow-eval:SECONDS         in-training evaluations announce themselves (file `slow-eval`) and each of their
                              sampling batches takes SECONDS longer (the evaluation's own checks run as usual)
    slow-final:SECONDS        the final grid announces itself (file `slow-final`) and takes SECONDS longer
    sigterm-in-swap:NAME      SIGTERM this process between the two renames that swap in the export NAME (best)
    sigterm-in-ema-restore    SIGTERM this process as the EMA's training weights are put back after an evaluation

Several faults may be given, separated by commas. The process writes its pid to `pid.RANK` in the
working directory, so a test can signal one rank of a multi-process launch.

The faults wrap the libraries' own write functions (safetensors' save_file, torch.save, the
checkpoint's JSON state file), so the trainer runs unchanged and the moment is deterministic.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

import accelerate.utils.other
import safetensors.torch
import torch

import pipelines.checkpoints
import pipelines.evaluation
import pipelines.exports
import pipelines.gan
import pipelines.loop
import pipelines.rundir
import pipelines.trainer


def wrap_writes(on_write) -> None:
    """Call `on_write(path, write)` instead of each file write; `write()` does the real one."""

    def wrapped(real, path_arg):
        def write(*args, **kwargs):
            path = args[path_arg] if len(args) > path_arg else kwargs.get("filename", kwargs.get("f"))
            return on_write(str(path), lambda: real(*args, **kwargs))
        return write

    accelerate.utils.other.safe_save_file = wrapped(accelerate.utils.other.safe_save_file, 1)
    safetensors.torch.save_file = wrapped(safetensors.torch.save_file, 1)
    torch.save = wrapped(torch.save, 1)
    real_fsync = pipelines.checkpoints.os.fsync

    class TrackedOs:  # the checkpoint's state file ends with an fsync: count that as its write
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def fsync(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            return on_write(path, lambda: real_fsync(fd))

    pipelines.checkpoints.os = TrackedOs()


def at_checkpoint(n: int, act) -> None:
    """Call `act(output_dir)` just before the n-th checkpoint is written."""
    real = pipelines.loop.save_checkpoint
    calls = [0]

    def save_checkpoint(accelerator, output_dir, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            act(Path(output_dir))
        return real(accelerator, output_dir, *args, **kwargs)

    pipelines.loop.save_checkpoint = save_checkpoint


def install(fault: str) -> None:
    kind, _, arg = fault.partition(":")
    if kind == "slow":
        real = pipelines.loop.write_stats

        def write_stats(*args, **kwargs):
            real(*args, **kwargs)
            time.sleep(float(arg))
        pipelines.loop.write_stats = write_stats
    elif kind == "log-writes":
        def log(path, write):
            result = write()
            with open(arg, "a") as f:
                f.write(json.dumps(path) + "\n")
            return result
        wrap_writes(log)
    elif kind == "kill-at-write":
        count, target = [0], int(arg)

        def kill(path, write):
            result = write()
            count[0] += 1
            if count[0] == target:
                size = os.path.getsize(path)
                os.truncate(path, size // 2)  # as if the kill came halfway through this file
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        wrap_writes(kill)
    elif kind == "file-size-at-checkpoint":
        n, limit = (int(x) for x in arg.split(":"))

        def limit_files(_):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        at_checkpoint(n, limit_files)
    elif kind == "fill-disk-at-checkpoint":
        n, leave = (int(x) for x in arg.split(":"))

        def fill(root: Path):
            stat = os.statvfs(root)
            free = stat.f_bavail * stat.f_frsize
            with open(root / "filler", "wb") as f:
                f.truncate(0)
                f.write(b"\0" * max(free - leave, 0))
        at_checkpoint(n, fill)
    elif kind == "slow-final":  # a long final grid, announced by a file
        seconds = float(arg)
        real_draw = pipelines.trainer.Training.draw_grid

        def slow(self, name, step):
            if name == "final":
                Path(kind).write_text("started")
                time.sleep(seconds)
            return real_draw(self, name, step)
        pipelines.trainer.Training.draw_grid = slow
    elif kind == "slow-eval":  # a long in-training evaluation: each sampling batch slower, announced by a file
        seconds = float(arg)
        real_generate = pipelines.evaluation.generate

        def generate(pipe, *args, **kwargs):
            Path(kind).write_text("started")
            real_call = type(pipe).__call__

            def slow_call(self, *call_args, **call_kwargs):
                time.sleep(seconds)
                return real_call(self, *call_args, **call_kwargs)
            type(pipe).__call__ = slow_call
            try:
                return real_generate(pipe, *args, **kwargs)
            finally:
                type(pipe).__call__ = real_call
        pipelines.evaluation.generate = generate
    elif kind == "slow-steps":  # every step slow: a SIGTERM lands between log steps
        seconds = float(arg)
        real_after_step = pipelines.loop.Upkeep.after_step
        rank = os.environ.get("RANK", "0")

        def after_step(self, step, *args, **kwargs):
            time.sleep(seconds)
            Path(f"step.{rank}").write_text(str(step))
            return real_after_step(self, step, *args, **kwargs)
        pipelines.loop.Upkeep.after_step = after_step
    elif kind == "sigterm-in-swap":  # the signal between `NAME -> .old-NAME` and `.tmp-NAME -> NAME`
        class SwapOs:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                os.replace(src, dst)
                if Path(src).name == arg and Path(dst).name == f".old-{arg}":
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.5)  # the handler runs now, inside the swap
        pipelines.exports.os = SwapOs()
    elif kind == "sigterm-in-ema-restore":  # the signal as the training weights come back after an evaluation
        from diffusers.training_utils import EMAModel

        real_restore, real_evaluate = EMAModel.restore, pipelines.trainer.Training.evaluate
        evaluating = [False]

        def restore(self, parameters):
            if evaluating[0]:
                evaluating[0] = False
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)  # the handler runs now, before the weights are back
            return real_restore(self, parameters)

        def evaluate(self, *args):
            evaluating[0] = True
            try:
                return real_evaluate(self, *args)
            finally:
                evaluating[0] = False
        EMAModel.restore = restore
        pipelines.trainer.Training.evaluate = evaluate
    elif kind == "unshared-on-rank":  # as if this rank's output_dir were a different, local folder
        real_sees = pipelines.rundir.sees_token
        blind = int(arg) == int(os.environ.get("RANK", "0"))
        pipelines.rundir.sees_token = lambda path, nonce: False if blind else real_sees(path, nonce)
    elif kind == "record-pg-timeout":  # the timeout the process group is created with, per rank
        import torch.distributed

        real_init = torch.distributed.init_process_group

        def init_process_group(*args, **kwargs):
            timeout = kwargs.get("timeout")
            Path(f"pg_timeout.{os.environ.get('RANK', '0')}").write_text(str(timeout.total_seconds() if timeout
                                                                              else None))
            return real_init(*args, **kwargs)
        torch.distributed.init_process_group = init_process_group
    elif kind == "nan-on-rank":  # NaN images on one rank at one step; every rank dumps its weights each step
        rank, at = (int(x) for x in arg.split(":"))
        real_call = pipelines.gan.GANStep.__call__
        me = int(os.environ.get("RANK", "0"))

        def call(self, step, real, labels, measure_grads=False):
            if me == rank and step == at:
                real = real * float("nan")  # D's loss is NaN on this rank only
            metrics = real_call(self, step, real, labels, measure_grads)
            from safetensors.torch import save_file

            weights = {f"{name}.{k}": v.detach().cpu().contiguous() for name, net in
                       (("G", self.generator), ("D", self.discriminator))
                       for k, v in self.accelerator.unwrap_model(net).state_dict().items()}
            save_file(weights, f"weights.{me}.safetensors")
            return metrics
        pipelines.gan.GANStep.__call__ = call
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    import pipelines.commands

    faults, script, *argv = sys.argv[1:]
    Path(f"pid.{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
    for fault in faults.split(","):
        install(fault)
    sys.exit(getattr(pipelines.commands, script)(argv))
