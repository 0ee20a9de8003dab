"""The run config: its schema, loading and overrides, error messages and credential redaction (ground floor).

A run is one YAML file validated by a typed schema (`schema.py`); `load_config(path, overrides)` (`loading.py`)
applies dotted `a.b=value` overrides and raises a `ConfigError` (`errors.py`) that names the key and the valid choices;
what the run directory, W&B and messages show passes through `redaction.py`. `python -m opd_agents.config --markdown`
prints the field reference (docs/config.md). The names below are the package's public interface.
"""
from opd_agents.config.errors import ConfigError
from opd_agents.config.loading import build_config, config_dict, dump_config, load_config, load_yaml, parse_override
from opd_agents.config.paths import ZOO_PREFIX, model_folder
from opd_agents.config.redaction import REDACTED, redact, short_repr
from opd_agents.config.schema import (
    Config,
    EvalConfig,
    FidelityConfig,
    LearnerConfig,
    LoggingConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RayConfig,
    RolloutConfig,
    RunConfig,
    ScheduleConfig,
    TaskConfig,
    TeacherConfig,
)

__all__ = [
    "REDACTED", "ZOO_PREFIX", "Config", "ConfigError", "EvalConfig", "FidelityConfig", "LearnerConfig",
    "LoggingConfig", "LoraConfig", "LossConfig", "ModelConfig", "OptimConfig", "RayConfig", "RolloutConfig",
    "RunConfig", "ScheduleConfig", "TaskConfig", "TeacherConfig", "build_config", "config_dict", "dump_config",
    "load_config", "load_yaml", "model_folder", "parse_override", "redact", "short_repr",
]
