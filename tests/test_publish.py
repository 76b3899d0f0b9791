"""Publishing exports on the Hub: `python -m pipelines.publish` and `export.push_to_hub` at the end of training.

huggingface_hub runs for real (HfApi, its commit and LFS code, its HTTP client); only the server is
replaced, by `hub_fake.FakeHub` behind the client's transport.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import hub_fake
from pipelines.config import CGANConfig, ConfigError, load_config
from pipelines.publish import PublishError, main, publish
from trainer_utils import run_script

TINY = ["data.name=synthetic", "data.synthetic_size=128", "model.base_channels=8", "model.latent_dim=8",
        "model.label_emb_dim=4", "train.batch_size=32", "train.epochs=2"]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = hub_fake.FakeHub(user="alice", orgs=("alice-lab",))
    hub_fake.install(fake, monkeypatch, tmp_path)
    yield fake
    hub_fake.uninstall()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("publish") / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run for each test: publishing rewrites the export's card."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_publish_uploads_every_file_of_the_export_in_one_commit(run, hub):
    url = publish(run / "pipeline", "alice/tiny-cgan")
    assert url.startswith("https://huggingface.co/alice/tiny-cgan/commit/")
    local = contents(run / "pipeline")
    assert hub.files("alice/tiny-cgan") == local  # byte for byte
    assert {"model_index.json", "pipeline.py", "pipeline_common.py", "model/cgan.py", "model/config.json",
            "model/diffusion_pytorch_model.safetensors", "README.md", "samples.png", "training.json"} <= set(local)
    assert len(hub.repos["alice/tiny-cgan"].commits) == 1
    weights = local["model/diffusion_pytorch_model.safetensors"]
    assert weights in hub.lfs.values()  # the weights went through the LFS API, as the Hub requires
    card = local["README.md"].decode()
    assert 'DiffusionPipeline.from_pretrained("alice/tiny-cgan", trust_remote_code=True)' in card


def test_a_bare_name_goes_under_the_user_and_a_revision_and_private_repo_are_made(run, hub):
    publish(run / "pipeline", "tiny-cgan", revision="epoch-2", private=True)
    repo = hub.repos["alice/tiny-cgan"]
    assert repo.private and repo.branches["main"] == {}
    assert set(repo.branches["epoch-2"]) == set(contents(run / "pipeline"))
    card = repo.branches["epoch-2"]["README.md"].decode()
    assert 'from_pretrained("alice/tiny-cgan", revision="epoch-2", trust_remote_code=True)' in card
    publish(run / "pipeline", "alice-lab/tiny-cgan")  # an organisation of the user
    assert "alice-lab/tiny-cgan" in hub.repos


@pytest.mark.parametrize("family", ["cgan", "ddpm"])
def test_a_pushed_export_loads_back_by_repo_id_with_the_same_images(family, hub, tmp_path):
    from diffusers import DiffusionPipeline

    from pipelines.exports import save_pipeline
    from test_hub_exports import images, tiny_cgan, tiny_ddpm

    pipe = tiny_cgan() if family == "cgan" else tiny_ddpm()
    save_pipeline(pipe, tmp_path / "export")
    publish(tmp_path / "export", f"alice/tiny-{family}")
    # huggingface_hub's download code (repo info, resolve/ with its headers) and diffusers' resolution
    loaded = DiffusionPipeline.from_pretrained(f"alice/tiny-{family}", trust_remote_code=True,
                                               cache_dir=tmp_path / "cache")
    weights = "unet" if family == "ddpm" else "model"
    assert ("GET", f"/alice/tiny-{family}/resolve/{hub.repos[f'alice/tiny-{family}'].heads['main']}/{weights}/"
                   "diffusion_pytorch_model.safetensors") in hub.calls  # downloaded from the fake Hub
    np.testing.assert_array_equal(images(loaded), images(pipe))


def no_token(hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")


def bad_token(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_expired")


def offline(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def network_down(hub, monkeypatch):
    hub.down = True


def read_only_member(hub, monkeypatch):
    hub.repos["alice-lab/tiny-cgan"] = hub_fake.Repo(owner="alice-lab", private=False)
    hub.refuse_upload.add("alice-lab/tiny-cgan")


def public_repo_exists(hub, monkeypatch):
    hub.repos["alice/tiny-cgan"] = hub_fake.Repo(owner="alice", private=False)


FAILURES = {  # how the push is broken: (repo id, private, what the error says)
    no_token: ("alice/tiny-cgan", None, "no Hugging Face token: run `hf auth login`, or set HF_TOKEN"),
    bad_token: ("alice/tiny-cgan", None, "the Hub refused the token (401"),
    offline: ("alice/tiny-cgan", None, "HF_HUB_OFFLINE is set"),
    network_down: ("alice/tiny-cgan", None, "cannot reach the Hub at https://huggingface.co (ConnectError"),
    read_only_member: ("alice-lab/tiny-cgan", None, "the Hub refused to write to alice-lab/tiny-cgan (403"),
    public_repo_exists: ("alice/tiny-cgan", True, "already exists and is public, but private=true was asked"),
}


@pytest.mark.parametrize("breakage", FAILURES, ids=lambda f: f.__name__)
def test_a_failed_push_says_why_and_leaves_the_local_export_as_it_was(breakage, run, hub, monkeypatch):
    repo_id, private, reason = FAILURES[breakage]
    before = contents(run / "pipeline")
    breakage(hub, monkeypatch)
    with pytest.raises(PublishError) as err:
        publish(run / "pipeline", repo_id, private=private)
    message = str(err.value)
    assert reason in message
    assert f"the export stays in {run / 'pipeline'}; push it later with: python -m pipelines.publish" in message
    assert contents(run / "pipeline") == before  # the card rewritten for the push is put back too
    assert not any(c["summary"] for r in hub.repos.values() for c in r.commits)  # nothing was committed


@pytest.mark.parametrize("private, flag", [(True, "--private"), (False, "--public"), (None, None)],
                         ids=["private", "public", "hub_default"])
def test_the_retry_command_of_a_failed_push_keeps_the_visibility(private, flag, run, hub, capsys):
    """Followed as printed, the retry makes the repository that was asked for: without --private, a public one."""
    import shlex

    hub.down = True
    assert main([str(run), "--repo-id", "tiny-cgan", *([flag] if flag else [])]) == 2
    err = capsys.readouterr().err
    command = err.split("push it later with: ", 1)[1].strip()
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "pipelines.publish"]
    assert ("--private" in argv, "--public" in argv) == (private is True, private is False)
    hub.down = False
    assert main(argv[3:]) == 0
    assert hub.repos["alice/tiny-cgan"].private is bool(private)
    assert hub.files("alice/tiny-cgan") == contents(run / "pipeline")


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit], ids=lambda e: e.__name__)
def test_a_push_killed_during_the_upload_leaves_the_export_as_it_was(interrupt, run, hub, monkeypatch):
    """An interrupt is no Exception: nothing may need putting back, as a SIGTERM (which kills the process at
    once) puts nothing back. The pushed folder is a staging copy, removed on the way out."""
    before, entries = contents(run / "pipeline"), sorted(p.name for p in run.iterdir())
    put = hub._lfs_put

    def killed_midway(request):
        put(request)  # one file went up
        raise interrupt()

    monkeypatch.setattr(hub, "_lfs_put", killed_midway)
    with pytest.raises(interrupt):
        publish(run / "pipeline", "alice/tiny-cgan")
    assert ("POST", "/alice/tiny-cgan.git/info/lfs/objects/batch") in hub.calls  # it died during the upload
    assert contents(run / "pipeline") == before  # byte for byte, its card too
    assert sorted(p.name for p in run.iterdir()) == entries  # no staging folder left behind
    assert not hub.repos["alice/tiny-cgan"].commits


def test_the_staging_copy_links_the_exports_files_but_never_its_card(run):
    """Hard links share the bytes: a card written into the staging copy, even in place, must not reach the export's."""
    from pipelines.publish import stage

    export = run / "pipeline"
    card = (export / "README.md").read_bytes()
    staging = stage(export, run.parent / "staging" / "pipeline")
    (staging / "README.md").write_text("the repository's card")  # in place, as any writer may
    assert (export / "README.md").read_bytes() == card
    weights = "model/diffusion_pytorch_model.safetensors"
    assert (staging / weights).stat().st_ino == (export / weights).stat().st_ino  # linked, not copied
    assert set(contents(staging)) == set(contents(export))


def test_someone_elses_repository_is_refused_before_anything_is_created(run, hub):
    hub.repos["bob/cgan"] = hub_fake.Repo(owner="bob", private=False)
    with pytest.raises(PublishError, match="bob/cgan belongs to 'bob', and this token is 'alice''s .* "
                                           "alice, alice-lab\\); choose a repo id such as alice/cgan"):
        publish(run / "pipeline", "bob/cgan")
    assert hub.writes() == []  # not even create_repo, which the Hub answers silently for an existing repo


def test_an_invalid_repo_id_is_refused_before_any_call(run, hub):
    with pytest.raises(PublishError, match="'a/b/c' is not a Hub repository id"):
        publish(run / "pipeline", "a/b/c")
    assert hub.calls == []


def test_publish_command_takes_a_run_directory_or_its_best_export(run, hub, capsys):
    assert main([str(run), "--repo-id", "tiny-cgan"]) == 0
    out = capsys.readouterr().out
    assert f"pushed {run / 'pipeline'} to https://huggingface.co/alice/tiny-cgan/commit/" in out
    assert re.search(r"^uploading \d+ files \(\d+\.\d MB\) to alice/tiny-cgan\nuploaded in \d+ s$", out, flags=re.M)
    assert main([str(run), "--best", "--repo-id", "tiny-cgan"]) == 2
    assert f"error: {run} has no best/ export" in capsys.readouterr().err
    assert main([str(run / "grids"), "--repo-id", "tiny-cgan"]) == 2
    assert "is neither an export (no model_index.json) nor a run directory" in capsys.readouterr().err


def test_training_pushes_the_final_export_and_best_to_its_branch(hub, tmp_path, classifier_dir, capsys):
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY + [
        "eval.every_epochs=1", "eval.num_per_class=4", f"eval.classifier={classifier_dir}",
        "export.push_to_hub=true", "export.hub_model_id=tiny-cgan", "export.push_best=true"]) == 0
    repo = hub.repos["alice/tiny-cgan"]
    assert repo.branches["main"] == contents(out / "pipeline")
    assert repo.branches["best"] == contents(out / "best") and "best.json" in repo.branches["best"]
    assert json.loads(repo.branches["main"]["training.json"])["steps"] == 8
    assert 'from_pretrained("alice/tiny-cgan", revision="best", ' in repo.branches["best"]["README.md"].decode()
    printed = capsys.readouterr().out
    assert "pushed pipeline/ to the Hub: https://huggingface.co/alice/tiny-cgan/commit/" in printed
    assert "pushed best/ to the Hub" in printed


@pytest.mark.parametrize("setup, reason", [
    (lambda hub, mp: mp.delenv("HF_TOKEN"), "export.push_to_hub: no Hugging Face token"),
    (lambda hub, mp: None, "bob/cgan belongs to 'bob'"),
], ids=["no_token", "someone_elses_namespace"])
def test_a_push_bound_to_fail_stops_the_run_before_training(setup, reason, hub, tmp_path, monkeypatch, capsys):
    setup(hub, monkeypatch)
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY + ["export.push_to_hub=true",
                                                              "export.hub_model_id=bob/cgan"]) == 2
    err = capsys.readouterr().err
    assert reason in err and "Traceback" not in err
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()  # nothing trained or written


def test_a_push_that_fails_at_the_end_keeps_the_finished_run_and_the_command_pushes_it_later(hub, tmp_path, capsys):
    from pipelines.exports import load_pipeline

    hub.down = True  # for the whole run: a warning at the start, the push fails at the end
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY + ["export.push_to_hub=true",
                                                              "export.hub_model_id=tiny-cgan"]) == 2
    err = capsys.readouterr().err
    assert "warning: export.push_to_hub: cannot reach the Hub" in err and "training goes on" in err
    assert f"error: pushing to tiny-cgan failed: cannot reach the Hub" in err
    assert f"push it later with: python -m pipelines.publish {out / 'pipeline'} --repo-id tiny-cgan" in err
    load_pipeline(out)  # the export is complete
    hub.down = False
    assert main([str(out / "pipeline"), "--repo-id", "tiny-cgan"]) == 0
    assert hub.files("alice/tiny-cgan") == contents(out / "pipeline")


@pytest.mark.parametrize("overrides, message", [
    (["export.push_to_hub=true"], "export.push_to_hub=true needs export.hub_model_id"),
    (["export.hub_model_id=a/b/c"], "export.hub_model_id: 'a/b/c' is not a Hub repository id"),
    (["export.push_best=true"], "export.push_best=true needs export.push_to_hub=true"),
    (["export.push_to_hub=true", "export.hub_model_id=x", "export.push_best=true"],
     "export.push_best=true needs eval.every_epochs"),
    (["export.push_to_hub=true", "export.hub_model_id=x", "export.push_best=true", "eval.every_epochs=1",
      "export.hub_revision=best"], "export.best_revision='best' is also the branch of the final export"),
])
def test_publishing_options_are_checked_with_the_config(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(CGANConfig, None, overrides)
