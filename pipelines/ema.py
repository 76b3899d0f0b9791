"""The EMA copy of a model's weights: made, saved as tensors, and swapped in for sampling and export in one place,
with the BatchNorm statistics that belong to those weights."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch


def make_ema(model: torch.nn.Module, decay: Optional[float], device: torch.device, start_step: int = 0):
    """A diffusers `EMAModel` of `model`'s weights (None without a decay); foreach: one fused update per step.

    For the first `start_step` steps its decay is 0: the copy equals the weights (diffusers' update_after_step).
    """
    if decay is None:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=decay, foreach=True, update_after_step=start_step)
    ema.to(device)
    return ema


def ema_step(ema, parameters, skip: torch.Tensor) -> None:
    """`EMAModel.step`, except that where `skip` (a device tensor, 1.0 for a skipped optimizer step) is set the
    shadow weights stay as they were, decided on the device: the non-finite guard's skip, no host sync."""
    parameters = list(parameters)
    ema.optimization_step += 1
    decay = ema.get_decay(ema.optimization_step)
    ema.cur_decay_value = decay
    weight = (1.0 - decay) * (1.0 - skip)
    trained = [(s, p) for s, p in zip(ema.shadow_params, parameters) if p.requires_grad]
    if trained:
        shadow, params = [s for s, _ in trained], [p.detach() for _, p in trained]
        torch._foreach_add_(shadow, torch._foreach_mul(torch._foreach_sub(params, shadow), weight))
    for s, p in zip(ema.shadow_params, parameters):
        if not p.requires_grad:
            s.copy_(p.detach())


def ema_state(ema) -> dict[str, torch.Tensor]:
    """A diffusers `EMAModel` as flat tensors for safetensors (no pickle in checkpoints)."""
    state = {f"ema.{i}": p for i, p in enumerate(ema.shadow_params)}
    state["ema.optimization_step"] = torch.tensor(ema.optimization_step)
    return state


def load_ema_state(ema, extra: dict[str, torch.Tensor]) -> None:
    for i, p in enumerate(ema.shadow_params):
        p.data.copy_(extra[f"ema.{i}"].to(p.device))
    ema.optimization_step = int(extra["ema.optimization_step"])


@contextlib.contextmanager
def ema_weights(ema, model: torch.nn.Module) -> Iterator[None]:
    """Temporarily put the EMA weights into `model` (for sampling and export); no-op without EMA."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


@torch.no_grad()
def measure_batchnorm_statistics(model: torch.nn.Module, forward: Callable[[int], object], batches: int) -> None:
    """BigGAN's standing statistics: every BatchNorm's running mean and variance measured again for the weights
    `model` holds now, as the plain average over `batches` training-mode passes (`forward(i)` runs the i-th).

    The running statistics of training are an average over the trained weights of the last steps; the EMA
    weights are another network, whose activations have other means and variances."""
    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or batches <= 0:
        return
    momenta, was_training = [m.momentum for m in norms], model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: each batch counts alike
    model.train()
    try:
        for i in range(batches):
            forward(i)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


@contextlib.contextmanager
def kept_buffers(model: torch.nn.Module) -> Iterator[None]:
    """The model's buffers (BatchNorm statistics) as they were on entry, put back on exit."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module, ema=None, statistics: Optional[Callable[[], None]] = None
                   ) -> Iterator[None]:
    """Eval mode and the EMA weights, restored afterwards. With an EMA, `statistics` (if given) then measures
    what depends on those weights (`measure_batchnorm_statistics`), and the trained buffers come back after."""
    was_training = model.training
    refresh = ema is not None and statistics is not None
    try:
        with ema_weights(ema, model), (kept_buffers(model) if refresh else contextlib.nullcontext()):
            if refresh:
                statistics()
            model.eval()
            yield
    finally:
        model.train(was_training)
