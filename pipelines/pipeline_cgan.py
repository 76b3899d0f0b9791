"""`CGANPipeline`: a trained conditional-GAN generator as a diffusers pipeline (one forward pass per batch)."""

from __future__ import annotations

from typing import List, Optional

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from .models.cgan import CGANGenerator
from .pipeline_ddpm import ClassLabels, class_label_tensor, images_to_output


class CGANPipeline(DiffusionPipeline):
    """Samples images of the given classes from a `CGANGenerator`.

    The registered component is called `model` because `generator` is, by diffusers convention,
    the `torch.Generator` argument of `__call__`.
    """

    model_cpu_offload_seq = "model"

    def __init__(self, model: CGANGenerator, class_names: Optional[List[str]] = None):
        super().__init__()
        self.register_modules(model=model)
        self.register_to_config(class_names=class_names)

    @torch.no_grad()
    def __call__(self, class_labels: ClassLabels, generator: Optional[torch.Generator] = None,
                 output_type: str = "pil", return_dict: bool = True, latents: Optional[torch.Tensor] = None):
        """Generate one image per entry of `class_labels` (ids or names); `latents` overrides the noise."""
        labels = class_label_tensor(class_labels, self.config.class_names, self.model.config.num_classes,
                                    self._execution_device)
        if latents is None:
            latents = self.model.sample_noise(len(labels), generator, self._execution_device)
        images = self.model(latents.to(self._execution_device, self.model.dtype), labels)
        images = images_to_output(images, output_type, self.numpy_to_pil)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
