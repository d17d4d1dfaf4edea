"""The project-local state folder: embedded MLflow store, model cache, local storage, service pids."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

STATE_ENV = "KUBETUNE_HOME"


def state_dir() -> Path:
    """KUBETUNE_HOME if set, else ./.kubetune; created on first use."""
    path = Path(os.environ.get(STATE_ENV) or Path.cwd() / ".kubetune").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkout_root() -> Optional[Path]:
    """The source checkout kubetune runs from (an editable install), or None for an installed wheel.
    Default data paths (../shared/data/...) are relative to it, not to the current directory."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "kubetune").is_dir() else None


def cache_dir() -> Path:
    path = state_dir() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path
