"""W&B as its users expect it: one run across resumes, the user's own W&B set-up respected, model artifacts,
per-class tables and best-value summaries, evaluations logged into the training's run.

Runs log offline; W&B's own files (`wandb/offline-run-*/run-<id>.wandb`, read by `wandb_files`) are the evidence.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.config import CGANConfig, LogConfig
from pipelines.tracking import RUN_FILE, wandb_mode
from trainer_utils import ROOT, launch, run_script
from wandb_files import offline_runs

TINY = ["data.name=synthetic", "data.synthetic_size=128", "model.base_channels=8", "model.latent_dim=8",
        "model.label_emb_dim=4", "train.batch_size=32", "train.epochs=2", "log.every_steps=1"]
KEY = "a" * 40  # the shape of a W&B API key
W_AND_B_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "NETRC", "WANDB_PROJECT", "WANDB_ENTITY",
               "WANDB_RUN_ID", "WANDB_DISABLED", "WANDB_IDENTITY_TOKEN_FILE")


@pytest.fixture(autouse=True)
def wandb_home(monkeypatch, tmp_path):
    """No login, no W&B settings of this machine; W&B's staging and caches inside the test's folder."""
    home = tmp_path / "home"
    (home / ".config" / "wandb").mkdir(parents=True)
    for name in W_AND_B_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return home


def wandb_run(out):
    """`train_cgan` with W&B offline (run_script turns it off; a later override wins)."""
    return lambda *args, extra=(): run_script("train_cgan", CGANConfig, out, [*TINY, "log.wandb=offline", *extra],
                                             *args)


def next_second() -> None:
    """W&B names offline run folders by the second (offline-run-YYYYMMDD_HHMMSS-<id>): a tiny run resumed
    within the same second would share its folder, which no real run does."""
    time.sleep(1.05 - time.time() % 1)


def netrc(home, host="api.wandb.ai"):
    (home / ".netrc").write_text(f"machine {host}\n  login user\n  password {KEY}\n")
    (home / ".netrc").chmod(0o600)


@pytest.mark.parametrize("setup, expected", [
    ({}, "offline"),
    ({"WANDB_MODE": "disabled"}, "disabled"),
    ({"WANDB_MODE": "offline", "WANDB_API_KEY": KEY}, "offline"),
    ({"WANDB_MODE": "dryrun"}, "offline"),
    ({"WANDB_DISABLED": "true"}, "disabled"),
    ({"WANDB_API_KEY": KEY}, "online"),
    ({"netrc": "api.wandb.ai"}, "online"),
    ({"netrc": "wandb.example.com"}, "offline"),  # a login for another server than the one configured
    ({"netrc": "wandb.example.com", "WANDB_BASE_URL": "https://wandb.example.com"}, "online"),
    ({"netrc": "wandb.example.com", "settings": "https://wandb.example.com"}, "online"),  # `wandb login --host`
], ids=["nothing", "env_disabled", "env_offline_beats_key", "env_dryrun", "wandb_disabled", "api_key",
        "netrc_cloud", "netrc_other_host", "netrc_base_url", "netrc_settings_host"])
def test_auto_defers_to_the_users_wandb_setup(setup, expected, wandb_home, monkeypatch, caplog):
    for name, value in setup.items():
        if name == "netrc":
            netrc(wandb_home, value)
        elif name == "settings":
            (wandb_home / ".config" / "wandb" / "settings").write_text(f"[default]\nbase_url = {value}\n")
        else:
            monkeypatch.setenv(name, value)
    with caplog.at_level(logging.WARNING, logger="pipelines.tracking"):
        assert wandb_mode(LogConfig(wandb="auto")) == expected
    falls_back = expected == "offline" and "WANDB_MODE" not in setup
    assert ("no W&B login for https://api.wandb.ai" in caplog.text) == falls_back  # the one line, only then
    explicit = "disabled" if expected == "disabled" else "offline"  # kept, unless the environment is stricter
    assert wandb_mode(LogConfig(wandb="offline")) == explicit


STRICTNESS = ["online", "offline", "disabled"]


@pytest.mark.parametrize("configured", STRICTNESS)
@pytest.mark.parametrize("setup, env_mode", [
    ({}, None),
    ({"WANDB_MODE": "online"}, "online"),
    ({"WANDB_MODE": "run"}, "online"),
    ({"WANDB_MODE": "offline"}, "offline"),
    ({"WANDB_MODE": "dryrun"}, "offline"),
    ({"WANDB_MODE": "disabled"}, "disabled"),
    ({"WANDB_DISABLED": "true"}, "disabled"),
    ({"WANDB_DISABLED": "true", "WANDB_MODE": "online"}, "disabled"),
], ids=["no_env", "env_online", "env_run", "env_offline", "env_dryrun", "env_disabled", "wandb_disabled",
        "wandb_disabled_beats_mode"])
def test_an_explicit_choice_gives_way_to_a_stricter_environment(configured, setup, env_mode, monkeypatch, caplog):
    """The stricter of log.wandb and the environment wins (disabled > offline > online), with one line then."""
    for name, value in setup.items():
        monkeypatch.setenv(name, value)
    cfg = LogConfig(wandb=configured)
    expected = max(configured, env_mode or configured, key=STRICTNESS.index)
    with caplog.at_level(logging.WARNING, logger="pipelines.tracking"):
        assert wandb_mode(cfg) == expected
    lines = [r.getMessage() for r in caplog.records]
    if expected == configured:
        assert lines == []
    else:
        variable = "WANDB_DISABLED=true" if "WANDB_DISABLED" in setup else f"WANDB_MODE={setup['WANDB_MODE']}"
        what = "not logging to W&B" if expected == "disabled" else f"logging {expected}"
        assert lines == [f"log.wandb={configured}, but {variable} in the environment: {what}"]
    caplog.clear()
    assert wandb_mode(cfg, warn=False) == expected and caplog.records == []  # run.py's quiet call


def test_wandb_mode_disabled_in_the_environment_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, [*TINY, "log.wandb=auto"]) == 0
    assert not (out / "wandb").exists() and not (out / RUN_FILE).exists()


def test_a_login_for_a_self_hosted_server_makes_auto_online(tmp_path, wandb_home, monkeypatch):
    """The mode handed to wandb.init is checked there; the run then goes offline, as no server exists."""
    from accelerate import Accelerator

    netrc(wandb_home, "wandb.example.com")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    seen = {}
    real = Accelerator.init_trackers

    def init_trackers(self, project_name, config=None, init_kwargs=None):
        seen.update(init_kwargs["wandb"], project=project_name)
        init_kwargs["wandb"]["mode"] = "offline"  # stop before any network call
        return real(self, project_name, config, init_kwargs)

    monkeypatch.setattr(Accelerator, "init_trackers", init_trackers)
    monkeypatch.setenv("WANDB_PROJECT", "their-project")
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, [*TINY, "log.wandb=auto", "log.entity=their-team"]) == 0
    assert seen["mode"] == "online" and seen["project"] == "their-project" and seen["entity"] == "their-team"
    assert seen["resume"] == "allow" and seen["id"] == json.loads((out / RUN_FILE).read_text())["id"]


def test_a_resumed_run_is_the_same_wandb_run_and_its_steps_continue(tmp_path):
    out = tmp_path / "run"
    train = wandb_run(out)
    assert train(extra=["train.max_steps=4"]) == 0  # stops after the first checkpoint (4 steps an epoch)
    next_second()
    assert train("--resume", "latest") == 0
    first, second = offline_runs(out)
    run_id = json.loads((out / RUN_FILE).read_text())["id"]
    assert first.id == second.id == run_id
    assert first.steps("loss_d") == [1, 2, 3, 4] and second.steps("loss_d") == [5, 6, 7, 8]
    next_second()
    assert train("--overwrite") == 0  # a new run: a new id
    [fresh] = offline_runs(out)
    assert fresh.id != run_id


@pytest.mark.slow  # a trainer process stopped by SIGTERM and resumed: 12 s
def test_sigterm_then_resume_continues_the_same_wandb_run(tmp_path):
    from test_faults import HARNESS, wait_for_steps

    out = tmp_path / "run"
    cmd = [sys.executable, str(HARNESS), "slow:0.2", "train_cgan", f"output_dir={out}", *TINY, "train.epochs=4",
           "checkpoint.every_steps=1000", "log.wandb=offline"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, proc, 3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert wandb_run(out)("--resume", "latest", extra=["train.epochs=4"]) == 0
    first, second = offline_runs(out)
    assert first.id == second.id
    stop = first.steps("loss_d")[-1]
    assert second.steps("loss_d") == list(range(stop + 1, 17))


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, classifier_dir):
    """A run with evaluation every epoch, logged offline."""
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("wandb")
    for name in W_AND_B_ENV:
        mp.delenv(name, raising=False)
    mp.setenv("HOME", str(tmp))
    mp.setenv("WANDB_DATA_DIR", str(tmp / "wandb-data"))
    mp.setenv("WANDB_SILENT", "true")
    out = tmp / "run"
    assert wandb_run(out)(extra=["eval.every_epochs=1", "eval.num_per_class=4", f"eval.classifier={classifier_dir}",
                                 "log.group=study-x"]) == 0
    yield out
    mp.undo()


def test_the_offline_run_holds_the_exports_as_model_artifacts(evaluated_run):
    [run] = offline_runs(evaluated_run)
    assert run.run.run_group == "study-x" and run.run.job_type == "train"
    logged = [a for a in run.artifacts if a.type == "model"]
    assert len(logged) == 2  # W&B adds "latest" to each version it logs: the server keeps it on the last one
    models = {("latest", "step-8") if "step-8" in a.aliases else ("best",): a for a in logged}
    assert set(models) == {("latest", "step-8"), ("best",)} and "best" in models[("best",)].aliases
    for artifact in models.values():
        assert artifact.name == f"model-{run.id}"
        files = {entry.path for entry in artifact.manifest.contents}
        assert {"model_index.json", "README.md", "samples.png", "training.json", "pipeline.py"} <= files
    final = json.loads(models[("latest", "step-8")].metadata)
    assert final["steps"] == 8 and final["config"]["log"]["group"] == "study-x" and "eval/fid" in final["metrics"]
    best = json.loads(models[("best",)].metadata)
    assert best["metric"] == "fid" and "best.json" in {e.path for e in models[("best",)].manifest.contents}


def test_best_is_logged_before_the_final_export_so_latest_names_the_final_export(evaluated_run):
    """W&B's server moves `latest` to the version logged last, whatever aliases the records carry."""
    [run] = offline_runs(evaluated_run)
    logged = [a for a in run.artifacts if a.type == "model"]  # in the order the run logged them
    assert [("best" in a.aliases, "step-8" in a.aliases) for a in logged] == [(True, False), (False, True)]


def test_every_evaluation_logs_a_per_class_table_and_the_best_values_summarise(evaluated_run):
    [run] = offline_runs(evaluated_run)
    tables = [row for row in run.history if row.get("eval/per_class/_type") == "table-file"]
    assert [row["_step"] for row in tables] == [4, 8] and all(row["eval/per_class/nrows"] == 10 for row in tables)
    # The table itself, with its images, is a run_table artifact, staged for `wandb sync`.
    logged = [a for a in run.artifacts if a.type == "run_table"]
    assert len(logged) == 2
    for artifact in logged:
        files = {entry.path: entry.local_path for entry in artifact.manifest.contents}
        assert sum(path.startswith("media/images/") for path in files) == 10  # a strip of samples per class
        table = json.loads(Path(files["eval/per_class.table.json"]).read_text())
        assert table["columns"] == ["class", "samples", "fid", "accuracy", "diversity_ratio", "flagged"]
        assert [row[0] for row in table["data"]] == [f"class_{k}" for k in range(10)]
        assert all(row[1]["_type"] == "image-file" and isinstance(row[2], float) for row in table["data"])
        assert all(row[5] == (row[4] < 0.8) for row in table["data"])  # flagged: the diversity ratio below 0.8
    summaries = {name: metric.summary for name, metric in run.metrics.items()}
    assert summaries["eval/fid"].min and summaries["eval/kid"].min and summaries["eval/accuracy"].max
    assert run.metrics["eval/fid"].step_metric == "step"


def test_eval_on_a_run_logs_into_the_same_wandb_run(evaluated_run, classifier_dir, tmp_path):
    from pipelines.commands import evaluate

    assert evaluate([str(evaluated_run), "--data", "synthetic", "--classifier", str(classifier_dir),
                     "--num-per-class", "4", "--no-pngs", "--wandb", "offline"]) == 0
    training, evaluation = offline_runs(evaluated_run)[:2]
    assert evaluation.id == training.id
    [row] = [r for r in evaluation.history if "eval/fid" in r]
    metrics = json.loads((evaluated_run / "eval" / "classifier" / "metrics.json").read_text())
    assert row["eval/fid"] == pytest.approx(metrics["fid"]) and row["step"] == 8
    assert row["eval/per_class/_type"] == "table-file"
    [artifact] = [a for a in evaluation.artifacts if a.type == "evaluation"]
    assert {e.path for e in artifact.manifest.contents} == {"metrics.json", "grid.png"}
    assert json.loads(artifact.metadata)["model_artifact"] == f"model-{training.id}:step-8"  # the version evaluated


@pytest.mark.parametrize("evaluated, version", [
    ("", "step-12"), ("pipeline", "step-12"), ("best", "best"), ("snapshots/epoch_003", None),
    ("no-training-json", "latest"),
], ids=["run_dir", "pipeline", "best", "snapshot", "pipeline_without_training_json"])
def test_eval_links_the_version_of_the_export_it_evaluates(evaluated, version, tmp_path):
    """`latest` moves on when a resumed run exports again; a snapshot is no artifact at all."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from pipelines.tracking import start_eval_tracking

    run_dir = tmp_path / "run"
    for folder in ("pipeline", "best", "snapshots/epoch_003"):
        (run_dir / folder).mkdir(parents=True)
    (run_dir / "config.yaml").write_text("log:\n  group: study-x\n")
    (run_dir / RUN_FILE).write_text(json.dumps({"id": "abcd1234", "project": "p", "entity": None, "name": "run"}))
    if evaluated == "no-training-json":
        evaluated = "pipeline"
    else:
        (run_dir / "pipeline" / "training.json").write_text(json.dumps({"steps": 12}))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, log_with="wandb")
    model_artifact = start_eval_tracking(accelerator, run_dir / evaluated, tmp_path / "eval", "offline")
    accelerator.end_training()
    assert model_artifact == (f"model-abcd1234:{version}" if version else None)
    assert [run.id for run in offline_runs(run_dir)] == ["abcd1234"]  # logged into the training's run all the same


def test_eval_wandb_gives_way_to_a_stricter_environment_too(tmp_path, monkeypatch):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from pipelines.tracking import start_eval_tracking

    run_dir = tmp_path / "run"
    (run_dir / "pipeline").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("log: {}\n")
    (run_dir / RUN_FILE).write_text(json.dumps({"id": "abcd1234", "project": "p", "entity": None, "name": "run"}))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, log_with="wandb")
    assert start_eval_tracking(accelerator, run_dir, tmp_path / "eval", "offline") is None  # `eval.py --wandb offline`
    accelerator.end_training()
    assert not (run_dir / "wandb").exists() and not (tmp_path / "eval").exists()


def test_artifacts_can_be_turned_off(tmp_path):
    out = tmp_path / "run"
    assert wandb_run(out)(extra=["log.artifacts=false"]) == 0
    [run] = offline_runs(out)
    assert not [a for a in run.artifacts if a.type == "model"]


@pytest.mark.slow  # two 2-process launches: 29 s
def test_two_processes_make_one_wandb_run_and_resume_it(tmp_path):
    out = tmp_path / "run"
    script = [str(ROOT / "train_cgan.py"), f"output_dir={out}", *TINY, "log.wandb=offline"]
    first = launch(tmp_path, ["--multi_gpu", "--num_processes", "2"], [*script, "train.max_steps=2"])
    assert first.returncode == 0, first.report
    assert len(offline_runs(out)) == 1
    second = launch(tmp_path, ["--multi_gpu", "--num_processes", "2"], [*script, "--resume", "latest"])
    assert second.returncode == 0, second.report
    runs = offline_runs(out)
    assert len(runs) == 2 and runs[0].id == runs[1].id == json.loads((out / RUN_FILE).read_text())["id"]
    assert runs[0].steps("loss_d") == [1, 2] and runs[1].steps("loss_d") == [3, 4]


def test_compare_logs_its_table_and_grid_in_the_runs_project_and_group(evaluated_run, classifier_dir, tmp_path):
    import shutil

    from pipelines.commands import evaluate

    if not (evaluated_run / "eval" / "classifier" / "metrics.json").is_file():
        assert evaluate([str(evaluated_run), "--data", "synthetic", "--classifier", str(classifier_dir),
                         "--num-per-class", "4", "--no-pngs"]) == 0
    other = Path(shutil.copytree(evaluated_run, tmp_path / "other", ignore=shutil.ignore_patterns("wandb")))
    out = tmp_path / "comparison"
    assert evaluate(["compare", str(evaluated_run), str(other), "--out", str(out), "--per-class", "2",
                     "--wandb", "offline"]) == 0
    assert (out / "report.md").is_file()
    [run] = offline_runs(out)
    assert run.run.job_type == "compare" and run.run.run_group == "study-x"
    [row] = [r for r in run.history if "compare/table/_type" in r]
    assert row["compare/table/_type"] == "table-file" and row["compare/table/nrows"] == 2
    assert row["compare/grids/_type"] == "image-file"
