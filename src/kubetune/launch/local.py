"""`kubetune run`: the pipeline's own function on this machine, under kfp.local.

Preflight runs first in this process, so bad input stops here with one message; then every task
runs as a subprocess in this virtualenv, or in its component's image (kubetune.launch.container_runner).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from kubetune import tracking
from kubetune.config import INPUT, RunConfig, locations, with_value
from kubetune.console import PROGRESS_ENV
from kubetune.errors import ConfigError
from kubetune.launch import container_runner
from kubetune.paths import STATE_ENV, state_dir
from kubetune.pipelines.pipeline import kubetune_pipeline
from kubetune.preflight import preflight

log = logging.getLogger(__name__)


RUNNERS = ("process", "container")


def pin_locations(cfg: RunConfig) -> RunConfig:
    """Make every place the config names absolute and explicit, so that each stage (a subprocess or a
    container, started in another directory) and the MLflow params agree on where things are."""
    cfg = with_value(cfg, "storage.uri", cfg.storage.uri or str(state_dir() / "storage"))
    cfg = with_value(cfg, "tracking.mlflow_uri", tracking.resolve_uri(cfg.tracking.mlflow_uri))
    for key, value, kind in locations(cfg):
        if value.startswith("sqlite:///"):  # sqlite:///relative.db would move with the directory
            database = Path(value[len("sqlite:///"):])
            if not database.is_absolute():
                cfg = with_value(cfg, key, f"sqlite:///{database.resolve()}")
            continue
        if "://" in value or value.startswith("package:"):
            continue
        path = Path(value).expanduser()
        if kind == INPUT and not path.exists():
            continue  # a hub id, or a missing file that preflight reports
        cfg = with_value(cfg, key, str(path.resolve()))
    return cfg


def run_pipeline(cfg: RunConfig, progress: bool = True, runner: str = "process") -> dict[str, Any]:
    """Preflight in this process (so bad input fails fast with one message), then the whole DAG
    under kfp.local: each task a subprocess in this virtualenv (runner "process") or a container
    of its component's image (runner "container", kubetune.launch.container_runner). Returns what the run
    produced."""
    if runner not in RUNNERS:
        raise ConfigError("--runner", runner, f"use one of {', '.join(RUNNERS)}")
    cfg = pin_locations(cfg)
    if runner == "container":  # before anything is loaded: containers must be able to run here
        podman, gpu = container_runner.ready()
    preflight(cfg)

    from kfp import local

    home = state_dir()
    os.environ[STATE_ENV] = str(home)  # the stage subprocesses inherit it
    os.environ[PROGRESS_ENV] = "1" if progress else "0"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Resource, accelerator and Kubernetes settings belong to the cluster; kfp.local ignores them.
    warnings.filterwarnings("ignore", message=r"Task '.*': settings .* have no effect in the current local runner")
    warnings.filterwarnings("ignore", message=r".*custom or non-Python base image.*")
    started = time.monotonic()
    if runner == "container":
        registered = container_runner.run(cfg, podman, gpu, home, progress, pipeline_root=home / "kfp",
                                          workspace_root=home / "kfp-workspace")
    else:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(home / "kfp"),
                   workspace_root=str(home / "kfp-workspace"), raise_on_error=True)
        registered = kubetune_pipeline(config_json=json.dumps(cfg.to_dict())).output
    wall = time.monotonic() - started
    return summarize(cfg, registered, wall)


def summarize(cfg: RunConfig, registered: str, wall_seconds: float) -> dict[str, Any]:
    mlflow_client = tracking.client(cfg.tracking.mlflow_uri)
    name, version = registered.split("/")
    model_version = mlflow_client.get_model_version(name, version)
    run = mlflow_client.get_run(model_version.run_id)
    metrics = run.data.metrics
    return {
        "registered": registered,
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": cfg.tracking.mlflow_uri,
        "champion": model_version.aliases and "champion" in model_version.aliases,
        "wall_seconds": round(wall_seconds, 1),
        "stage_seconds": {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith("stage_seconds.")},
        "eval": {k: v for k, v in metrics.items() if k.startswith("eval.")},
        "trainable_line": run.data.tags.get("kubetune.trainable_line", ""),
        "storage": run.data.tags.get("kubetune.storage_run_prefix"),
    }
