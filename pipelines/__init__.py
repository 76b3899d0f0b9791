"""Class-conditional image generation: conditional GANs and diffusion models with accelerate and diffusers."""

from .models.cgan import CGANDiscriminator, CGANGenerator
from .pipeline_cgan import CGANPipeline
from .pipeline_ddpm import ClassConditionalDiffusionPipeline

__all__ = ["CGANDiscriminator", "CGANGenerator", "CGANPipeline", "ClassConditionalDiffusionPipeline"]
