"""`--set section.key=value` overrides, the layering of config data (defaults, file, overrides), and
one dotted key changed in a built config; kept apart so config.py holds the schema alone.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import yaml

from kubetune.errors import ConfigError


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", item, "write section.key=value, e.g. --set train.max_steps=20")
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {key.strip()}", raw, f"not a valid YAML value ({problem}); quote text that "
                          "holds YAML syntax, e.g. --set 'data.instruction=\"Classify: the review\"'") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of data with each `section.key=value` set; values are read as YAML (1e-3 is a number)."""
    data = copy.deepcopy(data)
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(keys), item, f"{key} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """base with update laid over it, section by section (a copy)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def with_value(cfg: Any, key: str, value: Any) -> Any:
    """A copy of cfg with one dotted key changed."""
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: with_value(getattr(cfg, head), rest, value)})
