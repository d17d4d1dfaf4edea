"""The config reference: every key with its help text and default, read from the config dataclasses,
for `kubetune config` and the table in docs/configuration.md (tests/unit/test_readme.py keeps the two in step)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from kubetune.config import RunConfig


def describe(cls: Any = RunConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(key, help, default) for every config key, for the README and `kubetune config --help`."""
    rows = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        tp = typing.get_type_hints(cls)[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(inner[0]):
            rows.append((name, f.metadata.get("help", ""), None if default is None else "mapping"))
            rows.extend(describe(inner[0], name))
        else:
            rows.append((name, f.metadata.get("help", ""), default))
    return rows


def reference_markdown() -> str:
    """The config reference table that docs/configuration.md embeds (a test keeps the two in step)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, help_text, default in describe():
        if default == "mapping":
            lines.append(f"| **{key}** | | {help_text} |")
        else:
            shown = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
            shown = shown.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"| `{key}` | `{shown}` | {help_text} |")
    return "\n".join(lines)
