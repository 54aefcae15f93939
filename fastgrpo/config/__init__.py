"""Configuration: frozen dataclasses are the only home of defaults.

A run's config is the defaults, then a YAML file (overrides only), then ``key=value`` overrides
from the command line (dotted keys, values parsed as YAML scalars). Unknown keys and wrong types
fail with the key's dotted name and what is allowed, before any model loads.

Layout: schema.py (the dataclasses, CHOICES, ConfigError), loading.py (files, overrides, saved dicts),
checks.py (cross-field validation). This package imports nothing from the rest of fastgrpo.
"""

from fastgrpo.config.checks import validate
from fastgrpo.config.loading import config_from_dict, load_config, parse_override, to_dict
from fastgrpo.config.schema import (CHOICES, LORA_ALL_PROJECTIONS, RENAMED_SECTIONS, Config, ConfigError, DataConfig,
                                    EvalConfig, LogConfig, LoraConfig, LossConfig, ModelConfig, RewardConfig,
                                    RolloutConfig, TrainConfig)

__all__ = ["CHOICES", "LORA_ALL_PROJECTIONS", "RENAMED_SECTIONS", "Config", "ConfigError", "DataConfig", "EvalConfig",
           "LogConfig", "LoraConfig", "LossConfig", "ModelConfig", "RewardConfig", "RolloutConfig", "TrainConfig",
           "config_from_dict", "load_config", "parse_override", "to_dict", "validate"]
