"""A run's config, checked whole: each section's own rules (kubetune.config), then the task kind's
(TaskKind.check_config: a classifier needs its label field and takes no replay). Every entry point
builds its config here (the CLI, the stages, the run form), so a bad value is refused the same way
everywhere, before any model is loaded.

The split exists because the rules of a task kind belong to the kind, and the kinds (kubetune.tasks)
sit above the config they read; the architecture test checks that nothing else in kubetune builds
a RunConfig from data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from kubetune.config import RunConfig, read_config
from kubetune.overrides import run_name, set_values
from kubetune.tasks import get_task


def checked(cfg: RunConfig) -> RunConfig:
    """cfg after its task kind's rules (its sections have checked themselves); ConfigError names the field."""
    get_task(cfg.task).check_config(cfg)
    return cfg


def from_dict(data: Any) -> RunConfig:
    """A run's config from its dict (a stage's config_json, the run form's result)."""
    return checked(RunConfig.from_dict(data))


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """The embedded defaults, then the YAML file (if any), then --set overrides; checked whole."""
    return checked(read_config(path, overrides))


def named(cfg: RunConfig, name: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """cfg with its MLflow run name: `name` (--run-name), else the config's own, else the model name
    and what the --set overrides changed (None keeps the start time as the name)."""
    if name is not None:
        cfg.tracking.run_name = name
    elif cfg.tracking.run_name is None:
        cfg.tracking.run_name = run_name(cfg.register.model_name, set_values(overrides or []))
    cfg.tracking.validate()
    return cfg
