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
