"""What a person watching a run sees, and what the run keeps of it: a progress bar on a terminal, one plain line
per log step elsewhere (a Slurm log, nohup, CI), and `train.log` in the run directory in both cases."""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional, TextIO

LOG_FILE = "train.log"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _Tee(io.TextIOBase):
    """A text stream that writes to `stream` and hands the same text to `sink`."""

    def __init__(self, stream: TextIO, sink):
        self.stream, self.sink = stream, sink

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.sink(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")


class RunLog:
    """`train.log`: everything the main process prints (its lines, warnings, errors) while the block runs, without
    a progress bar's redraws; appended to by every resume. Lines printed before `attach(folder)` (the run
    directory is known once it is checked) are kept and written first.

    Other processes (RANK > 0) keep nothing: their lines are the main process's."""

    def __init__(self):
        self.active = int(os.environ.get("RANK", "0")) == 0
        self.pending: list[str] = []
        self.partial = ""
        self.file: Optional[TextIO] = None
        self.original: Optional[tuple[TextIO, TextIO]] = None
        self.handler: Optional[logging.Handler] = None

    def __enter__(self) -> "RunLog":
        if not self.active:
            return self
        self.original = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._take), _Tee(sys.stderr, self._take)
        # Log records go to the stream their handler was made with (the terminal): the file gets them here.
        self.handler = _SinkHandler(self._take)
        self.handler.setLevel(logging.INFO)  # the loggers' own levels decide: this project's INFO, others' warnings
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, kind, err, tb) -> None:
        if not self.active:
            return
        if err is not None and not isinstance(err, SystemExit):
            self._take(f"error: {type(err).__name__}: {err}\n")  # the command prints it after the block
        if self.partial:
            self._take("\n")
        sys.stdout, sys.stderr = self.original
        logging.getLogger().removeHandler(self.handler)
        if self.file is not None:
            self.file.close()
            self.file = None

    def attach(self, folder: Path) -> None:
        """From now on write to `folder/train.log` (with what was printed before)."""
        if not self.active or self.file is not None:
            return
        self.file = open(Path(folder) / LOG_FILE, "a", buffering=1)
        self.file.write("".join(self.pending))
        self.pending.clear()

    def line(self, text: str) -> None:
        """A line for the file only (what a terminal shows as the bar)."""
        if self.active:
            self._take(text + "\n")

    def _take(self, text: str) -> None:
        """Whole lines; of a line redrawn with carriage returns (another library's bar), its last state."""
        self.partial += text
        if "\n" not in self.partial:
            return
        *lines, self.partial = self.partial.split("\n")
        kept = "".join(line.rsplit("\r", 1)[-1] + "\n" for line in lines if line.rsplit("\r", 1)[-1].strip())
        if self.file is not None:
            self.file.write(kept)
        else:
            self.pending.append(kept)

    @property
    def terminal(self) -> TextIO:
        """The real stderr, for a bar that must not reach the file."""
        return self.original[1] if self.original else sys.stderr


class _SinkHandler(logging.Handler):
    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink(self.format(record) + "\n")


def quiet_library_bars() -> None:
    """Without a terminal, the libraries' own bars (datasets, huggingface_hub) would fill a log with redraws."""
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class TrainingProgress:
    """The training's progress: a tqdm bar on a terminal (its postfix: `keys`), else one line per log step:

        step 400/3750 (10.7%) | epoch 2/8 | 1530 img/s | ETA 0:03:39 | loss_d 0.6931 loss_g 0.7012 | lr_g 0.0002

    and one per evaluation. `train.log` gets those lines in both cases."""

    SKIP = {"step", "epoch"}

    def __init__(self, *, total: int, initial: int, desc: str, steps_per_epoch: int, images_per_step: int,
                 keys: tuple[str, ...], show: bool, log: Optional[RunLog] = None, stream: Optional[TextIO] = None):
        self.total, self.desc, self.keys, self.show, self.log = total, desc, keys, show, log
        self.steps_per_epoch, self.images_per_step = steps_per_epoch, images_per_step
        stream = stream or (log.terminal if log is not None else sys.stderr)
        self.bar = None
        if show and stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, file=stream, dynamic_ncols=True)
        elif show:
            quiet_library_bars()
        self.started, self.first_step = time.monotonic(), initial
        self.last_time, self.last_step = self.started, initial

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def line_of(self, record: dict) -> str:
        step, now = record["step"], time.monotonic()
        rate = (step - self.last_step) * self.images_per_step / max(now - self.last_time, 1e-9)
        done = step - self.first_step
        eta = (now - self.started) / done * (self.total - step) if done else 0.0
        self.last_time, self.last_step = now, step
        epochs = -(-self.total // self.steps_per_epoch)
        values = " ".join(f"{k} {number(v)}" for k, v in record.items() if k not in self.SKIP)
        return (f"{self.desc} step {step}/{self.total} ({100 * step / self.total:.1f}%) | epoch {record['epoch']}/"
                f"{epochs} | {rate:.0f} img/s | ETA {timedelta(seconds=round(eta))} | {values}")

    def logged(self, record: dict) -> None:
        """A log step's record (losses, rates, the guard's count)."""
        if not self.show:
            return
        line = self.line_of(record)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{record.get(k, float('nan')):.4f}" for k in self.keys})
            if self.log is not None:
                self.log.line(line)
        else:
            print(line, flush=True)

    def evaluated(self, record: Optional[dict]) -> None:
        """An in-training evaluation's record (`eval/...` values)."""
        if not self.show or not record:
            return
        values = " ".join(f"{k.removeprefix('eval/')} {number(v)}" for k, v in record.items() if k not in self.SKIP)
        line = f"{self.desc} evaluation at epoch {record.get('epoch')} (step {record.get('step')}) | {values}"
        if self.bar is not None:
            self.bar.write(line, file=self.log.terminal if self.log is not None else sys.stderr)
            if self.log is not None:
                self.log.line(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Progress:
    """A long phase's progress (sampling, feature extraction, decoding, denoising steps): a tqdm bar on a terminal;
    elsewhere a plain line at each quarter, once the phase has run for `quiet_s` seconds (a short phase prints
    nothing):

        evaluation: sampling 2500/10000 images (25%) | 0:00:12 | ETA 0:00:36

    `show=False` (the other processes of a launch) keeps it silent. Use it as a context manager, or call close()."""

    QUIET_S = 3.0

    def __init__(self, what: str, total: int, unit: str = "images", *, show: bool = True,
                 stream: Optional[TextIO] = None, quiet_s: Optional[float] = None, clock=time.monotonic):
        self.what, self.total, self.unit, self.show, self.clock = what, total, unit, show, clock
        self.quiet_s = self.QUIET_S if quiet_s is None else quiet_s
        self.stream = stream or sys.stderr
        self.done, self.started, self.quarter = 0, clock(), 0
        self.bar = None
        if show and total > 0 and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", file=self.stream, leave=False,
                            dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if not self.show or self.total <= 0:
            return
        quarter = min(4, 4 * self.done // self.total)
        elapsed = self.clock() - self.started
        if quarter > self.quarter and elapsed >= self.quiet_s:
            eta = elapsed / self.done * (self.total - self.done)
            print(f"{self.what} {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%) | "
                  f"{timedelta(seconds=round(elapsed))} | ETA {timedelta(seconds=round(eta))}",
                  file=self.stream, flush=True)
        self.quarter = max(self.quarter, quarter)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
