"""The typed SegProp run configuration (pydantic, YAML, ``--set a.b=c`` overrides)."""

from segprop_ray.config.loading import (
    ConfigError,
    RunConflict,
    apply_overrides,
    config_to_yaml,
    load_config,
    validate_config,
)
from segprop_ray.config.schema import (
    Config,
    DataConfig,
    ExitConfig,
    ResourcesConfig,
    SegPropConfig,
    SnapCheckConfig,
)
from segprop_ray.config.training import TrainingConfig

__all__ = [
    "Config",
    "ConfigError",
    "RunConflict",
    "DataConfig",
    "ExitConfig",
    "ResourcesConfig",
    "SegPropConfig",
    "SnapCheckConfig",
    "TrainingConfig",
    "apply_overrides",
    "config_to_yaml",
    "load_config",
    "validate_config",
]
