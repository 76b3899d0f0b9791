"""The run configuration's schema: one dataclass tree per model family (`CGANConfig`, `DDPMConfig`).

The sections every family shares are `RunConfig`'s (`run_config.py`); each family adds its model, loss and
optimizer sections (`gan_config.py`, `diffusion_config.py`). This module gathers them, and the config API of
`typed_yaml`, under one name: `from pipelines.config import CGANConfig, load_config`.
"""

from .diffusion_config import DDPMConfig, DDPMOptimConfig, DiffusionConfig, UNetConfig  # noqa: F401
from .gan_config import DEFAULT_GAN_LR, CGANConfig, CGANModelConfig, GANLossConfig, GANOptimConfig  # noqa: F401
from .run_config import (  # noqa: F401
    CheckpointConfig, CompileMode, DataConfig, EvalConfig, ExportConfig, LogConfig, MixedPrecision, RunConfig,
    TrainConfig, check_repo_id, load_config,
)
from .typed_yaml import (  # noqa: F401
    ConfigError, check_at_least, check_positive, config_from_dict, expand_output_dir, parse_overrides, renamed,
    save_config, to_dict,
)
