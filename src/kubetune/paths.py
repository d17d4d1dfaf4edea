"""The project-local state folder: embedded MLflow store, model cache, local storage, service pids."""

from __future__ import annotations

import os
from pathlib import Path

STATE_ENV = "KUBETUNE_HOME"


def state_dir() -> Path:
    """KUBETUNE_HOME if set, else ./.kubetune; created on first use."""
    path = Path(os.environ.get(STATE_ENV) or Path.cwd() / ".kubetune").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    path = state_dir() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path
