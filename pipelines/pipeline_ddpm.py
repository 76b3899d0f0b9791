"""Class-conditional diffusion pipeline: a diffusers `UNet2DModel` with class embeddings and any scheduler.

This file imports only torch and diffusers (and `pipeline_common` beside it): every export holds it
as `pipeline.py`, so stock diffusers loads the export without this project installed:

    DiffusionPipeline.from_pretrained(path_or_repo_id, trust_remote_code=True)
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils import deprecate
from diffusers.utils.torch_utils import randn_tensor

from .pipeline_common import (
    ClassConditionalMixin, ClassLabels, class_label_tensor, images_to_output, load_components, make_id2label,
)

def check_interval(interval: Sequence[float]) -> Tuple[float, float]:
    """A guidance interval (lo, hi) with 0 <= lo < hi <= 1, or a ValueError naming it."""
    values = tuple(float(v) for v in interval)
    if len(values) != 2 or not 0.0 <= values[0] < values[1] <= 1.0:
        raise ValueError(f"guidance_interval={list(interval)}: must be two fractions lo < hi within [0, 1]")
    return values


class ClassConditionalDiffusionPipeline(ClassConditionalMixin, DiffusionPipeline):
    """Samples class-conditional images with classifier-free guidance.

    Args:
        unet: a `UNet2DModel` with `num_class_embeds` = number of classes (+1 for the guidance null class).
        scheduler: `DDPMScheduler`, `DDIMScheduler`, `DPMSolverMultistepScheduler`, ...; swap with
            `Scheduler.from_config(pipe.scheduler.config)`.
        id2label: class names by id, `{"0": "T-shirt/top", ...}` (as `DiTPipeline` takes them).
        image_size: the dataset's own image size; samples are centre-cropped to it when the U-Net
            works on padded images (Fashion-MNIST 28 -> 32).
        num_classes: the number of real classes (the U-Net may have one more: the null class).
        default_steps, default_guidance, default_guidance_interval: what `__call__` uses when not told
            (set at export to the fastest setting that keeps the quality).
        class_names: the names as a list, as exports before `id2label` kept them (read into `id2label`).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DModel, scheduler, id2label: Optional[Dict[str, str]] = None,
                 image_size: Optional[int] = None, num_classes: Optional[int] = None, default_steps: int = 50,
                 default_guidance: float = 1.0, default_guidance_interval: Optional[Sequence[float]] = None,
                 class_names: Optional[List[str]] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        interval = None if default_guidance_interval is None else list(check_interval(default_guidance_interval))
        self.register_to_config(id2label=make_id2label(id2label, class_names), image_size=image_size,
                                num_classes=num_classes, default_steps=default_steps,
                                default_guidance=default_guidance, default_guidance_interval=interval)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """This class from an export folder or Hub repo id (`torch_dtype`, `variant`, `revision`, `token`, ...)."""
        return load_components(cls, pretrained_model_name_or_path, {}, **kwargs)


    @property
    def num_classes(self) -> int:
        if self.config.num_classes is not None:
            return self.config.num_classes
        return len(self.config.id2label) if self.config.id2label else self.unet.config.num_class_embeds

    @property
    def has_null_class(self) -> bool:
        return self.unet.config.num_class_embeds == self.num_classes + 1

    @torch.no_grad()
    def __call__(self, class_labels: ClassLabels, num_inference_steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, guidance_interval: Optional[Sequence[float]] = None,
                 eta: float = 0.0, generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
                 latents: Optional[torch.Tensor] = None, output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end: Optional[Callable[["ClassConditionalDiffusionPipeline", int, int, Dict], Dict]]
                 = None, callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None):
        """Generate one image per entry of `class_labels` (ids or names, a list, nested or not, or a tensor).

        `num_inference_steps` and `guidance_scale` default to the export's `default_steps` and
        `default_guidance`.
        `guidance_scale` w mixes predictions as uncond + w * (cond - uncond); 1 is the plain
        conditional model. Both halves go through the U-Net in one batched call per step.
        `guidance_interval` (lo, hi), fractions of the training timesteps, applies guidance only to
        the steps with lo <= t / T <= hi and the plain conditional model elsewhere (Kynkaanniemi et
        al. 2024): guidance at high noise is what collapses the layouts within a class, so an
        interval such as (0, 0.6) keeps most of the accuracy gain without the loss of diversity.
        Defaults to the export's `default_guidance_interval` (None: every step).
        `generator`: one, or a list with one per image (each image then gets the noise it gets alone).
        `latents`: the starting noise (B, C, H, W) instead of drawing it.
        `callback_on_step_end(pipe, i, t, tensors)` is called after each step with the tensors named
        in `callback_on_step_end_tensor_inputs` (`"latents"`); a returned `"latents"` replaces them.
        `callback(i, t, sample)`: the older per-step callback, still called, deprecated as in diffusers.
        """
        if callback is not None:
            deprecate("callback", "1.0.0", "Passing `callback` as an input argument to `__call__` is deprecated, "
                      "consider using `callback_on_step_end`")
        labels = class_label_tensor(class_labels, self.config.id2label, self.num_classes, self._execution_device)
        bad_inputs = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if bad_inputs:
            raise ValueError(f"callback_on_step_end_tensor_inputs={sorted(bad_inputs)}: valid inputs are "
                             f"{self._callback_tensor_inputs}")
        num_inference_steps = num_inference_steps or self.config.default_steps
        guidance_scale = self.config.default_guidance if guidance_scale is None else guidance_scale
        guided = guidance_scale != 1.0
        interval = guidance_interval if guidance_interval is not None else self.config.get("default_guidance_interval")
        lo, hi = check_interval(interval) if interval is not None else (0.0, 1.0)
        if guided and not self.has_null_class:
            raise ValueError("guidance_scale != 1 needs a U-Net trained with label dropout (a null class); "
                             "this one has none: use guidance_scale=1")
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (len(labels), self.unet.config.in_channels, *size)
        if latents is None:
            sample = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; these labels need {shape}")
        else:
            sample = latents.to(self._execution_device, self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        sample = sample * self.scheduler.init_noise_sigma
        guided_labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        # Which steps to guide, decided once on the host (no device sync inside the loop).
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        guide_at = [guided and lo <= t / num_train_timesteps <= hi for t in self.scheduler.timesteps.tolist()]
        step_params = set(inspect.signature(self.scheduler.step).parameters)
        # DDIM clips its predicted x0 (clip_sample) but by default keeps the unclipped epsilon for the
        # direction to x_t; under strong guidance the two disagree and the error compounds over steps.
        # Re-deriving epsilon from the clipped x0 (as GLIDE does) keeps each step consistent.
        wanted = (("eta", eta), ("generator", generator), ("use_clipped_model_output", True))
        step_kwargs = {k: v for k, v in wanted if k in step_params}
        self._num_timesteps = len(self.scheduler.timesteps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            guide = guide_at[i]
            model_input = torch.cat([sample, sample]) if guide else sample
            model_input = self.scheduler.scale_model_input(model_input, t)
            output = self.unet(model_input, t, class_labels=guided_labels if guide else labels).sample
            if guide:
                cond, uncond = output.chunk(2)
                output = uncond + guidance_scale * (cond - uncond)
            sample = self.scheduler.step(output, t, sample, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                tensors = {name: sample for name in callback_on_step_end_tensor_inputs}
                returned = callback_on_step_end(self, i, t, tensors) or {}
                sample = returned.get("latents", sample)
            if callback is not None:
                callback(i, t, sample)
        crop = self.config.image_size
        if crop is not None and crop < sample.shape[-1]:
            top = (sample.shape[-2] - crop) // 2
            left = (sample.shape[-1] - crop) // 2
            sample = sample[..., top: top + crop, left: left + crop]
        images = images_to_output(sample, output_type, self.numpy_to_pil)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps
