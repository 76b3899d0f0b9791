"""`CGANPipeline`: a trained conditional-GAN generator as a diffusers pipeline (one forward pass per batch).

This file imports only torch and diffusers (and `pipeline_common` beside it): every export holds it
as `pipeline.py`, and the generator's module in `model/`, so stock diffusers loads the export
without this project installed:

    DiffusionPipeline.from_pretrained(path_or_repo_id, trust_remote_code=True)
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from .pipeline_common import (
    ClassConditionalMixin, ClassLabels, class_label_tensor, images_to_output, load_components, make_id2label,
)


class CGANPipeline(ClassConditionalMixin, DiffusionPipeline):
    """Samples images of the given classes from a conditional generator (`CGANGenerator`).

    The registered component is called `model` because `generator` is, by diffusers convention,
    the `torch.Generator` argument of `__call__`. `id2label` (or, in older exports, `class_names`)
    names the classes.
    """

    model_cpu_offload_seq = "model"

    def __init__(self, model, id2label: Optional[Dict[str, str]] = None, class_names: Optional[List[str]] = None):
        super().__init__()
        self.register_modules(model=model)
        self.register_to_config(id2label=make_id2label(id2label, class_names))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """This class from an export folder or Hub repo id (`torch_dtype`, `variant`, `revision`, `token`, ...)."""
        try:  # the project's generator class (not an import statement: diffusers would ask for the file)
            generator_class = importlib.import_module(".models.cgan", __package__).CGANGenerator
        except ImportError:  # this is an export's copy of the file: its generator is in the export
            return super().from_pretrained(pretrained_model_name_or_path, trust_remote_code=True, **kwargs)
        return load_components(cls, pretrained_model_name_or_path, {"CGANGenerator": generator_class}, **kwargs)


    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    @torch.no_grad()
    def __call__(self, class_labels: ClassLabels, generator: Optional[Union[torch.Generator, List[torch.Generator]]]
                 = None, output_type: str = "pil", return_dict: bool = True, latents: Optional[torch.Tensor] = None):
        """Generate one image per entry of `class_labels` (ids or names, a list, nested or not, or a tensor).

        `generator`: one, or a list with one per image (each image then gets the noise it gets alone).
        `latents` (B, latent_dim) overrides the noise.
        """
        labels = class_label_tensor(class_labels, self.config.id2label, self.model.config.num_classes,
                                    self._execution_device)
        if latents is None:
            latents = self.model.sample_noise(len(labels), generator, self._execution_device)
        images = self.model(latents.to(self._execution_device, self.model.dtype), labels)
        images = images_to_output(images, output_type, self.numpy_to_pil)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
