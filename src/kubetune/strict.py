"""Dataclasses from plain dicts (YAML, JSON), with strict key and type checks.

Every key must be a field; every value must have the field's type (an int is accepted as a float,
one string as a list of strings, and a string that spells a finite number, such as `1e-4`, as a
float: YAML 1.1, which PyYAML reads, takes `1e-4` for a string because it has no dot). A refusal is a
ConfigError naming the key by its full path.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any

from kubetune.errors import ConfigError


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return None if value is None else _convert(inner, value, name)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, name)
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(name, value, f"expected a mapping of {_type_name(value_type)} values")
        return {str(k): _convert(value_type, v, f"{name}.{k}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str) and item_type is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(name, value, f"expected a {_type_name(tp)}")
        return [_convert(item_type, item, f"{name}[{i}]") for i, item in enumerate(value)]
    if tp is float and isinstance(value, str):
        value = _number(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp, True)
    if not ok:
        raise ConfigError(name, value, f"expected {_type_name(tp)}")
    return float(value) if tp is float else value


def _number(text: str) -> Any:
    """The float a string spells (1e-4, -1E+3, .5), or the string itself when it spells none."""
    if not re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", text):
        return text  # not "nan", "inf" or "1_000": those are refused as the string they are
    return float(text)


def build(cls: Any, data: Any, prefix: str) -> Any:
    """An instance of the dataclass cls from a plain dict: unknown keys and values of the wrong
    type are refused with the key's full name (prefix.key)."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(where, data, "expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            name = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}? " if close else ""
            raise ConfigError(name, data[key], f"unknown key; {hint}valid keys here are {', '.join(sorted(known))}")
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _convert(hints[key], value, name)
    return cls(**kwargs)


