"""The lines that run only on a GPU or under a launcher, executed here on the CPU with the real libraries:
fp16 under a real GradScaler, batches moved from host memory to another device, the compiled loop's CUDA-graph
step marks, BatchNorm statistics that belong to the exported EMA weights, errors named for what they are."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from pipelines.config import CGANConfig, DDPMConfig, load_config
from test_cgan import TINY as CGAN_TINY
from test_ddpm import TINY as DDPM_TINY
from trainer_utils import final_checkpoint, run_script

FAMILIES = {"train_cgan": (CGANConfig, CGAN_TINY), "train_ddpm": (DDPMConfig, DDPM_TINY)}


class ScaledAccelerator(Accelerator):
    """What accelerate builds for fp16 on a GPU (`native_amp` and a `torch.amp.GradScaler`), on the CPU:
    autocast in float16 and the same scaler class, given the CPU as its device."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.state.mixed_precision == "fp16":
            self.native_amp = True
            self.scaler = torch.amp.GradScaler("cpu")


@pytest.fixture
def fp16_scaler(monkeypatch):  # run_script resets accelerate's process-wide state before each run
    monkeypatch.setattr("pipelines.run.Accelerator", ScaledAccelerator)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


def scaled_accelerator() -> ScaledAccelerator:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = ScaledAccelerator(cpu=True, mixed_precision="fp16")
    assert isinstance(acc.scaler, torch.amp.GradScaler)
    return acc


# --- fp16 ------------------------------------------------------------------------------------------------------

def test_a_nonfinite_cgan_loss_under_the_grad_scaler_skips_both_updates_then_training_goes_on():
    """The guard's verdict reaches the scaler: a NaN D loss leaves G, D and both Adam states as they were,
    the scaler lowers its scale as for an overflow, and a finite step afterwards updates the weights."""
    from pipelines import CGANDiscriminator, CGANGenerator
    from pipelines.gan import GANStep
    from pipelines.losses import gan_loss
    from pipelines.loop import NonFiniteGuard

    acc = scaled_accelerator()
    torch.manual_seed(0)
    g, d = CGANGenerator(base_channels=8), CGANDiscriminator(base_channels=8)
    opt_g, opt_d = torch.optim.Adam(g.parameters(), fused=True), torch.optim.Adam(d.parameters(), fused=True)
    g, d, opt_g, opt_d = acc.prepare(g, d, opt_g, opt_d)
    poisoned = {"on": True}
    hinge = gan_loss("hinge")
    loss = hinge._replace(discriminator=lambda r, f: hinge.discriminator(r, f) * (float("nan") if poisoned["on"]
                                                                                  else 1.0))
    guard = NonFiniteGuard(limit=3, accelerator=acc)
    step = GANStep(accelerator=acc, generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d, loss=loss, guard=guard)
    weights = lambda: [p.detach().clone() for p in [*d.parameters(), *g.parameters()]]
    before = weights()
    x, y = torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8)
    step(0, x, y, measure_grads=True)  # measure_grads: unscales each optimizer's gradients once, as fp16 must
    assert guard.read() == 1
    assert all(torch.equal(a, b) for a, b in zip(before, weights()))
    assert all(not opt.state or int(next(iter(opt.state.values()))["step"]) == 0
               for opt in (opt_d.optimizer, opt_g.optimizer))  # no Adam step counted
    assert acc.scaler.get_scale() < 2.0 ** 16  # the scaler saw the skip: it backed off from its initial scale

    poisoned["on"] = False
    scale = acc.scaler.get_scale()
    for i in range(1, 6):
        step(i, x, y, measure_grads=True)
    assert guard.read() == 1  # no new skips
    after = weights()
    assert all(torch.isfinite(p).all() for p in after)
    changed_d = sum(not torch.equal(a, b) for a, b in zip(before[:len(list(d.parameters()))], after))
    assert changed_d > 0 and any(not torch.equal(a, b) for a, b in zip(before, after))
    assert acc.scaler.get_scale() <= scale  # finite steps: the scale only grows after 2000 of them


def test_a_skip_decided_on_another_process_reaches_the_grad_scaler():
    """Finite losses here, but the guard's all-reduced verdict says skip (another rank's loss was NaN): the
    scaler, which decides from this process's gradients, must skip too, or the ranks' weights part."""
    from pipelines import CGANDiscriminator, CGANGenerator
    from pipelines.gan import GANStep
    from pipelines.losses import gan_loss
    from pipelines.loop import NonFiniteGuard

    class ElsewhereNaN(NonFiniteGuard):
        def check(self, *losses):
            return torch.ones((), device=losses[0].device)  # what the all-reduce returns after a NaN on rank 1

    acc = scaled_accelerator()
    torch.manual_seed(0)
    g, d = CGANGenerator(base_channels=8), CGANDiscriminator(base_channels=8)
    opt_g, opt_d = torch.optim.Adam(g.parameters(), fused=True), torch.optim.Adam(d.parameters(), fused=True)
    g, d, opt_g, opt_d = acc.prepare(g, d, opt_g, opt_d)
    guard = ElsewhereNaN(limit=3, accelerator=acc)
    step = GANStep(accelerator=acc, generator=g, discriminator=d, opt_g=opt_g, opt_d=opt_d, loss=gan_loss("hinge"),
                   guard=guard)
    before = [p.detach().clone() for p in [*d.parameters(), *g.parameters()]]
    step(0, torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8))
    assert guard.read() == 1
    assert all(torch.equal(a, p) for a, p in zip(before, [*d.parameters(), *g.parameters()]))


def test_a_nonfinite_diffusion_loss_under_the_grad_scaler_skips_the_update():
    from diffusers import DDPMScheduler

    from pipelines.diffusion import DiffusionStep
    from pipelines.losses import DiffusionObjective, ShardedDraw
    from pipelines.loop import NonFiniteGuard
    from pipelines.models.unet import build_unet

    acc = scaled_accelerator()
    cfg = load_config(DDPMConfig, overrides=DDPM_TINY)
    torch.manual_seed(0)
    unet = build_unet(cfg.model, 3, 1, 28, null_class=False)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    unet, opt, schedule = acc.prepare(unet, opt, schedule)
    guard = NonFiniteGuard(limit=3, accelerator=acc)
    objective = DiffusionObjective(scheduler=DDPMScheduler(num_train_timesteps=50), num_classes=3)
    step = DiffusionStep(accelerator=acc, unet=unet, optimizer=opt, lr_schedule=schedule, objective=objective,
                         draw=ShardedDraw(generator=torch.Generator().manual_seed(0)), guard=guard)
    before = [p.detach().clone() for p in unet.parameters()]
    x, y = torch.rand(4, 1, 28, 28) * 2 - 1, torch.tensor([0, 1, 2, 0])
    step(x * float("nan"), y)
    assert guard.read() == 1
    assert all(torch.equal(a, p) for a, p in zip(before, unet.parameters()))
    assert not opt.optimizer.state or int(next(iter(opt.optimizer.state.values()))["step"]) == 0
    for _ in range(3):
        step(x, y)
    assert guard.read() == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, unet.parameters()))


@pytest.mark.parametrize("script", sorted(FAMILIES))
def test_both_trainers_train_and_resume_in_fp16_under_a_real_grad_scaler(script, fp16_scaler, tmp_path):
    """The whole trainer, as on a GPU with mixed_precision=fp16: accelerate's optimizer wrapper steps through
    the scaler every step (grad norms measured every step), the scaler's state is checkpointed and resumed."""
    cls, tiny = FAMILIES[script]
    out = tmp_path / "run"
    common = tiny + ["train.mixed_precision=fp16", "log.every_steps=1", "train.epochs=1"]
    assert run_script(script, cls, out, common + ["train.max_steps=4"]) == 0
    assert (final_checkpoint(out) / "scaler.pt").is_file()
    assert run_script(script, cls, out, common, "--resume", "latest") == 0
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    key = "grad_norm_d" if script == "train_cgan" else "grad_norm"
    assert all(np.isfinite(r["loss" if script == "train_ddpm" else "loss_d"]) for r in records)
    assert sum(np.isfinite(r[key]) for r in records) >= 4  # most steps fit in fp16 (overflows are the scaler's)
    assert (out / "pipeline" / "model_index.json").is_file()
    info = json.loads((out / "pipeline" / "training.json").read_text())
    assert info["mixed_precision"] == "fp16"


# --- host-side batches -------------------------------------------------------------------------------------------

def synthetic(n: int):
    from pipelines.config import DataConfig
    from pipelines.data import load_tensors

    return load_tensors(DataConfig(name="synthetic", synthetic_size=n))


def test_batches_of_images_kept_in_host_memory_arrive_on_the_training_device():
    """data.on_device=false: the images stay on the host and every batch is moved to the device (here `meta`,
    a device other than the data's), as uint8, then converted, padded and flipped there."""
    from pipelines.data import BatchLoader

    data = synthetic(64)
    host = BatchLoader(data, 8, seed=0, pad_to=32, hflip=True, device="meta", on_device=False)
    assert host.data.images.device.type == "cpu"
    x, y = next(host.epoch(0))
    assert (x.device.type, y.device.type) == ("meta", "meta")
    assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # The same batches as with the images on the device (both on the CPU here).
    a = [(x, y) for x, y in BatchLoader(data, 8, seed=0, pad_to=32, hflip=True, device="cpu", on_device=False).epoch(1)]
    b = [(x, y) for x, y in BatchLoader(data, 8, seed=0, pad_to=32, hflip=True).epoch(1)]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


@pytest.mark.parametrize("on_device", [True, False])
def test_the_run_serves_batches_on_the_accelerators_device_wherever_the_images_are(on_device, monkeypatch):
    import contextlib

    from pipelines.run import training_batches

    cfg = load_config(CGANConfig, overrides=CGAN_TINY + [f"data.on_device={str(on_device).lower()}"])
    accelerator = SimpleNamespace(device=torch.device("meta"), process_index=0, num_processes=1,
                                  main_process_first=contextlib.nullcontext)
    loader = training_batches(cfg, accelerator)
    assert loader.data.images.device.type == ("meta" if on_device else "cpu")
    x, y = next(loader.epoch(0))
    assert x.device.type == y.device.type == "meta"


def test_pinned_staging_is_used_only_for_host_images_bound_for_cuda():
    from pipelines.data import BatchLoader

    data = synthetic(16)
    assert BatchLoader(data, 8, 0, device="cuda", on_device=False).pin  # built only: nothing touches CUDA here
    assert not BatchLoader(data, 8, 0, device="meta", on_device=False).pin
    assert not BatchLoader(data, 8, 0, device="cpu", on_device=False).pin


# --- the compiled loop -------------------------------------------------------------------------------------------

@pytest.mark.slow  # compiling G and D takes about a minute on 2 cores
def test_the_compiled_loop_marks_every_step_for_cuda_graphs(tmp_path, monkeypatch):
    """With train.compile the loop marks each step's start (on CUDA, graph replays may then reuse the last
    step's outputs); here it compiles without graphs, and still runs the very lines CUDA runs."""
    marks = []
    real = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: (marks.append(1), real()))
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, CGAN_TINY + ["train.compile=true", "train.max_steps=3",
                                                                    "train.compile_mode=reduce-overhead",
                                                                    "train.channels_last=true"]) == 0
    assert len(marks) == 3
    assert (out / "pipeline" / "model_index.json").is_file()


def test_channels_last_puts_the_conv_weights_in_nhwc_and_the_export_stays_nchw(tmp_path):
    from pipelines.gan import build_cgan
    from pipelines.run import apply_speed_options

    cfg = load_config(CGANConfig, overrides=CGAN_TINY + ["train.channels_last=true"])
    g, d = build_cgan(cfg, 10, 1, 28)
    apply_speed_options(cfg, Accelerator(cpu=True), g, d)
    for net in (g, d):
        convs = [m.weight for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        assert any(not w.is_contiguous() for w in convs)  # (one input channel or 1x1 kernels: both orders agree)
    g.eval().save_pretrained(tmp_path / "g")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "g" / "diffusion_pytorch_model.safetensors"))
    assert all(v.is_contiguous() for v in saved.values())


# --- BatchNorm statistics of the EMA weights --------------------------------------------------------------------

def test_inference_mode_measures_statistics_for_the_ema_weights_and_restores_everything():
    from pipelines import CGANGenerator
    from pipelines.ema import inference_mode, make_ema, measure_batchnorm_statistics

    torch.manual_seed(0)
    g = CGANGenerator(base_channels=8, latent_dim=16)
    ema = make_ema(g, 0.9, torch.device("cpu"))
    with torch.no_grad():
        for s in ema.shadow_params:
            s.mul_(3.0).add_(0.5)  # an EMA far from the trained weights
    g.train()
    for _ in range(3):  # training statistics of the trained weights
        g(g.sample_noise(32), torch.randint(10, (32,)))
    params = [p.detach().clone() for p in g.parameters()]
    buffers = {k: b.clone() for k, b in g.named_buffers()}

    def forward(net, i: int) -> None:
        gen = torch.Generator().manual_seed(i)
        net(net.sample_noise(64, gen), torch.randint(10, (64,), generator=gen))

    with inference_mode(g, ema, lambda: measure_batchnorm_statistics(g, lambda i: forward(g, i), 4)):
        assert not g.training
        inside = {k: b.clone() for k, b in g.named_buffers()}
        assert all(torch.equal(p, s) for p, s in zip(g.parameters(), ema.shadow_params))
    # The same measurement on a copy holding the EMA weights gives the same statistics.
    import copy

    twin = copy.deepcopy(g)
    ema.copy_to(twin.parameters())
    measure_batchnorm_statistics(twin, lambda i: forward(twin, i), 4)
    for k, b in twin.named_buffers():
        if "running" in k:
            torch.testing.assert_close(inside[k], b, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(inside[k], buffers[k], rtol=1e-2), k  # not the training statistics
    # Afterwards: the trained weights, their statistics and training mode, exactly.
    assert g.training
    assert all(torch.equal(a, p) for a, p in zip(params, g.parameters()))
    assert all(torch.equal(buffers[k], b) for k, b in g.named_buffers())


def bn_input_moments(generator, seed: int, batches: int = 8):
    """The per-channel mean and variance each BatchNorm sees under `generator`'s own weights (fresh draws)."""
    seen = {}

    def hook(module, inputs):
        x = inputs[0].detach().double()
        dims = [0] + list(range(2, x.dim()))
        seen.setdefault(module, []).append((x.mean(dims), x.var(dims, unbiased=False)))

    norms = [m for m in generator.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_pre_hook(hook) for m in norms]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(batches):
            generator(generator.sample_noise(256, gen), torch.randint(10, (256,), generator=gen))
    for h in handles:
        h.remove()
    return {m: (torch.stack([a for a, _ in v]).mean(0), torch.stack([b for _, b in v]).mean(0)) for m, v in seen.items()}


@pytest.mark.parametrize("arch", ["transposed_conv", "resnet"])
def test_the_exported_ema_generator_carries_batchnorm_statistics_of_its_own_weights(arch, tmp_path):
    """The export's running means and variances are what its own (EMA) weights produce; with
    model.ema_bn_batches=0 they are the trained weights' and miss by far more."""
    from pipelines import CGANPipeline

    extra = ["model.arch=resnet", "model.d_base_channels=8"] if arch == "resnet" else []
    # A fast-moving generator and a long EMA horizon: the EMA weights are far from the trained ones.
    common = CGAN_TINY + extra + ["train.ema_decay=0.999", "optim.lr_g=0.01", "train.epochs=2"]
    errors = {}
    for batches in (8, 0):
        out = tmp_path / f"bn{batches}"
        assert run_script("train_cgan", CGANConfig, out, common + [f"model.ema_bn_batches={batches}"]) == 0
        g = CGANPipeline.from_pretrained(out / "pipeline").model
        g.train()  # batch statistics: the moments of the activations, per batch
        moments = bn_input_moments(g, seed=123)
        errors[batches] = max(max((m.running_mean.double() - mean).abs().max().item(),
                                  ((m.running_var.double() - var).abs() / var.clamp(min=1e-3)).max().item())
                              for m, (mean, var) in moments.items())
    assert errors[8] < 0.1, errors
    assert errors[0] > 3 * errors[8], errors


# --- errors named for what they are -----------------------------------------------------------------------------

def test_a_runtime_error_that_is_not_a_write_passes_through_the_checkpoint_unrenamed(tmp_path):
    from pipelines.rundir import RunDirError, cleaned_up_on_write_error

    tmp = tmp_path / ".tmp-step"
    tmp.mkdir()
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(RuntimeError) as caught:
        with cleaned_up_on_write_error(tmp, "checkpoint at step 4", []):
            raise oom
    assert caught.value is oom and not isinstance(caught.value, RunDirError)
    assert not tmp.exists()  # the half-written copy goes either way
    tmp.mkdir()
    with pytest.raises(RunDirError, match="the write was cut short"):
        with cleaned_up_on_write_error(tmp, "checkpoint at step 4", []):
            raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")


def test_the_random_state_check_covers_the_cuda_generator(monkeypatch):
    """accelerate saves `torch_cuda_manual_seed` (one state, or one per device) and restores it on a GPU; the
    check compares it there too, and passes over it on a machine without CUDA."""
    import random

    from pipelines.checkpoints import _rng_restored

    cuda_state = [torch.arange(16, dtype=torch.uint8)]
    saved = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
             "torch_manual_seed": torch.get_rng_state(), "torch_cuda_manual_seed": cuda_state}
    assert _rng_restored(saved)  # no CUDA here: nothing draws from that generator
    now = {"state": [torch.arange(16, dtype=torch.uint8)]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: now["state"])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": now["state"][0])
    assert _rng_restored(saved)
    assert _rng_restored({**saved, "torch_cuda_manual_seed": cuda_state[0]})  # accelerate's one-state form
    now["state"] = [torch.zeros(16, dtype=torch.uint8)]  # accelerate could not restore it
    assert not _rng_restored(saved)
    assert not _rng_restored({**saved, "torch_cuda_manual_seed": cuda_state[0]})


# --- launcher settings ------------------------------------------------------------------------------------------

def test_the_process_group_backend_reaches_accelerate_and_nccl_without_cuda_is_refused(tmp_path, monkeypatch,
                                                                                       capsys):
    import accelerate

    seen = {}

    class Stop(Exception):
        pass

    def partial_state(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(accelerate, "PartialState", partial_state)
    with pytest.raises(Stop):
        run_script("train_cgan", CGANConfig, tmp_path / "gloo", CGAN_TINY + ["train.process_group_backend=gloo"])
    assert seen["backend"] == "gloo"
    seen.clear()
    with pytest.raises(Stop):
        run_script("train_cgan", CGANConfig, tmp_path / "default", CGAN_TINY)
    assert "backend" not in seen  # accelerate's own choice
    assert run_script("train_cgan", CGANConfig, tmp_path / "nccl", CGAN_TINY + ["train.process_group_backend=nccl"]) == 2
    assert "train.process_group_backend=nccl needs CUDA" in capsys.readouterr().err


def test_fp16_on_a_cpu_says_it_trains_in_float32(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, CGAN_TINY + ["train.mixed_precision=fp16", "train.max_steps=2"]) == 0
    assert "mixed_precision=fp16 on cpu: accelerate has no GradScaler there and trains in float32" in capsys.readouterr().out


class DeviceTensor(torch.Tensor):
    """Stands for a CUDA tensor: numpy() refuses it, as torch does; cpu() gives a plain host tensor."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()


def test_samples_drawn_on_a_device_are_written_as_pngs(tmp_path):
    """`generate --out FOLDER` on a GPU hands its CUDA samples to save_samples."""
    from pipelines.evaluation import save_samples

    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8).as_subclass(DeviceTensor)
    save_samples(images, torch.tensor([0, 1, 1]), ["a", "b"], tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        "00_a/000000.png", "01_b/000001.png", "01_b/000002.png"]


def test_compile_with_the_residual_cgan_is_refused_before_training():
    """The compiled residual D keeps its spectral-norm vector for the backward, and the fakes' forward updates it
    in place: `one of the variables needed for gradient computation has been modified` at step 1."""
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="train.compile=true with model.arch=resnet"):
        load_config(CGANConfig, overrides=["model.arch=resnet", "train.compile=true"])
    load_config(CGANConfig, overrides=["model.d_norm=spectral", "model.d_conditioning=projection", "train.compile=true"])
