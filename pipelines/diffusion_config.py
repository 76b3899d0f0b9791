"""The conditional DDPM's config: its U-Net, diffusion and optimizer sections on the sections every run has."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .run_config import RunConfig, image_shape_options
from .typed_yaml import ConfigError, check_at_least, check_positive


@dataclass
class UNetConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    attention: list[bool] = field(default_factory=lambda: [False, False, True])  # one per level
    layers_per_block: int = 2
    norm_num_groups: int = 8
    dropout: float = 0.0
    sample_size: Optional[int] = None  # None: the data's image size after padding
    channels: Optional[int] = None  # None: taken from the data

    def validate(self) -> None:
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ConfigError(f"model.block_out_channels={self.block_out_channels}: must be positive channel counts")
        if len(self.attention) != len(self.block_out_channels):
            raise ConfigError(
                f"model.attention has {len(self.attention)} entries; it needs one per level of "
                f"model.block_out_channels ({len(self.block_out_channels)})"
            )
        check_positive(self, "norm_num_groups", "model")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(
                f"model.norm_num_groups={self.norm_num_groups} must divide every block channel count; it does not divide {bad}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout}: must be in [0, 1)")
        check_positive(self, "layers_per_block", "model")
        image_shape_options(self)


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000  # configs/ddpm/report_a.yaml uses 300
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "linear"  # squaredcos_cap_v2: the cosine schedule
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    snr_gamma: Optional[float] = None  # min-SNR loss weighting (5.0 is the paper's choice); None: plain MSE
    label_dropout: float = 0.1  # classifier-free guidance: share of labels replaced by the null class; 0 turns it off
    # The sampler of the training grids, the in-training evaluation and the export's default (dpmsolver: DPM-Solver++)
    sample_scheduler: Literal["ddim", "dpmsolver", "ddpm"] = "ddim"
    sample_steps: int = 10  # sampling steps of the training grids, the evaluation and the export's default
    sample_guidance: float = 2.0
    # Guide only the steps with lo <= t / T <= hi (the rest use the conditional model alone);
    # None guides every step. Also the export's default.
    sample_guidance_interval: Optional[list[float]] = None

    def validate(self) -> None:
        check_positive(self, "num_train_timesteps", "diffusion")
        interval = self.sample_guidance_interval
        if interval is not None and (len(interval) != 2 or not 0.0 <= interval[0] < interval[1] <= 1.0):
            raise ConfigError(f"diffusion.sample_guidance_interval={interval}: must be [lo, hi] with "
                              "0 <= lo < hi <= 1, or null")
        check_positive(self, "sample_steps", "diffusion")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"diffusion.label_dropout={self.label_dropout}: must be in [0, 1)")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"diffusion.snr_gamma={self.snr_gamma}: must be positive or null")
        if self.sample_steps > self.num_train_timesteps:
            raise ConfigError(f"diffusion.sample_steps={self.sample_steps}: must be at most "
                              f"diffusion.num_train_timesteps={self.num_train_timesteps}")
        check_at_least(self, "sample_guidance", "diffusion", 0)


@dataclass
class DDPMOptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine", "onecycle"] = "cosine"  # onecycle: warm up, then anneal (OneCycleLR)
    warmup_steps: int = 100  # for cosine
    max_grad_norm: Optional[float] = 1.0  # gradient clipping; None turns it off
    scale_lr: bool = False  # multiply lr by processes x accumulation (linear scaling in the global batch)

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr}: must be positive")
        check_at_least(self, "warmup_steps", "optim", 0)
        check_at_least(self, "weight_decay", "optim", 0)
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"optim.max_grad_norm={self.max_grad_norm}: must be positive or null (no clipping)")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas}: each must be in [0, 1)")


@dataclass
class DDPMConfig(RunConfig):
    """One conditional-diffusion run (`train_ddpm.py`)."""

    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: DDPMOptimConfig = field(default_factory=DDPMOptimConfig)
    output_dir: str = "runs/ddpm"
