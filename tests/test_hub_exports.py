"""Exports that stock diffusers loads by folder or repo id, and diffusers' pipeline conventions, for both families.

No network: the Hub's calls are replaced where diffusers makes them, and diffusers' own download and
resolution code runs on the export's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel

from pipelines import CGANPipeline, ClassConditionalDiffusionPipeline
from pipelines.exports import load_pipeline, save_pipeline
from pipelines.models.cgan import CGANGenerator

NAMES = ["T-shirt/top", "Trouser", "Pullover"]


def tiny_ddpm() -> ClassConditionalDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=len(NAMES) + 1)
    return ClassConditionalDiffusionPipeline(unet=unet.eval(), scheduler=DDIMScheduler(num_train_timesteps=50),
                                             class_names=NAMES, num_classes=len(NAMES), default_steps=3,
                                             default_guidance=2.0)


def tiny_cgan(noise: str = "normal") -> CGANPipeline:
    torch.manual_seed(0)
    model = CGANGenerator(num_classes=len(NAMES), base_channels=8, latent_dim=8, label_emb_dim=4, noise=noise)
    return CGANPipeline(model=model.eval(), class_names=NAMES)


FAMILIES = {"ddpm": tiny_ddpm, "cgan": tiny_cgan}
CALL = "[0, 'Trouser', 2], generator=torch.Generator().manual_seed(0), output_type='np'"


def images(pipe, labels=(0, "Trouser", 2), seed=0, **kwargs) -> np.ndarray:
    return pipe(list(labels), generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


@pytest.fixture(params=sorted(FAMILIES))
def exported(request, tmp_path):
    pipe = FAMILIES[request.param]()
    save_pipeline(pipe, tmp_path / "export")
    return request.param, pipe, tmp_path / "export"


def stock_diffusers(script: str, *args: str) -> subprocess.CompletedProcess:
    """Python with torch and diffusers but not this project (its editable install is blocked too)."""
    code = "import sys\nsys.modules['pipelines'] = None\nimport numpy as np, torch\n" + script
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=Path(args[0]).parent, timeout=300)


# ---------------------------------------------------------------- Hub-safe, self-contained exports


def test_model_index_names_the_code_and_holds_no_list_that_looks_like_a_component(exported):
    family, pipe, folder = exported
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", type(pipe).__name__]
    assert (folder / "pipeline.py").is_file() and (folder / "pipeline_common.py").is_file()
    assert index["id2label"] == {"0": "T-shirt/top", "1": "Trouser", "2": "Pullover"}
    assert "class_names" not in index
    if family == "cgan":
        assert index["model"] == ["cgan", "CGANGenerator"] and (folder / "model" / "cgan.py").is_file()
    components = {"ddpm": {"unet", "scheduler"}, "cgan": {"model"}}[family]
    looks_like_component = {k for k, v in index.items() if isinstance(v, list) and k != "_class_name"
                            and v and isinstance(v[0], str)}
    assert looks_like_component == components


def test_stock_diffusers_loads_the_folder_by_itself_and_draws_the_same_images(exported):
    family, pipe, folder = exported
    result = stock_diffusers(
        "from diffusers import DiffusionPipeline\n"
        "p = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "assert type(p).__module__.startswith('diffusers_modules'), type(p).__module__\n"
        f"np.save(sys.argv[2], p({CALL}).images)\n",
        str(folder), str(folder.parent / "out.npy"))
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(folder.parent / "out.npy"), images(pipe))


@pytest.mark.slow  # a fresh Python with diffusers: 12 s
def test_without_trust_remote_code_stock_diffusers_refuses_the_code(exported):
    _, _, folder = exported
    result = stock_diffusers("from diffusers import DiffusionPipeline\n"
                             "DiffusionPipeline.from_pretrained(sys.argv[1])\n", str(folder))
    assert result.returncode != 0 and "trust_remote_code" in result.stderr


@pytest.mark.slow  # a fresh Python with diffusers: 12 s
def test_the_older_custom_pipeline_form_still_loads(tmp_path):
    pipe = tiny_ddpm()
    save_pipeline(pipe, tmp_path / "export")
    result = stock_diffusers(
        "from diffusers import DiffusionPipeline\n"
        "p = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline=sys.argv[1], trust_remote_code=True)\n"
        f"np.save(sys.argv[2], p({CALL}).images)\n",
        str(tmp_path / "export"), str(tmp_path / "out.npy"))
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), images(pipe))


def serve_as_hub_repo(monkeypatch, folder: Path) -> None:
    """The Hub's calls, where diffusers makes them, answered from `folder` (the repo's files)."""
    import diffusers.pipelines.pipeline_utils as pipeline_utils
    import diffusers.utils.dynamic_modules_utils as dynamic_modules
    import diffusers.utils.hub_utils as hub_utils

    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    # diffusers caches the repo's code by commit: one commit per folder, so no test sees another's code
    commit = hashlib.sha1(str(folder).encode()).hexdigest()

    def model_info(repo_id, **kwargs):
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f) for f in files], sha=commit)

    def hf_hub_download(repo_id, filename, subfolder=None, **kwargs):
        path = folder / (subfolder or "") / filename
        if not path.is_file():
            raise FileNotFoundError(f"{repo_id} has no {subfolder or ''}/{filename}")
        return str(path)

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        return str(folder)

    for module in (pipeline_utils, dynamic_modules):
        monkeypatch.setattr(module, "model_info", model_info)
        monkeypatch.setattr(module, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(pipeline_utils, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub_utils, "resolve_revision", lambda repo_id, revision=None, **kwargs: revision)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)


def test_diffusers_download_and_resolution_accept_the_export_by_repo_id(exported, monkeypatch):
    family, pipe, folder = exported
    serve_as_hub_repo(monkeypatch, folder)
    assert Path(DiffusionPipeline.download("someone/tiny-export", trust_remote_code=True)) == folder
    loaded = DiffusionPipeline.from_pretrained("someone/tiny-export", trust_remote_code=True)
    np.testing.assert_array_equal(images(loaded), images(pipe))
    own = type(pipe).from_pretrained("someone/tiny-export")  # this project's class, through the same download
    assert type(own) is type(pipe)
    np.testing.assert_array_equal(images(own), images(pipe))


def test_an_export_with_a_list_of_class_names_is_refused_by_the_hub_download(tmp_path, monkeypatch):
    """What exports were before `id2label`: diffusers reads the list as a component folder."""
    folder = tmp_path / "old"
    save_pipeline(tiny_ddpm(), folder)
    index = json.loads((folder / "model_index.json").read_text())
    id2label = index.pop("id2label")
    index["class_names"] = [id2label[str(i)] for i in range(len(NAMES))]
    (folder / "model_index.json").write_text(json.dumps(index))
    serve_as_hub_repo(monkeypatch, folder)
    with pytest.raises(ValueError, match="class_names/T-shirt/top.py"):
        DiffusionPipeline.download("someone/old-export", trust_remote_code=True)


def make_old_export(pipe, folder: Path) -> None:
    """An export as this project wrote them before: class names as a list, `_class_name` a plain name,
    the generator named by its module in this package, no code beside the cGAN."""
    save_pipeline(pipe, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = index["_class_name"][1]
    id2label = index.pop("id2label")
    index["class_names"] = [id2label[str(i)] for i in range(len(NAMES))]
    if "model" in index:
        index["model"] = ["pipelines.models.cgan", "CGANGenerator"]
        (folder / "model" / "cgan.py").unlink()
        (folder / "pipeline.py").unlink()
        (folder / "pipeline_common.py").unlink()
    (folder / "model_index.json").write_text(json.dumps(index))


def test_old_exports_still_load_in_this_project(exported, tmp_path):
    family, pipe, _ = exported
    make_old_export(pipe, tmp_path / "old")
    for loaded in (type(pipe).from_pretrained(tmp_path / "old"), load_pipeline(tmp_path / "old")):
        assert type(loaded) is type(pipe) and loaded.class_names == NAMES
        np.testing.assert_array_equal(images(loaded), images(pipe))
    resaved = tmp_path / "resaved"
    save_pipeline(load_pipeline(tmp_path / "old"), resaved)
    assert json.loads((resaved / "model_index.json").read_text())["_class_name"] == ["pipeline", type(pipe).__name__]


# ---------------------------------------------------------------- diffusers' pipeline conventions


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_class_labels_as_ids_names_nested_lists_and_tensors_give_the_same_images(family):
    pipe = FAMILIES[family]()
    expected = images(pipe, labels=[1, 1])
    for labels in ([[1], [1]], ["Trouser", "Trouser"], [["Trouser"], [1]], torch.tensor([[1], [1]])):
        got = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="np").images
        np.testing.assert_array_equal(got, expected)
    assert pipe.get_label_ids(["Pullover", "T-shirt/top"]) == [2, 0] and pipe.labels["Trouser"] == 1
    with pytest.raises(ValueError, match="valid names: T-shirt/top, Trouser, Pullover"):
        pipe.get_label_ids("Sneaker")


@pytest.mark.parametrize("family,noise", [("ddpm", None), ("cgan", "normal"), ("cgan", "uniform")])
def test_a_list_of_generators_gives_each_image_the_noise_it_gets_alone(family, noise):
    pipe = tiny_cgan(noise) if family == "cgan" else tiny_ddpm()
    batch = pipe([0, 1, 2], generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)], output_type="np").images
    for i, seed in enumerate((5, 6, 7)):
        alone = pipe([i], generator=torch.Generator().manual_seed(seed), output_type="np").images
        np.testing.assert_allclose(batch[i], alone[0], atol=1e-6)
    assert not np.array_equal(batch[0], batch[1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_latents_replace_the_drawn_noise_and_return_dict_false_gives_a_tuple(family):
    pipe = FAMILIES[family]()
    if family == "ddpm":
        latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    else:
        latents = pipe.model.sample_noise(3, torch.Generator().manual_seed(0), torch.device("cpu"))
    np.testing.assert_array_equal(pipe([0, 1, 2], latents=latents, output_type="np").images,
                                  images(pipe, labels=[0, 1, 2]))
    (tupled,) = pipe([0, 1, 2], latents=latents, output_type="np", return_dict=False)
    np.testing.assert_array_equal(tupled, images(pipe, labels=[0, 1, 2]))


def test_callback_on_step_end_sees_every_step_and_may_replace_the_latents():
    pipe = tiny_ddpm()
    seen = []

    def record(p, i, t, tensors):
        seen.append((i, int(t), tuple(tensors["latents"].shape)))
        return tensors

    images(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents"])
    assert [s[0] for s in seen] == [0, 1, 2] and pipe.num_timesteps == 3 and all(s[2] == (3, 1, 8, 8) for s in seen)
    zeroed = images(pipe, callback_on_step_end=lambda p, i, t, tensors: {"latents": torch.zeros_like(tensors["latents"])})
    np.testing.assert_array_equal(zeroed, np.full_like(zeroed, 0.5))  # the last step's latents, zero, are the image
    with pytest.raises(ValueError, match="valid inputs are \\['latents'\\]"):
        images(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise_pred"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp16_variant_saves_and_loads(family, tmp_path):
    pipe = FAMILIES[family]()
    pipe.save_pretrained(tmp_path / "v", variant="fp16")
    component = "unet" if family == "ddpm" else "model"
    assert (tmp_path / "v" / component / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = type(pipe).from_pretrained(tmp_path / "v", variant="fp16")
    for a, b in zip(getattr(pipe, component).parameters(), getattr(loaded, component).parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # fp16 rounding: 2^-11 relative
    half = type(pipe).from_pretrained(tmp_path / "v", variant="fp16", torch_dtype=torch.float16)
    assert getattr(half, component).dtype == torch.float16


def test_the_older_callback_still_sees_every_step_with_diffusers_deprecation_warning():
    pipe = tiny_ddpm()
    seen = []
    with pytest.warns(FutureWarning, match="callback_on_step_end"):
        images(pipe, callback=lambda i, t, sample: seen.append((i, tuple(sample.shape))))
    assert seen == [(0, (3, 1, 8, 8)), (1, (3, 1, 8, 8)), (2, (3, 1, 8, 8))]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_call_frees_the_offload_hooks(family, monkeypatch):
    """diffusers' pipelines end every call with `maybe_free_model_hooks()` (CPU offload puts the models back)."""
    pipe = FAMILIES[family]()
    calls = []
    monkeypatch.setattr(pipe, "maybe_free_model_hooks", lambda: calls.append(1))
    images(pipe)
    pipe([0], output_type="np", return_dict=False)
    assert calls == [1, 1]
