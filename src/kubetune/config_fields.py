"""How a config field is declared and checked: its help text (which generates the README's config
reference), whether it names a place the run reads or writes, and the checks every section shares.
Apart from kubetune.config so that the sections can live in more than one module."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Optional

from kubetune.errors import ConfigError, redacted

INPUT, OUTPUT = "input", "output"  # what a run does with a place a config value names


def described(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING,
              location: Optional[str] = None):
    """A config field with its help text; `location` marks a value that names a place (a file, a
    folder or a URI) the run reads (INPUT) or writes (OUTPUT)."""
    metadata = {"help": text, **({"location": location} if location else {})}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def require(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(name, value, fix)


def no_credentials(name: str, uri: Optional[str], variables: str, secret: str) -> None:
    """A URI with user:password@ in it would be shown in messages and kept in the run's record."""
    require(not uri or redacted(uri) == uri, name, uri, f"put the credentials in {variables} (on a cluster, "
             f"the {secret} Secret) and give the URI without them")
