"""What a user sees of a run: plain lines when the output is not a terminal, a bar when it is, and train.log."""

from __future__ import annotations

import io
import re
import subprocess
import sys

from pipelines.config import CGANConfig
from pipelines.console import Progress, RunLog, TrainingProgress
from test_cgan import TINY
from trainer_utils import ROOT, run_script


def test_a_run_piped_to_a_file_prints_one_plain_line_per_log_step_and_keeps_them_in_train_log(tmp_path):
    out = tmp_path / "run"
    with open(tmp_path / "console.txt", "w") as console:  # as Slurm, nohup and CI see it: not a terminal
        code = subprocess.call([sys.executable, str(ROOT / "train_cgan.py"), f"output_dir={out}", "log.wandb=disabled",
                                *TINY, "train.max_steps=8", "log.every_steps=2"], cwd=tmp_path, stdout=console,
                               stderr=subprocess.STDOUT)
    printed = (tmp_path / "console.txt").read_text()
    assert code == 0, printed
    assert "\r" not in printed
    steps = re.findall(r"^cgan step (\d+)/8 \(\d+\.\d%\) \| epoch \d+/\d+ \| \d+ img/s \| ETA \d+:\d\d:\d\d \| .*loss_d ",
                       printed, flags=re.M)
    assert steps == ["2", "4", "6", "8"], printed
    kept = (out / "train.log").read_text()
    assert "\r" not in kept
    for line in printed.splitlines():
        if line.startswith(("cgan step", "done:", "1 process")):
            assert line in kept.splitlines(), line


def test_a_resumed_run_appends_to_train_log_with_its_warnings(tmp_path):
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY + ["train.max_steps=2", "log.every_steps=1"]) == 0
    first = (out / "train.log").read_text()
    assert run_script("train_cgan", CGANConfig, out, TINY + ["train.max_steps=4", "log.every_steps=1"],
                      "--resume", "latest") == 0
    kept = (out / "train.log").read_text()
    assert kept.startswith(first) and "resuming with changed settings: train.max_steps: 2 -> 4" in kept
    assert [line.split("/")[0] for line in kept.splitlines() if line.startswith("cgan step")] == [
        "cgan step 1", "cgan step 2", "cgan step 3", "cgan step 4"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_bar_is_drawn_there_and_its_lines_go_to_train_log_only(tmp_path, capsys):
    terminal = Terminal()
    with RunLog() as log:
        log.attach(tmp_path)
        progress = TrainingProgress(total=4, initial=0, desc="cgan", steps_per_epoch=2, images_per_step=32,
                                    keys=("loss_d",), show=True, log=log, stream=terminal)
        for step in (1, 2):
            progress.update()
        progress.logged({"loss_d": 0.5, "step": 2, "epoch": 1})
        progress.evaluated({"eval/fid": 12.5, "step": 2, "epoch": 1})
        progress.close()
    assert "\r" in terminal.getvalue() and "loss_d=0.5000" in terminal.getvalue()  # tqdm's redraws
    assert "cgan step" not in capsys.readouterr().out
    kept = (tmp_path / "train.log").read_text().splitlines()
    assert kept[0].startswith("cgan step 2/4 (50.0%) | epoch 1/2 | ") and kept[0].endswith("| loss_d 0.5")
    assert kept[1] == "cgan evaluation at epoch 1 (step 2) | fid 12.5"


def test_train_log_keeps_other_libraries_bars_as_their_last_state_only(tmp_path):
    with RunLog() as log:
        log.attach(tmp_path)
        print("loading", end="\r")
        print("loading 50%", end="\r")
        print("loading 100%")
        print("\r\r")
    assert (tmp_path / "train.log").read_text() == "loading 100%\n"


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_phase_prints_a_plain_line_at_each_quarter_once_it_has_run_a_few_seconds():
    clock, out = _Clock(), io.StringIO()
    with Progress("sampling", 8, stream=out, quiet_s=3.0, clock=clock) as progress:
        for _ in range(8):
            clock.now += 1.0
            progress.update()
    # 2/8 came at 1 s, before the phase counted as slow; then a line per quarter with the time left
    assert out.getvalue().splitlines() == ["sampling 4/8 images (50%) | 0:00:04 | ETA 0:00:04",
                                           "sampling 6/8 images (75%) | 0:00:06 | ETA 0:00:02",
                                           "sampling 8/8 images (100%) | 0:00:08 | ETA 0:00:00"]


def test_a_short_phase_and_the_other_processes_print_nothing():
    clock, out = _Clock(), io.StringIO()
    with Progress("decoding", 4, stream=out, quiet_s=3.0, clock=clock) as progress:
        progress.update(4)  # done within the quiet time
    with Progress("decoding", 4, stream=out, quiet_s=0.0, clock=clock, show=False) as progress:
        progress.update(4)
    assert out.getvalue() == ""


def test_a_phase_on_a_terminal_draws_a_bar_instead():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    with Progress("features", 8, stream=out, quiet_s=0.0) as progress:
        progress.update(8)
    assert "\rfeatures:   0%|" in out.getvalue()  # tqdm's bar, redrawn in place
    assert "ETA 0:00:00" not in out.getvalue()  # not the plain lines
