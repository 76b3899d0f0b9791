"""The conditional GAN's config: its model, loss and optimizer sections on the sections every run has."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .run_config import RunConfig, image_shape_options
from .typed_yaml import ConfigError, check_positive, renamed


@dataclass
class CGANModelConfig:
    # transposed_conv: ConvTranspose2d up-sampling; upsample_conv: nearest Upsample + Conv2d (the seeds' nets);
    # resnet: residual G with class-conditional BatchNorm, residual spectral-norm projection D (SNGAN / BigGAN)
    arch: Literal["transposed_conv", "upsample_conv", "resnet"] = field(
        default="transposed_conv", metadata=renamed({"report_a": "transposed_conv", "notes_e": "upsample_conv"}))
    latent_dim: int = 100
    label_emb_dim: int = 50
    base_channels: int = 64  # G: 2*base -> base -> image; D: base -> 2*base
    d_base_channels: Optional[int] = None  # D's own width; None: base_channels
    bn_momentum: float = 0.1  # PyTorch convention (Keras momentum 0.8 is PyTorch 0.2)
    bn_eps: float = 1e-5  # configs/cgan/notes_e.yaml uses 0.8: its source wrote BatchNorm2d(64, 0.8), which sets eps
    noise: Literal["normal", "uniform"] = "normal"  # uniform draws from [-1, 1]
    hierarchical_z: bool = False  # resnet: a chunk of z beside the class embedding in each block's BatchNorms
    # D's normalisation and conditioning; null: the architecture's own (batch and label_map for the seeds'
    # nets, spectral and projection for resnet, the only ones it has)
    d_norm: Optional[Literal["batch", "spectral"]] = None  # spectral norm stabilises D (Miyato et al., 2018)
    d_conditioning: Optional[Literal["label_map", "projection"]] = None  # label_map: the label as an input channel
    d_class_std: bool = False  # D also sees the batch's within-class feature spread (against collapse)
    # With train.ema_decay: G's BatchNorm statistics are measured again on the EMA weights (BigGAN's standing
    # statistics), over this many batches of 256 drawn from the run's seed, before every grid, evaluation and
    # export; the training ones belong to the trained weights. 8 batches agree with 32 to 0.3% (median).
    # 0: export the training statistics.
    ema_bn_batches: int = 8
    image_size: Optional[int] = None  # None: taken from the data
    channels: Optional[int] = None  # None: taken from the data

    def validate(self) -> None:
        for key in ("latent_dim", "label_emb_dim", "base_channels"):
            check_positive(self, key, "model")
        if self.ema_bn_batches < 0:
            raise ConfigError(f"model.ema_bn_batches={self.ema_bn_batches}: must be >= 0 (0: keep the training "
                              "statistics)")
        if self.d_base_channels is not None and self.d_base_channels <= 0:
            raise ConfigError(f"model.d_base_channels={self.d_base_channels}: must be positive or null "
                              "(null: model.base_channels)")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ConfigError(f"model.bn_momentum={self.bn_momentum}: must be in (0, 1]")
        if self.bn_eps <= 0:
            raise ConfigError(f"model.bn_eps={self.bn_eps}: must be positive")
        image_shape_options(self)
        if self.hierarchical_z and self.arch != "resnet":
            raise ConfigError(f"model.hierarchical_z=true feeds z to the conditional BatchNorms of model.arch=resnet; "
                              f"model.arch={self.arch} has none")
        if self.hierarchical_z and self.latent_dim < 3:
            raise ConfigError(f"model.hierarchical_z=true splits z into 3 chunks: model.latent_dim={self.latent_dim} "
                              "must be at least 3")
        norm, conditioning = self.discriminator()
        if self.arch == "resnet" and (norm, conditioning) != ("spectral", "projection"):
            raise ConfigError(f"model.arch=resnet has a spectral-norm projection discriminator only: "
                              f"model.d_norm={norm}, model.d_conditioning={conditioning} "
                              "(use spectral and projection, or leave both unset)")

    def discriminator(self) -> tuple[str, str]:
        """D's normalisation and conditioning, the architecture's own where unset."""
        resnet = self.arch == "resnet"
        return (self.d_norm or ("spectral" if resnet else "batch"),
                self.d_conditioning or ("projection" if resnet else "label_map"))


@dataclass
class GANLossConfig:
    name: Literal["bce", "wgan_gp", "lsgan", "hinge"] = "bce"
    gp_weight: float = 10.0  # WGAN-GP lambda
    critic_steps: int = 1  # discriminator updates per generator update (5 is usual for WGAN-GP)
    # MSGAN's mode-seeking weight (1.0 in its paper); 0 is off. Against within-class collapse: the generator
    # is paid for making two codes of one class give different images.
    mode_seeking: float = 0.0
    # DiffAugment (Zhao et al., 2020): the same random transforms on every real and fake image D sees; the
    # paper's choice is [translation, cutout] for grey images, [color, translation, cutout] for colour ones.
    diffaugment: list[Literal["color", "translation", "cutout"]] = field(default_factory=list)
    # R1 (Mescheder et al., 2018): gamma / 2 * E ||grad_x D(x)||^2 on real images, zero-centred; 0 is off.
    # Lazy: computed every r1_every D steps, scaled by r1_every (StyleGAN2's form; 1 is every step).
    r1_gamma: float = 0.0
    r1_every: int = 16

    def validate(self) -> None:
        check_positive(self, "critic_steps", "loss")
        check_positive(self, "r1_every", "loss")
        if len(set(self.diffaugment)) != len(self.diffaugment):
            raise ConfigError(f"loss.diffaugment={self.diffaugment}: each transform at most once")
        for key in ("gp_weight", "mode_seeking", "r1_gamma"):
            if getattr(self, key) < 0:
                raise ConfigError(f"loss.{key}={getattr(self, key)}: must be >= 0")


# Adam's usual rates for each loss: 2e-4 for BCE, LSGAN and hinge (DCGAN's), 1e-4 for WGAN-GP.
DEFAULT_GAN_LR = {"bce": 2e-4, "lsgan": 2e-4, "hinge": 2e-4, "wgan_gp": 1e-4}


@dataclass
class GANOptimConfig:
    lr_g: Optional[float] = None  # None: the loss's usual rate (DEFAULT_GAN_LR)
    lr_d: Optional[float] = None
    betas: tuple[float, float] = (0.5, 0.999)  # DCGAN's beta1=0.5 keeps the adversarial game from oscillating
    scale_lr: bool = False  # multiply the rates by processes x accumulation (linear scaling in the global batch)
    # linear: both rates fall linearly to 0 from `decay_start` (a share of the run's steps) to the last step,
    # as SNGAN's reference trainers do; constant keeps them where they start.
    schedule: Literal["constant", "linear"] = "constant"
    decay_start: float = 0.0

    def validate(self) -> None:
        if not 0.0 <= self.decay_start < 1.0:
            raise ConfigError(f"optim.decay_start={self.decay_start}: the share of the steps before the rates "
                              "start to fall, in [0, 1)")
        if self.decay_start and self.schedule == "constant":
            raise ConfigError(f"optim.decay_start={self.decay_start} needs optim.schedule=linear "
                              "(optim.schedule=constant keeps the rates fixed)")
        for key in ("lr_g", "lr_d"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"optim.{key}={value}: must be positive or null")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas}: each must be in [0, 1)")


@dataclass
class CGANConfig(RunConfig):
    """One conditional-GAN run (`train_cgan.py`)."""

    model: CGANModelConfig = field(default_factory=CGANModelConfig)
    loss: GANLossConfig = field(default_factory=GANLossConfig)
    optim: GANOptimConfig = field(default_factory=GANOptimConfig)
    output_dir: str = "runs/cgan"

    def validate(self) -> None:
        super().validate()
        if self.train.compile and self.loss.name == "wgan_gp":
            raise ConfigError("train.compile=true with loss.name=wgan_gp: torch.compile cannot differentiate the "
                              "gradient penalty twice; use train.compile=false or another loss (bce, lsgan, hinge)")
        if self.train.compile and self.model.arch == "resnet":
            raise ConfigError("train.compile=true with model.arch=resnet: the compiled discriminator keeps a spectral-norm "
                              "vector for its backward that its second forward pass (the fakes) updates in place, and "
                              "the first backward fails (seen with torch 2.14); use train.compile=false, or "
                              "model.arch=transposed_conv/upsample_conv")
        if self.train.compile and self.loss.r1_gamma:
            raise ConfigError(f"train.compile=true with loss.r1_gamma={self.loss.r1_gamma}: torch.compile cannot "
                              "differentiate the R1 penalty twice; use train.compile=false or loss.r1_gamma=0")
        if self.train.gradient_accumulation_steps != 1:
            raise ConfigError(
                "train.gradient_accumulation_steps must be 1 for the cGAN: each D and G update uses one batch"
            )
