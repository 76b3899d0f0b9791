"""Studies (`python -m pipelines.sweep`): W&B sweep files and experiment files, planned, trained,
evaluated and reported; finished runs skipped, interrupted ones resumed, bad files refused."""

from __future__ import annotations

import json
import os
import threading
import shutil
from pathlib import Path

import pytest
import yaml

from pipelines.train_cli import parse_args
from pipelines.config import CGANConfig, load_config, to_dict
from pipelines.sweep import StudyError, load_study, main
from pipelines.checkpoints import list_checkpoints
from test_cgan import TINY as CGAN_TINY
from test_ddpm import TINY as DDPM_TINY
from trainer_utils import ROOT, assert_same_tensors, load_safetensors_dir

STUDY_FILES = sorted((ROOT / "configs" / "sweeps").glob("*.yaml")) + sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
# The top-level keys W&B's sweep schema allows (it rejects any other).
WANDB_SWEEP_KEYS = {"program", "entity", "project", "description", "name", "method", "metric", "parameters",
                    "early_terminate", "command", "run_cap", "apiVersion", "kind", "controller"}


def as_overrides(values: list[str]) -> dict:
    return {"parameters": {k: {"value": yaml.safe_load(v)} for k, v in (x.split("=", 1) for x in values)}}


def write_sweep(path: Path, classifier: Path, extra: dict | None = None) -> Path:
    fixed = [*CGAN_TINY, "train.epochs=2", "eval.snapshot_epochs=[1,2]", "eval.every_epochs=1",
             "eval.num_per_class=4", f"eval.classifier={classifier}", "log.wandb=disabled",
             f"output_dir={path.parent}/runs/{{loss.name}}_emb{{model.label_emb_dim}}"]
    doc = {"name": "tiny", "program": "train_cgan.py", "method": "grid", "metric": {"name": "eval/fid"},
           "parameters": {"loss.name": {"values": ["bce", "hinge"]}, "model.label_emb_dim": {"values": [8]},
                          **as_overrides(fixed)["parameters"]},
           "command": ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}", "--resume", "latest"]}
    doc.update(extra or {})
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("path", [p for p in STUDY_FILES if p.parent.name == "sweeps"], ids=lambda p: p.name)
def test_sweep_files_are_grids_wandb_accepts(path):
    doc = yaml.safe_load(path.read_text())
    assert set(doc) <= WANDB_SWEEP_KEYS and {"program", "method", "parameters"} <= set(doc)
    study = load_study(path)
    assert len(study.runs) == 8 and len({r.output_dir for r in study.runs}) == 8  # 4 losses x 2 embeddings
    assert {r.cfg.loss.name for r in study.runs} == {"bce", "wgan_gp", "lsgan", "hinge"}
    assert all(len(r.cfg.eval.snapshot_epochs) == 3 and max(r.cfg.eval.snapshot_epochs) == r.cfg.train.epochs
               for r in study.runs)  # three lengths from one run, not three trainings


@pytest.mark.parametrize("path", [p for p in STUDY_FILES if p.parent.name == "sweeps"], ids=lambda p: p.name)
def test_wandb_agent_runs_the_configs_the_local_runner_plans(path):
    """Build the agent's command line the way `wandb agent` does and parse it as the trainer would."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    doc = yaml.safe_load(path.read_text())
    for run in load_study(path).runs:
        params = {k: {"value": v["value"]} for k, v in doc["parameters"].items() if "value" in v}
        params.update({k: {"value": v} for k, v in run.swept.items()})
        variables = sweep_utils.create_sweep_command_args({"args": params})
        variables.update(interpreter=["python"], program=[doc["program"]], env=["/usr/bin/env"])
        argv = []
        for chunk in sweep_utils.create_sweep_command(doc["command"]):
            argv += variables.get(chunk[2:-1], []) if chunk.startswith("${") else [chunk]
        assert argv[:3] == ["/usr/bin/env", "python", "train_cgan.py"]
        args = parse_args("", argv[3:])
        agent_cfg = load_config(CGANConfig, args.config, args.overrides)
        assert run.cfg.log.group == load_study(path).name and agent_cfg.log.group is None
        agent_cfg.log.group = run.cfg.log.group  # W&B groups an agent's runs by their sweep by itself
        assert args.resume == "latest" and to_dict(agent_cfg) == to_dict(run.cfg)


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.name)
def test_every_study_file_plans_and_dry_runs(path, capsys):
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    study = load_study(path)
    assert all(r.name in out for r in study.runs) and str(study.report_dir) in out


@pytest.mark.parametrize("change,message", [
    ({"method": "bayes"}, "method 'bayes'; the local runner runs grids only (valid: grid)"),
    ({"program": "train_vae.py"}, "program 'train_vae.py'; valid choices: train_cgan.py, train_ddpm.py"),
    ({"parameters": {"loss.name": {"values": ["bce", "wasserstein"]}}}, "loss.name"),
    ({"parameters": {"optim.lr": {"min": 1e-4, "max": 1e-3}}}, "needs `values: [...]` (swept) or `value: x`"),
])
def test_bad_sweep_files_are_refused_before_any_training(tmp_path, classifier_dir, change, message, capsys):
    path = write_sweep(tmp_path / "sweep.yaml", classifier_dir)
    doc = yaml.safe_load(path.read_text())
    for key, value in change.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(StudyError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_study(path)
    assert main([str(path)]) == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_runs_sharing_an_output_dir_are_refused(tmp_path, classifier_dir):
    path = write_sweep(tmp_path / "sweep.yaml", classifier_dir)
    doc = yaml.safe_load(path.read_text())
    doc["parameters"]["output_dir"] = {"value": str(tmp_path / "runs" / "same")}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(StudyError, match="several runs share an output_dir"):
        load_study(path)


def test_experiment_with_an_unknown_key_is_refused(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "x"),
                                    "runs": {"a": {"program": "train_cgan.py", "overides": []}}}))
    with pytest.raises(StudyError, match="unknown keys \\['overides'\\]; valid keys: program, config, overrides"):
        load_study(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sweep_end_to_end_skips_finished_and_resumes_interrupted(tmp_path, classifier_dir):
    path = write_sweep(tmp_path / "sweep.yaml", classifier_dir)
    assert main([str(path), "--gpus", "0", "--runs-per-gpu", "2", "--stagger-seconds", "0", "--inception", "no"]) == 0
    report_dir = tmp_path / "runs" / "report"
    records = read_jsonl(report_dir / "runs.jsonl")
    assert [r["status"] for r in records] == ["trained", "trained"]
    assert [r["gpu"] for r in records] == ["0", "0"]
    first, second = sorted(records, key=lambda r: r["started"])
    assert second["started"] + 1 < first["ended"]  # both on GPU 0 at once (a run takes several seconds here)
    report = json.loads((report_dir / "report.json").read_text())
    cells = {(r["loss.name"], r["epochs"]) for r in report["rows"]}
    assert cells == {("bce", 1), ("bce", 2), ("hinge", 1), ("hinge", 2)}  # two lengths from each single run
    assert report["rank_key"] == "combined (offline)"
    for row in report["rows"]:
        assert row["offline FID"] > 0 and 0 <= row["accuracy"] <= 1 and row["s/image"] > 0
    text = (report_dir / "report.md").read_text()
    assert "### By loss.name" in text and "### By epochs" in text and "Inception metrics skipped" in text
    assert (report_dir / "grids.png").stat().st_size > 0 and (report_dir / "curves.png").stat().st_size > 0

    # Re-running skips the finished runs and reuses their evaluations.
    bce = tmp_path / "runs" / "bce_emb8"
    stamp = (bce / "eval" / "study-epoch_001" / "metrics.json").stat().st_mtime
    assert main([str(path), "--inception", "no"]) == 0
    assert [r["status"] for r in read_jsonl(report_dir / "runs.jsonl")[2:]] == ["finished before"] * 2
    assert (bce / "eval" / "study-epoch_001" / "metrics.json").stat().st_mtime == stamp

    # An interrupted run (no export, a mid-run checkpoint) resumes and ends where it would have.
    before = load_safetensors_dir(bce / "pipeline")
    shutil.rmtree(bce / "pipeline")
    shutil.rmtree(list_checkpoints(bce)[-1])
    shutil.rmtree(bce / "eval")
    assert main([str(path), "--inception", "no"]) == 0
    assert [r["status"] for r in read_jsonl(report_dir / "runs.jsonl")[4:]] == ["trained", "finished before"]
    assert "resumed from" in (report_dir / "logs" / "bce_emb8.log").read_text()
    assert_same_tensors(load_safetensors_dir(bce / "pipeline"), before)


@pytest.mark.slow  # a multi-process or end-to-end run; the fast suite covers its parts
def test_experiment_cgan_vs_ddpm_end_to_end(tmp_path, classifier_dir):
    common = ["train.epochs=2", "eval.every_epochs=1", "eval.num_per_class=4", f"eval.classifier={classifier_dir}",
              "log.wandb=disabled"]
    doc = {"name": "tiny_vs", "description": "cGAN against DDPM, tiny.", "output_dir": str(tmp_path / "exp"),
           "runs": {"cgan": {"program": "train_cgan.py", "overrides": [*CGAN_TINY, *common]},
                    "ddpm": {"program": "train_ddpm.py", "overrides": [*DDPM_TINY, *common]}}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main([str(path), "--inception", "no"]) == 0
    report = json.loads((tmp_path / "exp" / "report" / "report.json").read_text())
    exports = {(r["run"], r["export"]) for r in report["rows"]}
    assert exports == {("cgan", "best"), ("cgan", "final"), ("ddpm", "best"), ("ddpm", "final")}
    assert all(r["epochs"] in (1, 2) for r in report["rows"])
    text = (tmp_path / "exp" / "report" / "report.md").read_text()
    assert "cGAN against DDPM, tiny." in text and "curves.png" in text and "grids.png" in text


def test_inception_is_tried_once_per_study(monkeypatch):
    from pipelines import metrics, sweep
    from pipelines.sweep import InceptionProbe

    calls = []

    def offline(device):
        calls.append(device)
        raise metrics.MetricsError("no weights here")

    monkeypatch.setattr(sweep, "inception_extractor", offline)
    auto = InceptionProbe("auto")
    assert [auto.available() for _ in range(3)] == [False] * 3 and len(calls) == 1
    assert "no weights here" in auto.note
    with pytest.raises(metrics.MetricsError):
        InceptionProbe("yes").available()
    assert not InceptionProbe("no").available() and len(calls) == 2


class FakeGpus:
    """Free memory per GPU and a clock, as GpuSlots reads them."""

    def __init__(self, free):
        self.free, self.now = dict(free), 0.0

    def free_gib(self, gpu):
        return self.free[gpu]

    def clock(self):
        return self.now


def test_gpu_slots_fill_the_least_loaded_gpu_up_to_k_runs():
    from pipelines.sweep import GpuSlots

    gpus = FakeGpus({"0": 100.0, "1": 100.0})
    slots = GpuSlots(["0", "1"], per_gpu=2, min_free_gib=4, stagger_seconds=0, free_gib=gpus.free_gib,
                     clock=gpus.clock)
    assert [slots.acquire() for _ in range(4)] == ["0", "1", "0", "1"]
    assert slots.active == {"0": 2, "1": 2}
    got = []
    waiter = threading.Thread(target=lambda: got.append(slots.acquire()))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not got  # all 4 slots taken: the fifth run waits
    slots.release("1")
    waiter.join(5)
    assert got == ["1"]


def test_gpu_slots_never_join_a_busy_gpu_short_of_memory_or_before_the_last_start_settled():
    from pipelines.sweep import GpuSlots

    gpus = FakeGpus({"0": 100.0})
    slots = GpuSlots(["0"], per_gpu=3, min_free_gib=4, stagger_seconds=30, free_gib=gpus.free_gib, clock=gpus.clock)
    assert slots.acquire() == "0"  # an idle GPU takes a run whatever it reports
    assert slots._room("0")[0] is False and slots._room("0")[1] == pytest.approx(30)  # the first run still allocating
    gpus.now = 31.0
    gpus.free["0"] = 3.5
    assert slots._room("0")[0] is False  # settled, but 3.5 GiB < 4
    gpus.free["0"] = 40.0
    assert slots.acquire() == "0" and slots.active == {"0": 2}


def test_gpu_free_memory_is_read_from_nvidia_smi(tmp_path, monkeypatch):
    from pipelines.sweep import gpu_free_gib

    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\necho 81920\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert gpu_free_gib("1") == 80.0
    assert (tmp_path / "args").read_text().split() == ["--query-gpu=memory.free", "--format=csv,noheader,nounits",
                                                       "-i", "1"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_free_gib("1") is None  # no nvidia-smi: no check (CPU machines)


def test_runs_per_gpu_needs_gpus(capsys):
    assert main([str(ROOT / "configs" / "sweeps" / "cgan_losses_cpu.yaml"), "--runs-per-gpu", "2"]) == 2
    assert "--runs-per-gpu 2: must be 1 or more, and more than 1 needs --gpus" in capsys.readouterr().err
