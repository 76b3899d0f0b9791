"""The standing GPU script's correctness matrix: do the GPU-only paths train, resume and export?

Both trainers x precision {no, bf16, fp16} x data {on the device, in host memory} x {eager, compile,
compile reduce-overhead} (compiled cells in channels_last): each cell trains a tiny model of the family's modern recipe for 10 steps through the
real command (`train_cgan.py` / `train_ddpm.py`), resumes it to 20, and passes when both exit 0, every step is
logged once, no loss was non-finite, the export exists and (fp16 on CUDA) the checkpoint holds the GradScaler's
state. Then each trainer as 2 processes sharing the one GPU (two "machines" on 127.0.0.1, over gloo: NCCL
refuses two ranks on one device). Cells run `--jobs` at a time; none starts after `--deadline` seconds.

    python scripts/gpu_matrix.py OUT.json [--jobs 8] [--deadline 290] [--small] [--only TEXT ...]

Without CUDA the CUDA-only cells say they were skipped (fp16: accelerate has no GradScaler on a CPU, and
tests/test_gpu_paths.py runs that path with a CPU scaler; host data: the host is the device; CUDA graphs);
`--small` (the CPU rehearsal) also compiles one cell only. OUT.json is rewritten after every cell.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# 2,048 images: 32 steps of 2 x 32 with 2 processes, so all 20 steps fit in one epoch either way.
COMMON = ["data.name=synthetic", "data.synthetic_size=2048", "train.batch_size=32", "train.epochs=1",
          "log.every_steps=5", "log.wandb=disabled", "checkpoint.every_steps=10", "eval.every_epochs=null"]
# The modern recipes in miniature: the residual cGAN with skip-z, spectral norm, DiffAugment, EMA (and its
# BatchNorm statistics); the U-Net with attention, classifier-free guidance, min-SNR, EMA.
FAMILY = {
    "cgan": ("train_cgan.py", ["model.arch=resnet", "model.hierarchical_z=true", "model.base_channels=16",
                               "model.latent_dim=32", "model.label_emb_dim=16", "loss.name=hinge",
                               "loss.diffaugment=[translation,cutout]", "train.ema_decay=0.999",
                               "model.ema_bn_batches=2"]),
    "ddpm": ("train_ddpm.py", ["model.block_out_channels=[16,32]", "model.attention=[false,true]",
                               "model.layers_per_block=1", "model.norm_num_groups=8",
                               "diffusion.num_train_timesteps=100", "diffusion.sample_steps=2",
                               "diffusion.label_dropout=0.1", "diffusion.snr_gamma=5", "train.ema_decay=0.999"]),
}
# train.compile refuses the residual cGAN (its spectral-norm D breaks the compiled backward): the compiled cGAN
# cells train the seeds' network with the spectral-norm projection D instead.
CGAN_COMPILED = ["model.arch=transposed_conv", "model.d_norm=spectral", "model.d_conditioning=projection",
                 "model.base_channels=16", "model.latent_dim=32", "model.label_emb_dim=16", "loss.name=hinge",
                 "loss.diffaugment=[translation,cutout]", "train.ema_decay=0.999", "model.ema_bn_batches=2"]
PRECISIONS = ("no", "bf16", "fp16")
DATA = ("device", "host")
# The compiled cells also train in channels_last, as GPU users combine them.
COMPILE = {"eager": [], "compile": ["train.compile=true", "train.channels_last=true"],
           "reduce-overhead": ["train.compile=true", "train.compile_mode=reduce-overhead", "train.channels_last=true"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error:") or "Error" in line.split(":")[0]:
            return line[:400]
    return (lines[-1] if lines else "no output")[:400]


def run(cmd: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
        return proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        return 124, f"error: ran past {timeout:.0f} s\n{err.stdout or ''}{err.stderr or ''}"


def launch_two(script: str, args: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Two one-process "machines" on this host: both workers see LOCAL_RANK 0, so both use GPU 0."""
    port, procs, outputs = free_port(), [], []
    for rank in range(2):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--rdzv_backend", "static", "--same_network", "--num_processes", "2", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(ROOT / script), *args]
        procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}))
    code = 0
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, code = f"error: ran past {timeout:.0f} s", 124
        outputs.append(out or "")
        code = code or proc.returncode
    return code, "\n".join(outputs)


def check_run(out: Path, steps: int, fp16_on_cuda: bool) -> str | None:
    """Why the finished run is wrong, or None."""
    stats = out / "stats.jsonl"
    if not stats.is_file():
        return "no stats.jsonl"
    records = [json.loads(line) for line in stats.read_text().splitlines()]
    logged = [r["step"] for r in records]
    if logged != sorted(set(logged)) or logged[-1] != steps:
        return f"logged steps {logged}"
    if records[-1].get("nonfinite_skipped", 0):
        return f"{records[-1]['nonfinite_skipped']} non-finite losses"
    if not (out / "pipeline" / "model_index.json").is_file():
        return "no pipeline/model_index.json"
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    if fp16_on_cuda and not (checkpoints and (checkpoints[-1] / "scaler.pt").is_file()):
        return "fp16 on CUDA but no GradScaler state in the checkpoint"
    return None


def cell(name: str, family: str, overrides: list[str], work: Path, two: bool, cuda: bool, fp16: bool,
         timeout: float) -> dict:
    script, recipe = FAMILY[family]
    if family == "cgan" and "train.compile=true" in overrides:
        recipe = CGAN_COMPILED
    out = work / name
    start = time.monotonic()
    args = [f"output_dir={out}", *COMMON, *recipe, *overrides]
    first = ["train.max_steps=10"]
    second = ["train.max_steps=20", "--resume", "latest"]
    for part, extra in (("first 10 steps", first), ("resume to 20", second)):
        if two:
            code, text = launch_two(script, [*args, "train.process_group_backend=gloo", *extra], work, timeout)
        else:
            code, text = run([sys.executable, str(ROOT / script), *args, *extra], work, timeout)
        if code != 0:
            return {"status": "fail", "seconds": round(time.monotonic() - start, 1),
                    "error": f"{part}: exit {code}: {first_error(text)}"}
        if part == "resume to 20" and "resumed from" not in text:
            return {"status": "fail", "seconds": round(time.monotonic() - start, 1), "error": "did not resume"}
    why = check_run(out, 20, fp16 and cuda)
    return {"status": "fail" if why else "pass", "seconds": round(time.monotonic() - start, 1),
            **({"error": why} if why else {})}


def plan(cuda: bool, small: bool) -> list[tuple[str, dict]]:
    """(name, what to run or why it is skipped), most telling first: a deadline cuts the last."""
    cells = []
    order = ["eager", "reduce-overhead", "compile"]
    for mode, family, precision, data in itertools.product(order, FAMILY, PRECISIONS, DATA):
        name = f"{family}/{precision}/{data}/{mode}"
        skip = None
        if not cuda and precision == "fp16":
            skip = "CUDA only: accelerate has no GradScaler on a CPU (tests/test_gpu_paths.py runs it with one)"
        elif not cuda and data == "host":
            skip = "CUDA only: the host is the device here"
        elif not cuda and mode == "reduce-overhead":
            skip = "CUDA only: CUDA graphs"
        elif small and mode == "compile" and (family, precision) != ("cgan", "no"):
            skip = "--small compiles one cell only"
        overrides = [f"train.mixed_precision={precision}", f"data.on_device={str(data == 'device').lower()}",
                     *COMPILE[mode]]
        cells.append((name, {"skip": skip, "family": family, "overrides": overrides, "two": False,
                             "fp16": precision == "fp16"}))
    for family in FAMILY:
        precision = "bf16" if cuda else "no"
        cells.insert(len(FAMILY) * len(PRECISIONS) * len(DATA),  # right after the eager cells
                     (f"{family}/2 processes, one GPU, gloo/{precision}", {
                         "skip": None, "family": family, "overrides": [f"train.mixed_precision={precision}"],
                         "two": True, "fp16": False}))
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--jobs", type=int, default=None, help="cells at a time (default: 8 on CUDA, 1 otherwise)")
    parser.add_argument("--deadline", type=float, default=290.0, help="seconds after which no cell starts")
    parser.add_argument("--cell-timeout", type=float, default=240.0, help="seconds each training may take")
    parser.add_argument("--small", action="store_true", help="the CPU rehearsal: one compiled cell")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="run only the cells whose name contains TEXT (repeat for several), e.g. 2 processes")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    jobs = args.jobs or (8 if cuda else 1)
    cells = plan(cuda, args.small)
    if args.only:
        cells = [(name, spec) for name, spec in cells if any(text in name for text in args.only)]
    results: dict[str, dict] = {}
    lock = threading.Lock()
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gpu_matrix_"))

    def write() -> None:
        summary = {s: sum(r["status"] == s for r in results.values()) for s in ("pass", "fail", "skipped", "not run")}
        doc = {"device": device, "torch": torch.__version__, "jobs": jobs,
               "seconds": round(time.monotonic() - start, 1), "summary": summary,
               "cells": {name: results[name] for name, _ in cells if name in results}}
        tmp = args.out.with_suffix(".partial")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, args.out)

    def one(name: str, spec: dict) -> None:
        if spec["skip"]:
            result = {"status": "skipped", "why": spec["skip"]}
        elif time.monotonic() - start > args.deadline:
            result = {"status": "not run", "why": f"past the {args.deadline:.0f} s deadline"}
        else:
            safe = name.replace("/", "_").replace(" ", "_").replace(",", "")
            result = cell(safe, spec["family"], spec["overrides"], work, spec["two"], cuda, spec["fp16"],
                          args.cell_timeout)
        with lock:
            results[name] = result
            print(f"[{time.monotonic() - start:6.1f} s] {name}: {result['status']}"
                  + (f" ({result.get('error') or result.get('why')})" if result["status"] != "pass" else
                     f" ({result['seconds']} s)"), flush=True)
            write()

    print(f"correctness matrix on {device}: {len(cells)} cells, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda item: one(*item), cells))
    write()
    summary = json.loads(args.out.read_text())["summary"]
    print(f"matrix: {summary} in {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
