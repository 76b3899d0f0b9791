"""The commands' help: every config field from the schema (type, default, choices, comment), and the commands'
own texts naming what the schema offers."""

from __future__ import annotations

import contextlib
import io

import pytest

import pipelines.commands
from pipelines.config import CGANConfig, DDPMConfig
from pipelines.config_help import choices, field_rows


def help_of(command: str, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = getattr(pipelines.commands, command)(list(args))
        except SystemExit as stop:  # argparse's --help
            code = stop.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("command,cls", [("train_cgan", CGANConfig), ("train_ddpm", DDPMConfig)])
def test_help_lists_every_config_field_with_its_default(command, cls):
    code, text, _ = help_of(command, "--help")
    assert code == 0
    lines = text.splitlines()
    for row in field_rows(cls):
        assert any(line.strip().startswith(f"{row['name']} = ") for line in lines), row["name"]
    assert len(field_rows(cls)) > 60


def test_help_shows_defaults_choices_and_the_schemas_comment():
    _, text, _ = help_of("train_cgan", "--help")
    assert "  loss.r1_gamma = 0.0  (float)" in text
    assert "  model.hierarchical_z = false  (bool)" in text
    assert "      resnet: a chunk of z beside the class embedding in each block's BatchNorms" in text
    assert "  model.arch = transposed_conv  (one of transposed_conv, upsample_conv, resnet)" in text
    assert "  model.d_norm = null  (one of batch, spectral, null)" in text
    assert "  eval.snapshot_epochs = []  (list[int])" in text


def test_help_config_shows_one_section_and_names_the_sections_when_wrong():
    code, text, _ = help_of("train_ddpm", "--help-config", "diffusion")
    assert code == 0 and {line.split()[0] for line in text.splitlines() if not line.startswith("      ")} == {
        row["name"] for row in field_rows(DDPMConfig) if row["name"].startswith("diffusion.")}
    code, _, err = help_of("train_ddpm", "--help-config", "loss")
    assert code == 2 and "--help-config loss: no such section; sections: checkpoint, data, diffusion, eval" in err


@pytest.mark.parametrize("command,cls,fields", [
    ("train_cgan", CGANConfig, ["model.arch", "loss.name"]),
    ("train_ddpm", DDPMConfig, ["diffusion.prediction_type", "diffusion.sample_scheduler"]),
])
def test_the_commands_own_text_names_every_choice_the_schema_has(command, cls, fields):
    _, text, _ = help_of(command, "--help")
    description = text.split("positional arguments")[0]
    for name in fields:
        for choice in choices(cls, name):
            assert choice in description, (name, choice)


def test_a_shipped_recipe_runs_by_name_from_any_folder(tmp_path, monkeypatch):
    from pipelines.config import load_config
    from pipelines.recipes import SHIPPED

    monkeypatch.chdir(tmp_path)  # no configs/ here
    code, by_name, err = help_of("train_cgan", "--config", "cgan/demo_cpu", "--dry-run")
    assert code == 0, err
    assert load_config(CGANConfig, "cgan/demo_cpu") == load_config(CGANConfig, SHIPPED / "cgan" / "demo_cpu.yaml")
    assert "output_dir: runs/demo/cgan" in by_name and "arch: resnet" in by_name
    # the clone's own path, typed from another folder, finds the same recipe
    assert load_config(CGANConfig, "configs/cgan/demo_cpu.yaml") == load_config(CGANConfig, "cgan/demo_cpu")


def test_a_file_of_your_own_wins_over_a_shipped_recipe_of_the_same_name(tmp_path, monkeypatch):
    from pipelines.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cgan").mkdir()
    (tmp_path / "cgan" / "demo_cpu").write_text("seed: 5\n")
    assert load_config(CGANConfig, "cgan/demo_cpu").seed == 5
    assert load_config(CGANConfig, "cgan/demo_cpu.yaml").model.arch == "resnet"  # no such file here: shipped


def test_an_unknown_recipe_is_refused_with_the_nearest_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = help_of("train_cgan", "--config", "cgan/demo_gpu")
    assert code == 2
    assert "error: config file not found: cgan/demo_gpu" in err and "did you mean cgan/demo_cpu" in err
    assert "python -m pipelines recipes" in err and "Traceback" not in err


def test_the_recipes_command_lists_every_shipped_file_with_its_description():
    from pipelines.recipes import SHIPPED

    code, text, _ = help_of("recipes")
    assert code == 0
    files = sorted(SHIPPED.glob("*/*.yaml"))
    assert len(files) > 30
    for path in files:
        name = path.relative_to(SHIPPED).with_suffix("").as_posix()
        first = path.read_text().splitlines()[0].lstrip("# ")[:25]  # the head of its description
        assert any(line.split()[:1] == [name] and first in line for line in text.splitlines()), name
    assert "cgan (conditional GANs: python train_cgan.py --config NAME)" in text

    code, shown, _ = help_of("recipes", "ddpm/demo_cpu")
    assert code == 0 and shown == (SHIPPED / "ddpm" / "demo_cpu.yaml").read_text()
    code, path, _ = help_of("recipes", "--path", "accelerate/multi_gpu_bf16")
    assert code == 0 and path.strip() == str(SHIPPED / "accelerate" / "multi_gpu_bf16.yaml")


def test_a_shipped_study_runs_by_name(tmp_path, monkeypatch):
    from pipelines.sweep import StudyError, load_study

    monkeypatch.chdir(tmp_path)
    study = load_study("sweeps/cgan_losses_cpu")
    assert len(study.runs) == 8 and study.runs[0].cfg.loss.name == "bce"
    with pytest.raises(StudyError, match="study file not found: sweeps/nope"):
        load_study("sweeps/nope")
