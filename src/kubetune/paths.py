"""The project-local state folder: embedded MLflow store, model cache, local storage, service pids."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from kubetune.errors import ConfigError

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


def below_root(path: Path, field: str, value: str) -> Path:
    """path, unless it is the filesystem root (`/`, `file:///`): a store there would write its runs and
    caches among the system's own folders. ConfigError naming `field` (as `value`)."""
    resolved = Path(path).expanduser().resolve()
    if resolved == Path(resolved.anchor):
        raise ConfigError(field, value, "this is the filesystem root: runs would be written among the system's own "
                          "folders; give a folder of its own, e.g. /srv/kubetune or ~/kubetune-storage")
    return path
