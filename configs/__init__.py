"""Typed configuration: dataclass schema (schema.py), loader (loader.py), shipped YAML files."""

from configs.loader import ConfigError, eval_config, load_config, shipped_configs, to_yaml
from configs.schema import (DataConfig, EnvConfig, LearnerConfig, LossConfig, RewardConfig, RolloutConfig,
                            TrainerConfig, WeftConfig)

__all__ = [
    "ConfigError", "eval_config", "load_config", "shipped_configs", "to_yaml",
    "DataConfig", "EnvConfig", "LearnerConfig", "LossConfig", "RewardConfig", "RolloutConfig", "TrainerConfig", "WeftConfig",
]
