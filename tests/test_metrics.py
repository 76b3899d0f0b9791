"""Metrics and eval.py: FID/KID behaviour, the clean-fid path, diversity flags, both pipeline kinds, processes."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import requires_fmnist
from pipelines import CGANGenerator, CGANPipeline
from pipelines.config import CGANConfig, DataConfig
from pipelines.data import ImageTensors, load_tensors
from pipelines.metrics import (
    MetricsError, classifier_extractor, collapsed_classes, combined_score, extract, fid, inception_score, kid,
    per_class_report,
)
from trainer_utils import ROOT, launch, run_script

SYNTH = DataConfig(name="synthetic", synthetic_size=600)


@pytest.fixture(scope="module")
def extractor(classifier_dir):
    from pipelines.classifier import load_classifier

    return classifier_extractor(load_classifier(classifier_dir)[0], torch.device("cpu"))


def noisy(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (images.float() + sigma * torch.randn(images.shape, generator=gen)).clamp(0, 255).to(torch.uint8)


def test_fid_is_zero_against_itself_and_grows_with_noise(extractor):
    images = load_tensors(SYNTH, "test").images
    base, _ = extract(images, extractor)
    assert abs(fid(base, base)) < 1e-6
    scores = [fid(extract(noisy(images, s), extractor)[0], base) for s in (10, 40, 120)]
    assert 0 < scores[0] < scores[1] < scores[2]


def test_kid_is_about_zero_between_halves_of_one_split(extractor):
    feats, _ = extract(load_tensors(SYNTH, "train").images, extractor)
    half = len(feats) // 2
    same = kid(feats[:half], feats[half:])
    far = kid(feats[:half], extract(noisy(load_tensors(SYNTH, "train").images[half:], 80), extractor)[0])
    assert abs(same) < 0.05 * far
    assert kid(feats[:half], feats[half:]) == same  # seeded subsets: the same number every time


def test_clean_fid_folder_path_with_custom_extractor_matches(extractor, tmp_path):
    from cleanfid import fid as cleanfid
    from pipelines.evaluation import save_samples

    a = load_tensors(SYNTH, "test")
    b = ImageTensors(noisy(a.images, 30), a.labels, a.class_names)
    save_samples(a.images[:200], a.labels[:200], a.class_names, tmp_path / "a")
    save_samples(b.images[:200], b.labels[:200], b.class_names, tmp_path / "b")
    via_folders = cleanfid.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), mode="clean", num_workers=0,
                                       batch_size=64, device=torch.device("cpu"), verbose=False,
                                       custom_feat_extractor=extractor.model, custom_fn_resize=extractor.resize,
                                       use_dataparallel=False)
    in_memory = fid(extract(a.images[:200], extractor)[0], extract(b.images[:200], extractor)[0])
    assert via_folders == pytest.approx(in_memory, rel=1e-4)


def test_repeated_images_are_flagged_and_real_ones_are_not(extractor):
    real = load_tensors(SYNTH, "train")
    ref = load_tensors(SYNTH, "test")
    feats_ref, _ = extract(ref.images, extractor)
    # A collapsed set: for every class, one real image repeated 10 times.
    idx = torch.cat([(real.labels == k).nonzero().flatten()[:1].repeat(10) for k in range(10)])
    collapsed = per_class_report(extract(real.images[idx], extractor)[0], real.labels[idx].numpy(), feats_ref,
                                 ref.labels.numpy(), real.class_names)
    genuine = per_class_report(extract(real.images, extractor)[0], real.labels.numpy(), feats_ref,
                               ref.labels.numpy(), real.class_names)
    assert collapsed_classes(collapsed) == real.class_names
    assert all(row["diversity_ratio"] < 1e-6 for row in collapsed.values())
    assert collapsed_classes(genuine) == []
    assert all(0.8 < row["diversity_ratio"] < 1.25 for row in genuine.values())


def test_inception_score_bounds():
    uniform = np.zeros((100, 10))
    assert inception_score(uniform) == pytest.approx(1.0)
    confident = np.full((1000, 10), -50.0)
    confident[np.arange(1000), np.arange(1000) // 100] = 50.0  # sorted by class, as eval.py generates them
    assert inception_score(confident, splits=1) == pytest.approx(10.0, rel=1e-6)
    assert inception_score(confident) == pytest.approx(10.0, rel=0.05)  # 10 chunks of 100 shuffled samples


def test_combined_score_is_report_b_formula():
    assert combined_score(38.15, 2.21, 0.431) == pytest.approx(38.15 + 10 / 2.21 + 4.31)
    assert combined_score(10.0, 0.01, None) == pytest.approx(10.0 + 100.0)  # IS floored at 0.1
    assert combined_score(None, 2.0, 0.5) is None


def test_missing_inception_weights_give_a_clear_error(monkeypatch):
    import cleanfid.features

    from pipelines.metrics import inception_extractor

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(cleanfid.features, "build_feature_extractor", offline)
    with pytest.raises(MetricsError, match="inception-2015-12-05.pt.*put it at"):
        inception_extractor(torch.device("cpu"))


@pytest.fixture(scope="module")
def pipelines_dir(tmp_path_factory):
    from pipelines.pipeline_ddpm import ClassConditionalDiffusionPipeline
    from test_ddpm import tiny_pipeline

    root = tmp_path_factory.mktemp("pipes")
    torch.manual_seed(0)
    CGANPipeline(model=CGANGenerator(base_channels=8, latent_dim=8).eval(),
                 class_names=[f"class_{i}" for i in range(10)]).save_pretrained(root / "cgan")
    ddpm = tiny_pipeline()
    assert isinstance(ddpm, ClassConditionalDiffusionPipeline)
    ddpm.save_pretrained(root / "ddpm")
    return root


def run_eval(args: list[str]) -> int:
    """`python eval.py ARGS` in this process."""
    from pipelines.commands import evaluate

    return evaluate(args)


@pytest.mark.parametrize("kind", ["cgan", "ddpm"])
def test_eval_runs_on_both_pipeline_kinds(kind, pipelines_dir, classifier_dir, tmp_path):
    out = tmp_path / "eval"
    extra = ["--steps", "2", "--guidance", "2.0", "--scheduler", "ddim", "--guidance-interval", "0", "0.5"] \
        if kind == "ddpm" else []
    code = run_eval([str(pipelines_dir / kind), "--data", "synthetic", "--classifier", str(classifier_dir),
                     "--num-per-class", "4", "--batch-size", "16", "--out", str(out), *extra])
    assert code == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["num_samples"] == 40 and len(list((out / "samples").rglob("*.png"))) == 40
    for key in ("fid", "kid", "accuracy", "classifier_score", "diversity_ratio", "seconds_per_image"):
        assert isinstance(result[key], float), key
    assert result["real_floor"]["fid"] < result["fid"]  # untrained models are far from real data
    assert set(result["per_class"]) == {f"class_{i}" for i in range(10)}
    assert result["lpips"] is None and "LPIPS not available" in result["lpips_note"]
    if kind == "ddpm":
        assert result["sampler"] == {"num_inference_steps": 2, "guidance_scale": 2.0, "guidance_interval": [0.0, 0.5],
                                     "scheduler": "DDIMScheduler"}


def test_eval_and_generate_say_how_far_they_are_in_plain_lines(pipelines_dir, classifier_dir, tmp_path, monkeypatch,
                                                                capsys):
    from pipelines.console import Progress
    from pipelines.generate import main as generate_main

    monkeypatch.setattr(Progress, "QUIET_S", 0.0)  # every phase counts as slow: a line at each quarter
    assert run_eval([str(pipelines_dir / "cgan"), "--data", "synthetic", "--classifier", str(classifier_dir),
                     "--num-per-class", "4", "--batch-size", "10", "--out", str(tmp_path / "eval"), "--no-pngs"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    sampling = re.findall(r"^evaluation: sampling (\d+)/40 images \(\d+%\) \| \d:\d\d:\d\d \| ETA ", err, flags=re.M)
    assert sampling == ["10", "20", "30", "40"]  # four batches of 10: one line per quarter
    assert re.search(r"^decoding 512/512 images \(100%\)", err, flags=re.M)  # the reference split, once
    for phase, n in (("features of the samples", 40), ("features of the real images", 512),
                     ("features of the real-data floor", 40)):
        assert re.search(rf"^evaluation: {phase} {n}/{n} images \(100%\)", err, flags=re.M), (phase, err)
    assert generate_main([str(pipelines_dir / "ddpm"), "--class", "1", "--num", "2", "--steps", "4",
                          "--out", str(tmp_path / "grid.png")]) == 0
    steps = re.findall(r"^generate: 2 images (\d)/4 steps", capsys.readouterr().err, flags=re.M)
    assert steps == ["1", "2", "3", "4"]


def test_metrics_record_the_export_defaults_a_call_did_not_override(pipelines_dir):
    from pipelines.evaluation import sampler_used
    from pipelines.exports import load_pipeline

    pipe = load_pipeline(pipelines_dir / "ddpm", "dpmsolver")
    pipe.register_to_config(default_steps=7, default_guidance=1.5, default_guidance_interval=[0.0, 0.4])
    assert sampler_used(pipe, {"guidance_scale": 3.0}) == {
        "num_inference_steps": 7, "guidance_scale": 3.0, "guidance_interval": [0.0, 0.4],
        "scheduler": "DPMSolverMultistepScheduler"}
    assert sampler_used(load_pipeline(pipelines_dir / "cgan"), {}) == {}


def test_eval_rejects_bad_input(pipelines_dir, classifier_dir, tmp_path, capsys):
    assert run_eval([str(tmp_path), "--data", "synthetic"]) == 2
    assert "not an exported pipeline" in capsys.readouterr().err
    assert run_eval([str(pipelines_dir / "cgan"), "--data", "synthetic", "--scheduler", "ddim",
                     "--classifier", str(classifier_dir)]) == 2
    assert "diffusion pipelines only" in capsys.readouterr().err
    assert run_eval([str(pipelines_dir / "ddpm"), "--data", "synthetic", "--guidance-interval", "0.7", "0.2"]) == 2
    assert "guidance_interval=[0.7, 0.2]" in capsys.readouterr().err
    assert run_eval([str(pipelines_dir / "cgan"), "--data", "synthetic", "--classifier",
                     str(tmp_path / "none")]) == 2
    assert "train-classifier" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["cgan", "ddpm"])
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_export_gives_a_clear_error(kind, damage, pipelines_dir, classifier_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / kind
    shutil.copytree(pipelines_dir / kind, broken)
    weights = next(broken.rglob("*.safetensors"))
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:64])
    else:
        weights.unlink()
    assert run_eval([str(broken), "--data", "synthetic", "--classifier", str(classifier_dir)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "truncated or corrupt" in err


def test_eval_with_two_processes_gathers_exactly_n_and_matches_one(pipelines_dir, classifier_dir, tmp_path):
    common = [str(pipelines_dir / "cgan"), "--data", "synthetic", "--classifier", str(classifier_dir),
              "--num-per-class", "5", "--batch-size", "8"]
    assert run_eval(common + ["--out", str(tmp_path / "one")]) == 0
    result = launch(tmp_path, ["--multi_gpu", "--num_processes", "2"],
                    [str(ROOT / "eval.py"), *common, "--out", str(tmp_path / "two")])
    assert result.returncode == 0, result.report
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (one["num_processes"], two["num_processes"], two["num_samples"]) == (1, 2, 50)
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-5)  # the same 50 images, no duplicates, none lost
    assert (tmp_path / "one" / "grid.png").read_bytes() == (tmp_path / "two" / "grid.png").read_bytes()


def test_training_evaluates_and_keeps_the_best_export(classifier_dir, tmp_path):
    from test_cgan import TINY

    out = tmp_path / "run"
    overrides = TINY + ["train.epochs=3", "eval.every_epochs=1", "eval.num_per_class=4",
                        f"eval.classifier={classifier_dir}"]
    assert run_script("train_cgan", CGANConfig, out, overrides) == 0
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/fid" in r]
    assert [r["epoch"] for r in evals] == [1, 2, 3]
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["value"] == min(r["eval/fid"] for r in evals)
    assert best["epoch"] == min(evals, key=lambda r: r["eval/fid"])["epoch"]
    assert (out / "best" / "model_index.json").exists()


@requires_fmnist
@pytest.mark.realdata
def test_real_fashion_mnist_floor_and_classifier():
    """The shipped classifier: >= 0.9 test accuracy; the test split scores a low FID against train."""
    from pipelines.classifier import load_classifier
    from pipelines.evaluation import SHIPPED_CLASSIFIERS, balanced_subset

    model, info = load_classifier(SHIPPED_CLASSIFIERS / "fashion_mnist")
    assert info["test_accuracy"] >= 0.9
    ext = classifier_extractor(model, torch.device("cpu"))
    train = balanced_subset(load_tensors(DataConfig(), "train"), 200)
    test = load_tensors(DataConfig(), "test")
    feats_test, logits = extract(test.images, ext, with_logits=True)
    assert (logits.argmax(1) == test.labels.numpy()).mean() >= 0.9
    floor = fid(extract(train.images, ext)[0], feats_test)
    uniform_noise = torch.randint(0, 256, (2000, 1, 28, 28), generator=torch.Generator().manual_seed(0),
                                  dtype=torch.uint8)
    assert floor < 0.02 * fid(extract(uniform_noise, ext)[0], feats_test)


def test_generate_command_writes_a_grid_and_a_folder(pipelines_dir, tmp_path, capsys):
    from PIL import Image

    from pipelines.generate import main as generate_main

    assert generate_main([str(pipelines_dir / "ddpm"), "--class", "c3", "--class", "1", "--num", "3",
                          "--steps", "2", "--out", str(tmp_path / "grid.png")]) == 0
    width, height = Image.open(tmp_path / "grid.png").size
    assert (width, height) == (3 * 30 + 2, 2 * 30 + 2)  # 3 columns, 2 rows of 28px images with 2px padding
    assert generate_main([str(pipelines_dir / "cgan"), "--class", "class_9", "--num", "4",
                          "--out", str(tmp_path / "folder")]) == 0
    assert len(list((tmp_path / "folder").rglob("*.png"))) == 4
    assert generate_main([str(pipelines_dir / "cgan"), "--class", "Sneakers", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "unknown class 'Sneakers'" in err and "0=class_0" in err
    assert generate_main([str(pipelines_dir / "ddpm"), "--class", "1", "--guidance-interval", "0", "2",
                          "--out", str(tmp_path / "x.png")]) == 2
    assert "guidance_interval" in capsys.readouterr().err


def test_baselines_put_real_images_far_below_noise(classifier_dir, tmp_path):
    assert run_eval(["baselines", "--data", "synthetic", "--classifier", str(classifier_dir), "--num-per-class", "50",
                     "--out", str(tmp_path / "baselines.json")]) == 0
    result = json.loads((tmp_path / "baselines.json").read_text())
    real, noise = result["real_train"], result["uniform_noise"]
    assert real["num_samples"] == noise["num_samples"] == 500
    assert real["fid"] < 0.1 * noise["fid"]
    assert real["accuracy"] > 0.9 and noise["accuracy"] < 0.5
    assert real["diversity_ratio"] > 0.8  # averaged over classes (one class of the tiny synthetic set can dip)
    # Softness alone lowers the diversity ratio: a flag can mean blur as well as collapse.
    blurred = result["real_train_blurred"]
    assert blurred["diversity_ratio"] < 0.9 * real["diversity_ratio"] and blurred["fid"] > real["fid"]


def test_set_default_picks_the_fastest_sampler_within_tolerance(pipelines_dir, classifier_dir, tmp_path):
    import shutil

    from pipelines import ClassConditionalDiffusionPipeline

    run = tmp_path / "run"
    shutil.copytree(pipelines_dir / "ddpm", run / "pipeline")
    for sched, steps, fid_value, seconds, n in (("DDIMScheduler", 50, 10.0, 0.5, 100),
                                                ("DDIMScheduler", 10, 10.9, 0.1, 100),
                                                ("DPMSolverMultistepScheduler", 10, 12.0, 0.09, 100),
                                                ("DPMSolverMultistepScheduler", 20, 3.0, 0.2, 1000)):
        folder = run / "eval" / f"{sched}-{steps}"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({
            "num_samples": n, "fid": fid_value, "seconds_per_image": seconds,
            "sampler": {"scheduler": sched, "num_inference_steps": steps, "guidance_scale": 2.0,
                        "guidance_interval": [0.0, 0.6] if steps == 10 else None}}))
    assert run_eval(["set-default", str(run)]) == 0
    pipe = ClassConditionalDiffusionPipeline.from_pretrained(run / "pipeline")
    # At the most common N (100): DPM-Solver++ 10 is faster but 20% worse; DDIM-10 is within 10% of the best
    # (DDIM-50) and 5x faster. The one evaluation at N = 1,000 is not comparable with them.
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert (pipe.config.default_steps, pipe.config.default_guidance) == (10, 2.0)
    assert pipe.config.default_guidance_interval == [0.0, 0.6]
    import pipelines.pipeline_ddpm  # the rewritten export still carries its code for stock diffusers

    assert (run / "pipeline" / "pipeline.py").read_text() == Path(pipelines.pipeline_ddpm.__file__).read_text()
    assert run_eval(["set-default", str(run), "--num-samples", "7"]) == 2  # no evaluation of that size
    assert run_eval(["set-default", str(run), "--num-samples", "1000"]) == 0
    pipe = ClassConditionalDiffusionPipeline.from_pretrained(run / "pipeline")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and pipe.config.default_steps == 20
    assert pipe.config.default_guidance_interval is None


def test_fid_works_with_a_scipy_whose_sqrtm_takes_no_disp(monkeypatch):
    # The GPU machine's newer scipy rejects sqrtm's `disp`, which clean-fid 0.1.35 still passes.
    import scipy.linalg

    from pipelines.metrics import fid

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8)), rng.normal(0.5, 1.5, size=(200, 8))
    expected = fid(a, b)
    plain_sqrtm = scipy.linalg.sqrtm

    def sqrtm(matrix, **kwargs):
        if kwargs:
            raise TypeError(f"sqrtm() got an unexpected keyword argument {next(iter(kwargs))!r}")
        return plain_sqrtm(matrix)

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm)
    assert expected > 1 and fid(a, b) == pytest.approx(expected, rel=1e-9)


def test_in_training_evaluation_without_a_shipped_classifier_trains_one_once_and_reuses_it(tmp_path, monkeypatch,
                                                                                           caplog):
    """No classifier ships for this data (as for CIFAR-10 or the user's own): the first run trains one on its
    training split and caches it; the next run on the same data uses it."""
    import logging

    from pipelines.config import CGANConfig
    from pipelines.evaluation import classifier_cache
    from test_cgan import TINY

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    overrides = [*TINY, "train.epochs=1", "eval.every_epochs=1", "eval.num_per_class=4"]
    with caplog.at_level(logging.INFO, logger="pipelines.evaluation"):
        assert run_script("train_cgan", CGANConfig, tmp_path / "first", overrides) == 0
    [cached] = classifier_cache().iterdir()
    info = json.loads((cached / "classifier_info.json").read_text())
    assert cached.name.startswith("synthetic-") and 0 <= info["test_accuracy"] <= 1
    assert "no classifier ships for data.name=synthetic: training one" in caplog.text
    assert f"classifier trained: test accuracy {info['test_accuracy']:.4f}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.evaluation"):
        assert run_script("train_cgan", CGANConfig, tmp_path / "second", overrides) == 0
    assert "using the classifier trained earlier for this data" in caplog.text and "training one" not in caplog.text
    assert [p.name for p in classifier_cache().iterdir()] == [cached.name]
    assert "eval/fid" in (tmp_path / "second" / "stats.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cgan", "ddpm"])
def test_eval_compiled_gives_the_same_images_and_says_which_mode(kind, pipelines_dir, classifier_dir, tmp_path, capsys):
    """`eval.py --compile`: on this CPU plain compilation (CUDA graphs need a GPU), images equal up to rounding."""
    from PIL import Image

    common = [str(pipelines_dir / kind), "--data", "synthetic", "--classifier", str(classifier_dir),
              "--num-per-class", "2", "--batch-size", "10", *(["--steps", "2"] if kind == "ddpm" else [])]
    assert run_eval([*common, "--out", str(tmp_path / "eager")]) == 0
    assert run_eval([*common, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    assert "--compile: mode=reduce-overhead: CUDA graphs need a CUDA device" in capsys.readouterr().out
    eager, compiled = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("eager", "compiled"))
    assert eager["compiled"] is None and compiled["compiled"] == "default"
    a, b = (np.asarray(Image.open(tmp_path / n / "grid.png"), dtype=int) for n in ("eager", "compiled"))
    assert np.abs(a - b).max() <= 1  # uint8 images: kernels that add in another order move a value by one at most
