"""The conditional GAN: models, pipeline export, and train_cgan.py end to end on synthetic data."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipelines import CGANDiscriminator, CGANGenerator, CGANPipeline
from pipelines.config import CGANConfig, ConfigError, load_config
from pipelines.gan import GANStep, build_cgan, make_optimizers, paired_labels
from pipelines.losses import gan_loss, gradient_penalty, mode_seeking_penalty
from pipelines.models.cgan import class_feature_std
from pipelines.checkpoints import list_checkpoints
from pipelines.loop import NonFiniteGuard
from trainer_utils import (
    ROOT, assert_same_state, assert_same_tensors, checkpoint_state, file_stamp, launch, load_safetensors_dir,
    logged_steps, run_script,
)

TINY = ["data.name=synthetic", "data.synthetic_size=256", "model.base_channels=8", "model.latent_dim=16",
        "model.label_emb_dim=8", "train.batch_size=32", "train.epochs=2", "log.every_steps=4"]


@pytest.mark.parametrize("arch", ["transposed_conv", "upsample_conv"])
@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
@pytest.mark.parametrize("norm,conditioning", [("batch", "label_map"), ("spectral", "projection")])
def test_shapes(arch, size, channels, norm, conditioning):
    # eval: BatchNorm's running statistics (batch statistics of equal rows would amplify rounding by 1 / sqrt(eps))
    g = CGANGenerator(arch=arch, image_size=size, channels=channels, base_channels=8, latent_dim=16).eval()
    d = CGANDiscriminator(arch=arch, image_size=size, channels=channels, base_channels=8, norm=norm,
                          conditioning=conditioning)
    labels = torch.tensor([0, 3, 9])
    images = g(g.sample_noise(1).expand(3, -1), labels)
    assert images.shape == (3, channels, size, size)
    # One code, three labels: the generator draws from the label, not from the noise alone. (Equal inputs
    # differ by ~1e-7 across a batch's rows, the kernels' rounding; a label moves some pixel by > 0.1.)
    for a, b in ((0, 1), (1, 2)):
        assert not torch.allclose(images[a], images[b], atol=1e-4), (a, b)
    assert d(images, labels).shape == (3,)


def test_discriminator_uses_the_label():
    torch.manual_seed(0)
    d = CGANDiscriminator(base_channels=8).eval()
    x = torch.randn(2, 1, 28, 28)
    assert not torch.allclose(d(x, torch.tensor([0, 0])), d(x, torch.tensor([5, 5])))


def test_class_feature_std_is_the_spread_within_each_class():
    h = torch.tensor([[0.0, 0.0], [2.0, 4.0], [5.0, 5.0], [1.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 2, 2])
    got = class_feature_std(h, labels, num_classes=4).squeeze(1)
    # class 0: per-feature unbiased std sqrt(2) and sqrt(8); class 1 alone and class 2 identical: spread 0
    expected = torch.tensor([(2 ** 0.5 + 8 ** 0.5) / 2] * 2 + [0.0, 0.0, 0.0])
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)


def test_discriminator_with_class_std_tells_a_collapsed_batch_from_a_varied_one():
    torch.manual_seed(0)
    d = CGANDiscriminator(base_channels=8, norm="spectral", conditioning="projection", class_std=True).eval()
    labels = torch.tensor([3] * 8)
    varied = torch.rand(8, 1, 28, 28) * 2 - 1
    collapsed = varied[:1].expand(8, -1, -1, -1)
    torch.nn.init.constant_(d.head.parametrizations.weight.original[:, -1:], 5.0)  # weight on the spread input only
    torch.nn.init.zeros_(d.head.parametrizations.weight.original[:, :-1])
    assert (d(varied, labels) > d(collapsed, labels)).all()  # same first image, different batch companions
    assert d.head.in_features == CGANDiscriminator(base_channels=8).head.in_features + 1


@pytest.mark.parametrize("noise", ["normal", "uniform"])
def test_noise_is_seeded_and_in_range(noise):
    g = CGANGenerator(noise=noise, latent_dim=1000)
    a = g.sample_noise(4, torch.Generator().manual_seed(1))
    b = g.sample_noise(4, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    if noise == "uniform":
        assert a.min() >= -1 and a.max() <= 1 and a.std() < 0.7  # U[-1, 1] has std 0.577
    else:
        assert a.min() < -2 and 0.9 < a.std() < 1.1


def test_bad_arch_and_size_are_rejected():
    with pytest.raises(ValueError, match="transposed_conv, upsample_conv"):
        CGANGenerator(arch="dcgan")
    with pytest.raises(ValueError, match="multiple of 4"):
        CGANGenerator(image_size=30)


def test_pipeline_labels_by_name_and_range_errors():
    pipe = CGANPipeline(model=CGANGenerator(base_channels=8).eval(), class_names=[f"c{i}" for i in range(10)])
    out = pipe(["c2", 7], generator=torch.Generator().manual_seed(0), output_type="np").images
    # The generator's [-1, 1] images for labels 2 and 7 from the same seed, as [0, 1] NHWC float32.
    with torch.no_grad():
        direct = pipe.model(pipe.model.sample_noise(2, torch.Generator().manual_seed(0)), torch.tensor([2, 7]))
    assert out.shape == (2, 28, 28, 1) and out.dtype == np.float32
    np.testing.assert_array_equal(out, (direct / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    with pytest.raises(ValueError, match="out of range; valid labels are 0..9"):
        pipe([10])
    with pytest.raises(ValueError, match="unknown class name 'shoe'"):
        pipe(["shoe"])


def test_pipeline_round_trip_in_a_new_process(tmp_path):
    torch.manual_seed(0)
    pipe = CGANPipeline(model=CGANGenerator(base_channels=8, noise="uniform").eval(), class_names=list("abcdefghij"))
    expected = pipe([0, 4, 9], generator=torch.Generator().manual_seed(3), output_type="np").images
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "model" / "diffusion_pytorch_model.safetensors").exists()
    code = (
        "import sys, numpy as np, torch\n"
        "from pipelines import CGANPipeline\n"
        "p = CGANPipeline.from_pretrained(sys.argv[1])\n"
        "np.save(sys.argv[2], p([0, 4, 9], generator=torch.Generator().manual_seed(3), output_type='np').images)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "pipe"), str(tmp_path / "out.npy")], check=True,
                   cwd=tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


@pytest.mark.parametrize("old,new", [("report_a", "transposed_conv"), ("notes_e", "upsample_conv")])
def test_an_export_under_the_old_architecture_name_loads_and_is_saved_under_the_new(old, new, tmp_path):
    torch.manual_seed(0)
    pipe = CGANPipeline(model=CGANGenerator(arch=new, base_channels=8).eval(), class_names=list("abcdefghij"))
    expected = pipe([0, 4, 9], generator=torch.Generator().manual_seed(3), output_type="np").images
    pipe.save_pretrained(tmp_path / "old")
    config = tmp_path / "old" / "model" / "config.json"
    config.write_text(config.read_text().replace(f'"{new}"', f'"{old}"'))  # as exports were written before

    loaded = CGANPipeline.from_pretrained(tmp_path / "old")
    np.testing.assert_array_equal(loaded([0, 4, 9], generator=torch.Generator().manual_seed(3), output_type="np").images,
                                  expected)
    loaded.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "model" / "config.json").read_text())["arch"] == new


@pytest.mark.parametrize("fused", [True, False], ids=["fused_on_the_device", "unfused_by_a_host_sync"])
def test_nonfinite_loss_skips_the_step_and_stops_after_the_limit(fused):
    from accelerate import Accelerator

    g, d = CGANGenerator(base_channels=8), CGANDiscriminator(base_channels=8)
    acc = Accelerator(cpu=True)
    nan_loss = gan_loss("bce")._replace(discriminator=lambda r, f: (r.mean() + f.mean()) * float("nan"))
    opt_g, opt_d = torch.optim.Adam(g.parameters(), fused=fused), torch.optim.Adam(d.parameters(), fused=fused)
    guard = NonFiniteGuard(limit=3, accelerator=acc)
    step = GANStep(accelerator=acc, generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d, loss=nan_loss,
                   guard=guard)
    before = [p.clone() for p in [*d.parameters(), *g.parameters()]]
    x, y = torch.rand(4, 1, 28, 28) * 2 - 1, torch.arange(4)
    step(0, x, y)
    step(1, x, y)
    assert guard.read() == 2  # read at log steps: 2 skipped, fewer than 3 in a row
    assert all(torch.equal(a, b) for a, b in zip(before, [*d.parameters(), *g.parameters()]))
    assert all(not opt.state or int(next(iter(opt.state.values()))["step"]) == 0 for opt in (opt_d, opt_g))
    step(2, x, y)
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row"):
        guard.read()


def test_the_ema_of_a_skipped_step_stays_and_otherwise_matches_diffusers_ema_step():
    from pipelines.ema import ema_step, make_ema

    torch.manual_seed(0)
    g = CGANGenerator(base_channels=8)
    ours, theirs = make_ema(g, 0.9, torch.device("cpu")), make_ema(g, 0.9, torch.device("cpu"))
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
    kept = [s.clone() for s in ours.shadow_params]
    ema_step(ours, g.parameters(), torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(kept, ours.shadow_params))
    ema_step(ours, g.parameters(), torch.tensor(0.0))
    theirs.optimization_step = 1  # ours counted the skipped step too
    theirs.step(g.parameters())
    for a, b in zip(ours.shadow_params, theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_mode_seeking_pairs_share_labels_and_penalise_equal_images():
    assert paired_labels(torch.tensor([3, 1, 4, 1, 5])).tolist() == [3, 1, 3, 1, 5]
    z = torch.tensor([[0.0], [0.0], [2.0], [2.0]])  # mean |z1 - z2| = 2
    images = torch.tensor([[1.0], [0.0], [0.0], [0.0]])  # mean |G1 - G2| = 0.5
    assert mode_seeking_penalty(images, z).item() == pytest.approx(1 / (0.25 + 1e-5))
    same = torch.zeros(4, 1)
    assert mode_seeking_penalty(same, z).item() == pytest.approx(1e5)  # a collapsed pair costs the most
    with pytest.raises(ConfigError, match="loss.mode_seeking=-1.0: must be >= 0"):
        load_config(CGANConfig, None, ["loss.mode_seeking=-1.0"])


def test_mode_seeking_makes_codes_of_one_class_differ_more():
    """From the same start and batches, the mode-seeking term spreads G(z1, y) and G(z2, y) further apart."""
    from accelerate import Accelerator

    def spread_after_training(weight: float) -> float:
        torch.manual_seed(0)
        g, d = CGANGenerator(base_channels=8, latent_dim=16), CGANDiscriminator(base_channels=8)
        opt_g, opt_d = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
        step = GANStep(accelerator=Accelerator(cpu=True), generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d,
                       loss=gan_loss("hinge"), guard=NonFiniteGuard(limit=3), mode_seeking=weight)
        data = torch.Generator().manual_seed(1)
        for i in range(15):
            step(i, torch.rand(16, 1, 28, 28, generator=data) * 2 - 1, torch.randint(0, 10, (16,), generator=data))
        g.eval()
        with torch.no_grad():
            codes = g.sample_noise(64, torch.Generator().manual_seed(2))
            labels = torch.arange(10).repeat(7)[:32].repeat(2)
            images = g(codes, labels)
        return (images[:32] - images[32:]).abs().mean().item()

    assert spread_after_training(5.0) > 1.2 * spread_after_training(0.0)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cgan") / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY + ["train.ema_decay=0.9"]) == 0
    return out


def test_short_run_writes_grids_checkpoints_and_pipeline(finished_run):
    out = finished_run
    for name in ("config.yaml", "stats.jsonl", "grids/epoch_001.png", "grids/epoch_002.png", "grids/final.png",
                 "latent_interpolation.png", "class_interpolation.png", "pipeline/model_index.json"):
        assert (out / name).exists(), name
    assert [p.name for p in list_checkpoints(out)] == ["step_000000008", "step_000000016"]
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert {"loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g", "lr_g", "lr_d"} <= set(records[0])
    assert records[0]["loss_d"] != records[-1]["loss_d"]
    # The discriminator learns to tell real from fake: D(real) - D(fake) grows from about 0.
    assert records[-1]["d_real"] - records[-1]["d_fake"] > records[0]["d_real"] - records[0]["d_fake"]
    pipe = CGANPipeline.from_pretrained(out / "pipeline")
    images = pipe(list(range(10)), generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (10, 1, 28, 28)


def test_same_seed_gives_identical_grids(finished_run, tmp_path):
    again = tmp_path / "again"
    assert run_script("train_cgan", CGANConfig, again, TINY + ["train.ema_decay=0.9"]) == 0
    assert (again / "grids" / "final.png").read_bytes() == (finished_run / "grids" / "final.png").read_bytes()
    assert_same_tensors(load_safetensors_dir(again / "pipeline"), load_safetensors_dir(finished_run / "pipeline"))


def test_resume_from_mid_run_checkpoint_equals_uninterrupted(finished_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(finished_run, resumed)
    shutil.rmtree(resumed / "pipeline")
    shutil.rmtree(resumed / "checkpoints" / "step_000000016")  # as if killed during epoch 2
    kept = file_stamp(resumed / "checkpoints" / "step_000000008" / "training_state.json")
    assert run_script("train_cgan", CGANConfig, resumed, TINY + ["train.ema_decay=0.9"], "--resume", "latest") == 0
    # Continued from step 8 (its checkpoint untouched, not rewritten by a run from the start) and logged steps
    # 9-16 once: the records the first run logged after step 8 are replaced, so the log is the uninterrupted one.
    assert file_stamp(resumed / "checkpoints" / "step_000000008" / "training_state.json") == kept
    assert (resumed / "stats.jsonl").read_text() == (finished_run / "stats.jsonl").read_text()
    assert_same_tensors(load_safetensors_dir(resumed / "pipeline"), load_safetensors_dir(finished_run / "pipeline"))
    # Both networks, both optimizers, the EMA and the RNG state.
    assert_same_state(checkpoint_state(resumed / "checkpoints" / "step_000000016"),
                      checkpoint_state(finished_run / "checkpoints" / "step_000000016"))


def test_a_constant_rate_checkpoint_resumed_with_a_schedule_says_so_and_is_kept(finished_run, tmp_path, capsys):
    resumed = tmp_path / "resumed"
    shutil.copytree(finished_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000000016")
    overrides = TINY + ["train.ema_decay=0.9", "optim.schedule=linear", "optim.decay_start=0.5"]
    assert run_script("train_cgan", CGANConfig, resumed, overrides, "--resume", "latest") != 0
    assert "optim.schedule: 'constant' -> 'linear'" in capsys.readouterr().err  # another training: refused
    # Accepted on purpose, the checkpoint still cannot give the schedules their state, and says why.
    assert run_script("train_cgan", CGANConfig, resumed, overrides, "--resume", "latest",
                      "--accept-config-changes") != 0
    err = capsys.readouterr().err
    assert "holds 0 LR schedule(s) but this run has 2" in err and "optim.schedule=constant" in err, err
    assert "corrupt" not in err and (resumed / "checkpoints" / "step_000000008" / "training_state.json").is_file()


def test_existing_run_dir_is_not_overwritten_without_asking(finished_run, capsys):
    before = (finished_run / "stats.jsonl").read_text()
    assert run_script("train_cgan", CGANConfig, finished_run, TINY) == 2
    assert "--resume latest" in capsys.readouterr().err
    assert (finished_run / "stats.jsonl").read_text() == before


def test_wgan_gp_with_critic_steps_runs(tmp_path):
    out = tmp_path / "wgan"
    overrides = TINY + ["loss.name=wgan_gp", "loss.critic_steps=2", "train.epochs=1", "model.arch=upsample_conv",
                        "model.d_norm=spectral", "model.d_conditioning=projection", "model.d_class_std=true"]
    assert run_script("train_cgan", CGANConfig, out, overrides) == 0
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert records[0]["lr_d"] == 1e-4  # the seeds' WGAN-GP learning rate
    assert (out / "pipeline" / "model_index.json").exists()


def test_wgan_gp_steps_the_critic_every_call_and_adds_the_penalty():
    """critic_steps=5: D steps on each of 10 calls, G on calls 5 and 10; loss_d = critic loss + lambda * GP."""
    from accelerate import Accelerator

    cfg = load_config(CGANConfig, None, TINY + ["loss.name=wgan_gp", "loss.critic_steps=5", "loss.gp_weight=10"])
    torch.manual_seed(0)
    g, d = build_cgan(cfg, num_classes=10, channels=1, image_size=28)
    g0, d0 = copy.deepcopy(g), copy.deepcopy(d)  # the untrained pair, for the loss by hand
    opt_g, opt_d = make_optimizers(cfg, g, d, torch.device("cpu"))
    counts = {"g": 0, "d": 0}
    opt_g.register_step_post_hook(lambda *_: counts.__setitem__("g", counts["g"] + 1))
    opt_d.register_step_post_hook(lambda *_: counts.__setitem__("d", counts["d"] + 1))
    loss = gan_loss(cfg.loss.name)
    step = GANStep(accelerator=Accelerator(cpu=True), generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d, loss=loss,
                   gp_weight=cfg.loss.gp_weight, critic_steps=cfg.loss.critic_steps, guard=NonFiniteGuard(limit=3))
    data = torch.Generator().manual_seed(1)
    real, labels = torch.rand(8, 1, 28, 28, generator=data) * 2 - 1, torch.randint(0, 10, (8,), generator=data)

    torch.manual_seed(2)
    first = step(0, real, labels)
    # By hand from the same global RNG state: the step draws z, then the penalty's interpolation weights.
    torch.manual_seed(2)
    fake = g0(g0.sample_noise(8), labels)
    critic = loss.discriminator(d0(real, labels), d0(fake.detach(), labels))
    penalty = gradient_penalty(d0, real, fake, labels)
    assert penalty.item() > 0.1  # so that leaving it out would show
    torch.testing.assert_close(first["loss_d"], (critic + 10.0 * penalty).detach())

    metrics = [first] + [step(i, real, labels) for i in range(1, 10)]
    assert [i for i, m in enumerate(metrics) if "loss_g" in m] == [4, 9]  # the 5th and 10th calls
    assert counts == {"d": 10, "g": 2}


def test_accelerate_launch_runs_the_script(tmp_path):
    out = tmp_path / "launched"
    result = launch(tmp_path, ["--num_processes", "1", "--cpu"],
                    [str(ROOT / "train_cgan.py"), f"output_dir={out}", "log.wandb=offline", *TINY, "train.epochs=1"])
    assert result.returncode == 0, result.report
    assert (out / "pipeline" / "model_index.json").exists()
    assert list((out / "wandb").glob("offline-run-*")), "an offline W&B run is written locally"


@pytest.mark.slow  # the fast suite trains the cGAN on 2 processes in test_faults.py's SIGTERM test
def test_two_processes_with_batch_b_follow_one_process_with_batch_2b(tmp_path):
    """DDP on CPU (gloo): the global batch is split, files are written once, the loss curve matches.

    Not weight for weight: BatchNorm normalises each process's half batch by its own statistics."""
    common = [*TINY, "train.epochs=1", "log.every_steps=1", "log.wandb=disabled"]
    one = tmp_path / "one"
    assert run_script("train_cgan", CGANConfig, one, common + ["train.batch_size=32"]) == 0
    two = tmp_path / "two"
    result = launch(tmp_path, ["--multi_gpu", "--num_processes", "2"],
                    [str(ROOT / "train_cgan.py"), f"output_dir={two}", *common, "train.batch_size=16"])
    assert result.returncode == 0, result.report
    assert result.stdout.count("done: 8 steps") == 1  # 256 images / (2 x 16) per step; one process reports
    curves = [[json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [r["step"] for r in curves[0]] == [r["step"] for r in curves[1]] == list(range(1, 9))
    # Same weights, same global batches; only the per-process noise draws and BatchNorm statistics differ.
    first = [c[0]["loss_d"] for c in curves]
    assert first[1] == pytest.approx(first[0], rel=0.05)
    means = [np.mean([r["loss_d"] for r in c]) for c in curves]
    assert means[1] == pytest.approx(means[0], rel=0.15)
    assert [p.name for p in list_checkpoints(two)] == ["step_000000008"]


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
@pytest.mark.parametrize("script", ["train_cgan", "train_ddpm"])
def test_mixed_precision_sets_the_dtype_of_the_training_convolutions(script, precision, dtype, tmp_path,
                                                                     monkeypatch):
    """bf16 autocast on CPU: every model's convolutions compute in bf16 while training; with "no", in float32."""
    import pipelines.diffusion
    import pipelines.gan
    from pipelines.config import DDPMConfig
    from test_ddpm import TINY as DDPM_TINY

    seen: dict[str, set] = {}

    def watched(name: str, model: torch.nn.Module) -> torch.nn.Module:
        def hook(module, inputs, output):
            if module.training:  # the training forward, not the grids' eval-mode sampling
                seen.setdefault(name, set()).add(output.dtype)

        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                module.register_forward_hook(hook)
        return model

    # The families call the builders by the names they import, so patch them there.
    build_cgan, build_unet = pipelines.gan.build_cgan, pipelines.diffusion.build_unet
    monkeypatch.setattr(pipelines.gan, "build_cgan", lambda *a, **k: tuple(
        watched(name, model) for name, model in zip(("G", "D"), build_cgan(*a, **k))))
    monkeypatch.setattr(pipelines.diffusion, "build_unet", lambda *a, **k: watched("unet", build_unet(*a, **k)))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)  # "no" defers to the launcher's setting

    cls, overrides = (CGANConfig, TINY) if script == "train_cgan" else (DDPMConfig, DDPM_TINY)
    out = tmp_path / precision
    assert run_script(script, cls, out, overrides + ["train.epochs=1", f"train.mixed_precision={precision}"]) == 0
    assert seen == ({"G": {dtype}, "D": {dtype}} if script == "train_cgan" else {"unet": {dtype}})
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert all(np.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    assert (out / "pipeline" / "model_index.json").exists()


def test_compile_with_the_gradient_penalty_is_refused():
    with pytest.raises(ConfigError, match="train.compile=true with loss.name=wgan_gp"):
        load_config(CGANConfig, overrides=["loss.name=wgan_gp", "train.compile=true"])


@pytest.mark.parametrize("script", ["train_cgan", "train_ddpm"])
def test_channels_last_trains_the_same_model(script, tmp_path, monkeypatch):
    from pipelines.config import DDPMConfig
    from test_ddpm import TINY as DDPM_TINY

    cls, overrides = (CGANConfig, TINY) if script == "train_cgan" else (DDPMConfig, DDPM_TINY)
    overrides = overrides + ["train.epochs=1", "log.every_steps=1"]
    # the memory format of every k x k convolution's weight as the training's convolutions see it
    nhwc_weights = []
    conv = torch.nn.Conv2d._conv_forward

    def spy(self, input, weight, bias):
        if weight.shape[-1] > 1 and weight.shape[1] > 1 and weight.requires_grad:  # else both formats are one
            nhwc_weights.append(weight.is_contiguous(memory_format=torch.channels_last))
        return conv(self, input, weight, bias)

    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", spy)
    curves, formats = [], []
    for name, extra in (("default", []), ("nhwc", ["train.channels_last=true"])):
        nhwc_weights.clear()
        assert run_script(script, cls, tmp_path / name, overrides + extra) == 0
        curves.append([json.loads(line) for line in (tmp_path / name / "stats.jsonl").read_text().splitlines()])
        formats.append(set(nhwc_weights))
    assert formats == [{False}, {True}]  # the option changes the memory format of every trained convolution
    key = "loss_d" if script == "train_cgan" else "loss"
    # Same arithmetic in another memory order: equal up to float rounding, step after step.
    assert [r[key] for r in curves[1]] == pytest.approx([r[key] for r in curves[0]], rel=1e-3)
    a, b = (load_safetensors_dir(tmp_path / n / "pipeline") for n in ("default", "nhwc"))
    assert a.keys() == b.keys()
    # safetensors stores row-major bytes under the logical shape, so equal shapes, dtypes and values mean the
    # export is the standard NCHW one whatever the option. NHWC kernels on CPU add the same products in
    # another order: float rounding (~1e-7 here), carried along by 8 optimizer steps, hence 1e-5. Except
    # where the true gradient is zero (a bias just before BatchNorm, and with it the running mean; attention's
    # key bias, which softmax ignores): the gradient is rounding noise that Adam scales to steps of ~lr, so
    # those may drift by up to lr per step.
    drift = sum(r["lr_g" if script == "train_cgan" else "lr"] for r in curves[0])
    null_gradient = ("fc.0.bias", "net.0.bias", "running_mean", "to_k.bias")
    for key in a:  # assert_close also checks shape and dtype
        loose = key.endswith(null_gradient)
        torch.testing.assert_close(b[key], a[key], atol=drift if loose else 1e-5, rtol=0 if loose else 1e-4,
                                   msg=lambda m: f"{key}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["model.d_norm=spectral", "model.d_conditioning=projection", "loss.name=hinge"]],
                         ids=["batchnorm", "spectral_norm"])  # spectral norm's power iteration under compile
def test_compiled_run_resumes_without_compile(extra, tmp_path, capsys):
    """torch.compile is applied in place: checkpoints carry the same keys, so a run can switch it off."""
    from torch._dynamo.utils import counters

    compiled = tmp_path / "compiled"
    counters.clear()
    assert run_script("train_cgan", CGANConfig, compiled, TINY + extra + ["train.compile=true"]) == 0
    assert counters["stats"]["unique_graphs"] > 0  # the networks were compiled
    plain = tmp_path / "plain"
    assert run_script("train_cgan", CGANConfig, plain, TINY + extra) == 0
    assert load_safetensors_dir(compiled / "pipeline").keys() == load_safetensors_dir(plain / "pipeline").keys()
    finished = load_safetensors_dir(compiled / "pipeline")
    shutil.rmtree(compiled / "pipeline")
    shutil.rmtree(list_checkpoints(compiled)[-1])
    counters.clear()
    capsys.readouterr()
    assert run_script("train_cgan", CGANConfig, compiled, TINY + extra, "--resume", "latest") == 0
    assert counters["stats"]["unique_graphs"] == 0  # resumed eagerly
    assert f"resumed from {list_checkpoints(compiled)[0]} at step 8" in capsys.readouterr().out
    last_epoch = json.loads((compiled / "stats.jsonl").read_text().splitlines()[-1])
    assert last_epoch["step"] == 16 and "loss_d" in last_epoch
    # the last epoch trained eagerly from the compiled run's checkpoint ends where the compiled run ended, up to
    # the rounding that compiled kernels change
    resumed = load_safetensors_dir(compiled / "pipeline")
    for key in finished:
        torch.testing.assert_close(resumed[key], finished[key], atol=1e-3, rtol=1e-3, msg=lambda m: f"{key}: {m}")
