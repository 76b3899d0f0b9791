"""pipelines.losses: the four GAN objectives, the WGAN gradient penalty and the diffusion MSE, against hand values."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.losses import GAN_LOSSES, diffusion_loss, gan_loss, gradient_penalty, min_snr_weights

REAL = [2.0, -1.0]  # discriminator logits on real images
FAKE = [0.5, -3.0]  # discriminator logits on generated images


def softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def losses(name: str):
    loss = gan_loss(name)
    real, fake = torch.tensor(REAL), torch.tensor(FAKE)
    return loss.discriminator(real, fake).item(), loss.generator(fake).item()


def test_bce_by_hand():
    d, g = losses("bce")
    # BCE(logit x, target 1) = -log(sigmoid(x)) = log(1 + e^-x); BCE(x, 0) = -log(1 - sigmoid(x)) = log(1 + e^x)
    # D = 1/2 [ mean_r log(1 + e^-r) + mean_f log(1 + e^f) ]
    expected_d = 0.5 * (mean(softplus(-r) for r in REAL) + mean(softplus(f) for f in FAKE))
    # G (non-saturating) = mean_f log(1 + e^-f) = -log D(G(z))
    expected_g = mean(softplus(-f) for f in FAKE)
    assert d == pytest.approx(expected_d, rel=1e-6)
    assert g == pytest.approx(expected_g, rel=1e-6)
    assert d == pytest.approx(0.5 * ((0.126928 + 1.313262) / 2 + (0.974077 + 0.048587) / 2), rel=1e-5)


def test_lsgan_by_hand():
    d, g = losses("lsgan")
    # D = 1/2 [ mean_r (r - 1)^2 + mean_f f^2 ] = 1/2 [ (1 + 4)/2 + (0.25 + 9)/2 ] = 3.5625
    expected_d = 0.5 * (mean((r - 1) ** 2 for r in REAL) + mean(f ** 2 for f in FAKE))
    # G = 1/2 mean_f (f - 1)^2 = 1/2 (0.25 + 16)/2 = 4.0625
    expected_g = 0.5 * mean((f - 1) ** 2 for f in FAKE)
    assert d == pytest.approx(expected_d) == pytest.approx(3.5625)
    assert g == pytest.approx(expected_g) == pytest.approx(4.0625)


def test_hinge_by_hand():
    d, g = losses("hinge")
    # D = mean_r max(0, 1 - r) + mean_f max(0, 1 + f) = (0 + 2)/2 + (1.5 + 0)/2 = 1.75
    # (the logits are chosen so that each term has one active and one inactive hinge)
    expected_d = mean(max(0.0, 1 - r) for r in REAL) + mean(max(0.0, 1 + f) for f in FAKE)
    # G = -mean_f f = 1.25
    expected_g = -mean(FAKE)
    assert d == pytest.approx(expected_d) == pytest.approx(1.75)
    assert g == pytest.approx(expected_g) == pytest.approx(1.25)


def test_wgan_by_hand():
    d, g = losses("wgan_gp")
    # critic: D = mean_f f - mean_r r = -1.25 - 0.5 = -1.75 ; generator: G = -mean_f f = 1.25
    assert d == pytest.approx(mean(FAKE) - mean(REAL)) == pytest.approx(-1.75)
    assert g == pytest.approx(-mean(FAKE)) == pytest.approx(1.25)


def test_only_wgan_asks_for_gradient_penalty():
    assert {name: gan_loss(name).gradient_penalty for name in GAN_LOSSES} == {
        "bce": False, "wgan_gp": True, "lsgan": False, "hinge": False}


@pytest.mark.parametrize("name", GAN_LOSSES)
def test_losses_are_scalars_with_gradients(name):
    real = torch.tensor(REAL, requires_grad=True)
    fake = torch.tensor(FAKE, requires_grad=True)
    loss = gan_loss(name)
    d = loss.discriminator(real, fake)
    assert d.shape == ()
    d.backward()
    assert real.grad is not None and fake.grad is not None
    assert torch.isfinite(real.grad).all() and torch.isfinite(fake.grad).all()
    assert real.grad.abs().sum() > 0  # real logits influence the critic loss (not detached)
    g = loss.generator(fake.detach().requires_grad_(True))
    assert g.shape == ()


def test_discriminator_losses_reward_a_good_discriminator():
    # a discriminator that scores real high and fake low must get a lower loss than the reverse
    good_real, good_fake = torch.tensor([3.0, 3.0]), torch.tensor([-3.0, -3.0])
    for name in GAN_LOSSES:
        d = gan_loss(name).discriminator
        assert d(good_real, good_fake) < d(good_fake, good_real), name
        g = gan_loss(name).generator  # and the generator prefers fakes that are scored as real
        assert g(good_real) < g(good_fake), name


def test_bce_is_stable_for_extreme_logits():
    real = torch.tensor([100.0, -100.0], requires_grad=True)
    fake = torch.tensor([-100.0, 100.0], requires_grad=True)
    loss = gan_loss("bce")
    d = loss.discriminator(real, fake)
    g = loss.generator(fake)
    # log(1 + e^100) = 100 (+ e^-100); log(1 + e^-100) ~ 0, so D = 1/2 (50 + 50) = 50 and G = (100 + 0)/2 = 50
    assert torch.isfinite(d) and torch.isfinite(g)
    assert d.item() == pytest.approx(50.0)
    assert g.item() == pytest.approx(50.0)
    (d + g).backward()
    assert torch.isfinite(real.grad).all() and torch.isfinite(fake.grad).all()


def test_gan_loss_unknown_name():
    with pytest.raises(ValueError) as err:
        gan_loss("foo")
    msg = str(err.value)
    assert "'foo'" in msg
    for name in ("bce", "wgan_gp", "lsgan", "hinge"):
        assert name in msg


# ---------------------------------------------------------------- gradient penalty


def linear_critic(w: torch.Tensor):
    # D(x, y) = <x, w> + y : gradient w.r.t. x is w everywhere, whatever the labels
    return lambda x, y: (x * w).flatten(1).sum(1) + y.float()


def batch(seed: int = 0, n: int = 4):
    gen = torch.Generator().manual_seed(seed)
    real = torch.randn(n, 1, 3, 3, generator=gen)
    fake = torch.randn(n, 1, 3, 3, generator=gen)
    return real, fake, torch.arange(n)


def test_gradient_penalty_zero_for_unit_gradient_norm():
    w = torch.randn(1, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    w = w / w.norm()
    real, fake, labels = batch()
    gp = gradient_penalty(linear_critic(w), real, fake, labels)
    assert gp.shape == ()
    assert gp.item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("norm", [0.0, 0.25, 3.0])
def test_gradient_penalty_for_linear_critic(norm):
    w = torch.randn(1, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    w = w / w.norm() * norm
    real, fake, labels = batch()
    gp = gradient_penalty(linear_critic(w), real, fake, labels)
    # ||grad_x D|| = ||w|| for every interpolate, so E[(||w|| - 1)^2] = (norm - 1)^2
    assert gp.item() == pytest.approx((norm - 1.0) ** 2, rel=1e-5, abs=1e-6)


def test_gradient_penalty_per_sample_norms():
    # D(x) = 1/2 ||x||^2 has gradient x; with real == fake every interpolate is the real sample,
    # so GP = mean_i (||x_i|| - 1)^2 = ((2 - 1)^2 + (0.5 - 1)^2 + (1 - 1)^2) / 3 = 1.25 / 3
    real = torch.zeros(3, 1, 2, 2)
    real[0, 0, 0, 0] = 2.0
    real[1, 0, 1, 1] = -0.5
    real[2, 0] = 0.5  # four entries of 0.5: norm 1
    gp = gradient_penalty(lambda x, y: 0.5 * x.pow(2).flatten(1).sum(1), real, real.clone(), torch.zeros(3))
    assert gp.item() == pytest.approx(1.25 / 3, rel=1e-6)


def test_gradient_penalty_is_differentiable_in_the_critic():
    w = torch.full((1, 1, 3, 3), 1.0, requires_grad=True)  # ||w|| = 3
    real, fake, labels = batch()
    gp = gradient_penalty(linear_critic(w), real, fake, labels)
    gp.backward()
    # d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w|| = 2 * 2 * (1/3) for each entry
    assert torch.allclose(w.grad, torch.full_like(w, 4.0 / 3.0), atol=1e-5)


def test_gradient_penalty_does_not_reach_the_generator():
    # with a critic whose input-gradient depends on x, the penalty depends on where the fake images are;
    # still no gradient may flow into them: the penalty trains the critic only
    real, fake, labels = batch()
    fake.requires_grad_(True)
    real.requires_grad_(True)
    gp = gradient_penalty(lambda x, y: x.pow(3).flatten(1).sum(1), real, fake, labels)
    gp.backward()
    assert fake.grad is None
    assert real.grad is not None and real.grad.abs().sum() > 0  # (the graph itself is intact)


def test_gradient_penalty_interpolates_with_the_given_generator():
    critic = lambda x, y: x.pow(3).flatten(1).sum(1)  # gradient depends on where the interpolate lies
    real, fake, labels = batch(n=8)
    a = gradient_penalty(critic, real, fake, labels, generator=torch.Generator().manual_seed(5))
    b = gradient_penalty(critic, real, fake, labels, generator=torch.Generator().manual_seed(5))
    c = gradient_penalty(critic, real, fake, labels, generator=torch.Generator().manual_seed(6))
    assert a.item() == b.item()
    assert a.item() != c.item()


# ---------------------------------------------------------------- diffusion


def test_diffusion_loss_plain_mse():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 2.0]]]])  # (2, 1, 2, 2)
    target = torch.zeros_like(pred)
    # per-sample MSE: (1 + 4 + 9 + 16)/4 = 7.5 and 4/4 = 1; mean = 4.25
    assert diffusion_loss(pred, target).item() == pytest.approx(4.25)
    assert diffusion_loss(pred, pred).item() == 0.0


def test_diffusion_loss_with_weights():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 2.0]]]])
    target = torch.ones_like(pred)
    # per-sample MSE: (0 + 1 + 4 + 9)/4 = 3.5 and (1 + 1 + 1 + 1)/4 = 1
    # weighted: mean(0.5 * 3.5, 3 * 1) = (1.75 + 3)/2 = 2.375
    loss = diffusion_loss(pred, target, torch.tensor([0.5, 3.0]))
    assert loss.item() == pytest.approx(2.375)
    # weights are per sample, not a global scale: swapping them changes the loss
    swapped = diffusion_loss(pred, target, torch.tensor([3.0, 0.5]))
    assert swapped.item() == pytest.approx((3 * 3.5 + 0.5 * 1) / 2)


def test_diffusion_loss_computes_in_float32():
    pred = torch.full((2, 1, 4, 4), 300.0, dtype=torch.float16)
    target = torch.zeros_like(pred)
    loss = diffusion_loss(pred, target)
    # 300^2 = 90000 overflows float16 (max 65504); the loss must be computed in float32
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(90000.0)


def test_diffusion_loss_gradient():
    pred = torch.tensor([[1.0, -1.0]], requires_grad=True)
    diffusion_loss(pred, torch.zeros(1, 2)).backward()
    # d/dp mean(p^2) = 2p / 2 = p
    assert torch.allclose(pred.grad, torch.tensor([[1.0, -1.0]]))


@pytest.mark.parametrize("prediction_type,gamma", [("epsilon", None), ("v_prediction", 5.0), ("epsilon", 2.0)])
def test_diffusion_objective_by_hand(prediction_type, gamma):
    """Noise, then timesteps, drawn in that order; the target is the noise or the velocity; min-SNR weights."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from pipelines.losses import DiffusionObjective, ShardedDraw

    class Zero(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            return SimpleNamespace(sample=torch.zeros_like(x))

    scheduler = DDPMScheduler(num_train_timesteps=50)
    x0, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.arange(4)
    objective = DiffusionObjective(scheduler=scheduler, num_classes=4, prediction_type=prediction_type,
                                   snr_gamma=gamma)
    loss = objective(Zero(), x0, labels, ShardedDraw(generator=torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn((4, 1, 8, 8), generator=g), torch.randint(0, 50, (4,), generator=g)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = noise if prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
    per_sample = target.pow(2).flatten(1).mean(1)
    if gamma is not None:
        snr = (abar / (1 - abar)).flatten()
        per_sample = per_sample * snr.clamp(max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    torch.testing.assert_close(loss, per_sample.mean())


def test_min_snr_weights_epsilon():
    snr = torch.tensor([0.5, 5.0, 20.0])
    # min(SNR, 5) / SNR = [0.5/0.5, 5/5, 5/20]
    w = min_snr_weights(snr, 5.0, "epsilon")
    assert torch.allclose(w, torch.tensor([1.0, 1.0, 0.25]))


def test_min_snr_weights_v_prediction():
    snr = torch.tensor([0.5, 5.0, 20.0])
    # min(SNR, 5) / (SNR + 1) = [0.5/1.5, 5/6, 5/21]
    w = min_snr_weights(snr, 5.0, "v_prediction")
    assert torch.allclose(w, torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))


def test_min_snr_weights_keep_shape_and_dtype():
    snr = torch.tensor([[1.0, 100.0]], dtype=torch.float64)
    w = min_snr_weights(snr, 1.0, "epsilon")
    assert w.shape == snr.shape and w.dtype == torch.float64
    assert w.tolist() == [[1.0, 0.01]]
