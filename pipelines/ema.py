"""The EMA copy of a model's weights: made, saved as tensors, and swapped in for sampling and export in one place."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

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


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module, ema=None) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics) and the EMA weights, restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with ema_weights(ema, model):
            yield
    finally:
        model.train(was_training)
