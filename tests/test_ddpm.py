"""The conditional diffusion model: U-Net from config, pipeline, and train_ddpm.py end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from pipelines import ClassConditionalDiffusionPipeline
from pipelines.config import ConfigError, DDPMConfig, DiffusionConfig, UNetConfig
from pipelines.diffusion import build_noise_scheduler
from pipelines.models.unet import build_unet
from pipelines.plots import denoising_strip
from pipelines.checkpoints import list_checkpoints
from trainer_utils import (
    ROOT, assert_same_state, assert_same_tensors, checkpoint_state, file_stamp, launch, load_safetensors_dir,
    logged_steps, run_script,
)

TINY = ["data.name=synthetic", "data.synthetic_size=256", "model.block_out_channels=[8,16]",
        "model.attention=[false,true]", "model.layers_per_block=1", "model.norm_num_groups=4",
        "diffusion.num_train_timesteps=50", "diffusion.sample_steps=2", "train.batch_size=32", "train.epochs=2",
        "optim.lr=0.002", "optim.warmup_steps=2", "log.every_steps=4", "train.ema_decay=0.9"]


def tiny_pipeline(null_class: bool = True, image_size=None, sample_size=28, seed=0):
    torch.manual_seed(seed)
    cfg = UNetConfig(block_out_channels=[4, 8], attention=[False, True], layers_per_block=1, norm_num_groups=4)
    unet = build_unet(cfg, num_classes=10, channels=1, sample_size=sample_size, null_class=null_class).eval()
    scheduler = DDIMScheduler.from_config(build_noise_scheduler(DiffusionConfig(num_train_timesteps=50)).config)
    return ClassConditionalDiffusionPipeline(unet=unet, scheduler=scheduler, class_names=[f"c{i}" for i in range(10)],
                                             image_size=image_size, num_classes=10)


@pytest.mark.parametrize("size,channels,levels", [(28, 1, [8, 16]), (32, 1, [8, 16, 16]), (32, 3, [8, 16, 16])])
def test_unet_forward_shapes(size, channels, levels):
    cfg = UNetConfig(block_out_channels=levels, attention=[False] * (len(levels) - 1) + [True], layers_per_block=1,
                     norm_num_groups=4)
    unet = build_unet(cfg, num_classes=10, channels=channels, sample_size=size, null_class=True)
    assert unet.config.num_class_embeds == 11  # ten classes and the guidance null class
    x = torch.randn(2, channels, size, size)
    assert unet(x, torch.tensor([3, 40]), class_labels=torch.tensor([1, 10])).sample.shape == x.shape


def test_unet_rejects_sizes_it_cannot_halve():
    cfg = UNetConfig(block_out_channels=[8, 8, 8, 8], attention=[False] * 4, norm_num_groups=4)
    with pytest.raises(ConfigError, match="pad it"):
        build_unet(cfg, num_classes=10, channels=1, sample_size=28, null_class=False)


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_add_noise_is_the_closed_form_forward_process(schedule):
    sched = build_noise_scheduler(DiffusionConfig(num_train_timesteps=300, beta_schedule=schedule))
    x0, eps, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0, 150, 299])
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(sched.add_noise(x0, eps, t), abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    assert sched.alphas_cumprod[-1] < 0.05  # nearly pure noise at t = T


def test_guidance_one_is_the_plain_conditional_sampler():
    pipe = tiny_pipeline()
    labels = torch.tensor([1, 7])
    got = pipe(labels, num_inference_steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    # The same sampler written out with the scheduler alone; DDIM re-derives epsilon from its clipped x0
    # (GLIDE's choice), which matters here: the untrained U-Net's x0 predictions leave [-1, 1].
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(3)
    x = torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(pipe.unet(x, t, class_labels=labels).sample, t, x, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(got, (x / 2 + 0.5).clamp(0, 1))


def test_guided_batch_equals_separate_conditional_and_unconditional_calls():
    pipe = tiny_pipeline()
    w = 3.0
    got = pipe([2], num_inference_steps=2, guidance_scale=w, generator=torch.Generator().manual_seed(1),
               output_type="pt").images
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(2)
    x = torch.randn((1, 1, 28, 28), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in sched.timesteps:
            cond = pipe.unet(x, t, class_labels=torch.tensor([2])).sample
            uncond = pipe.unet(x, t, class_labels=torch.tensor([10])).sample
            x = sched.step(uncond + w * (cond - uncond), t, x, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(got, (x / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-4)


def test_guidance_interval_guides_only_the_steps_inside_it(tmp_path):
    pipe = tiny_pipeline()
    w, lo, hi = 3.0, 0.0, 0.6

    def run(**kwargs):
        return pipe([2, 8], num_inference_steps=4, guidance_scale=w, generator=torch.Generator().manual_seed(3),
                    output_type="pt", **kwargs).images

    got = run(guidance_interval=(lo, hi))
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(4)
    x = torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(3))
    guided_steps = 0
    with torch.no_grad():
        for t in sched.timesteps:
            out = pipe.unet(x, t, class_labels=torch.tensor([2, 8])).sample
            if lo <= t.item() / 50 <= hi:
                guided_steps += 1
                uncond = pipe.unet(x, t, class_labels=torch.tensor([10, 10])).sample
                out = uncond + w * (out - uncond)
            x = sched.step(out, t, x, use_clipped_model_output=True).prev_sample
    assert 0 < guided_steps < 4
    torch.testing.assert_close(got, (x / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(run(guidance_interval=(0, 1)), run())  # the whole range: plain guidance
    assert not torch.allclose(got, run())
    for bad in [(0.6, 0.2), (0, 1.5), (0.1,)]:
        with pytest.raises(ValueError, match="guidance_interval"):
            run(guidance_interval=bad)
    # The export's default interval survives a save/load round trip and is what a plain call uses.
    pipe.register_to_config(default_guidance_interval=[lo, hi])
    pipe.save_pretrained(tmp_path)
    loaded = ClassConditionalDiffusionPipeline.from_pretrained(tmp_path)
    assert loaded.config.default_guidance_interval == [lo, hi]
    torch.testing.assert_close(loaded([2, 8], num_inference_steps=4, guidance_scale=w, output_type="pt",
                                      generator=torch.Generator().manual_seed(3)).images, got)


@pytest.mark.parametrize("scheduler_cls,steps", [(DDPMScheduler, 50), (DDIMScheduler, 10),
                                                 (DPMSolverMultistepScheduler, 10)])
def test_schedulers_swap_by_from_config(scheduler_cls, steps):
    pipe = tiny_pipeline(image_size=28, sample_size=32)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)

    def sample():
        return pipe(["c0", 9], num_inference_steps=steps, guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    images = sample()
    assert images.shape == (2, 28, 28, 1)  # cropped back from the padded 32x32 to the dataset's size
    assert np.isfinite(images).all()
    pipe.register_to_config(image_size=None)  # the same sampler without the crop
    full = sample()
    assert full.shape == (2, 32, 32, 1)
    np.testing.assert_array_equal(images, full[:, 2:30, 2:30])  # the centre, not a corner


def test_same_seed_same_images_and_label_errors():
    pipe = tiny_pipeline()
    a = pipe([0, 5], num_inference_steps=2, generator=torch.Generator().manual_seed(4), output_type="np").images
    b = pipe([0, 5], num_inference_steps=2, generator=torch.Generator().manual_seed(4), output_type="np").images
    c = pipe([0, 5], num_inference_steps=2, generator=torch.Generator().manual_seed(5), output_type="np").images
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="valid labels are 0..9"):
        pipe([10])
    with pytest.raises(ValueError, match="null class"):
        tiny_pipeline(null_class=False)([0], guidance_scale=2.0)


def test_denoising_strip_with_fewer_steps_than_columns_keeps_one_class_per_row():
    """3 steps in 6 columns: each step fills two columns, and row k holds class k's samples only."""
    pipe = tiny_pipeline()
    strip = denoising_strip(pipe, num_classes=3, steps=3, columns=6, seed=2)
    assert strip.shape == (3 * 6, 1, 28, 28)  # the caller's grid has nrow=6: one row per class
    # The same call, recording every step: the noise is drawn once for the whole batch, so it is identical.
    seen = []
    final = pipe([0, 1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(2), output_type="pt",
                 callback=lambda i, t, sample: seen.append((sample / 2 + 0.5).clamp(0, 1))).images
    for k in range(3):
        row = strip[6 * k: 6 * (k + 1)]
        torch.testing.assert_close(row, torch.stack([seen[i][k] for i in (0, 0, 1, 1, 2, 2)]))
        torch.testing.assert_close(row[-1], final[k])  # x_0 of class k ends its row


LOAD_INSTALLED = (
    "import sys, numpy as np, torch\n"
    "from pipelines import ClassConditionalDiffusionPipeline\n"
    "p = ClassConditionalDiffusionPipeline.from_pretrained(sys.argv[1])\n"
)
LOAD_STOCK = (
    "import sys, numpy as np, torch\n"
    "sys.modules['pipelines'] = None  # as if this project were not installed\n"
    "from diffusers import DiffusionPipeline\n"
    "p = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
    "assert type(p).__module__ != 'pipelines.pipeline_ddpm'\n"
)
SAMPLE = "np.save(sys.argv[2], p([0, 'c3'], num_inference_steps=3, guidance_scale=2.0, " \
         "generator=torch.Generator().manual_seed(0), output_type='np').images)\n"


@pytest.mark.parametrize("loader", [LOAD_INSTALLED, LOAD_STOCK], ids=["installed", "stock-diffusers"])
def test_exported_pipeline_loads_in_a_new_process(tmp_path, loader):
    from pipelines.exports import save_pipeline

    pipe = tiny_pipeline()
    expected = pipe([0, "c3"], num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                    output_type="np").images
    save_pipeline(pipe, tmp_path / "pipe")
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    subprocess.run([sys.executable, "-c", loader + SAMPLE, str(tmp_path / "pipe"), str(tmp_path / "out.npy")],
                   check=True, cwd=tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpm") / "run"
    assert run_script("train_ddpm", DDPMConfig, out, TINY) == 0
    return out


def test_short_run_lowers_the_loss_and_writes_everything(finished_run):
    out = finished_run
    for name in ("config.yaml", "grids/epoch_001.png", "grids/final.png", "noise_schedule.png", "loss_curve.png",
                 "denoising_strip.png", "one_per_class.png", "class_0_samples.png", "pipeline/pipeline.py",
                 "pipeline/scheduler/scheduler_config.json"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm"} <= set(records[0])
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    assert [p.name for p in list_checkpoints(out)] == ["step_000000008", "step_000000016"]
    pipe = ClassConditionalDiffusionPipeline.from_pretrained(out / "pipeline")
    assert pipe.class_names[0] == "class_0" and pipe.unet.config.num_class_embeds == 11
    assert (pipe.config.default_steps, pipe.config.default_guidance) == (2, 2.0)  # the training grids' sampler
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # diffusion.sample_scheduler's default


def test_same_seed_same_run(finished_run, tmp_path):
    again = tmp_path / "again"
    assert run_script("train_ddpm", DDPMConfig, again, TINY) == 0
    assert (again / "grids" / "final.png").read_bytes() == (finished_run / "grids" / "final.png").read_bytes()
    assert_same_tensors(load_safetensors_dir(again / "pipeline"), load_safetensors_dir(finished_run / "pipeline"))


def test_resume_equals_uninterrupted_ema_included(finished_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(finished_run, resumed)
    shutil.rmtree(resumed / "pipeline")
    shutil.rmtree(resumed / "checkpoints" / "step_000000016")
    kept = file_stamp(resumed / "checkpoints" / "step_000000008" / "training_state.json")
    assert run_script("train_ddpm", DDPMConfig, resumed, TINY, "--resume", "latest") == 0
    # Continued from step 8 (its checkpoint untouched, not rewritten by a run from the start) and logged steps
    # 9-16 once: the records the first run logged after step 8 are replaced, so the log is the uninterrupted one.
    assert file_stamp(resumed / "checkpoints" / "step_000000008" / "training_state.json") == kept
    assert (resumed / "stats.jsonl").read_text() == (finished_run / "stats.jsonl").read_text()
    # The exported U-Net holds the EMA weights, so equality covers the EMA as well as the live weights.
    assert_same_tensors(load_safetensors_dir(resumed / "pipeline"), load_safetensors_dir(finished_run / "pipeline"))
    # The U-Net, AdamW, the LR schedule, the EMA, the noise generator and the RNG state.
    assert_same_state(checkpoint_state(resumed / "checkpoints" / "step_000000016"),
                      checkpoint_state(finished_run / "checkpoints" / "step_000000016"))


def test_a_checkpoint_without_the_noise_generator_still_resumes_and_says_so(finished_run, tmp_path, caplog):
    """Checkpoints written before the training noise had its own generator: they resume, with a warning."""
    from safetensors.torch import load_file, save_file

    resumed = tmp_path / "resumed"
    shutil.copytree(finished_run, resumed)
    shutil.rmtree(resumed / "pipeline")
    shutil.rmtree(resumed / "checkpoints" / "step_000000016")
    extra = resumed / "checkpoints" / "step_000000008" / "extra.safetensors"
    tensors = load_file(str(extra))
    del tensors["noise_rng"]
    save_file(tensors, str(extra))
    with caplog.at_level("WARNING", logger="pipelines"):
        assert run_script("train_ddpm", DDPMConfig, resumed, TINY, "--resume", "latest") == 0
    assert "holds no training-noise generator state" in caplog.text
    assert logged_steps(resumed)[-2:] == [12, 16]


@pytest.mark.parametrize("options", [
    ["diffusion.prediction_type=v_prediction", "diffusion.snr_gamma=5.0", "diffusion.beta_schedule=squaredcos_cap_v2",
     "optim.schedule=onecycle", "train.gradient_accumulation_steps=2", "diffusion.label_dropout=0",
     "diffusion.sample_scheduler=dpmsolver"],
    ["data.pad_to=32", "optim.schedule=constant", "optim.max_grad_norm=null"],
], ids=["v-minsnr-cosine-onecycle-accum", "padded-constant-noclip"])
def test_training_options_run(tmp_path, options, monkeypatch):
    from pipelines.losses import DiffusionObjective

    objective = DiffusionObjective.__call__
    seen = []

    def spy(self, model, x0, labels, draw):
        seen.append((self.prediction_type, self.snr_gamma))
        return objective(self, model, x0, labels, draw)

    monkeypatch.setattr(DiffusionObjective, "__call__", spy)
    out = tmp_path / "run"
    assert run_script("train_ddpm", DDPMConfig, out, TINY + ["train.epochs=1"] + options) == 0
    v = "diffusion.prediction_type=v_prediction" in options
    assert set(seen) == {("v_prediction" if v else "epsilon", 5.0 if v else None)}  # the objective trained
    accumulation = 2 if "train.gradient_accumulation_steps=2" in options else 1
    assert len(seen) == 256 // 32  # every batch of the epoch once ...
    steps = 256 // 32 // accumulation  # ... in this many optimizer steps
    assert logged_steps(out)[-1] == steps
    optimizer = checkpoint_state(list_checkpoints(out)[-1])["optimizer.bin"]
    assert {int(s["step"]) for s in optimizer["state"].values()} == {steps}  # AdamW's own count
    pipe = ClassConditionalDiffusionPipeline.from_pretrained(out / "pipeline")
    images = pipe([1], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 28, 28, 1)
    # the configured sampler is the export's, on the training schedule (cosine here)
    expected = "DPMSolverMultistepScheduler" if "diffusion.sample_scheduler=dpmsolver" in options else "DDIMScheduler"
    assert type(pipe.scheduler).__name__ == expected
    assert pipe.scheduler.config.beta_schedule == ("squaredcos_cap_v2" if expected != "DDIMScheduler" else "linear")


def test_two_processes_of_batch_b_train_the_weights_one_process_of_batch_2b_trains(tmp_path):
    """DDP on CPU (gloo): each process keeps its rows of the global batch's data and noise, so 2 x 16 is 1 x 32
    up to the order of float sums (the all-reduce adds the two halves' gradients apart); only rank 0 writes."""
    common = [*TINY, "train.epochs=1", "log.every_steps=1", "log.wandb=disabled"]
    one = tmp_path / "one"
    assert run_script("train_ddpm", DDPMConfig, one, common) == 0
    two = tmp_path / "two"
    result = launch(tmp_path, ["--multi_gpu", "--num_processes", "2"],
                    [str(ROOT / "train_ddpm.py"), f"output_dir={two}", *common, "train.batch_size=16"])
    assert result.returncode == 0, result.report
    assert result.stdout.count("done: 8 steps") == 1
    assert [p.name for p in list_checkpoints(two)] == ["step_000000008"]
    curves = [[json.loads(line)["loss"] for line in (run / "stats.jsonl").read_text().splitlines()]
              for run in (one, two)]
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-4)
    # 8 Adam steps of lr <= 2e-3 move a weight by up to ~1.6e-2; rounding differences stay three orders below.
    # Attention's key bias has a true gradient of zero (softmax ignores it): its gradient is rounding noise that
    # Adam scales to steps of ~lr, so it may drift by the summed learning rates.
    drift = sum(json.loads(line)["lr"] for line in (one / "stats.jsonl").read_text().splitlines())
    a, b = load_safetensors_dir(one / "pipeline"), load_safetensors_dir(two / "pipeline")
    assert a.keys() == b.keys()
    for key in a:
        loose = key.endswith("to_k.bias")
        torch.testing.assert_close(b[key], a[key], atol=drift if loose else 2e-5, rtol=0 if loose else 1e-4,
                                   msg=lambda m: f"{key}: {m}")
    ClassConditionalDiffusionPipeline.from_pretrained(str(two / "pipeline"))


@pytest.mark.parametrize("schedule", ["constant", "onecycle"])
def test_scale_lr_multiplies_the_rate_by_processes_times_accumulation(schedule, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_script("train_ddpm", DDPMConfig, out, TINY + [
        "train.max_steps=2", "train.gradient_accumulation_steps=2", "optim.scale_lr=true", "optim.lr=1e-3",
        f"optim.schedule={schedule}", "optim.warmup_steps=0", "log.every_steps=1"]) == 0
    printed = capsys.readouterr().out
    assert "x accumulation 2 = global batch" in printed and "lr=0.002 (scaled x2 by optim.scale_lr)" in printed
    if schedule == "constant":
        assert json.loads((out / "stats.jsonl").read_text().splitlines()[0])["lr"] == pytest.approx(2e-3)
