"""Every export carries a model card and a sample grid; `eval.py` rebuilds the card with its metrics."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from pipelines.config import CGANConfig
from trainer_utils import run_script

TINY = ["data.name=synthetic", "data.synthetic_size=128", "model.base_channels=8", "model.latent_dim=8",
        "model.label_emb_dim=4", "train.batch_size=32", "train.epochs=2", "eval.snapshot_epochs=[1]"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY) == 0
    return out


def header_and_body(card: str) -> tuple[dict, str]:
    _, header, body = card.split("---\n", 2)
    return yaml.safe_load(header), body


@pytest.mark.parametrize("export", ["pipeline", "snapshots/epoch_001"])
def test_every_export_has_a_card_and_its_sample_grid(run, export):
    folder = run / export
    header, body = header_and_body((folder / "README.md").read_text())
    assert header["library_name"] == "diffusers" and header["license"] == "apache-2.0"
    assert {"diffusers", "class-conditional", "gan"} <= set(header["tags"])
    names = json.loads((folder / "model_index.json").read_text())["id2label"]
    assert all(f"`{name}`" in body for name in names.values())
    assert "DiffusionPipeline.from_pretrained(\"REPO_OR_FOLDER\", trust_remote_code=True)" in body
    assert "training: 2 epochs, batch 32 per process" in body and "model/cgan.py" in body
    assert "## Metrics" not in body  # nothing evaluated yet
    grid = Image.open(folder / "samples.png")
    assert grid.size == (10 * 28 + 11 * 2, 10 * 28 + 11 * 2)  # one row of 10 per class, 2-pixel padding


def test_eval_rebuilds_the_card_of_the_export_it_evaluated(run, classifier_dir):
    from pipelines.commands import evaluate

    assert evaluate([str(run), "--data", "synthetic", "--classifier", str(classifier_dir), "--num-per-class", "4",
                     "--no-pngs"]) == 0
    metrics = json.loads((run / "eval" / "classifier" / "metrics.json").read_text())
    _, body = header_and_body((run / "pipeline" / "README.md").read_text())
    assert "## Metrics" in body and f"| FID | {metrics['fid']:.4g} |" in body
    assert f"| conditional accuracy | {metrics['accuracy']:.4g} |" in body
    assert "40 samples (4 per class, seed 0), classifier features" in body
    _, snapshot_body = header_and_body((run / "snapshots" / "epoch_001" / "README.md").read_text())
    assert "## Metrics" not in snapshot_body  # another export's card is left alone


def test_the_card_says_how_long_training_took_on_what(run):
    info = json.loads((run / "pipeline" / "training.json").read_text())
    assert info["steps"] == 8 and info["images"] == 8 * 32 and info["epochs"] == 2
    assert info["processes"] == 1 and info["device"] == "CPU" and 0 < info["wall_seconds"] < 600
    _, body = header_and_body((run / "pipeline" / "README.md").read_text())
    assert (f"- time: {info['wall_seconds']:.1f} seconds of wall time (set-up, training and evaluation, summed over "
            "resumes) on 1 process (CPU, mixed precision `no`): 8 steps, 256 images (2 epochs)") in body
    assert json.loads((run / "snapshots" / "epoch_001" / "training.json").read_text())["steps"] == 4


def test_the_training_time_of_a_resumed_run_adds_the_time_before_its_checkpoint(tmp_path):
    from pipelines.checkpoints import STATE_FILE
    from trainer_utils import final_checkpoint

    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY + ["train.max_steps=4"]) == 0
    state_file = final_checkpoint(out) / STATE_FILE
    state = json.loads(state_file.read_text())
    assert state["step"] == 4 and 0 < state["train_seconds"] < 600
    state_file.write_text(json.dumps({**state, "train_seconds": 9000.0}))  # as if the first part took 2.5 hours
    assert run_script("train_cgan", CGANConfig, out, TINY, "--resume", "latest") == 0
    info = json.loads((out / "pipeline" / "training.json").read_text())
    assert info["steps"] == 8 and 9000 < info["wall_seconds"] < 9000 + 600
    assert "- time: 2.5 hours of wall time" in (out / "pipeline" / "README.md").read_text()
