"""The modern cGAN options: the residual pair (`model.arch=resnet`), DiffAugment, lazy R1, the EMA's start."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

from pipelines import CGANDiscriminator, CGANGenerator, CGANPipeline
from pipelines.augment import check_policy, color, cutout, diff_augment, translation
from pipelines.config import CGANConfig, ConfigError, load_config
from pipelines.ema import ema_step, make_ema
from pipelines.gan import GANStep, build_cgan, class_interpolation, latent_interpolation, make_lr_schedules
from pipelines.losses import gan_loss, r1_penalty
from pipelines.loop import NonFiniteGuard
from pipelines.models.cgan import ConditionalBatchNorm
from trainer_utils import assert_same_state, assert_same_tensors, checkpoint_state, load_safetensors_dir, run_script

MODERN = ["data.name=synthetic", "data.synthetic_size=256", "model.arch=resnet", "model.base_channels=8",
          "model.latent_dim=16", "model.label_emb_dim=8", "train.batch_size=32", "train.epochs=2", "log.every_steps=4",
          "loss.name=hinge", "loss.diffaugment=[color,translation,cutout]", "loss.r1_gamma=1.0", "loss.r1_every=4",
          "train.ema_decay=0.9", "train.ema_start_step=3", "optim.schedule=linear", "optim.decay_start=0.5"]


def resnet_pair(size=28, channels=1, base=8):
    g = CGANGenerator(arch="resnet", image_size=size, channels=channels, base_channels=base, latent_dim=16,
                      label_emb_dim=8)
    d = CGANDiscriminator(arch="resnet", image_size=size, channels=channels, base_channels=base, label_emb_dim=8,
                          norm="spectral", conditioning="projection")
    return g, d


# ----- the residual networks -----

@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_resnet_shapes_and_labels(size, channels):
    torch.manual_seed(0)
    g, d = resnet_pair(size, channels)
    g.eval()
    # cBN starts as plain BatchNorm; give its gains a value so the class acts in every block, as after training.
    for module in g.modules():
        if isinstance(module, ConditionalBatchNorm):
            torch.nn.init.normal_(module.gain.weight, std=0.5)
    labels = torch.tensor([0, 3, 9])
    images = g(g.sample_noise(1).expand(3, -1), labels)
    assert images.shape == (3, channels, size, size)
    assert images.abs().max() <= 1
    for a, b in ((0, 1), (1, 2)):
        assert not torch.allclose(images[a], images[b], atol=1e-4), (a, b)
    logits = d(images, labels)
    assert logits.shape == (3,)
    assert not torch.allclose(d(images, torch.tensor([5, 5, 5])), logits)  # projection: D reads the label


def test_conditional_batchnorm_starts_as_batchnorm_and_then_scales_each_class():
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm(4, emb_dim=3, momentum=0.1, eps=1e-5)
    x, emb = torch.randn(6, 4, 5, 5), torch.randn(6, 3)
    plain = torch.nn.BatchNorm2d(4, affine=False)(x)
    torch.testing.assert_close(cbn(x, emb), plain)
    with torch.no_grad():
        cbn.gain.weight.copy_(torch.eye(4, 3))
        cbn.bias.weight.fill_(0.5)
    got = cbn(x, emb)
    gain = 1 + torch.cat([emb, torch.zeros(6, 1)], dim=1)  # W_g e: the first 3 channels take e, the 4th 0
    torch.testing.assert_close(got, plain * gain.view(6, 4, 1, 1) + emb.sum(1).view(6, 1, 1, 1) * 0.5)


def test_resnet_discriminator_is_spectral_projection_only():
    with pytest.raises(ValueError, match="arch=resnet has a spectral-norm projection discriminator only"):
        CGANDiscriminator(arch="resnet", norm="batch", conditioning="projection")
    d = CGANDiscriminator(arch="resnet", norm="spectral", conditioning="projection", base_channels=8)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in convs)  # all SN


def test_a_discriminator_saved_with_the_old_spectral_norm_hooks_loads_with_the_same_output(monkeypatch):
    """Checkpoints from before the parametrization form (weight_orig, weight_u, weight_v) still resume."""
    import pipelines.models.cgan as cgan

    torch.manual_seed(0)
    monkeypatch.setattr(cgan, "spectral_norm", torch.nn.utils.spectral_norm)  # the hook form, as before
    old = CGANDiscriminator(norm="spectral", conditioning="projection", base_channels=8)
    monkeypatch.undo()
    x, labels = torch.randn(4, 1, 28, 28), torch.arange(4)
    old(x, labels)  # a training-mode call: one power iteration moves u and v off their initial values
    state = old.state_dict()
    assert "features.0.weight_orig" in state and "head.weight_u" in state
    new = CGANDiscriminator(norm="spectral", conditioning="projection", base_channels=8)
    new.load_state_dict(state)  # strict: every key found a place
    assert "features.0.parametrizations.weight.original" in new.state_dict()
    torch.testing.assert_close(new.eval()(x, labels), old.eval()(x, labels), rtol=0, atol=0)


def test_resnet_config_takes_its_discriminator_by_default_and_refuses_others():
    cfg = load_config(CGANConfig, None, ["model.arch=resnet"])
    assert cfg.model.discriminator() == ("spectral", "projection")
    g, d = build_cgan(cfg, num_classes=10, channels=1, image_size=28)
    assert d.conditioning == "projection" and hasattr(d, "projection")
    seeds = load_config(CGANConfig, None, [])
    assert seeds.model.discriminator() == ("batch", "label_map")  # as before
    with pytest.raises(ConfigError, match="model.arch=resnet .* model.d_norm=batch"):
        load_config(CGANConfig, None, ["model.arch=resnet", "model.d_norm=batch"])


@pytest.mark.parametrize("arch", ["transposed_conv", "resnet"])
def test_d_base_channels_widens_the_discriminator_only(arch):
    overrides = [f"model.arch={arch}", "model.base_channels=8", "model.d_norm=spectral", "model.d_conditioning=projection"]
    g, d = build_cgan(load_config(CGANConfig, None, overrides), num_classes=10, channels=1, image_size=28)
    wide_g, wide_d = build_cgan(load_config(CGANConfig, None, [*overrides, "model.d_base_channels=24"]),
                                num_classes=10, channels=1, image_size=28)
    first_conv = [m for m in wide_d.modules() if isinstance(m, torch.nn.Conv2d)][0]
    assert first_conv.out_channels == 24 and wide_d.projection.embedding_dim == d.projection.embedding_dim * 3
    assert wide_g.config == g.config  # G keeps model.base_channels
    assert wide_d(torch.randn(2, 1, 28, 28), torch.tensor([1, 2])).shape == (2,)
    with pytest.raises(ConfigError, match="model.d_base_channels=0: must be positive or null"):
        load_config(CGANConfig, None, ["model.d_base_channels=0"])


def test_resnet_export_loads_in_a_new_process_with_the_same_images(tmp_path):
    import subprocess
    import sys

    torch.manual_seed(0)
    g, _ = resnet_pair(32, 3)
    pipe = CGANPipeline(model=g.eval(), class_names=list("abcdefghij"))
    expected = pipe([0, 4, 9], generator=torch.Generator().manual_seed(3), output_type="np").images
    pipe.save_pretrained(tmp_path / "pipe")
    code = ("import sys, numpy as np, torch\n"
            "from diffusers import DiffusionPipeline\n"
            "p = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
            "np.save(sys.argv[2], p([0, 4, 9], generator=torch.Generator().manual_seed(3), output_type='np').images)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "pipe"), str(tmp_path / "out.npy")], check=True,
                   cwd=tmp_path)  # outside the repository: the export's own code, as a Hub user loads it
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_resnet_interpolations_start_and_end_where_they_say():
    """Latent rows: class k from code z0 to code z1. Class rows: one code from class k to class k + 1."""
    torch.manual_seed(0)
    g, _ = resnet_pair()
    g.eval()
    for module in g.modules():  # the class acts in every block, as after training
        if isinstance(module, ConditionalBatchNorm):
            torch.nn.init.normal_(module.gain.weight, std=0.5)
    with torch.no_grad():
        latent = latent_interpolation(g, 10, 4, seed=0).view(10, 4, 1, 28, 28)
        classes = class_interpolation(g, 10, 4, seed=0).view(10, 4, 1, 28, 28)
        gen = torch.Generator().manual_seed(0)
        z0, z1 = (g.sample_noise(1, gen) for _ in range(2))
        labels = torch.arange(10)
        torch.testing.assert_close(latent[:, 0], g(z0.expand(10, -1), labels))
        torch.testing.assert_close(latent[:, -1], g(z1.expand(10, -1), labels))
        torch.testing.assert_close(classes[:, 0], g(z0.expand(10, -1), labels))
        torch.testing.assert_close(classes[:, -1], g(z0.expand(10, -1), (labels + 1) % 10))
    assert not torch.allclose(latent[:, 1], latent[:, 0], atol=1e-4)  # and move between them


def test_hierarchical_z_gives_each_block_its_own_chunk_of_z_beside_the_class(tmp_path):
    torch.manual_seed(0)
    g = CGANGenerator(arch="resnet", base_channels=8, latent_dim=16, label_emb_dim=8, hierarchical_z=True).eval()
    assert g.z_split == [6, 5, 5]  # latent_dim // 3 to each block, the rest to the input
    for module in g.modules():
        if isinstance(module, ConditionalBatchNorm):
            torch.nn.init.normal_(module.gain.weight, std=0.5)
    seen = []
    for block in g.blocks:
        block.bn1.register_forward_hook(lambda module, args, out: seen.append(args[1]))
    z, labels = g.sample_noise(3), torch.tensor([0, 3, 9])
    images = g(z, labels)
    emb = g.label_emb(labels)
    torch.testing.assert_close(seen[0], torch.cat([emb, z[:, 6:11]], 1), rtol=0, atol=0)
    torch.testing.assert_close(seen[1], torch.cat([emb, z[:, 11:]], 1), rtol=0, atol=0)
    late = z.clone()
    late[:, 11:] = torch.randn(3, 5)  # only the last block's chunk: the images change
    assert not torch.allclose(g(late, labels), images, atol=1e-4)
    g.save_pretrained(tmp_path / "g")
    loaded = CGANGenerator.from_pretrained(tmp_path / "g").eval()
    assert loaded.config.hierarchical_z and loaded.z_split == [6, 5, 5]
    torch.testing.assert_close(loaded(z, labels), images, rtol=0, atol=0)
    assert class_interpolation(g, 10, 2, seed=0).shape == (20, 1, 28, 28)


def test_hierarchical_z_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="arch='transposed_conv' has none"):
        CGANGenerator(arch="transposed_conv", hierarchical_z=True)
    with pytest.raises(ConfigError, match="model.arch=upsample_conv has none"):
        load_config(CGANConfig, None, ["model.arch=upsample_conv", "model.hierarchical_z=true"])
    with pytest.raises(ConfigError, match="model.latent_dim=2 must be at least 3"):
        load_config(CGANConfig, None, ["model.arch=resnet", "model.hierarchical_z=true", "model.latent_dim=2"])
    cfg = load_config(CGANConfig, None, ["model.arch=resnet", "model.hierarchical_z=true", "model.latent_dim=64"])
    g, _ = build_cgan(cfg, num_classes=10, channels=1, image_size=28)
    assert g.z_split == [22, 21, 21]


# ----- DiffAugment -----

def test_translation_shifts_each_image_by_at_most_the_ratio_and_fills_zeros():
    x = torch.arange(1, 1 + 3 * 2 * 8 * 8, dtype=torch.float).view(3, 2, 8, 8)  # no zero pixel to start with
    out = translation(x, ratio=0.25, generator=torch.Generator().manual_seed(0))
    for img, src in zip(out, x):
        # Find the shift: the output is the input moved by (dy, dx) with zeros where it came from outside.
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(img, shifted(src, dy, dx))]
        assert len(matches) == 1, "each image is one shift of at most 2 = 0.25 x 8 pixels"


def shifted(src: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[i, j] = src[i + dy, j + dx], 0 outside."""
    out = torch.zeros_like(src)
    h, w = src.shape[-2:]
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                out[:, i, j] = src[:, i + dy, j + dx]
    return out


def test_translation_draws_a_shift_per_image():
    x = torch.ones(64, 1, 8, 8)
    out = translation(x, generator=torch.Generator().manual_seed(0))  # ratio 1/8: shifts of -1, 0, 1
    zeros = (out == 0).flatten(1).sum(1)
    assert len(set(zeros.tolist())) > 2  # different shifts leave different borders
    assert zeros.max() <= 8 + 8 - 1  # one row and one column at most


def test_cutout_zeroes_one_square_of_half_the_size_and_keeps_the_rest():
    x = torch.rand(32, 3, 8, 8) + 1  # no zero pixel to start with
    out = cutout(x, generator=torch.Generator().manual_seed(0))
    for img, src in zip(out, x):
        hole = img[0] == 0
        assert (img == 0).all(0).equal(hole) and (img != 0).any(0).equal(~hole)  # all channels alike
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert 0 < len(rows) <= 4 and 0 < len(cols) <= 4  # a 4x4 square, clipped at the border
        assert hole.sum() == len(rows) * len(cols)  # a rectangle, contiguous
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
        assert torch.equal(img[:, ~hole], src[:, ~hole])
    sizes = {int((img[0] == 0).sum()) for img in out}
    assert 16 in sizes and len(sizes) > 1  # whole squares and squares over the edge


def test_color_is_an_affine_change_per_image_and_leaves_grey_saturation_alone():
    x = torch.rand(16, 1, 6, 6) * 2 - 1
    out = color(x, generator=torch.Generator().manual_seed(0))
    for img, src in zip(out, x):
        # brightness b, contrast c about the mean: out = (src + b - m) c + m with m = mean(src) + b
        flat, ref = img.flatten(), src.flatten()
        slope = ((flat - flat.mean()) * (ref - ref.mean())).sum() / (ref - ref.mean()).square().sum()
        assert 0.5 - 1e-4 <= slope <= 1.5 + 1e-4
        torch.testing.assert_close(flat, (ref - ref.mean()) * slope + flat.mean())
    rgb = torch.rand(4, 3, 6, 6)
    spread = lambda t: (t - t.mean(dim=1, keepdim=True)).abs().mean(dim=(1, 2, 3))  # colour away from grey
    ratio = spread(color(rgb, generator=torch.Generator().manual_seed(0))) / spread(rgb)
    assert (ratio - ratio.mean()).abs().max() > 0.1  # saturation and contrast scale each image's colour its own way


@pytest.mark.parametrize("policy", [["color"], ["translation"], ["cutout"], ["color", "translation", "cutout"]])
def test_diffaugment_is_differentiable_and_a_function_of_the_rng(policy):
    x = (torch.rand(4, 3, 8, 8, dtype=torch.double) * 2 - 1).requires_grad_(True)

    def fn(inp):
        return diff_augment(inp, policy, generator=torch.Generator().manual_seed(5))

    assert torch.autograd.gradcheck(fn, (x,))
    assert not torch.equal(fn(x.detach()), x.detach())
    # The same random draw gives the same transform whatever image it meets: real and fake are treated alike.
    # Here: the two batches' outputs are the same affine map and the same pixels moved or cut.
    a, b = torch.rand(4, 3, 8, 8, dtype=torch.double) + 1, torch.rand(4, 3, 8, 8, dtype=torch.double) + 1
    torch.testing.assert_close(fn(a) - fn(b), fn(a - b + 1) - fn(torch.ones_like(a)))
    assert diff_augment(x, [], generator=None) is x


def test_diffaugment_policy_is_validated():
    check_policy(["translation", "cutout"])
    with pytest.raises(ValueError, match="each of color, translation, cutout at most once"):
        check_policy(["flip"])
    with pytest.raises(ConfigError, match="each transform at most once"):
        load_config(CGANConfig, None, ["loss.diffaugment=[cutout,cutout]"])
    with pytest.raises(ConfigError, match="flip"):
        load_config(CGANConfig, None, ["loss.diffaugment=[flip]"])


class Recorder(torch.nn.Module):
    """A discriminator that remembers every batch it is shown."""

    def __init__(self, d):
        super().__init__()
        self.d, self.seen = d, []

    def forward(self, x, labels):
        self.seen.append(x.detach().clone())
        return self.d(x, labels)


def test_every_image_d_sees_real_or_fake_goes_through_the_augmentation():
    from accelerate import Accelerator

    torch.manual_seed(0)
    g, d = resnet_pair()
    d = Recorder(d)
    step = GANStep(accelerator=Accelerator(cpu=True), generator=g, discriminator=d,
                   opt_g=torch.optim.Adam(g.parameters()), opt_d=torch.optim.Adam(d.parameters()),
                   loss=gan_loss("hinge"), guard=NonFiniteGuard(limit=3), augment=("cutout",))
    real = torch.rand(8, 1, 28, 28) + 0.5  # no zero pixel: a cut-out square shows as zeros
    step(0, real, torch.arange(8))
    assert len(d.seen) == 3  # real and fake for D's update, fake for G's
    for i, batch in enumerate(d.seen):
        holes = (batch == 0).flatten(1).sum(1)
        assert (holes >= 7 * 7).all() and (holes <= 14 * 14).all(), (i, holes)  # a 14x14 square, maybe clipped


# ----- R1 -----

def test_r1_by_hand_for_a_linear_and_a_quadratic_critic():
    w = torch.randn(1, 2, 3, 3)
    x = torch.randn(5, 2, 3, 3).requires_grad_(True)
    linear = (x * w).flatten(1).sum(1)  # grad = w for every image
    torch.testing.assert_close(r1_penalty(linear, x), w.square().sum())
    quadratic = x.square().flatten(1).sum(1) / 2  # grad = x
    torch.testing.assert_close(r1_penalty(quadratic, x), x.detach().square().flatten(1).sum(1).mean())


def test_lazy_r1_runs_every_k_steps_and_its_gradient_is_the_scaled_penalty():
    """At an R1 step D moves by the gradient of hinge + gamma / 2 * k * R1 (plain SGD, lr 1, reads it off)."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    g, d = resnet_pair()
    g0, d0 = copy.deepcopy(g), copy.deepcopy(d)
    gamma, every = 3.0, 4
    step = GANStep(accelerator=Accelerator(cpu=True), generator=g, discriminator=d,
                   opt_g=torch.optim.SGD(g.parameters(), lr=0.0), opt_d=torch.optim.SGD(d.parameters(), lr=1.0),
                   loss=gan_loss("hinge"), guard=NonFiniteGuard(limit=3), r1_gamma=gamma, r1_every=every)
    real, labels = torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8)
    torch.manual_seed(1)
    metrics = step(0, real, labels)
    moved = [p0.detach() - p.detach() for p0, p in zip(d0.parameters(), d.parameters())]

    torch.manual_seed(1)  # by hand, from the same draws
    fake = g0(g0.sample_noise(8), labels)
    x = real.clone().requires_grad_(True)
    real_logits = d0(x, labels)
    penalty = r1_penalty(real_logits, x)
    assert penalty.item() > 1e-3  # so that leaving it out would show
    loss = gan_loss("hinge").discriminator(real_logits, d0(fake.detach(), labels)) + gamma / 2 * every * penalty
    grads = torch.autograd.grad(loss, list(d0.parameters()))
    for a, b in zip(moved, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(metrics["r1"], penalty.detach())
    assert [("r1" in step(i, real, labels)) for i in range(1, 9)] == [False, False, False, True] * 2


def test_r1_with_compile_is_refused():
    with pytest.raises(ConfigError, match="loss.r1_gamma=1.0: torch.compile cannot differentiate"):
        load_config(CGANConfig, None, ["train.compile=true", "loss.r1_gamma=1.0"])
    with pytest.raises(ConfigError, match="loss.r1_every=0: must be positive"):
        load_config(CGANConfig, None, ["loss.r1_every=0"])


# ----- EMA start -----

def test_ema_equals_the_weights_until_its_start_step_then_averages():
    torch.manual_seed(0)
    g = CGANGenerator(base_channels=8)
    ema = make_ema(g, 0.99, torch.device("cpu"), start_step=3)
    for i in range(5):
        with torch.no_grad():
            for p in g.parameters():
                p.add_(1.0)
        ema_step(ema, g.parameters(), torch.tensor(0.0))
        same = all(torch.equal(s, p) for s, p in zip(ema.shadow_params, g.parameters()))
        # steps 1-4 copy (diffusers counts the first averaging step after update_after_step + 1)
        assert same == (i < 4), i
    with pytest.raises(ConfigError, match="train.ema_start_step=-1: must be >= 0"):
        load_config(CGANConfig, None, ["train.ema_start_step=-1"])


# ----- learning-rate schedule -----

def test_linear_schedule_holds_the_rates_then_brings_them_to_zero_at_the_last_step():
    cfg = load_config(CGANConfig, None, ["optim.schedule=linear", "optim.decay_start=0.5"])
    params = [torch.nn.Parameter(torch.zeros(1))]
    for processes in (1, 2):
        opt = torch.optim.Adam(params, lr=1e-3)
        [schedule] = make_lr_schedules(cfg, [opt], total_steps=8, num_processes=processes)
        rates = []
        for _ in range(8):
            rates.append(opt.param_groups[0]["lr"])
            for _ in range(processes):  # accelerate steps a prepared schedule once per process each step
                schedule.step()
        assert rates == pytest.approx([1e-3] * 5 + [7.5e-4, 5e-4, 2.5e-4]), processes
        assert opt.param_groups[0]["lr"] == 0.0
    constant = load_config(CGANConfig, None, [])
    assert make_lr_schedules(constant, [torch.optim.Adam(params)], total_steps=8, num_processes=1) == []


def test_schedule_options_are_checked():
    with pytest.raises(ConfigError, match=r"optim.decay_start=1.0: the share of the steps .* in \[0, 1\)"):
        load_config(CGANConfig, None, ["optim.schedule=linear", "optim.decay_start=1.0"])
    with pytest.raises(ConfigError, match="optim.decay_start=0.5 needs optim.schedule=linear"):
        load_config(CGANConfig, None, ["optim.decay_start=0.5"])
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(CGANConfig, None, ["optim.schedule=cosine"])


# ----- end to end -----

@pytest.fixture(scope="module")
def modern_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("modern") / "run"
    assert run_script("train_cgan", CGANConfig, out, MODERN) == 0
    return out


def test_modern_run_trains_logs_r1_and_exports(modern_run):
    import json

    records = [json.loads(line) for line in (modern_run / "stats.jsonl").read_text().splitlines()]
    assert all("r1" in r for r in records)  # every log window of 4 steps holds one R1 step
    # the linear schedule of 16 steps from the middle: full rate to step 8, then down to 0 at step 16
    assert [r["step"] for r in records] == [4, 8, 12, 16]
    for key in ("lr_g", "lr_d"):
        assert [r[key] for r in records] == pytest.approx([2e-4, 2e-4, 1e-4, 0.0]), key
    pipe = CGANPipeline.from_pretrained(modern_run / "pipeline")
    assert pipe.model.config.arch == "resnet"
    assert pipe(list(range(10)), generator=torch.Generator().manual_seed(0), output_type="pt").images.shape == (
        10, 1, 28, 28)


def test_modern_run_resumed_mid_run_equals_uninterrupted(modern_run, tmp_path):
    """The augmentation and R1 draw from the checkpointed RNG: a resumed run is the same run."""
    resumed = tmp_path / "resumed"
    shutil.copytree(modern_run, resumed)
    shutil.rmtree(resumed / "pipeline")
    shutil.rmtree(resumed / "checkpoints" / "step_000000016")
    with open(resumed / "stats.jsonl", "a") as f:
        f.write('{"step": 16, "loss_d": 1.')  # a line cut short by a kill
    assert run_script("train_cgan", CGANConfig, resumed, MODERN, "--resume", "latest") == 0
    assert_same_tensors(load_safetensors_dir(resumed / "pipeline"), load_safetensors_dir(modern_run / "pipeline"))
    # the records of steps 9-16 logged before the interruption are replaced by the resumed run's, not repeated
    assert (resumed / "stats.jsonl").read_text() == (modern_run / "stats.jsonl").read_text()
    assert_same_state(checkpoint_state(resumed / "checkpoints" / "step_000000016"),
                      checkpoint_state(modern_run / "checkpoints" / "step_000000016"))
