"""The config file read strictly, `--set section.key=value` overrides, the layering of config data
(defaults, file, overrides), and one dotted key changed in a built config; kept apart so config.py
holds the schema alone.
"""

from __future__ import annotations

import copy
import json
import dataclasses
from pathlib import Path
from typing import Any, Optional

import yaml

from kubetune.errors import ConfigError, redacted

#: More values than a run config holds: YAML aliases (`*name`) nested a few lines deep expand to
#: millions, so a document that expands past this is refused before it is built.
MAX_VALUES = 100_000


def read_yaml(text: str, field: str, value: str, prefix: str = "") -> Any:
    """yaml.safe_load of text, stricter: a key given twice in one mapping is refused (PyYAML keeps
    the last one silently), and so is a document whose aliases expand past MAX_VALUES values.
    field and value name the text in a refusal (--config and the file); prefix is where its keys sit."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        count = _checked(node, prefix, field, value, {})
        if count > MAX_VALUES:
            raise ConfigError(field, value, f"its YAML aliases (*name) expand to {count:,} values, more than the "
                              f"{MAX_VALUES:,} a run config may hold; write the values out instead")
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(field, value, "nested too deeply to read; a run config is a few levels deep") from None
    finally:
        loader.dispose()


def _checked(node: yaml.Node, path: str, field: str, value: str, counted: dict[int, int]) -> int:
    """How many values node expands to (an alias counts as often as it is used; each node is
    walked once, so that costs no more than the file's length), refusing a key given twice."""
    if id(node) in counted:  # an alias of a node walked already, or one inside itself (0 for now)
        return counted[id(node)]
    counted[id(node)] = 0
    count = 1
    if isinstance(node, yaml.SequenceNode):
        count += sum(_checked(item, f"{path}[{i}]", field, value, counted) for i, item in enumerate(node.value))
    elif isinstance(node, yaml.MappingNode):
        seen: dict[Any, yaml.Node] = {}
        for key_node, item in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                name = f"{path}.{key_node.value}" if path else key_node.value
                first = seen.setdefault((key_node.tag, key_node.value), key_node)
                if first is not key_node:
                    where = (f"on lines {first.start_mark.line + 1} and {key_node.start_mark.line + 1} of this file"
                             if field == "--config" else "in this value")
                    raise ConfigError(name, value if field == "--config" else f"{field}={value}", f"the key is "
                                      f"given twice, {where}, and YAML would keep the last silently; keep one")
            else:
                name = path
            count += _checked(item, name, field, value, counted)
    counted[id(node)] = count
    return count


def read_file(path: Path) -> dict[str, Any]:
    """The mapping a config file holds, read with read_yaml; ConfigError naming --config otherwise."""
    try:
        loaded = read_yaml(path.read_text(encoding="utf-8"), "--config", str(path)) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError("--config", str(path), f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}); save the file as UTF-8") from None
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise ConfigError("--config", str(path), f"not valid YAML: {problem}") from None
    if not isinstance(loaded, dict):
        raise ConfigError("--config", str(path), "the file must hold a mapping of sections")
    return loaded


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", item, "write section.key=value, e.g. --set train.max_steps=20")
    try:
        return key.strip().split("."), read_yaml(raw, f"--set {key.strip()}", raw, key.strip()) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {key.strip()}", raw, f"not a valid YAML value ({problem}); quote text that "
                          "holds YAML syntax, e.g. --set 'data.instruction=\"Classify: the review\"'") from None


def set_values(overrides: list[str]) -> dict[str, Any]:
    """What `--set` items change: {section.key: value as read}; the last wins for a key set twice."""
    return {".".join(keys): value for keys, value in map(_parse_override, overrides)}


#: Characters of a run's name (tracking.run_name): MLflow's runs table and legends show about this many.
RUN_NAME_LIMIT = 250


def run_name(model_name: str, changed: dict[str, Any]) -> Optional[str]:
    """A run's name from what it set differently from its config, e.g. `quotes-lora learning_rate=0.003
    r=8` (each key's last part): chart legends then tell runs apart. None when nothing was set."""
    shown = [f"{key.rsplit('.', 1)[-1]}={redacted(json.dumps(value) if isinstance(value, (list, dict)) else str(value))}"
             for key, value in changed.items() if key != "tracking.run_name"]  # a URI's password never names a run
    if not shown:
        return None
    name = " ".join([model_name, *shown])
    return name if len(name) <= RUN_NAME_LIMIT else name[:RUN_NAME_LIMIT - 3] + "..."


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


def locations(section: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, value, INPUT or OUTPUT) for every set value that names a place: a path, a URI or an id."""
    found = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            found.extend(locations(value, name))
        elif value is not None and "location" in f.metadata:
            found.append((name, value, f.metadata["location"]))
    return found
