"""The sections every run has, whatever its model family: data, training, checkpoints, evaluation, logging,
export (`RunConfig`). A family's config (`gan_config.CGANConfig`, `diffusion_config.DDPMConfig`) adds its model,
loss and optimizer sections. Recipes (the shipped ones by name, see `recipes.py`, or any file) are read with
`load_config` (`typed_yaml`: YAML plus dotted overrides, every key, type and choice checked before any work starts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from . import typed_yaml
from .recipes import recipe_path
from .typed_yaml import ConfigError, check_at_least, check_positive, expand_output_dir


def load_config(cls: type, path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Any:
    """`typed_yaml.load_config` of a YAML file or of a shipped recipe's name (`cgan/demo_cpu`)."""
    return typed_yaml.load_config(cls, None if path is None else recipe_path(path), overrides)


MixedPrecision = Literal["no", "fp16", "bf16"]
# torch.compile's modes. reduce-overhead and max-autotune also capture CUDA graphs (a CUDA device only).
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclass
class DataConfig:
    # imagefolder: data.path holds class sub-folders; hub: any labelled image set on the Hub (data.hub_id)
    name: Literal["fashion_mnist", "cifar10", "synthetic", "imagefolder", "hub"] = "fashion_mnist"
    path: Optional[str] = None  # an IDX folder, a folder of class sub-folders, or a `save_to_disk` dataset
    hub_id: Optional[str] = None  # data.name=hub: a Hub dataset id (OWNER/NAME) or a local folder laid out as one
    hub_config: Optional[str] = None  # the dataset's configuration (subset), where it has several
    revision: Optional[str] = None  # a branch, tag or commit of the Hub dataset; None: main
    image_column: Optional[str] = None  # None: the first of image, img, pixel_values
    label_column: Optional[str] = None  # None: the first of label, labels, fine_label; strings become classes
    image_size: Optional[int] = None  # resize (shorter side) + centre crop to this square, once, at decode time
    channels: Optional[int] = None  # 1: grayscale, 3: RGB; None: RGB if any image is in colour, else grayscale
    split: Literal["train", "test"] = "train"
    classes: Optional[list[int]] = None  # keep only these classes, relabelled 0..k-1 (e.g. [3, 5]: cat and dog)
    pad_to: Optional[int] = None  # e.g. 32: pad Fashion-MNIST 28 -> 32 for U-Nets that halve three times
    hflip: bool = False  # random horizontal flip; right for CIFAR-10, wrong for digits or text
    limit: Optional[int] = None  # use only the first N images (after the class subset): quick runs
    synthetic_size: int = 512  # number of images of the synthetic set
    synthetic_image_size: int = 28
    synthetic_channels: int = 1
    on_device: bool = True  # keep the uint8 images on the accelerator (60k x 28 x 28 is 47 MB)

    def validate(self) -> None:
        if self.name == "imagefolder" and self.path is None:
            raise ConfigError("data.name=imagefolder needs data.path: a folder of class sub-folders "
                              "(PATH/<class>/<images>, or PATH/train/<class>/... and PATH/test/<class>/...)")
        if self.name == "hub" and not self.hub_id:
            raise ConfigError("data.name=hub needs data.hub_id: a Hub dataset id such as OWNER/NAME")
        if self.name == "hub" and self.path is not None:
            raise ConfigError(f"data.path={self.path} with data.name=hub: give one source, data.hub_id for the Hub "
                              "or data.name=imagefolder with data.path for a folder")
        for key in ("hub_id", "hub_config", "revision"):
            if getattr(self, key) is not None and self.name != "hub":
                raise ConfigError(f"data.{key}={getattr(self, key)} is only read with data.name=hub "
                                  f"(data.name is {self.name})")
        if self.classes is not None:
            if not self.classes or len(set(self.classes)) != len(self.classes) or min(self.classes) < 0:
                raise ConfigError(f"data.classes={self.classes}: must be a non-empty list of distinct class ids >= 0")
        if self.pad_to is not None and self.pad_to < 1:
            raise ConfigError(f"data.pad_to={self.pad_to}: must be a positive image size")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"data.image_size={self.image_size}: must be at least 8 (pixels per side)")
        if self.channels is not None and self.channels not in (1, 3):
            raise ConfigError(f"data.channels={self.channels}: valid choices are 1 (grayscale), 3 (RGB) or null")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit={self.limit}: must be positive")
        check_positive(self, "synthetic_size", "data")
        if self.synthetic_channels not in (1, 3):
            raise ConfigError(f"data.synthetic_channels={self.synthetic_channels}: valid choices are 1, 3")
        if self.synthetic_image_size < 8:
            raise ConfigError(f"data.synthetic_image_size={self.synthetic_image_size}: must be at least 8")


@dataclass
class LogConfig:
    # auto: WANDB_MODE if set, online with a W&B login for the configured host, else offline
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: Optional[str] = None  # None: WANDB_PROJECT, else class-conditional-generation
    entity: Optional[str] = None  # None: WANDB_ENTITY, else the login's default entity
    run_name: Optional[str] = None  # default: the output directory's name
    tags: list[str] = field(default_factory=list)
    group: Optional[str] = None  # the dashboard's grouping; a study sets it to the study's name
    artifacts: bool = True  # log the final export and best/ as model artifacts (off for large studies)
    every_steps: int = 50  # scalar logging interval; each log is one host sync
    grid_every_epochs: int = 1  # per-class sample grid interval
    showcase_class: int = 0  # the class of the final many-samples-of-one-class picture

    def validate(self) -> None:
        check_positive(self, "every_steps", "log")
        check_positive(self, "grid_every_epochs", "log")
        check_at_least(self, "showcase_class", "log", 0)  # the upper bound is checked against the data's classes


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = None  # None: at the end of every epoch
    # Also save when this much wall time passed (preemptible jobs); with several processes the
    # save happens at the next log step, where the processes agree on it.
    every_minutes: Optional[float] = None
    keep: int = 3  # keep the newest K checkpoints

    def validate(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise ConfigError(f"checkpoint.every_steps={self.every_steps}: must be positive or null")
        if self.every_minutes is not None and self.every_minutes <= 0:
            raise ConfigError(f"checkpoint.every_minutes={self.every_minutes}: must be positive or null")
        check_positive(self, "keep", "checkpoint")


@dataclass
class EvalConfig:
    """Evaluation during training (offline classifier features), and which export counts as best."""

    every_epochs: Optional[int] = None  # None: no evaluation during training
    num_per_class: int = 100
    batch_size: int = 250  # images sampled at once; a SIGTERM stops the evaluation between batches
    classifier: Optional[str] = None  # None: the classifier shipped in the package for data.name
    metric: Literal["fid", "kid", "accuracy"] = "fid"  # chooses the best/ export; accuracy is maximised
    steps: Optional[int] = None  # diffusion sampling steps; None: diffusion.sample_steps
    guidance: Optional[float] = None  # None: diffusion.sample_guidance
    seed: int = 0
    # Export the pipeline at these epochs to snapshots/epoch_NNN/, so one run yields several training
    # lengths to compare (10/20/30 epochs from one 30-epoch run).
    snapshot_epochs: list[int] = field(default_factory=list)

    def validate(self) -> None:
        if self.every_epochs is not None and self.every_epochs < 1:
            raise ConfigError(f"eval.every_epochs={self.every_epochs}: must be positive or null")
        if any(e < 1 for e in self.snapshot_epochs) or len(set(self.snapshot_epochs)) != len(self.snapshot_epochs):
            raise ConfigError(f"eval.snapshot_epochs={self.snapshot_epochs}: must be distinct positive epochs")
        check_at_least(self, "num_per_class", "eval", 2)
        check_positive(self, "batch_size", "eval")
        if self.steps is not None:
            check_positive(self, "steps", "eval")
        if self.guidance is not None:
            check_at_least(self, "guidance", "eval", 0)
        check_at_least(self, "seed", "eval", 0)


def check_repo_id(repo_id: str) -> None:
    """A `ValueError` that says what a valid repository id is, before any network call."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{repo_id!r} is not a Hub repository id ({err}); write 'name' or 'your-name/name' with "
                         "letters, digits, '-', '_' and '.'") from None


@dataclass
class ExportConfig:
    """Publishing the final export on the Hugging Face Hub when training ends (`python -m pipelines.publish`
    does it later). The token comes from `hf auth login` or `HF_TOKEN`, and is checked before training."""

    push_to_hub: bool = False
    hub_model_id: Optional[str] = None  # "user/name" or "org/name"; a bare "name" goes under the logged-in user
    private: Optional[bool] = None  # None: the Hub's default (public, or the organisation's default)
    hub_revision: Optional[str] = None  # the branch to push to, created when missing; None: main
    push_best: bool = False  # also push best/ (the best evaluated export) to the branch `best_revision`
    best_revision: str = "best"

    def validate(self) -> None:
        if self.hub_model_id is not None:
            try:
                check_repo_id(self.hub_model_id)
            except ValueError as err:
                raise ConfigError(f"export.hub_model_id: {err}") from None
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("export.push_to_hub=true needs export.hub_model_id (e.g. your-name/fashion-mnist-cgan)")
        if self.push_best and not self.push_to_hub:
            raise ConfigError("export.push_best=true needs export.push_to_hub=true")
        if self.push_best and self.best_revision == (self.hub_revision or "main"):
            raise ConfigError(f"export.best_revision={self.best_revision!r} is also the branch of the final export "
                              "(export.hub_revision): choose another branch for best/")


@dataclass
class TrainConfig:
    batch_size: int = 32  # per process; the global batch is batch_size * num_processes
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many optimizer steps (overrides epochs when smaller)
    mixed_precision: MixedPrecision = "no"  # "no" leaves it to the launcher (accelerate launch --mixed_precision)
    gradient_accumulation_steps: int = 1
    ema_decay: Optional[float] = None  # None: no EMA copy of the weights
    # The EMA copy follows the weights exactly for this many steps, then averages (with diffusers' warm-up
    # (1 + t) / (10 + t) up to ema_decay): early, far-off weights never enter the average.
    ema_start_step: int = 0
    max_nonfinite_steps: int = 20  # stop after this many non-finite losses in a row
    # Speed options, applied to the networks in place (checkpoints and exports are the same either way):
    compile: bool = False  # torch.compile the forward passes; pays on GPUs, costs compile time up front
    # With train.compile: reduce-overhead replays each compiled forward and backward as a CUDA graph (one launch
    # for the small models whose steps are launch-bound); elsewhere than CUDA it falls back to default, and says so.
    compile_mode: CompileMode = "default"
    channels_last: bool = False  # NHWC memory format for the conv nets; pays with bf16/fp16 on tensor cores
    # How long a process waits in a collective (the others' evaluation, a checkpoint on a slow filesystem)
    # before the job is failed: torch's default for NCCL is 10 minutes, short for a long evaluation.
    process_group_timeout_minutes: float = 60.0
    # The collectives' backend; null: accelerate's choice (NCCL on GPUs, gloo on CPUs). gloo also runs on GPUs
    # and lets several processes share one (NCCL refuses two ranks on one device): for trying a multi-process
    # run on a one-GPU machine, not for speed.
    process_group_backend: Optional[Literal["nccl", "gloo"]] = None

    def validate(self) -> None:
        for key in ("batch_size", "epochs", "gradient_accumulation_steps", "max_nonfinite_steps",
                    "process_group_timeout_minutes"):
            check_positive(self, key, "train")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps={self.max_steps}: must be positive or null")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay}: must be in (0, 1) or null")
        if self.ema_start_step < 0:
            raise ConfigError(f"train.ema_start_step={self.ema_start_step}: must be >= 0")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"train.compile_mode={self.compile_mode} needs train.compile=true (it is torch.compile's "
                              "mode); set both, or leave compile_mode at default")


@dataclass
class RunConfig:
    """The sections every family's run has; a family's config adds its model, loss and optimizer sections."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    output_dir: str = "runs/run"  # may name config fields: runs/sweep/{loss.name}_emb{model.label_emb_dim}
    seed: int = 0  # the one seed: data order, initial weights, training noise, sampling

    def validate(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed}: must be >= 0 (numpy's seeding refuses negative seeds)")
        late = [e for e in self.eval.snapshot_epochs if e > self.train.epochs]
        if late:
            raise ConfigError(f"eval.snapshot_epochs={self.eval.snapshot_epochs}: {late} lie after the last epoch "
                              f"(train.epochs={self.train.epochs})")
        if self.export.push_best and not self.eval.every_epochs:
            raise ConfigError("export.push_best=true needs eval.every_epochs: best/ is chosen by the evaluation")
        self.output_dir = expand_output_dir(self)


def image_shape_options(model: Any) -> None:
    """`model.channels` and the image size, when given, must describe an image (checked against the data later)."""
    if model.channels is not None and model.channels not in (1, 3):
        raise ConfigError(f"model.channels={model.channels}: valid choices are 1, 3 or null (taken from the data)")
    size_key = "image_size" if hasattr(model, "image_size") else "sample_size"
    size = getattr(model, size_key)
    if size is not None and size < 8:
        raise ConfigError(f"model.{size_key}={size}: must be at least 8 or null (taken from the data)")
