"""Run the compiled pipeline's own function on this machine under kfp.local."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from kubetune.config import RunConfig
from kubetune.paths import STATE_ENV, state_dir

log = logging.getLogger(__name__)


def pin_locations(cfg: RunConfig) -> RunConfig:
    """Make every location absolute and explicit, so that each stage's subprocess (and the MLflow
    params) agree on where things are whatever directory it starts in."""
    from kubetune import tracking

    def absolute(path: str) -> str:
        if path.startswith(("s3://", "package:")) or not Path(path).expanduser().exists():
            return path
        return str(Path(path).expanduser().resolve())

    data = replace(cfg.data, path=absolute(cfg.data.path))
    model = replace(cfg.model, name_or_path=absolute(cfg.model.name_or_path))
    storage_uri = cfg.storage.uri or str(state_dir() / "storage")
    storage = replace(cfg.storage, uri=storage_uri if storage_uri.startswith("s3://") else absolute(storage_uri))
    tracking_cfg = replace(cfg.tracking, mlflow_uri=tracking.resolve_uri(cfg.tracking.mlflow_uri))
    return replace(cfg, data=data, model=model, storage=storage, tracking=tracking_cfg)


def run_pipeline(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Preflight in this process (so bad input fails fast with one message), then the whole DAG
    under kfp.local's SubprocessRunner in this virtualenv. Returns what the run produced."""
    from kubetune.preflight import check

    cfg = pin_locations(cfg)
    check(cfg)

    from kfp import local

    from kubetune.pipelines.pipeline import kubetune_pipeline

    home = state_dir()
    os.environ[STATE_ENV] = str(home)  # the stage subprocesses inherit it
    os.environ["KUBETUNE_PROGRESS"] = "1" if progress else "0"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Resource, accelerator and Kubernetes settings belong to the cluster; kfp.local ignores them.
    warnings.filterwarnings("ignore", message=r"Task '.*': settings .* have no effect in the current local runner")
    warnings.filterwarnings("ignore", message=r".*custom or non-Python base image.*")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(home / "kfp"),
               workspace_root=str(home / "kfp-workspace"), raise_on_error=True)
    started = time.monotonic()
    registered = kubetune_pipeline(config_json=json.dumps(cfg.to_dict())).output
    wall = time.monotonic() - started
    return summarize(cfg, registered, wall)


def summarize(cfg: RunConfig, registered: str, wall_seconds: float) -> dict[str, Any]:
    from kubetune.tracking import client

    mlflow_client = client(cfg.tracking.mlflow_uri)
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
